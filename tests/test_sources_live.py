"""Episode sources against the real kernel (root): an attached foreign
cgroup, and containers run by crun (a real OCI runtime from Debian) whose
cgroup and annotations name their episode. A known miner name inside is
killed at its exec; the same binary in an unlabelled container, or outside
the attached cgroup, runs untouched; detach releases without killing.

crun runs in a private mount namespace where /sys/fs/cgroup is the cgroup2
mount: on this hybrid host (/sys/fs/cgroup a tmpfs of v1 hierarchies, v2 at
/sys/fs/cgroup/unified with a controller enabled) crun refuses to start
otherwise (docs/episodes.md says why podman is not used here)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from at_testlib import LiveTracer, wait_for

pytestmark = pytest.mark.root


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups")


@pytest.fixture(scope="module")
def parent():
    """The parent cgroup every test here makes its cgroups in (a runtime's
    or a sandbox manager's own tree, outside agent-tracer/)."""
    _need_root()
    from episode_tracer import cgroups

    mount = cgroups.cgroup2_mount()
    ctl = mount / "cgroup.subtree_control"
    enabled = set(ctl.read_text().split())
    p = mount / f"at-test-src-{uuid.uuid4().hex[:8]}"
    p.mkdir()
    try:
        yield p
    finally:
        for dirpath, dirs, _ in os.walk(p, topdown=False):
            for pid in cgroups.procs(Path(dirpath)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_for(lambda: not cgroups.all_procs(p), timeout=10)
        for dirpath, dirs, _ in os.walk(p, topdown=False):
            os.rmdir(dirpath)
        # crun enables every available controller down its cgroup path (here
        # hugetlb at the root): the root's subtree_control as it was
        for c in set(ctl.read_text().split()) - enabled:
            try:
                ctl.write_text(f"-{c}")
            except OSError as e:  # another cgroup below uses it now
                print(f"could not disable {c} at {ctl} again: {e}")


@pytest.fixture(scope="module")
def tracer(parent):
    from episode_tracer.paths import POLICY_DIR

    rules = [{"pattern": rf"^/{parent.name}/crun-(?P<container>[a-z0-9-]+)$"}]
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], monitor=False,
                   containers={"rules": rules, "runtime_sockets": [], "builtin_patterns": False}).start()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    d = tmp_path_factory.mktemp("bins")
    for name in ("xmrig", "data-loader"):  # a known miner name; an innocent one
        shutil.copy("/bin/sleep", d / name)
    return d


def _in_cgroup(cg: Path, argv: list[str]) -> subprocess.Popen:
    """argv started inside cgroup cg (moves itself there, then execs)."""
    return subprocess.Popen(["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh", *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)


# ------------------------------------------------------------------ attach
def test_attached_cgroup_is_an_episode_and_detach_kills_nothing(tracer, parent, bins):
    from episode_tracer.attach_ops import attach_now, detach_now

    cg = parent / f"sandbox-{uuid.uuid4().hex[:6]}"
    cg.mkdir()
    ep = f"t-att-{uuid.uuid4().hex[:8]}"
    rt = tracer.rt
    before = _in_cgroup(cg, [str(bins / "data-loader"), "120"])  # already running at attach
    outside = subprocess.Popen([str(bins / "xmrig"), "2"])  # the same name outside: untouched
    later = None
    try:
        assert wait_for(lambda: before.pid in [int(x) for x in (cg / "cgroup.procs").read_text().split()], 5)
        reply = rt.source_ops.call(lambda: attach_now(rt, ep, cg))
        assert reply["cgroup_path"] == str(cg) and reply["processes"] >= 1
        start = tracer.wait(type="episode_start", episode=ep)
        assert start and start[0]["source"] == "attach" and start[0]["cgroup_path"] == str(cg)
        assert rt.tracker.table.get(before.pid).episode == ep
        # started later, in a sub-cgroup made after the attach: a member, killed at its exec
        sub = cg / "worker"
        sub.mkdir()
        later = _in_cgroup(sub, [str(bins / "xmrig"), "30"])
        assert later.wait(timeout=10) == -signal.SIGKILL
        a = tracer.expect_alert(ep, "miner-by-name")
        assert a["enforced"] is True
        ex = tracer.wait(type="exec", episode=ep, comm="xmrig")
        assert ex and ex[0]["killed_in_kernel"] is True and ex[0]["membership"] == "cgroup"
        assert outside.wait(timeout=10) == 0, "the same name outside the attached cgroup was touched"
        # moved into another sub-cgroup of the attached one (made just before): still
        # inside its episode, not an escape (episode-escape would kill the episode)
        moved = cg / "moved"
        moved.mkdir()
        (moved / "cgroup.procs").write_text(str(before.pid))
        rt.drain()
        assert wait_for(lambda: rt.tracker.cgroups.episode_of(os.stat(moved).st_ino) == ep, 5)
        time.sleep(0.3)  # a wrongly judged escape would have killed it by now; checked below, not timed
        rt.drain()
        assert before.poll() is None and not tracer.find(type="alert", rule="episode-escape", episode=ep)
        assert rt.tracker.table.get(before.pid).episode == ep
        # detach: ends the episode, kills nothing
        got = rt.source_ops.call(lambda: detach_now(rt, ep))
        assert got["released"] >= 1
        end = tracer.wait(type="episode_end", episode=ep)
        assert end and end[0]["reason"] == "detached"
        assert before.poll() is None, "detach killed a process"
        assert rt.tracker.table.get(before.pid).episode is None
        # after detach the miner name is nobody's business in there (default scope: episodes)
        again = _in_cgroup(cg, [str(bins / "xmrig"), "0.1"])
        assert again.wait(timeout=10) == 0
    finally:
        for p in (before, outside, later):
            if p is not None:
                _kill(p)
        wait_for(lambda: not (cg / "cgroup.procs").read_text().split(), 5)
        for d in sorted(cg.glob("*/"), reverse=True):
            if d.is_dir():
                d.rmdir()
        cg.rmdir()
        tracer.wait(type="episode_end", episode=ep)


def test_attach_by_pid_on_the_control_socket_then_kill_acts_on_that_cgroup(tracer, parent, bins, tmp_path):
    from episode_tracer.api import EpisodeError, attach_episode
    from episode_tracer.control import ControlServer
    from episode_tracer.episode_ops import EpisodeOpError, apply_episode_command

    rt = tracer.rt
    sock = tmp_path / "control.sock"

    def handle(cmd, args):
        try:
            return apply_episode_command(rt, _NoState(), cmd, args)
        except EpisodeOpError as e:
            return {"ok": False, "error": str(e)}

    cg = parent / f"sandbox-{uuid.uuid4().hex[:6]}"
    cg.mkdir()
    ep = f"t-att-{uuid.uuid4().hex[:8]}"
    p = _in_cgroup(cg, [str(bins / "data-loader"), "120"])
    server = ControlServer(sock, lambda: {}, handle).start()
    try:
        assert wait_for(lambda: str(p.pid) in (cg / "cgroup.procs").read_text().split(), 5)
        reply = attach_episode(ep, pid=p.pid, control_socket=sock)
        assert reply["ok"] and reply["cgroup_path"] == str(cg)
        # the same cgroup again, and a cgroup that is not one: clear errors
        with pytest.raises(EpisodeError, match="already episode"):
            attach_episode(f"{ep}-b", cgroup=str(cg), control_socket=sock)
        with pytest.raises(EpisodeError, match="no cgroup"):
            attach_episode(f"{ep}-c", cgroup=str(parent / "not-there"), control_socket=sock)
        with pytest.raises(EpisodeError, match="no process"):
            attach_episode(f"{ep}-d", pid=2 ** 22 + 7, control_socket=sock)
        r = handle("kill", {"id": ep})
        assert r["ok"], r
        assert p.wait(timeout=10) == -signal.SIGKILL
        # the cgroup gone ends the episode (its cgroup_rmdir record)
        wait_for(lambda: not (cg / "cgroup.procs").read_text().split(), 5)
        cg.rmdir()
        end = tracer.wait(type="episode_end", episode=ep, timeout=10)
        assert end and end[0]["reason"] == "removed"
    finally:
        server.close()
        _kill(p)
        if cg.exists():
            wait_for(lambda: not (cg / "cgroup.procs").read_text().split(), 5)
            cg.rmdir()


class _NoState:
    def set_episode_state(self, ep, state):
        pass


# -------------------------------------------------------------- containers
@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    """A minimal rootfs: the host's /usr bind-mounted read-only (in config.json)."""
    if shutil.which("crun") is None or shutil.which("unshare") is None:
        pytest.skip("needs crun (apt install crun) and unshare")
    r = tmp_path_factory.mktemp("rootfs")
    for d in ("usr", "proc", "sys", "dev", "tmp", "etc", "opt", "run"):
        (r / d).mkdir()
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/" + link).is_symlink() or Path(f"/usr/{link}").is_dir():
            os.symlink(f"usr/{link}", r / link)
    return r


def _bundle(tmp: Path, rootfs: Path, bins: Path, cgroup_path: str, argv: list[str],
            annotations: dict[str, str]) -> Path:
    b = tmp / f"bundle-{uuid.uuid4().hex[:6]}"
    b.mkdir()
    subprocess.run(["crun", "spec"], cwd=b, check=True, capture_output=True)
    spec = json.loads((b / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["process"]["args"] = argv
    spec["process"]["terminal"] = False
    spec["process"].pop("rlimits", None)  # no CAP_SYS_RESOURCE on this VM
    spec["mounts"] += [{"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
                       {"destination": "/opt", "type": "bind", "source": str(bins), "options": ["rbind", "ro"]}]
    spec["linux"]["cgroupsPath"] = cgroup_path
    spec["linux"].pop("resources", None)  # a device filter needs RLIMIT_MEMLOCK raised: not here
    spec["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(spec))
    return b


def _crun(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """crun in a mount namespace where /sys/fs/cgroup is the cgroup2 mount."""
    from episode_tracer import cgroups

    import tempfile

    inner = f"mount --bind {cgroups.cgroup2_mount()} /sys/fs/cgroup && exec crun \"$@\""
    # files, not pipes: a created container's init keeps its stdio open
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner, "sh", *args],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout).returncode
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, rc, out.read(), err.read())


@pytest.fixture
def containers():
    made: list[str] = []
    yield made
    for cid in made:
        _crun("delete", "-f", cid)


def test_labelled_container_is_an_episode_and_its_miner_is_killed(tracer, parent, rootfs, bins, tmp_path,
                                                                   containers):
    cid = f"at-{uuid.uuid4().hex[:10]}"
    ep = f"t-ctr-{uuid.uuid4().hex[:8]}"
    cgp = f"/{parent.name}/crun-{cid}"
    b = _bundle(tmp_path, rootfs, bins, cgp, ["/opt/xmrig", "30"], {"agent-tracer.episode": ep,
                                                                    "io.kubernetes.cri.image-name": "img:1"})
    containers.append(cid)
    r = _crun("create", "-b", str(b), cid)
    assert r.returncode == 0, r.stderr
    # created: its cgroup exists, crun's state names the bundle; the tracer
    # made it episode `ep` from the annotation before anything runs there
    start = tracer.wait(type="episode_start", episode=ep, timeout=10)
    assert start, [x for x in tracer.records if x["type"] == "episode_start"]
    s = start[0]
    assert s["source"] == "container" and s["cgroup_path"].endswith(cgp)
    assert s["container"] == {"id": cid, "name": None, "image": "img:1"} and s["rule"] == "rules[0]"
    r = _crun("start", cid)
    assert r.returncode == 0, r.stderr
    a = tracer.expect_alert(ep, "miner-by-name", timeout=10)
    assert a["enforced"] is True and a["container"]["id"] == cid
    ex = tracer.wait(type="exec", episode=ep, comm="xmrig")
    assert ex and ex[0]["killed_in_kernel"] is True and ex[0]["container"]["id"] == cid
    assert wait_for(lambda: '"stopped"' in _crun("state", cid).stdout, 10)
    assert _crun("delete", cid).returncode == 0
    end = tracer.wait(type="episode_end", episode=ep, timeout=10)
    assert end and end[0]["reason"] == "removed"


def test_unlabelled_container_is_not_touched(tracer, parent, rootfs, bins, tmp_path, containers):
    cid = f"at-{uuid.uuid4().hex[:10]}"
    cgp = f"/{parent.name}/crun-{cid}"
    b = _bundle(tmp_path, rootfs, bins, cgp, ["/opt/xmrig", "0.2"], {"other": "x"})
    containers.append(cid)
    n = len(tracer.find(type="episode_start"))
    r = _crun("run", "-b", str(b), cid)
    assert r.returncode == 0, f"the unlabelled container was touched: rc {r.returncode} {r.stderr}"
    tracer.rt.drain()
    assert not [x for x in tracer.find(type="episode_start")[n:] if (x.get("cgroup_path") or "").endswith(cgp)]
    assert tracer.rt.tracker.containers.unlabelled >= 1
