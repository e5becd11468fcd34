"""Protocol identification from first-bytes samples, the `protocol` record
decoder, and the wire rules of the default packs on recorded events (no root)."""
from __future__ import annotations

import json
import socket
import ssl
import struct
from pathlib import Path

import pytest

from episode_tracer import events
from episode_tracer.events import Kind
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy, record_context
from episode_tracer.protocols import escape, identify


def client_hello(server_hostname: str | None) -> bytes:
    """The ClientHello Python's real ssl module sends (no network)."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n'
AUTHORIZE = b'{"params": ["wallet.worker", "x"], "id": 2, "method": "mining.authorize"}\n'
XMRIG_LOGIN = (b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"44AFFq5k","pass":"x",'
               b'"agent":"XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0","algo":["rx/0"]}}\n')


# ---------------------------------------------------------------- identify
@pytest.mark.parametrize("data,proto,matched", [
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "ssh", "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\\r\\n"),
    (b"SSH-2.0-paramiko_3.4.0\r\n\x00\x00\x05\xdc\x06\x14", "ssh", "SSH-2.0-paramiko_3.4.0\\r\\n"),
    (b"SSH-1.99-Cisco-1.25\r\n", "ssh", "SSH-1.99-Cisco-1.25\\r\\n"),
    (b"SSH-2.0-", "ssh", "SSH-2.0-"),  # partial: a first write of just the prefix
    (SUBSCRIBE, "stratum", escape(SUBSCRIBE[:-1])),
    (AUTHORIZE, "stratum", escape(AUTHORIZE[:-1])),
    (XMRIG_LOGIN, "stratum", escape(XMRIG_LOGIN[:-1])),
    (b'{"id":1,"method":"mining.configure","params":[["version-rolling"],{}]}\n', "stratum", None),
    (b'{"worker":"rig","jsonrpc":"2.0","params":["0xabc","x"],"id":1,"method":"eth_submitLogin"}\n', "stratum", None),
    (b'[{"id":1,"method":"mining.subscribe","params":[]}]\n', "stratum", None),  # batch
    (b'{"id":1,"method":"mining.subscribe","params":["cpumin', "stratum", None),  # cut by the bound
    (b'{"id":1,"method":"login","params":{"login":"w","pass":"x","agent":"xmr-stak/2.10', "stratum", None),
    # by the protocol, not the user-agent: a browser agent, methods only mining speaks
    (b'{"id":1,"method":"login","params":{"login":"user","pass":"pw","agent":"Mozilla/5.0"}}\n', "stratum", None),
    (b'{"id":3,"method":"submit","params":{"id":"w1","job_id":"j","nonce":"00","result":"ab"}}\n', "stratum", None),
    (b'{"id":4,"method":"getjob","params":{"id":"w1"}}\n', "stratum", None),
    (b'{"id":5,"method":"keepalived","params":{"id":"w1"}}\n', "stratum", None),
    (b'{"id":6,"jsonrpc":"2.0","method":"eth_submitWork","params":["0x1","0x2","0x3"]}\n', "stratum", None),
    (b'{"id":7,"method":"mining.extranonce.subscribe","params":[]}\n', "stratum", None),
])
def test_identifies(data, proto, matched):
    w = identify(data)
    assert w.protocol == proto
    if matched is not None:
        assert escape(w.matched) == matched


@pytest.mark.parametrize("data,proto", [
    (b"", "unknown"),
    (b"S", "unknown"),
    (b"SSH", "unknown"),
    (b"SSH-3.0-future\r\n", "unknown"),
    (b"ssh-2.0-lowercase\r\n", "unknown"),
    (b"\x00\x01\x02garbage\xff", "unknown"),
    (b"HELO mail.example.com\r\n", "unknown"),
    (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "http"),
    (b"POST /v1/chat HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"method\":\"mining.subscribe\"}", "http"),
    (b"CONNECT pool.example:3333 HTTP/1.1\r\n\r\n", "http"),
    (b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}\n', "json"),
    (b'{"id":1,"method":"login","params":{"login":"u","agent":"Mozilla/5.0"}}\n', "json"),
    (b'{"text": "mining.subscribe is a stratum method"}\n', "json"),  # the words, not the method
    (b'{"broken json mining', "json"),
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "tls"),  # a handshake that is not a ClientHello
    (b"\x16\x03", "unknown"),  # too short to be TLS
    (b"\x16\x09\x01\x00\x05\x01", "unknown"),  # not a TLS version
])
def test_does_not_misidentify(data, proto):
    assert identify(data).protocol == proto


def test_tls_sni_from_python_ssl():
    hello = client_hello("xmr-eu1.Nanopool.org")
    w = identify(hello)
    assert (w.protocol, w.sni) == ("tls", "xmr-eu1.nanopool.org")
    assert w.matched == b"xmr-eu1.Nanopool.org" and hello[w.offset:w.offset + len(w.matched)] == w.matched


def test_tls_without_sni():
    w = identify(client_hello(None))
    assert (w.protocol, w.sni) == ("tls", None)


def test_tls_sni_beyond_the_captured_prefix():
    hello = client_hello("pool.example.org")
    sni_at = hello.find(b"pool.example.org")
    assert identify(hello[: sni_at + 4]).sni is None  # cut inside the name: no guess
    assert identify(hello[: sni_at + 4]).protocol == "tls"
    for n in range(0, 60):
        identify(hello[:n])  # any prefix: never raises


def test_tls_sni_fits_the_kernel_capture():
    hello = client_hello("a" * 60 + ".example.org")
    assert hello.find(b".example.org") < events.WIRE_CAP


def test_escape_is_printable_and_bounded():
    s = escape(b"A\\B\x00\xff\r\n\t" + b"x" * 500)
    assert s.startswith("A\\\\B\\x00\\xff\\r\\n\\t") and s.endswith("...")
    assert all(0x20 <= ord(c) < 0x7F for c in s)
    assert len(s) < 200


# ------------------------------------------------------------------ decoder
def pack_report(data: bytes, *, family=socket.AF_INET, addr=b"\x0a\x00\x00\x05" + bytes(12), port=443,
                flags=events.WIRE_HELD, upto=0, cookie=0x1234) -> bytes:
    """A flow report as episode_tracer/bpf/wire.h sends it: the head, then data[0:captured]."""
    lay = events.LAYOUTS[Kind.PROTOCOL]
    head = struct.pack(lay.fmt, 123, 456, int(Kind.PROTOCOL), 77, 0, 0, b"innocent", cookie,
                       min(len(data), events.WIRE_CAP), flags, upto, family, port, 40000, 0, 0, addr)
    assert len(head) == events.WIRE_HEAD
    return head + data[: events.WIRE_CAP]


def test_decode_flow_report():
    r = events.decode(pack_report(SUBSCRIBE))
    assert r["type"] == "wire_report" and r["pid"] == 77 and r["comm"] == "innocent" and r["cookie"] == 0x1234
    assert (r["family"], r["addr"], r["port"], r["sport"]) == ("inet", "10.0.0.5", 443, 40000)
    assert r["data"] == SUBSCRIBE and r["captured"] == len(SUBSCRIBE) and r["flags"] & events.WIRE_HELD


def test_decode_flow_report_v6_keeps_only_captured_bytes():
    addr = socket.inet_pton(socket.AF_INET6, "fd00:213:1::2")
    raw = pack_report(b"SSH-2.0-x\r\n", family=socket.AF_INET6, addr=addr, port=2222) + b"trailing junk"
    r = events.decode(raw)
    assert (r["family"], r["addr"], r["port"]) == ("inet6", "fd00:213:1::2", 2222)
    assert r["data"] == b"SSH-2.0-x\r\n"


# ------------------------------------------------------- rules (recorded)
@pytest.fixture(scope="module")
def policy():
    res = load_policy([POLICY_DIR])
    assert not res.errors and not res.warnings, [str(d) for d in res.errors + res.warnings]
    return res.policy


def proto_rec(data: bytes, addr="203.0.113.9", port=443, episode="ep-1", family="inet"):
    w = identify(data)
    return {"type": "protocol", "episode": episode, "pid": 42, "comm": "innocent", "exe": "/tmp/innocent",
            "family": family, "addr": addr, "port": port, "protocol": w.protocol, "sni": w.sni,
            "matched_bytes": escape(w.matched)}


def rules_of(policy, rec):
    return {v.rule: v for v in policy.evaluate(rec, record_context({}))}


def test_ssh_banner_to_outside_host_is_killed(policy):
    v = rules_of(policy, proto_rec(b"SSH-2.0-OpenSSH_9.2\r\n", port=8443))
    assert set(v) == {"ssh-on-the-wire"}
    rule = policy.rule("ssh-on-the-wire")
    assert rule.action.value == "kill" and rule.severity.value == "critical" and rule.description
    assert v["ssh-on-the-wire"].matched.get("protocol") == "ssh"


@pytest.mark.parametrize("addr,family", [("127.0.0.1", "inet"), ("::1", "inet6")])
def test_ssh_to_loopback_is_allowed(policy, addr, family):
    assert rules_of(policy, proto_rec(b"SSH-2.0-OpenSSH_9.2\r\n", addr=addr, family=family, port=22)) == {}


def test_ssh_outside_episodes_untouched(policy):
    assert rules_of(policy, proto_rec(b"SSH-2.0-OpenSSH_9.2\r\n", episode=None)) == {}


@pytest.mark.parametrize("data", [SUBSCRIBE, AUTHORIZE, XMRIG_LOGIN])
def test_stratum_on_443_kills_the_episode(policy, data):
    v = rules_of(policy, proto_rec(data, port=443))
    assert set(v) == {"stratum-on-the-wire"}
    assert policy.rule("stratum-on-the-wire").action.value == "kill-episode"


@pytest.mark.parametrize("host", ["xmr-eu1.nanopool.org", "nanopool.org", "gulf.moneroocean.stream",
                                  "stratum.slushpool.com", "stratum-eu.example.net"])
def test_pool_sni_is_killed(policy, host):
    # a pool domain (mining_pool_domains, subdomains included) or a stratum* host label
    v = rules_of(policy, proto_rec(client_hello(host)))
    want = ({"mining-pool-sni"} if "stratum-eu" not in host else set()) | (
        {"stratum-host-sni"} if host.startswith("stratum") else set())
    assert set(v) == want
    for name in want:
        assert v[name].matched["sni"] == host
        rule = policy.rule(name)
        assert rule.action.value == "kill" and rule.severity.value == "high" and rule.description


@pytest.mark.parametrize("host", ["pypi.org", "files.pythonhosted.org", "github.com", "huggingface.co",
                                  "notnanopool.org", "nanopool.org.evil.example"])
def test_benign_sni_is_quiet(policy, host):
    assert rules_of(policy, proto_rec(client_hello(host))) == {}


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b'{"jsonrpc":"2.0","method":"eth_call"}\n',
                                  client_hello(None), b"\x00garbage"])
def test_other_protocols_are_quiet(policy, data):
    assert rules_of(policy, proto_rec(data)) == {}


def test_wire_pack_holds_writers():
    from episode_tracer.engine import wire_hold

    res = load_policy([POLICY_DIR / "base.toml", POLICY_DIR / "wire.toml"])
    assert not res.errors
    assert wire_hold(res.policy)
    res = load_policy([POLICY_DIR / "base.toml", POLICY_DIR / "tunnels.toml"])
    assert wire_hold(res.policy)  # connect denies: a proxy request's target is judged like a connect
    res = load_policy([POLICY_DIR / "base.toml"])
    assert not wire_hold(res.policy)
