"""Wire inspection in the packet path, live: the cgroup_skb egress program
accumulates the first bytes of each new outbound TCP flow of an episode by
socket cookie, whatever call wrote them; user space judges each complete
message; while undecided the payload does not leave (dropped in the kernel,
TCP sends it again), a denied flow stays dropped and the rule's action runs.

Servers run in a network namespace (an "outside" host) and print everything
they received; clients are scripts under innocent names, so nothing here
depends on a binary's name. Each attack asserts that the peer NEVER got the
application message."""
from __future__ import annotations

import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from at_testlib import run_in_episode, wait_for
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable
PACKS = [POLICY_DIR / "base.toml", POLICY_DIR / "miners.toml", POLICY_DIR / "wire.toml"]
HERE = Path(__file__).resolve().parent

# accepts one connection, optionally sends a greeting, prints the hex of all
# it received once the peer is gone (or after `idle` seconds of silence)
SERVER = r"""
import socket, sys
addr, port, greet, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(4); s.settimeout(30)
print("up", flush=True)
got = b""
try:
    c, _ = s.accept(); c.settimeout(idle)
    if greet: c.sendall(greet.replace(b"\\r\\n", b"\r\n").replace(b"\\n", b"\n"))
    while True:
        try:
            b = c.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not b:
            break
        got += b
except socket.timeout:
    pass
print(got.hex(), flush=True)
"""

# connect, write `first` by the means asked for, then (optionally) read the
# greeting and write `second`; exit 0. Bytes are given as hex.
CLIENT = r"""
import ctypes, os, socket, sys, tempfile, time
def arg(a):
    return open(a[1:], "rb").read() if a.startswith("@") else bytes.fromhex(a)
addr, port, how, first, second = sys.argv[1], int(sys.argv[2]), sys.argv[3], arg(sys.argv[4]), arg(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.settimeout(8)
if how == "tfo":
    s.setsockopt(socket.IPPROTO_TCP, 30, 1)  # TCP_FASTOPEN_CONNECT: the data rides in the SYN
    s.setsockopt(socket.IPPROTO_TCP, 34, 1)  # TCP_FASTOPEN_NO_COOKIE: without a cookie from the server first
s.connect((addr, port))
fd = s.fileno()
if how == "write": os.write(fd, first)
elif how == "send": s.send(first)
elif how == "sendall": s.sendall(first)
elif how == "sendmsg": s.sendmsg([first[:7], first[7:]])
elif how == "writev": os.writev(fd, [first[:5], first[5:]])
elif how == "dup":
    s.send(b"")  # a zero-length write first, then the bytes through a dup of the fd
    d = os.dup(fd); os.write(d, first)
elif how == "empty-first":
    os.write(fd, b""); s.sendall(first)
elif how == "trickle":
    for i in range(0, len(first), 3):
        s.send(first[i:i + 3]); time.sleep(0.01)
elif how == "sendfile":
    with tempfile.TemporaryFile() as f:
        f.write(first); f.flush(); os.sendfile(fd, f.fileno(), 0, len(first))
elif how == "splice":
    r, w = os.pipe(); os.write(w, first); os.splice(r, fd, len(first))
elif how == "sendmmsg":
    class iovec(ctypes.Structure): _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    class msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint), ("iov", ctypes.POINTER(iovec)),
                    ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]
    class mmsghdr(ctypes.Structure): _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
    buf = ctypes.create_string_buffer(first, len(first))
    iov = iovec(ctypes.cast(buf, ctypes.c_void_p), len(first))
    mm = mmsghdr(msghdr(None, 0, ctypes.pointer(iov), 1, None, 0, 0), 0)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.sendmmsg(fd, ctypes.byref(mm), 1, 0) == 1, ctypes.get_errno()
elif how == "tfo":
    s.send(first)
elif how == "uring":  # io_uring IORING_OP_SEND, raw syscalls (no liburing)
    import mmap, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = ctypes.create_string_buffer(120)
    ufd = libc.syscall(425, 4, params)  # io_uring_setup
    assert ufd >= 0, ctypes.get_errno()
    sq_entries, cq_entries = struct.unpack_from("<II", params, 0)
    sq = struct.unpack_from("<IIIIIII", params, 40)  # head tail mask entries flags dropped array
    cq = struct.unpack_from("<IIIIII", params, 80)   # head tail mask entries overflow cqes
    size = max(sq[6] + sq_entries * 4, cq[5] + cq_entries * 16)
    ring = mmap.mmap(ufd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
    sqes = mmap.mmap(ufd, sq_entries * 64, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0x10000000)
    buf = ctypes.create_string_buffer(first, len(first))
    sqes[0:64] = struct.pack("<BBHiQQIIQ", 26, 0, 0, fd, 0, ctypes.addressof(buf), len(first), 0, 7).ljust(64, b"\0")
    tail = struct.unpack_from("<I", ring, sq[1])[0]
    struct.pack_into("<I", ring, sq[6] + (tail & sq[2]) * 4, 0)
    struct.pack_into("<I", ring, sq[1], tail + 1)
    assert libc.syscall(426, ufd, 1, 1, 1, None, 0) == 1, ctypes.get_errno()  # io_uring_enter, GETEVENTS
    head = struct.unpack_from("<I", ring, cq[0])[0]
    user, res = struct.unpack_from("<Qi", ring, cq[5] + (head & cq[2]) * 16)
    assert user == 7 and res == len(first), res
if second:
    s.recv(100)
    s.sendall(second)
time.sleep(0.3)
s.close()
"""

TLS_CLIENT = r"""
import socket, ssl, sys
addr, port = sys.argv[1], int(sys.argv[2])
name = open(sys.argv[3]).read().strip()  # not in argv: exec rules see pool names there
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["h2", "http/1.1"])
s = socket.create_connection((addr, port), timeout=8)
try:
    ctx.wrap_socket(s, server_hostname=name)
except (ssl.SSLError, OSError):
    sys.exit(3)
"""

# the episode connects, hands the connected socket to a helper outside the
# episode over a unix socket (SCM_RIGHTS) and exits; the helper writes
FDPASS_SENDER = r"""
import socket, sys
addr, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((addr, port), timeout=8)
u = socket.socket(socket.AF_UNIX); u.connect(path)
socket.send_fds(u, [b"x"], [s.fileno()])
u.recv(1)
"""
FDPASS_RECEIVER = r"""
import os, socket, sys, time
path, data = sys.argv[1], bytes.fromhex(sys.argv[2])
l = socket.socket(socket.AF_UNIX); l.bind(path); l.listen(1)
print("up", flush=True)
c, _ = l.accept()
_, fds, _, _ = socket.recv_fds(c, 1, 1)
os.write(fds[0], data)
time.sleep(1.0)
c.send(b"k")
print("wrote", flush=True)
"""

# a small real HTTP CONNECT proxy on the node (outside every episode)
PROXY = r"""
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(8)
print(l.getsockname()[1], flush=True)
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except OSError: pass
    finally:
        for x in (a, b):
            try: x.shutdown(socket.SHUT_RDWR)
            except OSError: pass
def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        d = c.recv(4096)
        if not d: return
        head += d
    line, rest = head.split(b"\r\n", 1)[0], head.split(b"\r\n\r\n", 1)[1]
    host, port = line.split()[1].decode().rsplit(":", 1)
    u = socket.create_connection((host.strip("[]"), int(port)), timeout=8)
    c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    if rest: u.sendall(rest)
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
    pipe(c, u)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

PROXY_CLIENT = r"""
import socket, sys
proxy_port, target, payload = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
s = socket.create_connection(("127.0.0.1", proxy_port), timeout=8)
s.sendall(b"CONNECT " + target.encode() + b" HTTP/1.1\r\nHost: " + target.encode() + b"\r\n\r\n")
resp = s.recv(200)
if not resp.startswith(b"HTTP/1.1 200"):
    sys.exit(4)
s.sendall(payload)
s.recv(100)
"""

SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["Mozilla/5.0 (X11; Linux x86_64)"]}\n'
LOGIN = b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"44AF","pass":"x","agent":"Mozilla/5.0"}}\n'


class NsServer:
    def __init__(self, netns, addr, port, greet="", idle=3.0):
        self.p = subprocess.Popen(netns["exec"] + [PY, "-S", "-c", SERVER, addr, str(port), greet, str(idle)],
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "up"

    def received(self) -> bytes:
        out = self.p.stdout.readline().strip()
        self.p.wait(timeout=40)
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


@pytest.fixture
def procs():
    made: list[subprocess.Popen] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
            p.wait()


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


def client(tmp_path, addr, p, how, first: bytes, second: bytes = b"", name="innocent"):
    return innocent(tmp_path, CLIENT, name) + [addr, str(p), how, first.hex(), second.hex()]


@pytest.fixture(scope="module")
def tracer():
    from at_testlib import LiveTracer

    t = LiveTracer(policy=True, policy_dirs=PACKS, monitor=False).start()
    try:
        yield t
    finally:
        t.stop()


def alerts_of(t, ep):
    return [(a["rule"], a.get("action")) for a in t.find(type="alert", episode=ep)]


# ------------------------------------------------------------------ monitor
def test_monitor_mode_does_not_hold_or_kill(live_tracer, episode_id, netns, servers, tmp_path):
    """First in the module: the module's enforcing tracer is not started yet."""
    t = live_tracer(policy=True, policy_dirs=PACKS, monitor=True).start()
    p = port()
    srv = servers(netns, netns["addr"], p, greet="SSH-2.0-x\\r\\n")
    res = run_in_episode(episode_id, client(tmp_path, netns["addr"], p, "write", b"SSH-2.0-mine\r\n", b"MORE"))
    assert res.exit_code == 0, res.summary()
    assert srv.received() == b"SSH-2.0-mine\r\nMORE"
    r = t.wait(type="protocol", episode=episode_id)[0]
    assert r["protocol"] == "ssh" and r["held"] is False
    a = t.wait(type="alert", rule="ssh-on-the-wire")
    assert a and a[0]["enforced"] is False and a[0]["would"] == "kill"
    t.stop()


# ------------------------------------------------------------- fail closed
def test_unreported_flow_stays_held_and_times_out_denied(live_tracer, episode_id, netns, servers, tmp_path):
    """The hold does not depend on the report: with the ring buffer full and
    nobody draining it (a one-page ring, no loop thread), the kernel still
    holds the flow, counts the unreserved report, and the flow is judged
    deny at the timeout. The pool never gets the bytes. (Before the module's
    tracer starts: one live tracer at a time.)"""
    t = live_tracer(policy=True, policy_dirs=[POLICY_DIR / "base.toml", POLICY_DIR / "wire.toml"], monitor=False,
                    ringbuf_pages=1, wire_timeout=1.0, preexisting_sockets=False).start(loop=False)
    rt = t.rt
    t.rt.drain()
    # fill the ring (nobody drains it): exec records of the episode itself
    p = port()
    flood = ["/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8; do /bin/true; done; exec " +
             shlex.join(client(tmp_path, netns["addr"], p, "send", SUBSCRIBE))]
    srv = servers(netns, netns["addr"], p)
    res = run_in_episode(episode_id, flood)
    assert res.exit_code == 0, res.summary()  # it wrote and closed: the bytes sit in its socket
    c = rt.probes.counters()
    assert c["wire_unreported"] >= 1 and c["wire_held"] >= 1, c
    got = wait_for(lambda: rt.flows.poll(), timeout=10)
    assert got and got[0]["type"] == "wire_timeout" and got[0]["verdict"] == "denied", got
    assert got[0]["reported"] is False and got[0]["held_s"] >= 1.0
    assert srv.received() == b""
    assert rt.probes.counters()["wire_denied"] >= 1 or rt.probes.flow_owner(got[0]["cookie"]) is not None


# ------------------------------------------------------------------ attacks
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_ssh_banner_on_a_random_port_never_leaves(tracer, episode_id, netns, servers, tmp_path, v6):
    addr, p = (netns["addr6"] if v6 else netns["addr"]), port()
    srv = servers(netns, addr, p)
    res = run_in_episode(episode_id, client(tmp_path, addr, p, "send", b"SSH-2.0-OpenSSH_9.2p1\r\n"))
    assert res.signal == signal.SIGKILL, res.summary()
    assert srv.received() == b""  # not even the banner
    r = tracer.wait(type="protocol", episode=episode_id)[0]
    assert (r["protocol"], r["addr"], r["port"], r["family"]) == ("ssh", addr, p, "inet6" if v6 else "inet")
    assert r["matched_bytes"] == "SSH-2.0-OpenSSH_9.2p1\\r\\n" and r["held"] is True
    a = tracer.expect_alert(episode_id, "ssh-on-the-wire")
    assert a["enforced"] is True and a["action"] == "kill" and a["port"] == p


@pytest.mark.parametrize("how", ["write", "sendmsg", "writev", "sendmmsg", "sendfile", "splice", "dup",
                                 "empty-first", "trickle", "uring"])
def test_stratum_on_443_never_reaches_the_pool_whatever_call_wrote_it(tracer, episode_id, netns, servers,
                                                                       tmp_path, how):
    srv = servers(netns, netns["addr"], 443)
    res = run_in_episode(episode_id, client(tmp_path, netns["addr"], 443, how, SUBSCRIBE, name="train_helper"))
    assert res.signal == signal.SIGKILL, res.summary()
    assert b"mining" not in srv.received()
    r = tracer.wait(type="protocol", episode=episode_id)[0]
    assert r["protocol"] == "stratum" and r["method"] == "mining.subscribe" and r["port"] == 443
    a = tracer.expect_alert(episode_id, "stratum-on-the-wire")
    assert a["action"] == "kill-episode" and a["enforced"] is True


def test_method_after_2kb_of_params(tracer, episode_id, netns, servers, tmp_path):
    line = b'{"params": ["' + b"a" * 2048 + b'"], "id": 1, "method": "mining.authorize"}\n'
    srv = servers(netns, netns["addr"], 443)
    res = run_in_episode(episode_id, client(tmp_path, netns["addr"], 443, "send", line))
    assert res.signal == signal.SIGKILL, res.summary()
    assert b"mining" not in srv.received()
    tracer.expect_alert(episode_id, "stratum-on-the-wire")


def test_login_with_pass_after_a_benign_line(tracer, episode_id, netns, servers, tmp_path):
    """JSON-RPC is judged per complete line: a first harmless line goes out,
    the XMRig-style login after it (browser user-agent) never does."""
    p = port()
    srv = servers(netns, netns["addr"], p)
    first = b'{"id":0,"jsonrpc":"2.0","method":"status","params":[]}\n'
    res = run_in_episode(episode_id, client(tmp_path, netns["addr"], p, "write", first + LOGIN))
    assert res.signal == signal.SIGKILL, res.summary()
    got = srv.received()
    assert b"login" not in got and b"pass" not in got
    recs = tracer.wait(type="protocol", episode=episode_id, n=2)
    assert [(r["protocol"], r["method"]) for r in recs[:2]] == [("json", "status"), ("stratum", "login")]
    tracer.expect_alert(episode_id, "stratum-on-the-wire")


def test_stratum_32bit_int80(tracer, episode_id, netns, servers, tmp_path):
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the 32-bit client")
    a = [int(x) for x in netns["addr"].split(".")]
    p = port()
    exe = tmp_path / "helper32"
    build = subprocess.run(["gcc", "-m32", "-nostdlib", "-static", "-fno-pic", "-fno-stack-protector", "-O1",
                            *[f"-DA{i}={v}" for i, v in enumerate(a)], f"-DPORT={p}", "-o", str(exe),
                            str(HERE / "data" / "stratum32.c")], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"gcc -m32 cannot build here: {build.stderr.strip()[-200:]}")
    srv = servers(netns, netns["addr"], p)
    res = run_in_episode(episode_id, [str(exe)])
    assert res.signal == signal.SIGKILL, res.summary()
    assert b"mining" not in srv.received()
    tracer.expect_alert(episode_id, "stratum-on-the-wire")


def test_tcp_fast_open_data_in_the_syn(tracer, episode_id, netns, servers, tmp_path):
    p = port()
    srv = servers(netns, netns["addr"], p)
    res = run_in_episode(episode_id, client(tmp_path, netns["addr"], p, "tfo", SUBSCRIBE))
    assert res.signal == signal.SIGKILL, res.summary()
    assert b"mining" not in srv.received()
    tracer.expect_alert(episode_id, "stratum-on-the-wire")


def test_socket_passed_outside_the_episode_stays_inspected(tracer, episode_id, netns, servers, tmp_path, procs):
    p = port()
    srv = servers(netns, netns["addr"], p)
    path = str(tmp_path / "pass.sock")
    helper = subprocess.Popen(innocent(tmp_path, FDPASS_RECEIVER, "helper") + [path, SUBSCRIBE.hex()],
                              stdout=subprocess.PIPE, text=True)
    procs.append(helper)
    assert helper.stdout.readline().strip() == "up"
    run_in_episode(episode_id, innocent(tmp_path, FDPASS_SENDER, "sender") + [netns["addr"], str(p), path])
    assert b"mining" not in srv.received()
    r = tracer.wait(type="protocol", protocol="stratum", port=p)
    assert r and r[0]["episode"] == episode_id, "the flow belongs to the episode that connected it"


def test_stratum_through_an_http_connect_proxy_on_the_node(tracer, episode_id, netns, servers, tmp_path, procs):
    proxy = subprocess.Popen([PY, "-S", "-c", PROXY], stdout=subprocess.PIPE, text=True)
    procs.append(proxy)
    pport = int(proxy.stdout.readline())
    srv = servers(netns, netns["addr"], 3333)  # a pool port (kernel deny for direct connects)
    res = run_in_episode(episode_id, innocent(tmp_path, PROXY_CLIENT) + [str(pport), f"{netns['addr']}:3333",
                                                                         SUBSCRIBE.hex()])
    assert res.exit_code != 0 or res.signal, res.summary()
    assert srv.received() == b""  # the proxy never even opened the forward
    r = tracer.wait(type="protocol", episode=episode_id, protocol="http")[0]
    assert (r["method"], r["proxy_host"], r["proxy_port"]) == ("CONNECT", netns["addr"], 3333)
    a = tracer.wait(type="alert", episode=episode_id, proxy_port=3333)
    assert a, alerts_of(tracer, episode_id)
    assert a[0]["enforced"] is True and a[0]["rule"] in {r.name for r in tracer.rt.pipeline.engine.policy.rules}


def test_tls_pool_sni_never_leaves_and_benign_sni_passes(tracer, episode_id, second_episode_id, netns, servers,
                                                         tmp_path):
    p = port()
    srv = servers(netns, netns["addr"], p, idle=1.5)
    res = run_in_episode(episode_id, innocent(tmp_path, TLS_CLIENT) + [netns["addr"], str(p),
                                                                        name_file(tmp_path, "data.example.org")])
    assert res.exit_code == 3, res.summary()  # judged, let out: the handshake went on (and failed: no TLS server)
    assert srv.received()[:1] == b"\x16"
    r = tracer.wait(type="protocol", episode=episode_id)[0]
    assert (r["protocol"], r["sni"], r["alpn"]) == ("tls", "data.example.org", ["h2", "http/1.1"])
    assert not tracer.find(type="alert", episode=episode_id)

    p2 = port()
    srv2 = servers(netns, netns["addr"], p2, idle=1.5)
    res = run_in_episode(second_episode_id, innocent(tmp_path, TLS_CLIENT) + [
        netns["addr"], str(p2), name_file(tmp_path, "xmr-eu1.nanopool.org")])
    assert res.signal == signal.SIGKILL, res.summary()
    assert srv2.received() == b""
    a = tracer.expect_alert(second_episode_id, "mining-pool-sni")
    assert a["enforced"] is True and a["sni"] == "xmr-eu1.nanopool.org"


# ------------------------------------------------------------------- benign
@pytest.mark.parametrize("how", ["write", "send", "sendmsg", "writev", "dup", "sendfile", "uring"])
def test_benign_http_passes_in_an_episode(tracer, episode_id, netns, servers, tmp_path, how):
    p = port()
    token = uuid.uuid4().hex[:8]
    srv = servers(netns, netns["addr"], p, greet="HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    req = f"GET /{token} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    res = run_in_episode(episode_id, client(tmp_path, netns["addr"], p, how, req, b"BODY-AFTER"))
    assert res.exit_code == 0, res.summary()
    assert srv.received() == req + b"BODY-AFTER"
    recs = tracer.wait(type="protocol", episode=episode_id)
    assert recs and recs[0]["protocol"] == "http" and recs[0]["method"] == "GET" and recs[0]["final"] is True
    assert len(recs) == 1, "one record: the flow is decided after its first message"
    assert not tracer.find(type="alert", episode=episode_id)


def test_benign_python_get_to_a_local_server(tracer, episode_id, tmp_path, procs):
    """HTTP to a web server on the node's loopback, from a python one-liner
    style client, keeps working."""
    srv = subprocess.Popen([PY, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(srv)
    line = srv.stdout.readline()
    lport = int(line.split("port ")[1].split()[0])
    (tmp_path / "hello.txt").write_text("hello\n")
    code = ("import urllib.request,sys; "
            f"sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{lport}/hello.txt', timeout=10).read()"
            " == b'hello\\n' else 5)")
    res = run_in_episode(episode_id, innocent(tmp_path, code, "fetch"))
    assert res.exit_code == 0, res.summary()
    r = tracer.wait(type="protocol", episode=episode_id, port=lport)
    assert r and r[0]["protocol"] == "http"
    assert not tracer.find(type="alert", episode=episode_id)


def test_benign_bulk_upload_in_an_episode(tracer, episode_id, netns, servers, tmp_path):
    p = port()
    srv = servers(netns, netns["addr"], p)
    body = b"PUT /blob HTTP/1.1\r\nHost: x\r\nContent-Length: 200192\r\n\r\n" + bytes(range(256)) * 782
    (tmp_path / "body").write_bytes(body)
    argv = innocent(tmp_path, CLIENT) + [netns["addr"], str(p), "sendall", f"@{tmp_path / 'body'}", ""]
    res = run_in_episode(episode_id, argv)
    assert res.exit_code == 0, res.summary()
    assert srv.received() == body


# ------------------------------------------------------------------ outside
def test_outside_episodes_untouched(tracer, netns, servers, tmp_path):
    p = port()
    srv = servers(netns, netns["addr"], p, greet="SSH-2.0-x\\r\\n")
    proc = subprocess.run(client(tmp_path, netns["addr"], p, "write", b"SSH-2.0-mine\r\n", b"MORE"), timeout=30)
    assert proc.returncode == 0
    assert srv.received() == b"SSH-2.0-mine\r\nMORE"
    tracer.rt.drain()
    assert not tracer.find(type="protocol", port=p)


def test_selftest_proves_the_hold_and_programs_are_links(tracer):
    """The self-test's canary flow was held in the kernel and let out by
    its verdict; the wire programs are attached as bpf links (they end with
    the tracer process)."""
    assert tracer.ready["selftest"]["wire_hold"] == "ok", tracer.ready["selftest"]
    assert {"cgroup:at_wire_egress", "cgroup:at_wire_release"} <= set(tracer.ready["programs"])
    assert len(tracer.rt.probes._wire_links) == 2
