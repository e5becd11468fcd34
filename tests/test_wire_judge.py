"""The wire judge on recorded bytes (no root): complete application messages
from the start of a flow (episode_tracer.protocols.judge), and the flow inspector
that turns kernel flow reports into `protocol` records and verdicts
(episode_tracer.flows), against the default packs."""
from __future__ import annotations

import socket
import ssl
import struct

import pytest

from episode_tracer import events
from episode_tracer.events import Kind
from episode_tracer.flows import FlowInspector
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy, record_context
from episode_tracer.protocols import judge

SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["Mozilla/5.0"]}\n'


def client_hello(name: str | None, alpn=None) -> bytes:
    ctx = ssl.create_default_context()
    if name is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def kinds(data: bytes, full: bool = False):
    return [(m.protocol, m.start, m.end, m.final) for m in judge(data, full=full)]


# ------------------------------------------------------------------- judge
@pytest.mark.parametrize("prefix", [b"", b"S", b"SSH", b"SSH-2.0-OpenSSH", b"{", b'{"id":1,"method":"mining.sub',
                                    b"GET", b"GET /index.html HTT", b"GET / HTTP/1.1\r\nHost: a\r\n",
                                    b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01\x00", b"\x00\x00"])
def test_incomplete_first_message_waits(prefix):
    assert judge(prefix) == []  # the kernel keeps holding: no verdict on a partial message


def test_every_prefix_of_a_stratum_line_waits_then_decides():
    for n in range(1, len(SUBSCRIBE)):
        assert judge(SUBSCRIBE[:n]) == [], n
    (m,) = judge(SUBSCRIBE)
    assert (m.protocol, m.method, m.end) == ("stratum", "mining.subscribe", len(SUBSCRIBE))


def test_full_buffer_is_judged_as_is():
    cut = b'{"id":1,"method":"mining.subscribe","params":["' + b"a" * 5000
    (m,) = judge(cut[: events.WIRE_CAP], full=True)
    assert m.protocol == "stratum" and m.truncated and m.final


def test_method_after_2kb_of_params():
    line = b'{"params": ["' + b"x" * 2048 + b'"], "id": 1, "method": "mining.authorize"}\n'
    (m,) = judge(line)
    assert (m.protocol, m.method) == ("stratum", "mining.authorize")


def test_json_rpc_is_judged_per_line():
    first = b'{"id":0,"jsonrpc":"2.0","method":"status","params":[]}\n'
    login = b'{"id":1,"method":"login","params":{"login":"w","pass":"x","agent":"Mozilla/5.0"}}\n'
    assert kinds(first + login[:20]) == [("json", 0, len(first), False)]
    ms = judge(first + login)
    assert [(m.protocol, m.method) for m in ms] == [("json", "status"), ("stratum", "login")]
    assert ms[1].start == len(first) and ms[1].end == len(first) + len(login)


@pytest.mark.parametrize("line", [
    b'{"id":1,"method":"submit","params":{"id":"w","job_id":"1","nonce":"0","result":"ff"}}\n',
    b'{"id":1,"method":"getjob","params":{}}\n',
    b'{"id":1,"method":"keepalived","params":{"id":"w"}}\n',
    b'{"id":1,"method":"eth_submitLogin","params":["0xabc"]}\n',
    b'{"id":1,"method":"eth_submitWork","params":["0x1","0x2","0x3"]}\n',
    b'{"id":1,"method":"mining.configure","params":[]}\n',
    b'  \r\n{"id":1,"method":"mining.subscribe","params":[]}\n',
])
def test_mining_json_rpc_by_protocol(line):
    assert judge(line)[0].protocol == "stratum"


def test_benign_json_rpc_is_not_stratum():
    (m,) = judge(b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}\n')
    assert (m.protocol, m.method, m.final) == ("json", "eth_blockNumber", False)


def test_ssh_banner_anywhere_in_the_first_bytes():
    (m,) = judge(b"\r\nhello there\r\nSSH-2.0-OpenSSH_9.2\r\n")
    assert m.protocol == "ssh" and m.matched == b"SSH-2.0-OpenSSH_9.2\r\n" and m.final
    assert judge(b"xx SSH-2.0-Open") == []  # the banner line is not complete yet


def test_tls_sni_and_alpn():
    hello = client_hello("Pool.Example.org", alpn=["h2", "http/1.1"])
    for n in range(1, len(hello)):
        assert judge(hello[:n]) == [], n  # the whole ClientHello record first
    (m,) = judge(hello)
    assert (m.protocol, m.sni, m.alpn, m.final, m.end) == ("tls", "pool.example.org", ("h2", "http/1.1"), True,
                                                           len(hello))


@pytest.mark.parametrize("req,host,port", [
    (b"CONNECT 198.18.0.2:3333 HTTP/1.1\r\nHost: 198.18.0.2:3333\r\n\r\n", "198.18.0.2", 3333),
    (b"CONNECT [2001:db8::2]:4444 HTTP/1.1\r\n\r\n", "2001:db8::2", 4444),
    (b"CONNECT pool.example.net:443 HTTP/1.0\r\n\r\n", "pool.example.net", 443),
    (b"GET http://pool.example.net:8080/x HTTP/1.1\r\nHost: pool.example.net\r\n\r\n", "pool.example.net", 8080),
    (b"POST https://api.example.com/v1 HTTP/1.1\r\n\r\n", "api.example.com", 443),
    (b"GET http://[::1]/ HTTP/1.1\r\n\r\n", "::1", 80),
])
def test_proxy_requests_carry_their_target(req, host, port):
    m = judge(req)[0]
    assert (m.protocol, m.proxy_host, m.proxy_port) == ("http", host, port)


def test_connect_tunnel_is_judged_from_its_start():
    req = b"CONNECT 198.18.0.2:3333 HTTP/1.1\r\n\r\n"
    ms = judge(req + SUBSCRIBE)
    assert [(m.protocol, m.final) for m in ms] == [("http", False), ("stratum", False)]
    assert ms[1].start == len(req)


def test_plain_http_is_final_after_its_headers():
    req = b"GET /simple/numpy/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n"
    (m,) = judge(req + b"{not judged}")
    assert (m.protocol, m.method, m.proxy_host, m.final, m.end) == ("http", "GET", None, True, len(req))


def test_stratum_v2_setup_connection_in_the_clear():
    payload = bytes([0]) + struct.pack("<HHI", 2, 2, 0) + bytes([9]) + b"pool.test" + struct.pack("<H", 3334) \
        + bytes([4]) + b"vend" + bytes([2]) + b"hw" + bytes([2]) + b"fw" + bytes([2]) + b"id"
    frame = struct.pack("<HB", 0, 0) + len(payload).to_bytes(3, "little") + payload
    (m,) = judge(frame)
    assert (m.protocol, m.method) == ("stratum", "SetupConnection")


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x10garbage-binary-protocol", b"PING\r\n", b"\x05\x01\x00",
                                  b"HELO mail.example.com\r\n", bytes(range(256))])
def test_other_bytes_are_decided_unknown(data):
    (m,) = judge(data)
    assert m.protocol == "unknown" and m.final


# ------------------------------------------------------- flow inspector
class Verdicts:
    """Records the inspector's kernel writes (the real maps are in the live tests)."""

    def __init__(self):
        self.written: dict[int, tuple[int, int]] = {}
        self.held: dict[int, int] = {}

    def set_flow_verdict(self, cookie, upto, flags):
        self.written[cookie] = (upto, flags)

    def held_flows(self):
        return dict(self.held)

    def forget_held(self, cookie):
        self.held.pop(cookie, None)

    def flow_owner(self, cookie):
        return {"pid": 4242, "comm": "innocent"}


def report(data: bytes, cookie=7, upto=0, flags=events.WIRE_HELD, port=443) -> dict:
    lay = events.LAYOUTS[Kind.PROTOCOL]
    head = struct.pack(lay.fmt, 1_000_000, 99, int(Kind.PROTOCOL), 4242, 0, 0, b"innocent", cookie, len(data),
                       flags, upto, socket.AF_INET, port, 40000, 0, 0, bytes([198, 18, 0, 2]) + bytes(12))
    return events.decode(head + data)


@pytest.fixture(scope="module")
def policy():
    res = load_policy([POLICY_DIR])
    assert not res.errors, [str(e) for e in res.errors]
    return res.policy


def test_reports_become_one_record_per_message_once():
    v = Verdicts()
    fi = FlowInspector(v)
    first = b'{"id":0,"method":"status"}\n'
    assert fi.feed(report(first[:10])) == []
    (r,) = fi.feed(report(first))
    assert (r["protocol"], r["method"], r["offset"], r["length"], r["held"]) == ("json", "status", 0, len(first), True)
    fi.verdict(r, enforcing=False)
    assert v.written[7] == (len(first), 0)  # the line may leave, what follows is held
    assert fi.feed(report(first + SUBSCRIBE[:5], upto=len(first))) == []  # no duplicate
    (r2,) = fi.feed(report(first + SUBSCRIBE, upto=len(first)))
    assert (r2["protocol"], r2["offset"]) == ("stratum", len(first))
    fi.deny(r2)
    assert v.written[7] == (0, events.VERDICT_DENY)
    assert fi.feed(report(first + SUBSCRIBE + b"more")) == []


def test_final_message_ends_inspection():
    v = Verdicts()
    fi = FlowInspector(v)
    (r,) = fi.feed(report(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", cookie=9))
    fi.verdict(r, enforcing=False)
    assert v.written[9] == (r["length"], events.VERDICT_DONE)
    assert fi.feed(report(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nSSH-2.0-x\r\n", cookie=9)) == []


def test_held_flow_without_verdict_times_out_denied():
    v = Verdicts()
    fi = FlowInspector(v, timeout_s=1.0)
    v.held[11] = 5_000_000_000
    assert fi.poll(now_ns=5_500_000_000) == []  # 0.5 s: not yet
    (t,) = fi.poll(now_ns=6_200_000_000)
    assert (t["type"], t["verdict"], t["pid"], t["cookie"], t["reported"]) == ("wire_timeout", "denied", 4242, 11,
                                                                            False)
    assert v.written[11] == (0, events.VERDICT_DENY) and 11 not in v.held and fi.timeouts == 1


def test_pack_rules_on_inspector_records(policy):
    fi = FlowInspector(Verdicts())

    def rules(data, port=443):
        out = set()
        for r in fi.feed(report(data, cookie=hash(data) & 0xFFFF, port=port)):
            r.update(episode="ep-1", exe="/tmp/innocent")
            out |= {v.rule for v in policy.evaluate(r, record_context({}))}
        return out

    assert rules(SUBSCRIBE) == {"stratum-on-the-wire"}
    assert rules(b"SSH-2.0-OpenSSH_9.2\r\n", port=8443) == {"ssh-on-the-wire"}
    assert rules(client_hello("xmr-eu1.nanopool.org")) == {"mining-pool-sni"}
    assert rules(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == set()
    assert rules(client_hello("pypi.org", alpn=["h2"])) == set()
