"""The kernel side for real: BPF programs loaded into this kernel, real
processes in real episodes, exact events asserted."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from at_testlib import run_in_episode, wait_for

pytestmark = pytest.mark.root
PY = sys.executable


class Listener:
    """A TCP listener on loopback that counts accepted connections."""

    def __init__(self, host="127.0.0.1", family=socket.AF_INET, keep=False):
        self.keep = keep
        self.conns = []
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.keep:
                self.conns.append(c)
            else:
                c.close()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_known_workload_exact_events(live_tracer, episode_id, netns, tmp_path):
    lo = Listener()
    srv = subprocess.Popen(netns["exec"] + [PY, "-S", "-c",
        "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('{netns['addr']}',7001));s.listen(8);print('up',flush=True)\n"
        "for _ in range(2):\n c,_=s.accept();c.close()\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "up"
        t = live_tracer().start()
        script = tmp_path / "wl.sh"
        script.write_text(
            "for i in 1 2 3 4 5 6 7; do /bin/true wl-$i; done\n"
            f"{PY} -S -c \"import socket\n"
            f"for _ in range(3): socket.create_connection(('127.0.0.1', {lo.port})).close()\n"
            f"for _ in range(2): socket.create_connection(('{netns['addr']}', 7001)).close()\"\n")
        res = run_in_episode(episode_id, ["/bin/sh", str(script)])
        assert res.exit_code == 0
        execs = t.wait(n=7, type="exec", argv=lambda a: bool(a) and a[0] == "/bin/true")
        assert sorted(r["argv"][1] for r in execs) == [f"wl-{i}" for i in range(1, 8)]
        for r in execs:
            assert r["episode"] == episode_id and r["membership"] == "cgroup"
            assert r["exe"] in ("/bin/true", "/usr/bin/true") and r["argv_truncated"] is False
            assert r["uid"] == 0 and isinstance(r["cgroup"], int) and r["ppid"]
        conns = t.wait(n=5, type="connect", episode=episode_id, family="inet")
        assert len(conns) == 5
        assert sorted((c["addr"], c["port"], c["result"]) for c in conns) == sorted(
            [("127.0.0.1", lo.port, 0)] * 3 + [(netns["addr"], 7001, 0)] * 2)
        assert lo.accepted == 3
        assert t.wait(type="episode_start", episode=episode_id)
        srv.wait(timeout=5)
    finally:
        lo.close()
        srv.kill()


def test_outside_episode_is_silent_in_default_scope(live_tracer, episode_id):
    t = live_tracer().start()
    marker = f"outside-{uuid.uuid4().hex[:6]}"
    subprocess.run(["/bin/true", marker], check=True)
    run_in_episode(episode_id, ["/bin/true", "inside"])
    assert t.wait(type="exec", argv=["/bin/true", "inside"])
    assert not t.find(argv=lambda a: bool(a) and marker in a)
    assert all(r.get("episode") for r in t.find(type="exec"))


def test_all_scope_traces_everything(live_tracer):
    t = live_tracer(scope_all=True).start()
    marker = f"all-{uuid.uuid4().hex[:6]}"
    subprocess.run(["/bin/true", marker], check=True)
    recs = t.wait(type="exec", argv=["/bin/true", marker])
    assert recs and recs[0]["episode"] is None


def test_double_fork_setsid_daemon_stays_in_episode(live_tracer, episode_id):
    t = live_tracer().start()
    # the daemon double-forks, calls setsid, is reparented to init and
    # outlives the command that started it
    res = run_in_episode(episode_id, ["/bin/sh", "-c",
        "setsid /bin/sh -c '(sleep 0.3; /bin/true daemonized) &' & sleep 0.05"], keep_stragglers=True)
    assert res.exit_code == 0
    recs = t.wait(timeout=5, type="exec", argv=["/bin/true", "daemonized"])
    assert recs and recs[0]["episode"] == episode_id


def test_env_marker_and_lineage_without_cgroup(live_tracer):
    t = live_tracer().start()
    ep = f"env-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, AGENT_EPISODE_ID=ep)
    # the child drops the marker from its environment and double-forks:
    # it stays in the episode by lineage
    subprocess.run(["/bin/sh", "-c",
                    "/bin/true marked; env -u AGENT_EPISODE_ID /bin/sh -c '(setsid /bin/true lineage &) ; sleep 0.1'"],
                   env=env, check=True)
    marked = t.wait(type="exec", argv=["/bin/true", "marked"])
    assert marked and marked[0]["episode"] == ep and marked[0]["membership"] == "env"
    lin = t.wait(type="exec", argv=["/bin/true", "lineage"])
    assert lin and lin[0]["episode"] == ep and lin[0]["membership"] == "lineage"
    start = t.find(type="episode_start", episode=ep)
    assert start and start[0]["source"] == "env"
    assert t.wait(type="episode_end", episode=ep)


def test_restart_mid_episode_recognises_running_episodes(live_tracer, episode_id, tmp_path):
    go = tmp_path / "go"
    env_ep = f"env-{uuid.uuid4().hex[:6]}"
    t1 = live_tracer().start()
    th = threading.Thread(target=run_in_episode, args=(episode_id, ["/bin/sh", "-c",
        f"while [ ! -e {go} ]; do sleep 0.05; done; /bin/true after-restart"]), daemon=True)
    th.start()
    envp = subprocess.Popen(["/bin/sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; /bin/true env-after"],
                            env=dict(os.environ, AGENT_EPISODE_ID=env_ep))
    try:
        assert t1.wait(type="episode_start", episode=episode_id)
        t1.stop()
        t2 = live_tracer().start()
        starts = {r["episode"]: r for r in t2.find(type="episode_start")}
        assert starts[episode_id]["source"] == "preexisting"
        assert starts[env_ep]["source"] == "preexisting"
        go.write_text("1")
        th.join(timeout=10)
        envp.wait(timeout=10)
        a = t2.wait(type="exec", argv=["/bin/true", "after-restart"])
        assert a and a[0]["episode"] == episode_id
        b = t2.wait(type="exec", argv=["/bin/true", "env-after"])
        assert b and b[0]["episode"] == env_ep
    finally:
        go.write_text("1")
        envp.kill()


def test_ring_buffer_loss_is_counted_never_silent(live_tracer, episode_id):
    # a one-page ring buffer that nobody drains while the episode floods it
    t = live_tracer(ringbuf_pages=1).start(loop=False)
    run_in_episode(episode_id, ["/bin/sh", "-c", "for i in $(seq 200); do /bin/true flood; done"])
    t.rt.drain()
    t.rt.tick()
    lost = t.find(type="lost")
    assert lost, "the flood must produce lost records"
    by_kind = {r["kind"]: r for r in lost}
    assert by_kind["exec"]["count"] > 0 and by_kind["exec"]["total"] >= by_kind["exec"]["count"]
    seen = len(t.find(type="exec", argv=["/bin/true", "flood"]))
    # what was seen and what was counted lost account for the whole flood
    assert seen + by_kind["exec"]["total"] >= 200
    assert t.rt.lost_total() == sum(r["count"] for r in lost)


def test_preexisting_connection_is_reported(live_tracer, episode_id, tmp_path):
    lo = Listener(keep=True)
    go = tmp_path / "go"
    th = threading.Thread(target=run_in_episode, args=(episode_id, [PY, "-S", "-c",
        f"import socket,os,time\ns=socket.create_connection(('127.0.0.1',{lo.port}))\n"
        f"while not os.path.exists('{go}'): time.sleep(0.05)\n"]), daemon=True)
    th.start()
    try:
        assert wait_for(lambda: lo.accepted == 1)
        t = live_tracer().start()
        recs = t.find(type="connect", preexisting=True, episode=episode_id)
        assert recs and recs[0]["addr"] == "127.0.0.1" and recs[0]["port"] == lo.port
    finally:
        go.write_text("1")
        th.join(timeout=10)
        lo.close()


def test_bind_listen_socket_memfd_events(live_tracer, episode_id):
    t = live_tracer().start()
    code = ("import socket,os\ns=socket.socket();s.bind(('127.0.0.1',0));s.listen(3)\n"
            "u=socket.socket(socket.AF_UNIX);\ntry: u.connect('/nonexistent-at.sock')\nexcept OSError: pass\n"
            "os.memfd_create('at-memfd')\nimport time; time.sleep(0.5)\n")
    run_in_episode(episode_id, [PY, "-S", "-c", code])
    lis = t.wait(type="listen", episode=episode_id)
    assert lis and lis[0]["addr"] == "127.0.0.1" and lis[0]["port"] and lis[0]["backlog"] == 3 and lis[0]["result"] == 0
    b = t.find(type="bind", episode=episode_id)
    assert b and b[0]["port"] == 0 and b[0]["addr"] == "127.0.0.1"  # as the process asked
    u = t.wait(type="connect", family="unix", episode=episode_id)
    assert u and u[0]["path"] == "/nonexistent-at.sock" and u[0]["result"] == -2
    m = t.wait(type="memfd", episode=episode_id)
    assert m and m[0]["name"] == "at-memfd" and m[0]["result"] >= 0
    socks = t.find(type="socket", episode=episode_id)
    assert {(s["family"], s["sock_type"]) for s in socks} >= {("inet", "stream"), ("unix", "stream")}


def test_argv_truncation_is_marked(live_tracer, episode_id):
    t = live_tracer().start()
    long_args = [f"arg{i:02d}-" + "x" * 60 for i in range(40)]
    run_in_episode(episode_id, ["/bin/true", *long_args])
    r = t.wait(type="exec", episode=episode_id, argv=lambda a: bool(a) and a[0] == "/bin/true")
    assert r and r[0]["argv_truncated"] is True
    assert r[0]["argv"][1:] == long_args[: len(r[0]["argv"]) - 1]


def test_exit_code_and_signal(live_tracer, episode_id):
    t = live_tracer().start()
    run_in_episode(episode_id, ["/bin/sh", "-c", "exit 7"])
    e = t.wait(type="exit", episode=episode_id, code=7)
    assert e
    ep2 = episode_id + "-b"
    try:
        run_in_episode(ep2, ["/bin/sh", "-c", "kill -TERM $$"])
        s = t.wait(type="exit", episode=ep2, signal=signal.SIGTERM)
        assert s and s[0]["code"] is None
    finally:
        from episode_tracer import cgroups
        cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep2)


def test_close_detaches_everything(live_tracer):
    def ours():
        out = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
        return sum(out.count(n) for n in ("at_connect4", "at_sendmsg6", "sched_process_e"))

    before = ours()
    t = live_tracer().start()
    assert ours() > before
    t.stop()
    assert ours() == before


def test_episode_named_by_cgroup_mkdir_before_its_cgroup_is_gone(live_tracer, episode_id, tmp_path):
    """A process killed in the kernel at its first exec, in an episode cgroup
    removed before user space reads anything: the cgroup_mkdir record named
    the episode first, so the exec and its alert still carry the episode
    (a directory scan alone would find nothing)."""
    name = f"atk{uuid.uuid4().hex[:8]}"
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "k.toml").write_text(
        f'[[rule]]\nname = "kill-by-name"\nseverity = "high"\non = "exec"\naction = "kill"\n'
        f'match = {{ basename = "{name}" }}\n')
    exe = tmp_path / name
    exe.write_bytes(open("/bin/true", "rb").read())
    exe.chmod(0o755)
    t = live_tracer(policy=True, policy_dirs=[pol], monitor=False).start(loop=False)  # nothing is read yet
    res = run_in_episode(episode_id, [str(exe)])
    assert res.signal == signal.SIGKILL
    from episode_tracer import cgroups

    assert not (cgroups.cgroup2_mount() / "agent-tracer" / episode_id).exists()
    t.rt.drain()
    starts = t.find(type="episode_start", episode=episode_id)
    assert starts and starts[0]["source"] == "cgroup"
    ex = t.find(type="exec", pid=lambda p: p is not None, filename=str(exe))
    assert ex and ex[0]["episode"] == episode_id and ex[0]["killed_in_kernel"] is True
    a = t.find(type="alert", rule="kill-by-name")
    assert a and a[0]["episode"] == episode_id and a[0]["enforced"] is True
