"""The reverse-tunnel shape live (root): a small Python relay in an episode
connects out to a listener in a network namespace (the "outside") and to a
local TCP listener the test runs on 127.0.0.1 outside the episode, and
shuttles bytes between them; the tracer (default packs, short relay
interval and min age) emits the `relay` record and the
reverse-tunnel-shape alert for that episode. A process of another episode
holding only an outbound connection gets no relay record."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from at_testlib import run_in_episode, wait_for

pytestmark = pytest.mark.root
PY = sys.executable

SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print("ready", flush=True)
held = []  # keep every connection open (a dropped one would end its relay)
while True:
    c, _ = s.accept()
    held.append(c)
    c.sendall(b"from-outside\n")
"""

# argv: out_addr out_port [local_port] stop_file
RELAY = r"""
import os, select, socket, sys, time
out = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
legs = [out]
if sys.argv[3] != "-":
    loc = socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=5)
    legs.append(loc)
deadline = time.time() + 30
while time.time() < deadline and not os.path.exists(sys.argv[4]):
    r, _, _ = select.select(legs, [], [], 0.2)
    for s in r:
        data = s.recv(65536)
        if not data:
            sys.exit(0)
        for o in legs:
            if o is not s:
                o.sendall(data)
"""


@pytest.fixture
def outside(netns):
    port = 9811
    p = subprocess.Popen(netns["exec"] + [PY, "-S", "-c", SERVER, netns["addr"], str(port)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield netns["addr"], port
    finally:
        p.kill()
        p.wait()


def test_relay_shape_live(live_tracer, episode_id, second_episode_id, outside, tmp_path):
    from episode_tracer.paths import POLICY_DIR

    t = live_tracer(policy=True, policy_dirs=[POLICY_DIR], relay_interval=0.3, relay_min_age=1.0).start()
    local = socket.socket()
    local.bind(("127.0.0.1", 0))
    local.listen(1)
    local.settimeout(10)
    stop = tmp_path / "stop"
    addr, port = outside
    script = tmp_path / "relay.py"  # a script file: `python -c` with sockets is the socket-oneliner rule
    script.write_text(RELAY)
    results = {}

    def run(ep, argv):
        results[ep] = run_in_episode(ep, argv, timeout=40)

    threads = [threading.Thread(target=run, args=(episode_id, [PY, "-S", str(script), addr, str(port),
                                                               str(local.getsockname()[1]), str(stop)])),
               threading.Thread(target=run, args=(second_episode_id, [PY, "-S", str(script), addr, str(port),
                                                                   "-", str(stop)]))]
    conn = None
    try:
        for th in threads:
            th.start()
        try:
            conn, _ = local.accept()
        except TimeoutError:
            pytest.fail(f"the relay never reached the local listener; results {results}, "
                        f"alerts {[(a['rule'], a['episode']) for a in t.find(type='alert')]}, "
                        f"connects {[(c['addr'], c['port'], c['result']) for c in t.find(type='connect', episode=episode_id)]}")
        conn.settimeout(10)
        assert conn.recv(100) == b"from-outside\n"  # the relay shuttles outside -> local listener
        recs = t.wait(type="relay", episode=episode_id, timeout=15)
        assert recs, f"no relay record; relay records: {t.find(type='relay')}"
        r = recs[0]
        assert (r["family"], r["addr"], r["port"]) == ("inet", addr, port)
        assert (r["local_addr"], r["local_port"]) == ("127.0.0.1", local.getsockname()[1])
        assert r["same_process"] is True and r["age_s"] >= 1.0
        assert r["exe"] and r["exe"].startswith("/") and "python" in r["exe"]
        assert r["argv"][:2] == [PY, "-S"] and r["pid"] in r["pids"]
        assert r["listener_pid"] is not None and r["listener_exe"] and "python" in r["listener_exe"]
        a = t.expect_alert(episode_id, "reverse-tunnel-shape")
        assert a["event"] == "relay" and a["action"] == "alert" and a["pid"] == r["pid"]
        assert a["addr"] == addr and a["port"] == port
        assert (a["local_port"], a["listener_exe"]) == (r["local_port"], r["listener_exe"])
        # the outbound-only process of the other episode was scanned (it has been
        # up longer than min age by now) and has no relay record
        assert wait_for(lambda: t.rt.relay.scans >= 3 and t.find(type="connect", episode=second_episode_id), 5)
        assert t.find(type="relay", episode=second_episode_id) == []
        assert len(t.find(type="relay", episode=episode_id)) == 1  # once per outbound connection
    finally:
        stop.write_text("")
        for th in threads:
            th.join(timeout=20)
        if conn is not None:
            conn.close()
        local.close()
    assert all(res.exit_code == 0 for res in results.values()), results
