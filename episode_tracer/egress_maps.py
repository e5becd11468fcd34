"""Egress mode in the kernel maps of episode_tracer/bpf/egress.h.

`build_egress_maps` (pure) compiles the policy's [[egress]] profiles and
the episode slots into what the generation-swapped maps hold; `write_gen` /
`clear_gen` are called by Probes.load_enforcement with the deny maps, so a
policy reload swaps egress mode atomically with everything else.
`DynAllow` is the DNS stub thread's writer of `egress_dyn` (the stub is
that map's only writer).
"""
from __future__ import annotations

import ctypes
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from .events import IDENT_MASK, SLOT_CANARY, Config
from .policy.egress import EgressProfile, profile_for

PENDING_BIT = 63  # slot 0 while no "*" profile exists: egress mode with nothing allowed


@dataclass
class EgressMaps:
    on: bool = False
    slot_bits: dict[int, int] = field(default_factory=dict)  # slot -> 1 << profile index
    allow4: dict[Any, int] = field(default_factory=dict)
    allow6: dict[Any, int] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    local: dict[int, int] = field(default_factory=dict)
    dns_drop_label: int = 0  # episode_tracer/bpf/udp.h: drop episode DNS queries with a label this long (0: off)


def _closure(entries: dict[Any, int]) -> dict[Any, int]:
    out = {}
    for net, mask in entries.items():
        m = mask
        for other, om in entries.items():
            if other != net and net.subnet_of(other):
                m |= om
        out[net] = m
    return out


def _ports(target: dict[int, int], ranges: Iterable[tuple[int, int]], bit: int) -> None:
    for lo, hi in ranges:
        for p in range(lo, hi + 1):
            target[p] = target.get(p, 0) | bit


def slot_profile(profiles: tuple[EgressProfile, ...], slot: int, episode: str | None) -> int | None:
    """Index of the profile of an episode slot (slot 0: unregistered episodes)."""
    if slot == SLOT_CANARY:
        return None
    p = profile_for(profiles, None if slot == 0 else episode)
    return None if p is None else profiles.index(p)


def build_egress_maps(profiles: tuple[EgressProfile, ...], slots: dict[int, str]) -> EgressMaps:
    em = EgressMaps()
    a4: dict[Any, int] = {}
    a6: dict[Any, int] = {}
    for i, p in enumerate(profiles):
        if not p.enabled:
            continue
        bit = 1 << i
        for net in p.allow_cidrs:  # (an inet6 socket's ::ffff:a.b.c.d is checked as IPv4)
            tgt = a4 if net.version == 4 else a6
            tgt[net] = tgt.get(net, 0) | bit
        _ports(em.ports, p.allow_ports, bit)
        _ports(em.local, p.allow_local_ports, bit)
    for slot, ep in {0: None, **slots}.items():
        idx = slot_profile(profiles, slot, ep)
        if idx is not None:
            em.slot_bits[slot] = 1 << idx
    em.on = bool(em.slot_bits) or any(p.enabled for p in profiles)
    if em.on and 0 not in em.slot_bits:
        # an episode the tracer has not registered yet (slot 0) may be one of
        # a profile's: fail closed until it is (nothing allowed, its DNS refused)
        em.slot_bits[0] = 1 << PENDING_BIT
    em.allow4, em.allow6 = _closure(a4), _closure(a6)
    return em


# ------------------------------------------------------------ kernel writes
def clear_gen(probes: Any, gen: int) -> None:
    bpf = probes.bpf
    for name in ("egress_allow4", "egress_allow6"):
        t = bpf[name]
        for k in [k for k in t.keys() if k.gen == gen]:
            del t[k]
    for name in ("egress_port", "egress_local"):
        t = bpf[name]
        for k in [k for k in t.keys() if (k.value >> 16) == gen]:
            del t[k]
    t = bpf["egress_slot"]
    for k in [k for k in t.keys() if (k.value >> 24) == gen]:
        del t[k]
    probes._set_cfg(Config.EGRESS, probes.get_cfg(Config.EGRESS) & ~(1 << gen))
    probes._set_cfg(Config.DNS_DROP_LABEL, probes.get_cfg(Config.DNS_DROP_LABEL) & ~(0xFF << (8 * gen)))


def write_gen(probes: Any, gen: int, em: EgressMaps) -> None:
    bpf = probes.bpf
    for name, entries in (("egress_allow4", em.allow4), ("egress_allow6", em.allow6)):
        t = bpf[name]
        for net, mask in entries.items():
            k = t.Key()
            k.prefixlen = 32 + net.prefixlen
            k.gen = gen
            packed = net.network_address.packed
            ctypes.memmove(ctypes.addressof(k.addr), packed, len(packed))
            t[k] = ctypes.c_ulonglong(mask)
    for name, entries in (("egress_port", em.ports), ("egress_local", em.local)):
        t = bpf[name]
        for port, mask in entries.items():
            t[ctypes.c_uint((gen << 16) | port)] = ctypes.c_ulonglong(mask)
    t = bpf["egress_slot"]
    for slot, bit in em.slot_bits.items():
        t[ctypes.c_uint(slot_key(gen, slot))] = ctypes.c_ulonglong(bit)
    if em.on:
        probes._set_cfg(Config.EGRESS, probes.get_cfg(Config.EGRESS) | (1 << gen))
    if em.dns_drop_label:
        probes._set_cfg(Config.DNS_DROP_LABEL,
                        probes.get_cfg(Config.DNS_DROP_LABEL) | ((em.dns_drop_label & 0xFF) << (8 * gen)))


def slot_key(gen: int, slot: int) -> int:
    """egress_slot key: policy generation << 24 | episode identity (like slot_mask's)."""
    return (gen << 24) | (slot & IDENT_MASK)


def clear_slot(probes: Any, slot: int) -> None:
    """An ended episode's posture, both generations (a leftover process with
    its identity then gets identity 0's: episode_tracer/bpf/egress.h egress_profile)."""
    t = probes.bpf["egress_slot"]
    for gen in (0, 1):
        try:
            del t[ctypes.c_uint(slot_key(gen, slot))]
        except KeyError:
            pass


def set_slot(probes: Any, slot: int, bit: int | None) -> None:
    """A newly registered episode identity, in the active generation."""
    t = probes.bpf["egress_slot"]
    key = ctypes.c_uint(slot_key(probes.active_gen(), slot))
    if bit:
        t[key] = ctypes.c_ulonglong(bit)
    else:
        try:
            del t[key]
        except KeyError:
            pass


def addr16(addr: str) -> bytes:
    a = ipaddress.ip_address(addr)
    if a.version == 4:
        return b"\0" * 10 + b"\xff\xff" + a.packed
    return a.packed


def set_resolvers(probes: Any, addrs: Iterable[str]) -> None:
    t = probes.bpf["dns_resolvers"]
    for k in list(t.keys()):
        del t[k]
    for a in addrs:
        k = t.Key()
        k.slot = 0
        raw = addr16(a)
        ctypes.memmove(ctypes.addressof(k.addr), raw, 16)
        t[k] = ctypes.c_ubyte(1)


class DynAllow:
    """`egress_dyn` as the DNS stub thread writes it: (slot, address) ->
    monotonic ns until which the slot may reach it. Only the stub thread
    calls put/expire/forget_slot."""

    def __init__(self, probes: Any):
        self.table = probes.bpf["egress_dyn"]
        self._until: dict[tuple[int, bytes], int] = {}

    def _key(self, slot: int, raw: bytes):
        k = self.table.Key()
        k.slot = slot
        ctypes.memmove(ctypes.addressof(k.addr), raw, 16)
        return k

    def put(self, slot: int, addr: str, ttl_s: float, now_ns: int | None = None) -> int:
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        until = now_ns + int(ttl_s * 1e9)
        raw = addr16(addr)
        self.table[self._key(slot, raw)] = ctypes.c_ulonglong(until)
        self._until[(slot, raw)] = until
        return until

    def expire(self, now_ns: int | None = None) -> int:
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        gone = [k for k, u in self._until.items() if u <= now_ns]
        for slot, raw in gone:
            self._delete(slot, raw)
        return len(gone)

    def forget_slot(self, slot: int) -> None:
        for s, raw in [k for k in self._until if k[0] == slot]:
            self._delete(s, raw)

    def _delete(self, slot: int, raw: bytes) -> None:
        self._until.pop((slot, raw), None)
        try:
            del self.table[self._key(slot, raw)]
        except KeyError:
            pass

    def entries(self) -> dict[tuple[int, str], int]:
        out = {}
        for (slot, raw), u in self._until.items():
            a = ipaddress.IPv6Address(raw)
            out[(slot, str(a.ipv4_mapped or a))] = u
        return out
