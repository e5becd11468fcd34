"""Egress mode in the live tracer: the engine's part (loop thread).

Owns the DNS stub's lifecycle and the slot -> (episode, profile) view it
reads, compiles the [[egress]] profiles into the kernel maps with every
policy load, and turns `egress` (kernel refusals), `dns` (stub verdicts)
and `datagram` records into alerts or policy input. Everything here runs
on the loop thread; the stub's threads only write `egress_dyn` and queue
`dns` records (episode_tracer/dns_stub.py).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .datagram import DatagramJudge
from .dns_stub import DnsStub, SlotView, node_resolvers
from .egress_maps import DynAllow, EgressMaps, build_egress_maps, clear_slot, set_resolvers, set_slot, slot_key, slot_profile
from .events import SLOT_CANARY, Config
from .policy.egress import profile_for

log = logging.getLogger(__name__)


def dns_drop_label(policy: Any) -> int:
    """The label length from which the packet path drops an episode's DNS
    query (0: never): the smallest N of the enabled enforcing `datagram`
    rules whose whole match is `app = "dns"` and `dns_label_max >= N` (no
    except), so the kill does not come after the data left."""
    from .policy.conditions import NumCond, StrCond

    best = 0
    for r in policy.rules:
        if not r.enabled or not r.action.enforces or getattr(r.on, "value", r.on) != "datagram" or r.excepts:
            continue
        fields = {c.field: c for c in r.match}
        app, lab = fields.get("app"), fields.get("dns_label_max")
        if set(fields) != {"app", "dns_label_max"} or not isinstance(app, StrCond) or app.exact != frozenset({"dns"}):
            continue
        if app.globs or app.regexes or not isinstance(lab, NumCond) or lab.values is not None:
            continue
        if lab.gte is None or lab.gt is not None or lab.lt is not None or lab.lte is not None:
            continue
        n = max(1, min(255, int(-(-lab.gte // 1))))  # ceil: labels are whole characters
        best = n if not best else min(best, n)
    return best


class EgressControl:
    def __init__(self, engine: Any):
        self.engine = engine
        self.upstreams: list[str] | None = None  # None: the node's (/etc/resolv.conf)
        self.ttl_grace_s = 2.0
        self.probes = None
        self.tracker = None
        self.stub: DnsStub | None = None
        self.judge = DatagramJudge()
        self.stub_error: str | None = None
        self.egress_denied = 0
        self.dns_refused = 0

    @property
    def profiles(self) -> tuple:
        return tuple(getattr(self.engine.policy, "egress", ()) or ())

    def configure(self, upstreams: list[str] | None = None, ttl_grace_s: float | None = None) -> None:
        self.upstreams = list(upstreams) if upstreams else None
        if ttl_grace_s is not None:
            self.ttl_grace_s = ttl_grace_s

    def resolvers(self) -> list[str]:
        ups = self.upstreams or node_resolvers()
        return list(dict.fromkeys([*node_resolvers(), *ups]))

    # --------------------------------------------------------------- wiring
    def attach(self, probes: Any, tracker: Any) -> None:
        self.probes, self.tracker = probes, tracker
        res = self.resolvers()
        self.judge = DatagramJudge(res)
        set_resolvers(probes, [a for a in res if ":" not in a])
        probes._set_cfg(Config.UDP_INSPECT, 1)

    def _ensure_stub(self) -> None:
        if self.stub is not None or self.probes is None or not any(p.enabled for p in self.profiles):
            return
        ups = self.upstreams or node_resolvers()
        try:
            self.stub = DnsStub(DynAllow(self.probes), ups, monitor=self.engine.monitor,
                                ttl_grace_s=self.ttl_grace_s,
                                default_profile=lambda: profile_for(self.profiles, None)).start()
        except OSError as e:  # no stub: egress-mode DNS is refused in the kernel (port 0)
            self.stub_error = f"DNS stub could not start: {e}"
            log.error("%s", self.stub_error)
            return
        self.probes._set_cfg(Config.DNS_STUB_PORT, self.stub.port)

    def kernel_maps(self, slots: dict[int, str]) -> EgressMaps:
        """The egress part of a policy load (loop thread); refreshes the stub's view."""
        self._ensure_stub()
        em = build_egress_maps(self.profiles, slots)
        em.dns_drop_label = 0 if self.engine.monitor else dns_drop_label(self.engine.policy)
        self._publish(slots)
        return em

    def _publish(self, slots: dict[int, str]) -> None:
        if self.stub is None:
            return
        view = {}
        for slot, ep in {0: None, **slots}.items():
            idx = slot_profile(self.profiles, slot, ep)
            if idx is not None:
                view[slot] = SlotView(ep, self.profiles[idx])
        self.stub.set_view(view)

    def on_slot(self, episode: Any) -> None:
        if self.probes is None:
            return
        idx = slot_profile(self.profiles, episode.slot, episode.id)
        set_slot(self.probes, episode.slot, None if idx is None else 1 << idx)
        if self.stub is not None:
            self._publish(self.engine._slots())

    def episode_ended(self, rec: dict[str, Any]) -> None:
        ep = rec.get("episode")
        if not ep:
            return
        self.judge.forget(ep)
        e = self.tracker.episodes.get(ep) if self.tracker is not None else None
        if e is not None and self.probes is not None:
            clear_slot(self.probes, e.slot)  # its identity may be handed out again (episode_tracer/slots.py)
        if e is not None and self.stub is not None:
            self.stub.forget_slot(e.slot)

    def drain_into(self, handle: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """A poll hook: the stub's `dns` records through the pipeline."""
        def hook() -> None:
            if self.stub is not None:
                for r in self.stub.drain():
                    handle(r)
        return hook

    def close(self) -> None:
        if self.stub is not None:
            if self.probes is not None:
                try:
                    self.probes._set_cfg(Config.DNS_STUB_PORT, 0)
                except Exception:  # pragma: no cover - maps already gone
                    pass
            self.stub.close()
            self.stub = None

    # ---------------------------------------------------------------- alerts
    def _profile_of(self, rec: dict[str, Any]):
        return profile_for(self.profiles, rec.get("episode"))

    def alerts(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        from .engine import make_alert
        from .policy import Action, Verdict

        t = rec["type"]
        if rec.get("slot") == SLOT_CANARY:
            return []  # the self-test's
        if t == "dns" and rec.get("verdict") != "refused":
            return []
        prof = self._profile_of(rec)
        if prof is None and rec.get("profile"):
            prof = next((p for p in self.profiles if p.name == rec["profile"]), None)
        if prof is None:
            return []
        if t == "egress":
            self.egress_denied += 1
            matched = {k: rec.get(k) for k in ("addr", "port", "protocol", "reason")}
            desc = f"egress mode: {rec.get('call')} to a destination the profile does not allow ({rec.get('reason')})"
        else:
            self.dns_refused += 1
            matched = {"qname": rec.get("qname"), "qtype": rec.get("qtype"), "reason": rec.get("reason")}
            desc = f"egress mode: DNS query refused by the stub ({rec.get('reason')})"
        v = Verdict(prof.name, prof.severity, Action.DENY, matched, prof.description or desc, ("egress",))
        o = self.engine.enforcer.apply("deny", rec, already=True)
        if o.enforced:
            o.detail = f"{rec.get('call', 'dns query')} refused" + (" in kernel" if t == "egress" else " by the DNS stub")
        a = make_alert(rec, v, o, self.engine.policy.version)
        for k in ("reason", "qname", "qtype", "call"):
            if rec.get(k) is not None:
                a[k] = rec[k]
        return [a]

    # ------------------------------------------------------------- self-test
    def selftest(self, enter: Callable[[], None]) -> dict[str, str]:
        """Prove the egress paths in the self-test's canary cgroup (`enter`
        joins it): a UDP send to a TEST-NET address must get EPERM from
        egress mode, and, when the stub runs, a DNS query to a node resolver
        must come back (REFUSED, from the resolver's address) through the
        redirect and the recvmsg rewrite."""
        import ctypes

        out: dict[str, str] = {}
        if self.probes is None:
            return out
        if self.engine.monitor:
            return {"egress_deny": "skipped: monitor mode (egress mode only reports)"}
        from .egress_maps import PENDING_BIT

        probes = self.probes
        t = probes.bpf["egress_slot"]
        key = ctypes.c_uint(slot_key(probes.active_gen(), SLOT_CANARY))
        word = probes.get_cfg(Config.EGRESS)
        t[key] = ctypes.c_ulonglong(1 << PENDING_BIT)
        probes._set_cfg(Config.EGRESS, word | (1 << probes.active_gen()))
        try:
            rc = _in_child(enter, _canary_send)
            out["egress_deny"] = "ok" if rc == 1 else f"failed: canary UDP send returned {rc}, expected EPERM (1)"
            res = [a for a in self.resolvers() if ":" not in a]
            if self.stub is not None and res:
                rc = _in_child(enter, lambda: _canary_dns(res[0]))
                out["dns_redirect"] = "ok" if rc == 0 else f"failed: canary DNS query to {res[0]}: code {rc}"
        finally:
            try:
                del t[key]
            except KeyError:
                pass
            probes._set_cfg(Config.EGRESS, word)
        return out

    def stats(self) -> dict[str, Any]:
        out = {"egress_denied": self.egress_denied, "dns_refused_alerts": self.dns_refused}
        if self.stub is not None:
            out.update(self.stub.stats())
        return out


def _canary_send() -> int:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", ("192.0.2.53", 9))
        return 0
    except OSError as e:
        return e.errno or 99


def _canary_dns(resolver: str) -> int:
    """0 when the stub's answer came back as from `resolver`:53."""
    import socket

    from dnslib import DNSRecord

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(DNSRecord.question("canary.agent-tracer.invalid").pack(), (resolver, 53))
        data, src = s.recvfrom(4096)
    except OSError as e:
        return 100 + (e.errno or 0)
    return 0 if src == (resolver, 53) and DNSRecord.parse(data).header.rcode else 98


def _in_child(enter: Callable[[], None], fn: Callable[[], int], timeout: float = 10.0) -> int:
    """fn() in a forked child that first joins the canary cgroup: its exit code."""
    import os
    import signal
    import time

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            enter()
            code = fn()
        finally:
            os._exit(code & 0xFF)
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -1
        time.sleep(0.002)
