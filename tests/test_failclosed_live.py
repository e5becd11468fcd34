"""Fail closed under load (root): no exec or connect of an episode goes
unjudged because the tracer is flooded or busy.

* A flood: one episode floods (a socket() loop: one record per call) under
  a small per-episode rate limit; while it floods, another episode and the
  flooding one attempt a gated exec (a miner argv) and a denied connect
  (a job-API port on loopback with a real listener). Both are held/denied
  and judged (alerts name the rules, the miner never ran, the listener got
  nothing), and the flood's loss is counted and reported for its episode
  only (`lost` records of kind episode_rate, the rate_dropped counter).
* User space busy: the loop does not drain at all; a gated exec is found in
  the kernel's `gated` map, judged from /proc (killed), and its late record
  is recognised and not judged twice.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from at_testlib import LiveTracer, run_in_episode, wait_for
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable

FLOOD = r"""
import socket, sys, time
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    for _ in range(1000):
        socket.socket().close()
    n += 1000
open(sys.argv[2], "w").write(str(n))
"""

CLIENT = r"""
import errno, socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", int(sys.argv[2])))
    r = "ok"
except OSError as e:
    r = errno.errorcode.get(e.errno, str(e.errno))
open(sys.argv[1], "w").write(r)
"""

PORT = 8265  # node-control-port (policies/services.toml): denied in the kernel for episodes


class Listener:
    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            c.close()

    def close(self):
        self._stop = True
        self.t.join(timeout=5)
        self.sock.close()


def _worker(d: Path) -> Path:
    w = d / "worker"
    w.write_text(f"#!/bin/sh\ntouch {d}/mined-$1\n")
    w.chmod(0o755)
    return w


@pytest.fixture
def listener():
    try:
        lst = Listener(PORT)
    except OSError as e:
        pytest.skip(f"loopback port {PORT} is in use here: {e}")
    yield lst
    lst.close()


def test_flood_one_episode_others_and_itself_still_judged(live_tracer, listener, tmp_path, episode_id,
                                                          second_episode_id):
    t = live_tracer(policy=True, policy_dirs=[POLICY_DIR], monitor=False,
                    episode_rate=5000, episode_burst=5000).start()
    w = _worker(tmp_path)
    (tmp_path / "flood.py").write_text(FLOOD)
    (tmp_path / "client.py").write_text(CLIENT)
    flooder = tmp_path / "a.sh"
    flooder.write_text(
        f"{PY} -S {tmp_path}/flood.py 8 {tmp_path}/flood-count &\n"
        f"{PY} -S -c 'import time; time.sleep(1)'\n"   # attempts made while the flood runs
        f"{PY} -S {tmp_path}/client.py {tmp_path}/conn-a {PORT}\n"
        f"{w} a --donate-level 1\n"
        "wait\n")
    other = tmp_path / "b.sh"
    other.write_text(
        f"{PY} -S {tmp_path}/client.py {tmp_path}/conn-b {PORT}\n"
        f"{w} b --donate-level 1\n")
    results = {}

    def run(ep, script, key):
        results[key] = run_in_episode(ep, ["/bin/sh", str(script)], timeout=120)

    ta = threading.Thread(target=run, args=(episode_id, flooder, "a"))
    ta.start()
    # the other episode starts once the flood is under way (its records are being dropped)
    assert wait_for(lambda: t.rt.probes.counters()["rate_dropped"] > 0, 60), t.rt.probes.counters()
    tb = threading.Thread(target=run, args=(second_episode_id, other, "b"))
    tb.start()
    ta.join(150)
    tb.join(150)
    assert not ta.is_alive() and not tb.is_alive()
    # the miner never ran in either episode; both were judged (kill-episode)
    assert not (tmp_path / "mined-a").exists() and not (tmp_path / "mined-b").exists()
    for ep in (episode_id, second_episode_id):
        a = t.expect_alert(ep, "miner-by-argv", timeout=20)
        assert a["enforced"] and a["action"] == "kill-episode", a
    # the denied connects: refused in the kernel, judged, the listener saw nothing
    assert (tmp_path / "conn-b").read_text() == "EPERM"
    if (tmp_path / "conn-a").exists():  # the flooding episode may have been killed before it got there
        assert (tmp_path / "conn-a").read_text() == "EPERM"
        t.expect_alert(episode_id, "node-control-port", timeout=20)
    t.expect_alert(second_episode_id, "node-control-port", timeout=20)
    assert listener.accepted == 0
    # the flood's loss is counted and reported, for the flooding episode only
    lost = t.wait(type="lost", episode=episode_id, kind="episode_rate", timeout=20)
    assert lost and sum(r["count"] for r in lost) > 0, t.find(type="lost")
    assert not t.find(type="lost", episode=second_episode_id, kind="episode_rate")
    stats = t.wait(type="stats", timeout=10, counters=lambda c: bool(c) and c.get("rate_dropped", 0) > 0)
    assert stats, t.find(type="stats")[-1:]


def test_busy_user_space_gated_exec_judged_from_proc(live_tracer, tmp_path, episode_id):
    """The loop does not drain: the gated exec's record sits in the ring
    buffer. The held process is found in `gated`, judged from /proc and
    killed; the record, drained later, is not judged again."""
    t = live_tracer(policy=True, policy_dirs=[POLICY_DIR], monitor=False).start(loop=False)
    w = _worker(tmp_path)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("r", run_in_episode(
        episode_id, [str(w), "c", "--donate-level", "1"], timeout=60)))
    th.start()
    probes, eng = t.rt.probes, t.rt.pipeline.engine
    pid = wait_for(lambda: next(iter(p for p in probes.gated() if p not in eng.canary_pids), None), 30)
    assert pid, "the exec was not gated"
    now = time.monotonic()
    assert eng.poll_gates(now) == []  # first sight
    out = eng.poll_gates(now + eng.proc_judge.grace_s + 0.01)
    assert out == []  # judged, not timed out
    th.join(60)
    assert box["r"].killed_by_policy or box["r"].signal == 9, box["r"]
    assert not (tmp_path / "mined-c").exists()
    alerts = t.find(type="alert", episode=episode_id, rule="miner-by-argv")
    assert len(alerts) == 1 and alerts[0]["enforced"], alerts
    assert t.find(type="exec", pid=pid, judged_from_proc=True)
    assert eng.proc_judge.judged == 1
    # the late kernel record arrives now: recorded, not judged twice
    t.rt.drain()
    assert wait_for(lambda: t.find(type="exec", pid=pid, judged_from_proc=None), 5)
    assert len(t.find(type="alert", episode=episode_id, rule="miner-by-argv")) == 1


class Collector:
    """A loopback TCP listener that keeps every byte it receives (the
    "pool": the test asserts the Stratum login never reached it)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.data = b""
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        conns = []
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                c.setblocking(False)
                conns.append(c)
            except OSError:
                pass
            for c in conns:
                try:
                    self.data += c.recv(65536)
                except OSError:
                    pass
        for c in conns:
            c.close()

    def close(self):
        self._stop = True
        self.t.join(timeout=5)
        self.sock.close()


# connects first, then (once the flood is under way) speaks Stratum on the
# connection it already had: the wire record must not be lost to the flood
EARLY_STRATUM = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
time.sleep(float(sys.argv[2]))
s.sendall(b'{"id": 1, "method": "mining.subscribe", "params": ["Mozilla/5.0"]}\n')
time.sleep(3)
"""

UNIX_CLIENT = r"""
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[2])
    r = "ok"
except OSError as e:
    r = errno.errorcode.get(e.errno, str(e.errno))
open(sys.argv[1], "w").write(r)
"""


def test_flood_every_class_still_held(live_tracer, listener, tmp_path, episode_id):
    """One episode floods (over its rate limit); while it floods, it and
    fresh episodes try each attack class: a gated miner exec, a denied
    connect, a node-service unix socket (by its path and by a relative
    spelling, which goes through the unix gate), Stratum on a new flow, and
    Stratum on a flow the flooder opened before the flood. Every one is
    held or denied and judged; the pool gets no Stratum byte; loss is
    counted for the flooder only."""
    import uuid

    from episode_tracer import cgroups

    sockdir = Path(f"/tmp/at-flood-{uuid.uuid4().hex[:8]}")
    sockdir.mkdir()
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(str(sockdir / "engine.sock"))
    engine.listen(16)
    engine.settimeout(0.2)
    site = tmp_path / "90-site.toml"
    site.write_text('[[override]]\nlist = "container_engine_sockets"\n'
                    f'append = ["{sockdir}/engine.sock"]\n')
    pool = Collector()
    eps = [f"{episode_id}-{k}" for k in ("exec", "conn", "unix", "unixrel", "wire")]
    t = None
    try:
        t = live_tracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False,
                        episode_rate=5000, episode_burst=5000).start()
        w = _worker(tmp_path)
        for name, text in (("flood.py", FLOOD), ("client.py", CLIENT), ("early.py", EARLY_STRATUM),
                           ("unix.py", UNIX_CLIENT)):
            (tmp_path / name).write_text(text)
        flooder = tmp_path / "a.sh"
        flooder.write_text(
            f"{PY} -S {tmp_path}/early.py {pool.port} 4 &\n"
            f"{PY} -S {tmp_path}/flood.py 10 {tmp_path}/flood-count &\n"
            "wait\n")
        scripts = {
            eps[0]: f"{w} b --donate-level 1\n",
            eps[1]: f"{PY} -S {tmp_path}/client.py {tmp_path}/conn {PORT}\n",
            eps[2]: f"{PY} -S {tmp_path}/unix.py {tmp_path}/unix {sockdir}/engine.sock\n",
            eps[3]: f"cd {sockdir} && {PY} -S {tmp_path}/unix.py {tmp_path}/unixrel engine.sock\n",
            eps[4]: (f"{PY} -S -c \"import socket; s=socket.create_connection(('127.0.0.1', {pool.port}), 5); "
                     "s.sendall(b'{\\\"id\\\": 2, \\\"method\\\": \\\"mining.authorize\\\", \\\"params\\\": "
                     "[\\\"w\\\", \\\"x\\\"]}\\n'); import time; time.sleep(3)\"\n"),
        }
        results = {}

        def run(ep, text):
            sh = tmp_path / f"{ep}.sh"
            sh.write_text(text)
            results[ep] = run_in_episode(ep, ["/bin/sh", str(sh)], timeout=120)

        ta = threading.Thread(target=run, args=(episode_id, flooder.read_text()))
        ta.start()
        assert wait_for(lambda: t.rt.probes.counters()["rate_dropped"] > 0, 60), t.rt.probes.counters()
        others = [threading.Thread(target=run, args=(ep, scripts[ep])) for ep in eps]
        for th in others:
            th.start()
        for th in [ta, *others]:
            th.join(150)
            assert not th.is_alive()
        # every class judged, in every episode, while the flood ran
        assert not (tmp_path / "mined-b").exists()
        assert t.expect_alert(eps[0], "miner-by-argv", timeout=20)["enforced"]
        assert (tmp_path / "conn").read_text() == "EPERM"
        t.expect_alert(eps[1], "node-control-port", timeout=20)
        assert listener.accepted == 0
        assert (tmp_path / "unix").read_text() == "ECONNREFUSED"
        assert (tmp_path / "unixrel").read_text() == "ECONNREFUSED"
        for ep in eps[2:4]:
            t.expect_alert(ep, "container-engine-socket", timeout=20)
        assert [g["verdict"] for g in t.find(type="unix_gate", episode=eps[3])] == ["denied"]
        for ep in (eps[4], episode_id):
            a = t.expect_alert(ep, "stratum-on-the-wire", timeout=20)
            assert a["enforced"], a
        assert b"mining" not in pool.data, pool.data[:200]
        # the loss is the flooder's alone
        lost = t.wait(type="lost", episode=episode_id, kind="episode_rate", timeout=20)
        assert lost and sum(r["count"] for r in lost) > 0
        for ep in eps:
            assert not t.find(type="lost", episode=ep, kind="episode_rate"), ep
    finally:
        pool.close()
        engine.close()
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)
        for ep in eps:
            cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep)
