"""Membership an episode cannot leave, and exec decisions whatever the
syscall entry (root): real processes in real episodes against the default
packs, a Stratum pool in a network namespace as the outside host.

* a member moving itself (or being moved by another member) into a cgroup
  outside its episode stays a member: `episode-escape` kills the episode,
  and with that rule excepted its miner is still refused in the kernel;
* an execve through the 32-bit `int 0x80` entry (no syscalls:* tracepoint)
  is killed by name in the kernel, or gated with argv read from /proc;
* execveat / fexecve of a renamed miner: the same decisions;
* an exec from a memfd: `fileless-exec`;
* a thread that outlives its thread-group leader is still tracked;
* the same actions outside every episode are untouched.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from at_testlib import LiveTracer, run_in_episode, wait_for
from nethost import NetHost

pytestmark = pytest.mark.root
PY = sys.executable
DATA = Path(__file__).parent / "data" / "membership"
NOESC = "t-noesc-"  # episodes the site file below excepts from episode-escape

SITE = f"""
# the escape is still tracked in the kernel, only the kill-episode is
# excepted for these test episodes: what the escaped process does next is
# judged like any episode process
[[override]]
rule = "episode-escape"
append_except = [ {{ episode = {{ glob = "{NOESC}*" }} }} ]
"""


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups/netns")
    with NetHost(tmp_path_factory.mktemp("pool")) as h:
        h.start_pool(ports=(3333,))
        yield h


@pytest.fixture(scope="module")
def tracer(ext, tmp_path_factory):
    from episode_tracer.paths import POLICY_DIR

    site = tmp_path_factory.mktemp("site")
    (site / "90-site.toml").write_text(SITE)
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False).start()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the 32-bit-entry and leader-exit helpers")
    d = tmp_path_factory.mktemp("bins")
    subprocess.run(["gcc", "-static", "-no-pie", "-O1", "-o", str(d / "exec32"), str(DATA / "exec32.c")],
                   check=True, capture_output=True)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "leader_exit"), str(DATA / "leader_exit.c")],
                   check=True, capture_output=True)
    for name in ("xmrig", "data-loader"):  # a known miner name; an innocent one
        shutil.copy("/bin/sleep", d / name)
    return d


@pytest.fixture
def outside_cgroup():
    """A cgroup outside the episode root, removed after the test."""
    from episode_tracer import cgroups

    cg = cgroups.cgroup2_mount() / f"at-test-out-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        yield cg
    finally:
        for pid in cgroups.procs(cg):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not cgroups.procs(cg), timeout=10)
        cg.rmdir()


@pytest.fixture
def noesc_episode():
    ep = f"{NOESC}{uuid.uuid4().hex[:8]}"
    yield ep
    from episode_tracer import cgroups

    try:
        cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep)
    except Exception:
        pass


def connects(ext, port=3333):
    return [e for e in ext.pool_events() if e.get("event") == "connect" and e.get("port") == port]


def no_new_connects(ext, before, for_s=0.5):
    """The pool saw no new connect for for_s seconds (polled)."""
    return not wait_for(lambda: len(connects(ext)) > before, timeout=for_s)


ESCAPE_SELF = """
import os, sys
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


# ------------------------------------------------------------------ escape
def test_escape_by_itself_kills_the_episode(tracer, ext, outside_cgroup, episode_id, tmp_path):
    """Root inside the episode writes its own pid into another cgroup's
    cgroup.procs, then starts a miner: episode-escape (kill-episode) stops
    it, and the pool never hears from it."""
    miner = ext.miner_script("data-loader")
    before = len(connects(ext))
    res = run_in_episode(episode_id, [PY, "-c", ESCAPE_SELF, str(outside_cgroup), str(miner), ext.addr, "3333"],
                         timeout=30)
    a = tracer.expect_alert(episode_id, "episode-escape", timeout=10)
    assert a["action"] == "kill-episode" and a["enforced"] is True
    esc = tracer.wait(type="escape", episode=episode_id)
    assert esc and esc[0]["membership"] == "escaped" and esc[0]["outside"] is True
    assert esc[0]["dst_path"].endswith(outside_cgroup.name)
    assert res.signal == signal.SIGKILL, res
    assert no_new_connects(ext, before), "the escaped miner reached the pool"


def test_escape_by_another_member_kills_the_moved_process(tracer, outside_cgroup, episode_id, tmp_path):
    """A member moves its child out of the episode; the child (outside the
    episode cgroup, so cgroup.kill cannot reach it) dies with the episode."""
    pidfile = tmp_path / "child.pid"
    script = (f"sleep 300 & echo $! > {pidfile}; echo $! > {outside_cgroup}/cgroup.procs; wait")
    res = run_in_episode(episode_id, ["/bin/sh", "-c", script], timeout=60)
    a = tracer.expect_alert(episode_id, "episode-escape", timeout=10)
    assert a["enforced"] is True
    child = int(pidfile.read_text())
    # the kernel's record of the move (a user-space "cgroup-change" record of
    # the same process may come first when a later record of it is seen outside)
    esc = tracer.wait(type="escape", episode=episode_id, via="cgroup.procs")
    assert esc and esc[0]["pid"] == child and esc[0]["by_other"] is True
    assert wait_for(lambda: not Path(f"/proc/{child}").exists() or _state(child) == "Z", timeout=10), \
        "the moved child outlived its episode"
    assert res.signal == signal.SIGKILL or res.killed_by_policy


def test_escaped_process_is_still_the_episodes(tracer, ext, outside_cgroup, noesc_episode):
    """With the kill-episode excepted: after the escape, the miner's connect
    to the pool port is refused in the kernel and attributed to the episode."""
    miner = ext.miner_script("data-loader")
    before = len(connects(ext))
    res = run_in_episode(noesc_episode, [PY, "-c", ESCAPE_SELF, str(outside_cgroup), str(miner), ext.addr, "3333"],
                         timeout=30)
    esc = tracer.wait(type="escape", episode=noesc_episode)
    assert esc, "no escape record"
    a = tracer.expect_alert(noesc_episode, "mining-pool-port", timeout=10)
    assert a["enforced"] is True and a["port"] == 3333
    assert not tracer.find(type="alert", episode=noesc_episode, rule="episode-escape")
    execs = tracer.find(type="exec", episode=noesc_episode, exe=lambda e: e and "python" in e)
    assert any(r["membership"] == "escaped" for r in execs), [(r["exe"], r["membership"]) for r in execs]
    assert res.exit_code not in (0, None)
    assert no_new_connects(ext, before), "a packet of the escaped miner reached the pool"


def test_moving_outside_episodes_is_untouched(tracer, outside_cgroup):
    """A process outside every episode moving between cgroups: no record."""
    from episode_tracer import cgroups

    p = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {outside_cgroup}/cgroup.procs; exit 7"])
    assert p.wait(timeout=20) == 7
    cg0 = cgroups.cgroup2_mount()
    subprocess.run(["/bin/sh", "-c", f"echo $$ > {outside_cgroup}/cgroup.procs; echo $$ > {cg0}/cgroup.procs"],
                   check=True, timeout=20)
    tracer.rt.drain()
    assert not tracer.find(type="escape", pid=p.pid)
    assert not tracer.find(type="alert", rule="episode-escape", episode=None)


# ------------------------------------------------------- exec, every entry
def test_32bit_execve_of_a_miner_name_is_killed_in_kernel(tracer, bins, episode_id):
    res = run_in_episode(episode_id, [str(bins / "exec32"), str(bins / "xmrig"), "xmrig", "30"], timeout=30)
    assert res.signal == signal.SIGKILL
    a = tracer.expect_alert(episode_id, "miner-by-name")
    assert a["enforced"] is True
    ex = tracer.wait(type="exec", episode=episode_id, comm="xmrig")
    assert ex and ex[0]["killed_in_kernel"] is True


def test_32bit_execve_of_a_renamed_miner_is_gated_and_judged_by_argv(tracer, bins, episode_id, tmp_path):
    """No syscall-entry record: the gate holds the new image, argv comes
    from /proc of the stopped task, miner-by-argv kills the episode."""
    argv = ["data-loader", "30", "-o", "stratum+tcp://10.0.0.9:3333", "-u", "wallet"]
    argfile = tmp_path / "argv"
    argfile.write_text("\n".join(argv) + "\n")
    res = run_in_episode(episode_id, [str(bins / "exec32"), str(bins / "data-loader"), f"@{argfile}"], timeout=30)
    a = tracer.expect_alert(episode_id, "miner-by-argv")
    assert a["enforced"] is True and a["argv"] == argv
    ex = [r for r in tracer.find(type="exec", episode=episode_id) if r.get("comm") == "data-loader"]
    assert ex and ex[0]["gated"] is True and ex[0]["argv_source"] == "proc", ex
    assert res.signal == signal.SIGKILL
    assert tracer.rt.probes.counters()["exec_no_argv"] >= 1


def test_32bit_execve_outside_episodes_runs(tracer, bins):
    out = subprocess.run([str(bins / "exec32"), "/bin/echo", "echo", "thirty-two"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0 and out.stdout.strip() == "thirty-two"


FEXECVE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.execve(fd, sys.argv[2:], {})   # fexecve: execveat(fd, "", AT_EMPTY_PATH)
"""


FEXECVE_ARGFILE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
with open(sys.argv[2]) as f:
    argv = f.read().splitlines()
os.execve(fd, argv, {})
"""


def test_fexecve_of_a_miner_name_is_killed(tracer, bins, episode_id):
    res = run_in_episode(episode_id, [PY, "-c", FEXECVE, str(bins / "xmrig"), "xmrig", "30"], timeout=30)
    assert res.signal == signal.SIGKILL
    a = tracer.expect_alert(episode_id, "miner-by-name")
    assert a["enforced"] is True


def test_fexecve_of_a_renamed_miner_is_judged_by_argv(tracer, bins, episode_id, tmp_path):
    argv = ["data-loader", "30", "--donate-level", "1"]
    argfile = tmp_path / "argv"
    argfile.write_text("\n".join(argv) + "\n")
    res = run_in_episode(episode_id, [PY, "-c", FEXECVE_ARGFILE, str(bins / "data-loader"), str(argfile)], timeout=30)
    a = tracer.expect_alert(episode_id, "miner-by-argv")
    assert a["enforced"] is True and a["argv"] == argv
    assert res.signal == signal.SIGKILL


def test_fexecve_of_a_file_on_disk_is_not_fileless(tracer, episode_id):
    res = run_in_episode(episode_id, [PY, "-c", FEXECVE, "/bin/true", "true"], timeout=30)
    assert res.exit_code == 0, res.alerts
    tracer.rt.drain()
    ex = wait_for(lambda: [r for r in tracer.find(type="exec", episode=episode_id) if r.get("exe") == "/usr/bin/true"
                           or r.get("exe") == "/bin/true"], timeout=5)
    assert ex and ex[0]["fileless"] is False
    assert not tracer.find(type="alert", episode=episode_id, rule="fileless-exec")


MEMFD_EXEC = """
import os, sys
fd = os.memfd_create("payload", 0)
with open("/bin/true", "rb") as f:
    os.write(fd, f.read())
os.execv(f"/proc/self/fd/{fd}", ["payload"])
"""


def test_memfd_exec_in_episode_is_killed(tracer, episode_id):
    res = run_in_episode(episode_id, [PY, "-c", MEMFD_EXEC], timeout=30)
    a = tracer.expect_alert(episode_id, "fileless-exec")
    assert a["enforced"] is True and a["exe"].startswith("/memfd:payload")
    assert res.signal == signal.SIGKILL


def test_memfd_exec_outside_episodes_runs(tracer):
    assert subprocess.run([PY, "-c", MEMFD_EXEC], timeout=20).returncode == 0


# ------------------------------------------------------------ leader exit
def test_thread_outliving_its_leader_is_still_tracked(tracer, ext, bins):
    """An env-marker member (outside any cgroup: only the kernel's tracking
    holds it in scope) whose leader leaves early: the remaining thread's
    connect to the pool port is still refused."""
    ep = f"t-env-{uuid.uuid4().hex[:8]}"
    before = len(connects(ext))
    p = subprocess.run([str(bins / "leader_exit"), ext.addr, "3333"], env={"AGENT_EPISODE_ID": ep},
                       capture_output=True, text=True, timeout=60)
    assert "leader gone 1" in p.stdout, p.stdout
    assert p.returncode == 3, f"connect was not refused: {p.stdout}"
    a = tracer.expect_alert(ep, "mining-pool-port")
    assert a["enforced"] is True
    assert no_new_connects(ext, before)


def test_thread_outliving_its_leader_outside_episodes_connects(tracer, ext, bins):
    before = len(connects(ext))
    p = subprocess.run([str(bins / "leader_exit"), ext.addr, "3333"], env={}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout
    assert wait_for(lambda: len(connects(ext)) > before, timeout=5)


def _state(pid: int) -> str | None:
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return s[s.rfind(")") + 2]
