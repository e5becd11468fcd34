"""What an episode's UDP datagram is, from its first bytes (pure), and the
per-episode DNS rates the tunnel rules need (state owned by the loop thread).

`describe(data, port)` identifies DNS queries (parsed with dnslib: name,
type, label lengths, entropy of the part below the registered domain) and
QUIC long headers (version); everything else is `app = "other"`. The
`DatagramJudge` adds, per episode: whether the resolver is one of the
node's, how many queries of the same type the episode sent in the last
`type_window_s`, and how many distinct names below the same parent domain
in the last `sub_window_s`. Rules in episode_tracer/policies/udp.toml decide from these
fields; nothing depends on a tool's name.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

QUIC_VERSIONS = {0x00000001: "1", 0x6B3343CF: "2", 0x00000000: "negotiation"}


def entropy(s: str) -> float:
    """Shannon entropy of `s` in bits per character (0 for an empty string)."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def parent_domain(labels: list[str]) -> str:
    return ".".join(labels[-2:]) if len(labels) >= 2 else ".".join(labels)


def describe_dns(data: bytes) -> dict[str, Any] | None:
    """Fields of a DNS query (None when `data` is not one)."""
    from dnslib import QTYPE, DNSError, DNSRecord

    try:
        rec = DNSRecord.parse(data)
    except (DNSError, Exception):  # dnslib raises assorted errors on garbage
        return None
    if rec.header.qr or not rec.questions:
        return None
    q = rec.questions[0]
    labels = [lab.decode("latin-1").lower() for lab in q.qname.label]
    sub = "".join(labels[:-2])
    return {
        "app": "dns",
        "dns_qname": ".".join(labels),
        "dns_qtype": QTYPE.get(q.qtype, str(q.qtype)),
        "dns_label_max": max((len(x) for x in labels), default=0),
        "dns_sub_len": len(sub),
        "dns_entropy": round(entropy(sub), 3),
        "dns_parent": parent_domain(labels),
    }


def describe_quic(data: bytes) -> dict[str, Any] | None:
    """A QUIC long header (RFC 8999 invariants: form bit, fixed bit, version)."""
    if len(data) < 7 or not data[0] & 0x80:
        return None
    version = int.from_bytes(data[1:5], "big")
    if version in QUIC_VERSIONS:
        name = QUIC_VERSIONS[version]
    elif version >> 8 == 0xFF0000:
        name = f"draft-{version & 0xFF}"
    elif version & 0x0F0F0F0F == 0x0A0A0A0A:
        name = "grease"
    else:
        return None
    if version and not data[0] & 0x40:  # fixed bit, except in version negotiation
        return None
    dcid_len = data[5]
    if dcid_len > 20 or len(data) < 6 + dcid_len + 1:
        return None
    return {"app": "quic", "quic_version": name}


def describe(data: bytes, port: int) -> dict[str, Any]:
    """The app-level fields of a datagram's first bytes (pure)."""
    if port == 53 or port == 5353:
        d = describe_dns(data)
        if d is not None:
            return d
    q = describe_quic(data)
    if q is not None:
        return q
    if port != 53:
        d = describe_dns(data)  # DNS on another port is still DNS
        if d is not None and d["dns_label_max"] > 0:
            return d
    return {"app": "other"}


@dataclass
class _EpisodeDns:
    by_type: deque = field(default_factory=lambda: deque(maxlen=8192))  # (t, qtype)
    subs: deque = field(default_factory=lambda: deque(maxlen=8192))  # (t, parent, name)


class DatagramJudge:
    """Per-episode DNS counters for datagram records (loop thread only)."""

    def __init__(self, node_resolvers: Iterable[str] = (), type_window_s: float = 10.0,
                 sub_window_s: float = 60.0):
        self.node_resolvers = frozenset(node_resolvers)
        self.type_window_s = type_window_s
        self.sub_window_s = sub_window_s
        self._eps: dict[str, _EpisodeDns] = {}

    def enrich(self, rec: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        if rec.get("app") != "dns":
            return rec
        now = time.monotonic() if now is None else now
        rec["dns_resolver"] = "node" if rec.get("addr") in self.node_resolvers else "other"
        key = rec.get("episode") or f"pid:{rec.get('pid')}"
        st = self._eps.setdefault(key, _EpisodeDns())
        qtype, parent, name = rec.get("dns_qtype"), rec.get("dns_parent"), rec.get("dns_qname")
        st.by_type.append((now, qtype))
        st.subs.append((now, parent, name))
        while st.by_type and now - st.by_type[0][0] > self.type_window_s:
            st.by_type.popleft()
        while st.subs and now - st.subs[0][0] > self.sub_window_s:
            st.subs.popleft()
        rec["dns_type_rate"] = sum(1 for _, t in st.by_type if t == qtype)
        rec["dns_unique_sub"] = len({n for _, p, n in st.subs if p == parent})
        return rec

    def forget(self, episode: str) -> None:
        self._eps.pop(episode, None)
