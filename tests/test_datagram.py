"""Datagram analysis (episode_tracer/datagram.py) and the udp.toml rules on recorded
queries (tests/data/datagrams.jsonl, made by tests/data/make_datagrams.py):
DNS tunnels by the shape of their names and their volume, foreign resolvers,
QUIC and other UDP to outside hosts; benign names raise nothing. No root."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from dnslib import DNSRecord

from episode_tracer.datagram import DatagramJudge, describe, describe_quic, entropy
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy, record_context

DATA = Path(__file__).parent / "data" / "datagrams.jsonl"
CASES = [json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]
NODE = "10.255.255.53"


@pytest.fixture(scope="module")
def policy():
    res = load_policy([POLICY_DIR])
    assert not res.errors, [str(e) for e in res.errors]
    return res.policy


def _record(addr: str, port: int, payload: bytes) -> dict:
    r = {"type": "datagram", "episode": "ep-1", "pid": 4242, "exe": "/usr/bin/python3", "comm": "python3",
         "family": "inet6" if ":" in addr else "inet", "addr": addr, "port": port, "len": len(payload)}
    r.update(describe(payload, port))
    return r


@pytest.mark.parametrize("case", CASES, ids=[c["note"] for c in CASES])
def test_recorded_datagram(policy, case):
    judge = DatagramJudge([NODE])
    if "repeat" in case:
        payloads = [DNSRecord.question(case["name"].format(i=i), case["qtype"]).pack() for i in range(case["repeat"])]
    else:
        payloads = [bytes.fromhex(case["payload"])]
    for i, p in enumerate(payloads):
        rec = judge.enrich(_record(case["addr"], case["port"], p), now=100.0 + i * 0.01)
        fired = sorted(v.rule for v in policy.evaluate(rec, record_context(rec)))
        if i < len(payloads) - 1:
            continue
        assert fired == sorted(case["rules"]), (rec, fired)


def test_dns_fields():
    q = DNSRecord.question("mfrggzdfmzthawdxpjqxy2lmnnxxs3tpobyxe43upv3hm6dz.t.Exfil.Example.", "TXT").pack()
    d = describe(q, 53)
    assert d["app"] == "dns" and d["dns_qtype"] == "TXT" and d["dns_parent"] == "exfil.example"
    assert d["dns_qname"] == "mfrggzdfmzthawdxpjqxy2lmnnxxs3tpobyxe43upv3hm6dz.t.exfil.example"
    assert d["dns_label_max"] == 48 and d["dns_sub_len"] == 49 and d["dns_entropy"] > 4.0


def test_not_dns_on_port_53_is_other():
    assert describe(b"\x00\x01garbage that is not dns", 53)["app"] == "other"
    assert describe(b"", 53)["app"] == "other"


def test_dns_answer_is_not_a_query():
    q = DNSRecord.question("pypi.org")
    assert describe(q.reply().pack(), 53)["app"] == "other"


def test_quic_versions():
    head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + bytes(8) + bytes([8]) + bytes(8)
    assert describe_quic(head) == {"app": "quic", "quic_version": "1"}
    v2 = bytes([0xC3]) + (0x6B3343CF).to_bytes(4, "big") + head[5:]
    assert describe_quic(v2)["quic_version"] == "2"
    assert describe_quic(bytes([0x43]) + head[1:]) is None  # short header: not identifiable
    assert describe_quic(bytes([0xC3]) + (0x12345678).to_bytes(4, "big") + head[5:]) is None


def test_entropy():
    assert entropy("") == 0.0 and entropy("aaaa") == 0.0
    assert abs(entropy("ab") - 1.0) < 1e-9


def test_rates_are_per_episode_and_windowed():
    j = DatagramJudge([NODE], type_window_s=10)
    mk = lambda ep, i: {**_record(NODE, 53, DNSRecord.question(f"k{i}.x.example", "TXT").pack()), "episode": ep}
    for i in range(5):
        j.enrich(mk("a", i), now=i)
    assert j.enrich(mk("b", 0), now=5)["dns_type_rate"] == 1
    assert j.enrich(mk("a", 9), now=5)["dns_type_rate"] == 6
    assert j.enrich(mk("a", 10), now=30)["dns_type_rate"] == 1  # the window moved on
    j.forget("a")
    assert j.enrich(mk("a", 11), now=31)["dns_unique_sub"] == 1
