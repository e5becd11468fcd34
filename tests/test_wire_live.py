"""First bytes on the wire, live: the kernel captures the first write on each
new outbound TCP connection of an episode process, user space identifies it
(`protocol` records) and the wire rules act on it. Servers run in a network
namespace (an "outside" host); clients are python scripts under innocent
names, so nothing here depends on a binary's name."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from at_testlib import run_in_episode, wait_for
from tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable
PACKS = [POLICY_DIR / "base.toml", POLICY_DIR / "miners.toml", POLICY_DIR / "wire.toml"]

# accepts one connection, optionally sends a greeting, prints the hex of all
# it received once the peer is gone (or after `idle` seconds of silence)
SERVER = r"""
import socket, sys
addr, port, greet, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(4); s.settimeout(20)
print("up", flush=True)
c, _ = s.accept(); c.settimeout(idle)
if greet: c.sendall(greet.replace(b"\\r\\n", b"\r\n"))
got = b""
while True:
    try:
        b = c.recv(65536)
    except (socket.timeout, ConnectionResetError):
        break
    if not b:
        break
    got += b
print(got.hex(), flush=True)
"""

# connect, write the first payload with the syscall asked for, read the
# server's greeting (if any), write a second payload, exit 0
CLIENT = r"""
import os, socket, sys, time
addr, port, how, first, second = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
first = first.encode().replace(b"\\r\\n", b"\r\n"); second = second.encode()
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.settimeout(5)
s.connect((addr, port))
if how == "write": os.write(s.fileno(), first)
elif how == "send": s.send(first)
elif how == "sendmsg": s.sendmsg([first])
elif how == "writev": os.writev(s.fileno(), [first])
if second:
    s.recv(100)
    s.sendall(second)
time.sleep(0.2)
s.close()
"""

TLS_CLIENT = r"""
import socket, ssl, sys
addr, port = sys.argv[1], int(sys.argv[2])
name = open(sys.argv[3]).read().strip()  # not in argv: exec rules see pool names there
ctx = ssl.create_default_context()
s = socket.create_connection((addr, port), timeout=5)
try:
    ctx.wrap_socket(s, server_hostname=name)
except (ssl.SSLError, OSError):
    sys.exit(3)
"""


class NsServer:
    def __init__(self, netns, addr, port, greet="", idle=3.0):
        self.p = subprocess.Popen(netns["exec"] + [PY, "-S", "-c", SERVER, addr, str(port), greet, str(idle)],
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "up"

    def received(self) -> bytes:
        out = self.p.stdout.readline().strip()
        self.p.wait(timeout=10)
        return bytes.fromhex(out)

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def servers():
    made = []

    def make(*a, **kw):
        s = NsServer(*a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def innocent(tmp_path, code: str, name: str = "innocent") -> list[str]:
    f = tmp_path / f"{name}.py"
    f.write_text(code)
    return [PY, "-S", str(f)]


def name_file(tmp_path, name: str) -> str:
    f = tmp_path / f"name-{uuid.uuid4().hex[:6]}"
    f.write_text(name)
    return str(f)


def port() -> int:
    return 20000 + int(uuid.uuid4().hex[:4], 16) % 20000


@pytest.fixture
def tracer(live_tracer):
    return live_tracer(policy=True, policy_dirs=PACKS, monitor=False).start()


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_ssh_banner_on_a_random_port_is_killed_before_kex(tracer, episode_id, netns, servers, tmp_path, v6):
    addr, p = (netns["addr6"] if v6 else netns["addr"]), port()
    banner = "SSH-2.0-OpenSSH_9.2p1\\r\\n"
    srv = servers(netns, addr, p, greet="SSH-2.0-OpenSSH_9.2p1 Debian\\r\\n")
    res = run_in_episode(episode_id, innocent(tmp_path, CLIENT) + [addr, str(p), "send", banner, "KEXINIT-NEXT"])
    assert res.signal == signal.SIGKILL, res.summary()
    # the peer got the banner and nothing after it
    assert srv.received() == b"SSH-2.0-OpenSSH_9.2p1\r\n"
    rec = tracer.wait(type="protocol", episode=episode_id)
    assert rec, "no protocol record"
    r = rec[0]
    assert (r["protocol"], r["addr"], r["port"], r["family"]) == ("ssh", addr, p, "inet6" if v6 else "inet")
    assert r["matched_bytes"] == "SSH-2.0-OpenSSH_9.2p1\\r\\n" and r["held"] is True and r["call"] == "sendto"
    a = tracer.wait(type="alert", rule="ssh-on-the-wire")
    assert a and a[0]["enforced"] is True and a[0]["action"] == "kill" and a[0]["episode"] == episode_id
    assert a[0]["matched_bytes"] == r["matched_bytes"] and a[0]["port"] == p


@pytest.mark.parametrize("how", ["write", "send", "sendmsg", "writev"])
def test_every_write_syscall_is_captured(tracer, episode_id, netns, servers, tmp_path, how):
    p = port()
    token = uuid.uuid4().hex[:8]
    srv = servers(netns, netns["addr"], p)
    req = f"GET /{token} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"
    res = run_in_episode(episode_id, innocent(tmp_path, CLIENT) + [netns["addr"], str(p), how, req, ""])
    assert res.exit_code == 0, res.summary()
    assert srv.received() == f"GET /{token} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    rec = tracer.wait(type="protocol", episode=episode_id)
    assert rec and rec[0]["protocol"] == "http" and token in rec[0]["matched_bytes"]
    assert rec[0]["call"] == {"send": "sendto"}.get(how, how) and rec[0]["held"] is False
    assert len(rec) == 1, "one record per connection (the first write only)"
    assert not tracer.find(type="alert", episode=episode_id)


def test_stratum_on_443_kills_the_episode(tracer, episode_id, netns, servers, tmp_path):
    srv = servers(netns, netns["addr"], 443, greet='{"id":1,"result":[[],"ab",4],"error":null}\\n')
    sub = '{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\\n'
    argv = innocent(tmp_path, CLIENT, "train_helper") + [netns["addr"], "443", "write", sub.replace("\\n", ""),
                                                         '{"id":2,"method":"mining.authorize"}']
    res = run_in_episode(episode_id, argv)
    assert res.signal == signal.SIGKILL, res.summary()  # (killed_by_policy reads verdict files: none here)
    assert b"mining.authorize" not in srv.received()
    r = tracer.wait(type="protocol", episode=episode_id)[0]
    assert r["protocol"] == "stratum" and "mining.subscribe" in r["matched_bytes"] and r["port"] == 443
    a = tracer.wait(type="alert", rule="stratum-on-the-wire")
    assert a and a[0]["action"] == "kill-episode" and a[0]["enforced"] is True


def test_tls_sni_is_recorded_and_pool_names_killed(tracer, episode_id, netns, servers, tmp_path):
    p = port()
    srv = servers(netns, netns["addr"], p, idle=1.0)
    res = run_in_episode(episode_id, innocent(tmp_path, TLS_CLIENT) + [netns["addr"], str(p), name_file(tmp_path, "data.example.org")])
    assert res.exit_code == 3, res.summary()  # held, judged, continued: the handshake went on and failed
    assert srv.received()[:1] == b"\x16"
    r = tracer.wait(type="protocol", episode=episode_id)[0]
    assert (r["protocol"], r["sni"], r["held"]) == ("tls", "data.example.org", True)
    assert not tracer.find(type="alert", episode=episode_id)

    ep2 = f"{episode_id}p"
    try:
        p2 = port()
        servers(netns, netns["addr"], p2, idle=1.0)
        res = run_in_episode(ep2, innocent(tmp_path, TLS_CLIENT) + [netns["addr"], str(p2), name_file(tmp_path, "xmr-eu1.nanopool.org")])
        assert res.signal == signal.SIGKILL, res.summary()
        r = tracer.wait(type="protocol", sni="xmr-eu1.nanopool.org")
        assert r, [(x["type"], x.get("episode"), x.get("protocol")) for x in tracer.records if x["type"] in ("protocol", "alert")]
        r = r[0]
        assert (r["protocol"], r["sni"]) == ("tls", "xmr-eu1.nanopool.org")
        assert r["matched_bytes"] == "xmr-eu1.nanopool.org"
        a = tracer.wait(type="alert", rule="mining-pool-sni")
        assert [x["rule"] for x in tracer.find(type="alert", episode=ep2)] == ["mining-pool-sni"]
        assert a and a[0]["enforced"] is True and a[0]["sni"] == "xmr-eu1.nanopool.org"
    finally:
        from tracer import cgroups
        cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep2)


def test_outside_episodes_nothing_is_captured(tracer, netns, servers, tmp_path):
    p = port()
    srv = servers(netns, netns["addr"], p, greet="SSH-2.0-x\\r\\n")
    proc = subprocess.run(innocent(tmp_path, CLIENT) + [netns["addr"], str(p), "write", "SSH-2.0-mine\\r\\n", "MORE"],
                          timeout=20)
    assert proc.returncode == 0
    assert srv.received() == b"SSH-2.0-mine\r\nMORE"
    tracer.rt.drain()
    assert not tracer.find(type="protocol")


def test_monitor_mode_does_not_hold_or_kill(live_tracer, episode_id, netns, servers, tmp_path):
    t = live_tracer(policy=True, policy_dirs=PACKS, monitor=True).start()
    p = port()
    srv = servers(netns, netns["addr"], p, greet="SSH-2.0-x\\r\\n")
    res = run_in_episode(episode_id, innocent(tmp_path, CLIENT) + [netns["addr"], str(p), "write",
                                                                    "SSH-2.0-mine\\r\\n", "MORE"])
    assert res.exit_code == 0, res.summary()
    assert srv.received() == b"SSH-2.0-mine\r\nMORE"
    r = t.wait(type="protocol", episode=episode_id)[0]
    assert r["protocol"] == "ssh" and r["held"] is False
    a = t.wait(type="alert", rule="ssh-on-the-wire")
    assert a and a[0]["enforced"] is False and a[0]["would"] == "kill"
