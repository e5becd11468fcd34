"""[[egress]] profiles: parsing and errors (file, entry, key), the posture
warnings of `policy check`, the kernel map contents they compile to, and the
DNS stub's decisions (no root: the stub answers through a real dnslib
upstream on loopback; the allow map is a recorder of the stub's writes)."""
from __future__ import annotations

import ipaddress
import socket
import threading

import pytest
from click.testing import CliRunner
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from episode_tracer.dns_stub import DnsStub, SlotView, node_resolvers, slot_of, tunnel_shape
from episode_tracer.egress_maps import PENDING_BIT, build_egress_maps
from episode_tracer.events import SLOT_CANARY
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy
from episode_tracer.policy.cli import policy as policy_cli
from episode_tracer.policy.egress import name_allowed, posture_warnings, profile_for

PROFILES = POLICY_DIR / "profiles"


def _load(tmp_path, text, name="50-egress.toml"):
    f = tmp_path / name
    f.write_text(text)
    return load_policy([f]), f


GOOD = """
[lists]
names = ["pypi.org", "*.huggingface.co"]
local = [5000]

[[egress]]
name = "train"
episodes = "train-*"
allow_names = ["$names", "Files.PythonHosted.org."]
allow_cidrs = ["10.1.0.0/16", "fd00::/8"]
allow_ports = ["8000-8002"]
allow_local_ports = ["$local"]

[[egress]]
name = "rest"
episodes = "*"
allow_cidrs = ["10.0.0.0/8"]
"""


def test_profiles_parse(tmp_path):
    res, _ = _load(tmp_path, GOOD)
    assert not res.errors, [str(e) for e in res.errors]
    train, rest = res.policy.egress
    assert train.allow_names == ("pypi.org", "*.huggingface.co", "files.pythonhosted.org")
    assert train.allow_cidrs == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8"))
    assert train.allow_ports == ((8000, 8002),) and train.allow_local_ports == ((5000, 5000),)
    assert profile_for(res.policy.egress, "train-7") is train
    assert profile_for(res.policy.egress, "eval-1") is rest
    assert profile_for(res.policy.egress, None) is rest  # an episode not registered yet: only "*"


def test_name_patterns():
    pats = ("pypi.org", "*.huggingface.co")
    assert name_allowed(pats, "PyPI.org.") and name_allowed(pats, "cdn-lfs.huggingface.co")
    assert name_allowed(pats, "a.b.huggingface.co")
    assert not name_allowed(pats, "huggingface.co") and not name_allowed(pats, "evilhuggingface.co")
    assert not name_allowed(pats, "pypi.org.evil.example")


@pytest.mark.parametrize("body,key,msg", [
    ('episodes = "*"', "name", "needs a name"),
    ('name = "x"', "episodes", "episode id glob"),
    ('name = "x"\nepisodes = "*"\nallow_names = ["bad name!"]', "allow_names[0]", "bad DNS name"),
    ('name = "x"\nepisodes = "*"\nallow_names = ["a.*.example"]', "allow_names[0]", "bad DNS name"),
    ('name = "x"\nepisodes = "*"\nallow_cidrs = ["10.0.0.0/33"]', "allow_cidrs[0]", ""),
    ('name = "x"\nepisodes = "*"\nallow_ports = [70000]', "allow_ports[0]", "not a port"),
    ('name = "x"\nepisodes = "*"\nallow_ports = ["50-60"]', "allow_ports", "port 53"),
    ('name = "x"\nepisodes = "*"\nallow_names = ["$nope"]', "allow_names[0]", "unknown list 'nope'"),
    ('name = "x"\nepisodes = "*"\nallow = ["1.2.3.4"]', "allow", "unknown key"),
    ('name = "x"\nepisodes = "*"\nseverity = "urgent"', "severity", "unknown severity"),
])
def test_profile_errors_name_file_entry_key(tmp_path, body, key, msg):
    res, f = _load(tmp_path, "[[egress]]\n" + body + "\n")
    assert res.policy is None
    d = res.errors[0]
    assert d.file == str(f) and d.key == key and msg in d.message, str(d)
    assert d.where.startswith("egress")


def test_duplicate_profile(tmp_path):
    res, _ = _load(tmp_path, '[[egress]]\nname="a"\nepisodes="*"\n[[egress]]\nname="a"\nepisodes="x-*"\n')
    assert res.policy is None and "defined twice" in res.errors[0].message


def test_posture_warnings(tmp_path):
    rule = ('[[rule]]\nname = "r"\ndescription = "d"\non = "connect"\nseverity = "low"\naction = "log"\n'
            'match = { episode = { glob = "eval-*" } }\n')
    res, f = _load(tmp_path, rule)
    w = posture_warnings(res.policy)
    assert len(w) == 1 and "'eval-*' has no egress posture" in w[0].message and w[0].where == "rule 'r'"
    res, _ = _load(tmp_path, rule + '[[egress]]\nname = "e"\nepisodes = "eval-*"\n')
    w = posture_warnings(res.policy)
    assert len(w) == 1 and "matching none of 'eval-*'" in w[0].message
    res, _ = _load(tmp_path, rule + '[[egress]]\nname = "e"\nepisodes = "*"\n')
    assert posture_warnings(res.policy) == []
    only_rule = tmp_path / "rule-only.toml"
    only_rule.write_text(rule)
    out = CliRunner().invoke(policy_cli, ["check", "--strict", str(only_rule)])
    assert out.exit_code == 1 and "has no egress posture" in out.output


def test_training_profile_loads_with_the_packs():
    res = load_policy([POLICY_DIR, PROFILES / "training-node.toml"])
    assert not res.errors and not res.warnings, [str(d) for d in res.errors + res.warnings]
    p = profile_for(res.policy.egress, "rollout-17")
    assert p is not None and p.name == "training-node"
    assert p.name_allowed("pypi.org") and p.name_allowed("files.pythonhosted.org")
    assert p.name_allowed("huggingface.co") and not p.name_allowed("example.com")
    assert posture_warnings(res.policy) == []


def test_site_extends_the_training_profile(tmp_path):
    site = tmp_path / "90-site.toml"
    site.write_text('[[override]]\nlist = "egress_names"\nappend = ["registry.internal.example"]\n'
                    '[[override]]\nlist = "egress_local_listeners"\nappend = [7000]\n')
    res = load_policy([POLICY_DIR, PROFILES / "training-node.toml", site])
    assert not res.errors, [str(e) for e in res.errors]
    p = res.policy.egress[0]
    assert p.name_allowed("registry.internal.example") and (7000, 7000) in p.allow_local_ports


def test_kernel_maps(tmp_path):
    res, _ = _load(tmp_path, GOOD)
    em = build_egress_maps(res.policy.egress, {3: "train-1", 4: "eval-2", SLOT_CANARY: "canary"})
    assert em.on and em.slot_bits == {0: 2, 3: 1, 4: 2}  # canary never in egress mode
    assert em.allow4[ipaddress.ip_network("10.1.0.0/16")] == 3  # closure: 10.0.0.0/8 of "rest" too
    assert em.allow4[ipaddress.ip_network("10.0.0.0/8")] == 2
    assert em.ports == {8000: 1, 8001: 1, 8002: 1} and em.local == {5000: 1}


def test_unregistered_episodes_fail_closed_without_a_catch_all(tmp_path):
    res, _ = _load(tmp_path, '[[egress]]\nname = "t"\nepisodes = "train-*"\n')
    em = build_egress_maps(res.policy.egress, {1: "other"})
    assert em.slot_bits == {0: 1 << PENDING_BIT}
    assert build_egress_maps((), {1: "x"}).on is False


def test_slot_addresses_and_resolv_conf(tmp_path):
    assert slot_of("127.53.0.0") == 0 and slot_of("127.53.1.2") == 258 and slot_of("127.0.0.1") is None
    rc = tmp_path / "resolv.conf"
    rc.write_text("# x\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\nnameserver bogus\nsearch a\n")
    assert node_resolvers(rc) == ["10.255.255.53", "fe80::1"]
    assert tunnel_shape(["mfrggzdfmzthawdxpjqxy2lmnnxxs3tpobyxe43upv3hm6dz", "t", "x", "example"])
    assert tunnel_shape(["cdn-lfs", "huggingface", "co"]) is None


# ------------------------------------------------------------------ the stub
class Recorder:
    """Stands in for the kernel map: records the stub's writes in order."""

    def __init__(self, log):
        self.log = log

    def put(self, slot, addr, ttl):
        self.log.append(("put", slot, addr, ttl))

    def expire(self):
        return 0

    def forget_slot(self, slot):
        self.log.append(("forget", slot))


@pytest.fixture
def upstream():
    """A real dnslib-answered UDP resolver on loopback; logs what it was asked."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    asked = []

    def serve():
        while True:
            try:
                data, peer = s.recvfrom(4096)
            except OSError:
                return
            q = DNSRecord.parse(data)
            asked.append(str(q.q.qname).rstrip("."))
            r = q.reply()
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.10"), ttl=42))
            s.sendto(r.pack(), peer)

    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname(), asked
    s.close()


def test_stub_installs_before_answering_and_refuses_others(tmp_path, upstream, monkeypatch):
    (host, port), asked = upstream
    import episode_tracer.dns_stub as stub_mod

    real = socket.socket

    class ToUpstream(real):  # the stub talks to port 53; the test upstream is elsewhere
        def connect(self, addr):
            return super().connect((host, port) if addr[1] == 53 else addr)

    monkeypatch.setattr(stub_mod.socket, "socket", ToUpstream)
    res, _ = _load(tmp_path, GOOD)
    train = res.policy.egress[0]
    log: list = []
    stub = DnsStub(Recorder(log), [host], ttl_grace_s=1.0)
    try:
        stub.set_view({7: SlotView("train-1", train)})
        reply = DNSRecord.parse(stub.resolve(DNSRecord.question("pypi.org").pack(), 7, "udp"))
        log.append(("answered",))
        assert [str(r.rdata) for r in reply.rr] == ["192.0.2.10"]
        assert log == [("put", 7, "192.0.2.10", 43.0), ("answered",)]
        for name, qtype in (("example.com", "A"), ("x.huggingface.co", "NULL"),
                            ("mfrggzdfmzthawdxpjqxy2lmnnxxs3tpobyxe43upv3hm6dz.huggingface.co", "A")):
            r = DNSRecord.parse(stub.resolve(DNSRecord.question(name, qtype).pack(), 7, "udp"))
            assert r.header.rcode == RCODE.REFUSED, name
        # a slot the loop thread has not published (not registered yet): refused
        r = DNSRecord.parse(stub.resolve(DNSRecord.question("pypi.org").pack(), 0, "udp"))
        assert r.header.rcode == RCODE.REFUSED
        assert asked == ["pypi.org"]
        recs = stub.drain()
        assert [(r["qname"], r["verdict"]) for r in recs] == [
            ("pypi.org", "allowed"), ("example.com", "refused"), ("x.huggingface.co", "refused"),
            ("mfrggzdfmzthawdxpjqxy2lmnnxxs3tpobyxe43upv3hm6dz.huggingface.co", "refused"), ("pypi.org", "refused")]
        assert recs[0]["episode"] == "train-1" and recs[0]["ttl"] == 42.0 and recs[-1]["reason"] == "episode not registered yet"
        assert stub.resolve(b"\x00garbage", 7, "udp") is None
    finally:
        stub.close()


def test_stub_answers_servfail_when_the_allow_map_is_full(tmp_path, upstream, monkeypatch):
    """An answer whose addresses could not be installed is not given out
    (the kernel would refuse them): SERVFAIL, counted, on record."""
    (host, port), asked = upstream
    import episode_tracer.dns_stub as stub_mod

    real = socket.socket

    class ToUpstream(real):
        def connect(self, addr):
            return super().connect((host, port) if addr[1] == 53 else addr)

    class Full(Recorder):
        def put(self, slot, addr, ttl):
            raise OSError(7, "Argument list too long")  # what a full BPF hash map answers

    monkeypatch.setattr(stub_mod.socket, "socket", ToUpstream)
    res, _ = _load(tmp_path, GOOD)
    stub = DnsStub(Full([]), [host])
    try:
        stub.set_view({7: SlotView("train-1", res.policy.egress[0])})
        r = DNSRecord.parse(stub.resolve(DNSRecord.question("pypi.org").pack(), 7, "udp"))
        assert r.header.rcode == RCODE.SERVFAIL and r.rr == []
        rec = stub.drain()[-1]
        assert rec["verdict"] == "failed" and "allow map" in rec["reason"]
        assert stub.stats()["dns_install_failed"] == 1
    finally:
        stub.close()


def test_dns_drop_label_from_enforcing_rules(tmp_path):
    from episode_tracer.egress_ctl import dns_drop_label

    assert dns_drop_label(load_policy([POLICY_DIR]).policy) == 40  # udp.toml's dns-tunnel-labels (kill)
    mk = lambda action, match, extra="": (
        f'[[rule]]\nname = "r"\ndescription = "d"\non = "datagram"\nseverity = "high"\naction = "{action}"\n'
        f"match = {match}\n{extra}")
    cases = [
        (mk("kill", '{ app = "dns", dns_label_max = { gte = 30.5 } }'), 31),
        (mk("alert", '{ app = "dns", dns_label_max = { gte = 30 } }'), 0),  # does not enforce
        (mk("kill", '{ app = "dns", dns_label_max = { gte = 30 }, port = 53 }'), 0),  # more than the kernel reads
        (mk("kill", '{ app = "dns", dns_label_max = { gte = 30 } }', 'except = [ { port = 5353 } ]'), 0),
        (mk("kill", '{ app = ["dns", "quic"], dns_label_max = { gte = 30 } }'), 0),
    ]
    for text, want in cases:
        res, _ = _load(tmp_path, text)
        assert not res.errors, [str(e) for e in res.errors]
        assert dns_drop_label(res.policy) == want, text
