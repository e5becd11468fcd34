"""Policy engine: evaluates records, runs actions, owns the exec gate and the
kernel enforcement maps, and self-tests every enforcement path at start.

The decisions themselves are pure (episode_tracer.policy); this module wires them to
the kernel (probes) and to the one monitor/enforce switch (episode_tracer.enforce).
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from . import cgroups
from .enforce import ENFORCING_ACTIONS, Enforcer, Outcome
from .events import RULE_CANARY, SLOT_CANARY
from .probes import KernelMaps

log = logging.getLogger(__name__)

CANARY_SLOT = SLOT_CANARY  # episode_tracer/bpf/events.h AT_SLOT_CANARY: never gated by gate-all
CANARY_BIT = RULE_CANARY
CANARY_ADDR = "127.255.255.254"
CANARY_PORT = 9
CANARY_KILL = "at-canary-kill"
CANARY_GATE = "at-canary-gate"
CANARY_UNIX = "/run/agent-tracer-canary-unix.sock"  # never exists: the hook refuses before the lookup
COMM_MAX = 15


class PolicyLoadError(RuntimeError):
    def __init__(self, errors: list[Any]):
        self.errors = errors
        super().__init__("invalid policy:\n" + "\n".join(f"  {e}" for e in errors))


def load_policy_or_raise(paths: Iterable[Path]):
    from .policy import load_policy

    res = load_policy([Path(p) for p in paths])
    for w in res.warnings:
        log.warning("%s", w)
    if res.errors or res.policy is None:
        raise PolicyLoadError(res.errors)
    return res.policy


# ------------------------------------------------------- kernel map compiler
def _closure(entries: dict[Any, int]) -> dict[Any, int]:
    """LPM lookups return only the longest prefix: give every prefix the bits
    of the prefixes that contain it."""
    out = {}
    for net, mask in entries.items():
        m = mask
        for other, om in entries.items():
            if other != net and other.version == net.version and net.subnet_of(other):
                m |= om
        out[net] = m
    return out


def _add_port_bits(ports: dict[int, int], ranges: Iterable[tuple[int, int]], bit: int) -> None:
    for lo, hi in ranges:
        for p in range(lo, hi + 1):
            ports[p] = ports.get(p, 0) | bit


def build_kernel_maps(plan: Any, slots: dict[int, str], canary: bool = False, monitor: bool = False) -> KernelMaps:
    """Compile a policy's kernel plan into map contents (pure).

    slots: episode slot -> episode id, for rules restricted by episode glob.
    Slot 0 stands for any episode the tracer has not registered yet.
    monitor: nothing killed or gated; the deny maps are kept so the kernel
    can report what it would have refused (it allows, `KernelMaps.monitor`)."""
    km = KernelMaps(monitor=monitor)
    if not monitor:
        for comm in plan.kill_comms:
            km.kill_comms[comm[:COMM_MAX]] = 1
        for comm in getattr(plan, "kill_comms_all", ()):
            km.kill_comms[comm[:COMM_MAX]] = 2
        for comm in plan.gate_comms:
            km.gate_comms.setdefault(comm[:COMM_MAX], 1)
        for comm in getattr(plan, "gate_comms_all", ()):
            km.gate_comms[comm[:COMM_MAX]] = 2
        km.gate_all = bool(plan.gate_all)
        km.gate_all_global = bool(getattr(plan, "gate_all_global", False))
        # GPU opens without the GPU right killed in the kernel: every episode
        # exec is gated, so an exec that keeps the right (episode_tracer.gpu_allow)
        # gets it back before the new image runs
        km.gpu_open_kill = bool(getattr(plan, "gpu_open_kill", False))
        km.gate_all = km.gate_all or km.gpu_open_kill
    deny4: dict[Any, int] = {}
    deny6: dict[Any, int] = {}
    exc4: dict[Any, int] = {}
    exc6: dict[Any, int] = {}
    any4, any6 = ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")
    noglob = 0
    for r in plan.deny:
        bit = 1 << r.index
        fams = set(r.families) or {"inet", "inet6"}
        cidrs = list(r.cidrs) or ([any4] if "inet" in fams else []) + ([any6] if "inet6" in fams else [])
        for net in cidrs:
            if net.version == 4 and "inet" in fams:
                deny4[net] = deny4.get(net, 0) | bit
            elif net.version == 6 and "inet6" in fams:
                deny6[net] = deny6.get(net, 0) | bit
        if r.ports:
            _add_port_bits(km.ports, r.ports, bit)
        else:
            km.anyport_mask |= bit
        protos = set(r.protocols) or {"tcp", "udp"}
        if "tcp" in protos:
            km.tcp_mask |= bit
        if "udp" in protos:
            km.udp_mask |= bit
        if r.except_cidrs or r.except_ports:
            for net in list(r.except_cidrs) or [any4, any6]:
                tgt = exc4 if net.version == 4 else exc6
                tgt[net] = tgt.get(net, 0) | bit
            if r.except_ports:
                _add_port_bits(km.exc_ports, r.except_ports, bit)
            else:
                km.exc_anyport_mask |= bit
        scope = getattr(r.scope, "value", r.scope)
        if scope == "all":
            km.global_mask |= bit
        elif not r.episode_glob:
            noglob |= bit
    km.slot_masks[0] = noglob
    for slot, ep in slots.items():
        m = noglob
        for r in plan.deny:
            if r.episode_glob and getattr(r.scope, "value", r.scope) != "all" and fnmatch.fnmatchcase(ep, r.episode_glob):
                m |= 1 << r.index
        km.slot_masks[slot] = m
    if canary:
        bit = 1 << CANARY_BIT
        net = ipaddress.ip_network(f"{CANARY_ADDR}/32")
        deny4[net] = deny4.get(net, 0) | bit
        km.ports[CANARY_PORT] = km.ports.get(CANARY_PORT, 0) | bit
        km.tcp_mask |= bit
        km.slot_masks[CANARY_SLOT] = bit
        km.kill_comms[CANARY_KILL] = 1
        km.gate_comms[CANARY_GATE] = 1
    km.deny4, km.deny6 = _closure(deny4), _closure(deny6)
    km.exc4, km.exc6 = _closure(exc4), _closure(exc6)
    from .nodesvc import unix_deny_entries

    km.unix_deny = unix_deny_entries(getattr(plan, "unix_deny", ()), canary=CANARY_UNIX if canary else None)
    return km


def wire_hold(policy) -> bool:
    """Hold the payload of undecided episode flows in the kernel until user
    space rules (episode_tracer/bpf/wire.h): when some enabled protocol rule enforces, or a
    connect rule does (a proxy request's target is judged like a connect)."""
    return any(getattr(r.on, "value", r.on) in ("protocol", "connect") and r.enabled and r.action.enforces
               for r in policy.rules)


# ------------------------------------------------------------------ context
class LiveContext:
    """What rules may ask beyond the record: ancestry and executable hash."""

    def __init__(self, tracker):
        from .stdio import NodeAddrs

        self.tracker = tracker
        self._hashes: dict[tuple[int, int, int], str] = {}
        self._node_addrs = NodeAddrs()
        self.stdio_seen: dict[int, list[dict[str, Any]]] = {}  # pid -> what the last exec's rules saw
        self.ssh_config_seen: dict[int, list[str]] = {}

    def ssh_config(self, event) -> list[str] | None:
        from .policy.sshconfig import ssh_config_directives

        got = ssh_config_directives(event)
        pid = event.get("pid")
        if got is not None and isinstance(pid, int):
            if len(self.ssh_config_seen) > 1024:
                self.ssh_config_seen.clear()
            self.ssh_config_seen[pid] = got
        return got

    def stdio_sockets(self, pid: int) -> list[dict[str, Any]] | None:
        from .stdio import stdio_sockets

        got = stdio_sockets(pid, self._node_addrs) if pid > 0 else None
        if got:
            if len(self.stdio_seen) > 1024:
                self.stdio_seen.clear()
            self.stdio_seen[pid] = got
        return got

    def ancestors_exe(self, pid: int) -> list[str]:
        return self.tracker.ancestors_exe(pid)

    def sha256(self, path: str | None, pid: int | None) -> str | None:
        src = f"/proc/{pid}/exe" if pid else path
        if not src:
            return None
        try:
            st = os.stat(src)
            key = (st.st_dev, st.st_ino, int(st.st_mtime_ns))
            h = self._hashes.get(key)
            if h is None:
                d = hashlib.sha256()
                with open(src, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        d.update(chunk)
                h = d.hexdigest()
                if len(self._hashes) > 4096:
                    self._hashes.clear()
                self._hashes[key] = h
            return h
        except OSError:
            return None


def make_context(tracker):
    from .gpu_allow import GpuAllow
    from .policy import EvalContext

    live = LiveContext(tracker)
    ctx = EvalContext(ancestors_exe=live.ancestors_exe, sha256=live.sha256,
                      gpu_allowed=GpuAllow.for_tracker(tracker).allowed,
                      stdio_sockets=live.stdio_sockets, ssh_config=live.ssh_config)
    return ctx, live


# -------------------------------------------------------------------- alert
def make_alert(rec: dict[str, Any], verdict: Any, outcome: Outcome, policy_version: str) -> dict[str, Any]:
    a = {
        "type": "alert",
        "ts": time.time(),
        "rule": verdict.rule,
        "severity": getattr(verdict.severity, "value", verdict.severity),
        "action": outcome.action,
        "enforced": outcome.enforced,
        "would": outcome.would,
        "episode": rec.get("episode"),
        "pid": rec.get("pid"),
        "exe": rec.get("exe"),
        "argv": rec.get("argv"),
        "event": rec.get("type"),
        "matched": verdict.matched,
        "description": verdict.description,
        "policy_version": policy_version,
        "tags": list(getattr(verdict, "tags", ()) or ()),
    }
    for k in ("addr", "port", "family", "path", "protocol", "sni", "alpn", "method", "proxy_host", "proxy_port", "call",
              "matched_bytes", "matched_offset",
              "local_addr", "local_port", "listener_exe"):
        if rec.get(k) is not None:
            a[k] = rec[k]
    if outcome.detail:
        a["detail"] = outcome.detail
    return a


class Engine:
    def __init__(self, policy, policy_paths: list[Path], monitor: bool, gate_timeout: float, gate_default: str,
                 gate_proc_grace: float = 0.5):
        self.policy = policy
        self.policy_paths = policy_paths
        self.monitor = monitor
        self.gate_timeout = gate_timeout
        self.gate_default = gate_default
        self.probes = None
        self.tracker = None
        self.pipeline = None
        self.enforcer: Enforcer | None = None
        self.ctx = None
        self.live_ctx = None
        self.canary_pids: set[int] = set()
        self._gate_seen: dict[int, float] = {}
        self.gate_timeouts = 0
        self.gate_races = 0
        self._reload_requested = False
        self.gpu_rights = None  # episode_tracer.gpu_allow.GpuRights once attached to the kernel
        self._budget_fired: set[tuple[str, str | None]] = set()
        self._mtimes = self._policy_mtimes()
        self.selftest_result: dict[str, str] = {}
        self.flows = None  # episode_tracer.flows.FlowInspector: wire verdicts back to the kernel
        # unix gate (episode_tracer/bpf/nodesvc.h): held connects judged on their target
        self.unix_gates = 0
        self._unix_seen: dict[int, float] = {}
        self._unix_pending_since: dict[int, float] = {}
        self._unix_entries_cache: tuple[str, dict] | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.hold_observers: list = []  # fn(kind, rec) when a held exec or flow got its verdict (metrics)
        from .egress_ctl import EgressControl
        from .nodesvc import ProcJudge
        from .policy import Holds

        self.holds = Holds()
        # gated processes whose exec record did not come: judged from /proc
        # (gate_proc_grace 0: off, only the gate timeout decides)
        self.proc_judge = ProcJudge(grace_s=min(gate_proc_grace, gate_timeout / 4)) if gate_proc_grace > 0 else None
        self.egress = EgressControl(self)  # egress mode, DNS stub, datagrams (episode_tracer/egress_ctl.py)

    @classmethod
    def from_options(cls, opts) -> "Engine":
        paths = [Path(p) for p in opts.policy_dirs]
        policy = load_policy_or_raise(paths)
        eng = cls(policy, paths, opts.monitor, opts.gate_timeout, opts.gate_default,
                  getattr(opts, "gate_proc_grace", 0.5))
        eng.egress.configure(getattr(opts, "dns_upstreams", None), getattr(opts, "dns_ttl_grace", None))
        return eng

    @property
    def policy_version(self) -> str:
        return self.policy.version

    # ---------------------------------------------------------------- wiring
    def attach(self, probes, tracker, pipeline) -> None:
        self.probes, self.tracker, self.pipeline = probes, tracker, pipeline
        self.enforcer = Enforcer(
            self.monitor,
            episode_cgroup=lambda ep: tracker.cgroups.paths.get(ep),
            episode_pids=lambda ep: [p.pid for p in tracker.table.members(ep)],
            release_gated=probes.release_gated,
        )
        self.ctx, self.live_ctx = make_context(tracker)
        from .gpu_allow import GpuAllow, GpuRights

        self.gpu_rights = GpuRights(GpuAllow.for_tracker(tracker), probes)
        self.egress.attach(probes, tracker)

    def _slots(self) -> dict[int, str]:
        return {e.slot: e.id for e in self.tracker.episodes.values() if not e.ended}

    def load_kernel(self, canary: bool = False) -> None:
        km = build_kernel_maps(self.policy.kernel_plan(), self._slots(), canary=canary, monitor=self.monitor)
        # the self-test proves the wire hold on its canary flow (monitor mode too)
        km.wire_hold = canary or (not self.monitor and wire_hold(self.policy))
        km.egress = self.egress.kernel_maps(self._slots())
        self.probes.load_enforcement(km)

    def on_episode_slot(self, episode) -> None:
        if self.probes is None:
            return
        plan = self.policy.kernel_plan()
        km = build_kernel_maps(plan, {episode.slot: episode.id})
        self.probes.set_slot_mask(episode.slot, km.slot_masks.get(episode.slot, 0))
        self.egress.on_slot(episode)

    # --------------------------------------------------------------- process
    def process(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        t = rec.get("type")
        if t == "deny":
            return self._kernel_denied(rec)
        if t == "unix_deny":
            return self._unix_denied(rec)
        if t == "unix_gate":
            return self._unix_gate(rec)
        if t == "exec" and rec.get("gated") and self.proc_judge and self.proc_judge.already_judged(rec):
            return []  # judged from /proc while its record was late
        if t == "gate_race":
            self.gate_races += 1
            return []
        if t in ("egress", "dns"):
            return self.egress.alerts(rec)
        if t == "datagram":
            self.egress.judge.enrich(rec)
        elif t == "episode_end":
            self.egress.episode_ended(rec)
        if t == "exec" and rec.get("pid") in self.canary_pids:
            return []
        if t == "exit":
            self._gate_seen.pop(rec.get("pid"), None)
        if t == "exec" and rec.get("argv_unreadable") and rec.get("gated") and not rec.get("killed_in_kernel"):
            return self._unjudgeable_exec(rec)
        if self.gpu_rights is not None:
            self.gpu_rights.observe(rec)
        verdicts = self.policy.evaluate(rec, self.ctx, self.holds)  # holds: durations (for_s) of gpu rules
        if t == "exec" and self.live_ctx is not None:
            # on record, so replay judges what the gate saw (files and sockets as they were)
            seen = self.live_ctx.stdio_seen.pop(rec.get("pid"), None) if self.live_ctx.stdio_seen else None
            if seen:
                rec["stdio"] = seen
            cfg = self.live_ctx.ssh_config_seen.pop(rec.get("pid"), None) if self.live_ctx.ssh_config_seen else None
            if cfg is not None and "ssh_config" not in rec:
                rec["ssh_config"] = cfg
        if t == "gpu_budget" and verdicts:
            # a window stays over budget for a while: one verdict per rule and episode
            fired = self._budget_fired
            if len(fired) > 4096:
                fired.clear()
            verdicts = [v for v in verdicts if (v.rule, rec.get("episode")) not in fired]
            fired.update((v.rule, rec.get("episode")) for v in verdicts)
        out = []
        enforcing_verdict = False
        for v in verdicts:
            action = getattr(v.action, "value", v.action)
            if t == "connect" and action == "deny" and not self.monitor and rec.get("result") == -errno.EPERM:
                continue  # the kernel denied it; the deny record carries the alert
            if t == "connect" and action == "deny" and rec.get("family") == "unix" and self._unix_hook():
                continue  # the unix-connect program judged it (a socket the episode bound itself is allowed)
            # a protocol `deny` is the flow dropped in the kernel (episode_tracer.flows)
            already = ((t in ("exec", "gpu_open") and bool(rec.get("killed_in_kernel")))
                       or (t == "protocol" and action == "deny"))
            if t == "protocol" and self.flows is not None and action in ENFORCING_ACTIONS and not self.monitor:
                self.flows.deny(rec)  # before the action runs: even an orphaned socket sends nothing
            held = t == "exec" and rec.get("gated")
            if action == "freeze-episode" and held:
                outcome = self.enforcer.apply(action, rec)
                self._continue(rec["pid"])
            else:
                outcome = self.enforcer.apply(action, rec, already=already)
            if t == "connect" and action == "deny" and not outcome.enforced and not outcome.would:
                outcome = Outcome(action, False, detail="not denied in the kernel")
            enforcing_verdict = enforcing_verdict or (action in ENFORCING_ACTIONS and outcome.enforced)
            out.append(make_alert(rec, v, outcome, self.policy.version))
        if t == "exec" and rec.get("gated") and not rec.get("killed_in_kernel"):
            if not enforcing_verdict:
                self._continue(rec["pid"])
            for h in self.hold_observers:
                h(t, rec)
        elif t == "protocol" and self.flows is not None:
            out.extend(self.flows.verdict(rec, enforcing_verdict, self))
            if rec.get("held"):
                for h in self.hold_observers:
                    h(t, rec)
        return out

    def _unjudgeable_exec(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """A gated exec whose argv could not be read (no syscall-entry
        record and no /proc/<pid>/cmdline): it cannot be judged, so it gets
        the gate default, like a verdict that did not come in time (an
        episode's process is killed unless --gate-default allow)."""
        pid = rec["pid"]
        allow = self.gate_default == "allow" or self.monitor or not rec.get("episode")
        if allow:
            self._continue(pid)
        else:
            self._gate_seen.pop(pid, None)
            self.probes.release_gated(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.gate_timeouts += 1
        return [{"type": "gate_timeout", "ts": time.time(), "pid": pid, "episode": rec.get("episode"),
                 "exe": rec.get("exe"), "verdict": "allowed" if allow else "killed",
                 "reason": "argv unreadable", "timeout_s": 0}]

    def _continue(self, pid: int) -> None:
        self._gate_seen.pop(pid, None)
        if self.probes.release_gated(pid):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _kernel_denied(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        mask = rec.get("rules_mask", 0)
        out = []
        if mask & (1 << CANARY_BIT):
            return out
        plan = self.policy.kernel_plan()
        p = self.tracker.table.get(rec.get("pid")) if self.tracker else None
        if p is not None:
            rec.setdefault("argv", p.argv)
        for r in plan.deny:
            if mask & (1 << r.index):
                v = self._rule_verdict(r.name, {"addr": rec.get("addr"), "port": rec.get("port"),
                                                "protocol": rec.get("protocol")})
                # the kernel decided (refused, or in monitor mode only matched):
                # the one switch counts and labels it
                o = self.enforcer.apply("deny", rec, already=True)
                if o.enforced:
                    o.detail = f"{rec.get('call')} refused in kernel"
                out.append(make_alert(rec, v, o, self.policy.version))
        return out

    def _unix_hook(self) -> bool:
        return bool(getattr(self.probes, "unix_connect", False))

    def _unix_denied(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        from .nodesvc import unix_deny_rules

        mask = rec.get("rules_mask", 0)
        if mask & (1 << CANARY_BIT):
            return []
        from .nodesvc import reached_nothing

        if reached_nothing(rec):
            return []  # no such socket: a client probing for a server it then starts itself (tmux new)
        p = self.tracker.table.get(rec.get("pid")) if self.tracker else None
        if p is not None:
            rec.setdefault("argv", p.argv)
        out = []
        for name in unix_deny_rules(self.policy.kernel_plan(), mask, rec.get("unverified")):
            matched = {"path": rec.get("path")}
            if rec.get("unverified"):
                matched["unverified"] = rec["unverified"]
            v = self._rule_verdict(name, matched)
            o = self.enforcer.apply("deny", rec, already=True)
            if o.enforced:
                o.detail = ("unix connect refused in kernel: " + rec["unverified"]) if rec.get("unverified") \
                    else "unix connect refused in kernel"
            out.append(make_alert(rec, v, o, self.policy.version))
        return out

    def _unix_gate(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """An episode's unix connect held at sys_enter_connect: judge the
        socket its path leads to (symlinks, cwd, bind mounts resolved: the
        text alone cannot name it), write the verdict, continue the thread;
        the connect runs again and takes the verdict (episode_tracer/bpf/nodesvc.h). A
        refusal then comes back as a unix_deny record, which alerts."""
        from .events import UNIX_V_ALLOW, UNIX_V_DENY
        from .nodesvc import denied_ids, resolve_unix_target, unix_target_rules, wait_stopped

        pid, tid = rec["pid"], rec["tid"]
        self._unix_seen[tid] = time.monotonic()
        entries = self._unix_entries()
        try:
            real, target = resolve_unix_target(pid, tid, rec.get("path") or "")
        except OSError:
            real, target = None, None  # the thread is gone (or its cwd unreadable): refused
        mask = 0
        if real is not None:
            mask = unix_target_rules(real, target, entries, denied_ids(entries), self._unix_owned(real, rec))
        allow = real is not None and not mask
        self.probes.set_unix_verdict(tid, UNIX_V_ALLOW if allow else UNIX_V_DENY, rec.get("hash", 0), mask)
        rec["resolved"], rec["verdict"] = real, "allowed" if allow else "denied"
        self.unix_gates += 1
        if wait_stopped(pid):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._unix_seen.pop(tid, None)
        return []

    def _unix_entries(self) -> dict[tuple[bytes, bool], int]:
        from .nodesvc import unix_deny_entries

        v = self.policy.version
        if self._unix_entries_cache is None or self._unix_entries_cache[0] != v:
            self._unix_entries_cache = (v, unix_deny_entries(getattr(self.policy.kernel_plan(), "unix_deny", ())))
        return self._unix_entries_cache[1]

    def _unix_owned(self, real: str, rec: dict[str, Any]) -> bool:
        """The episode of `rec` bound the socket at `real` itself."""
        from .events import IDENT_MASK
        from .nodesvc import OWNER_SLOT_BIT

        owner = self.probes.owned_unix_paths().get(real) if self.probes is not None else None
        ep = self.tracker.episodes.get(rec.get("episode")) if self.tracker and rec.get("episode") else None
        if owner is None or ep is None:
            return False
        if owner & OWNER_SLOT_BIT:
            return (owner & IDENT_MASK) == ep.slot
        return owner in ep.cgroup_ids

    def poll_unix_gates(self, now_mono: float) -> None:
        """A held unix connect whose gate record never came (ring buffer
        full) is refused after the gate timeout: never stopped forever."""
        if self.probes is None or not self._unix_hook():
            return
        from .events import UNIX_V_DENY

        for tid, h in self.probes.unix_pending().items():
            first = self._unix_pending_since.setdefault(tid, now_mono)
            if tid in self._unix_seen or now_mono - first < self.gate_timeout:
                continue
            self.probes.set_unix_verdict(tid, UNIX_V_DENY, h, 0)
            self._unix_pending_since.pop(tid, None)
            self.gate_timeouts += 1
            try:
                os.kill(tid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        live = self.probes.unix_pending()
        for tid in [t for t in self._unix_pending_since if t not in live]:
            del self._unix_pending_since[tid]

    def _rule_verdict(self, name: str, matched: dict[str, Any]):
        from .policy import Verdict

        rule = self.policy.rule(name)
        return Verdict(rule.name, rule.severity, rule.action, matched, rule.description, rule.tags)

    # ------------------------------------------------------------------ gate
    def poll_gates(self, now_mono: float | None = None) -> list[dict[str, Any]]:
        """Gated processes whose verdict did not come in time (lost record,
        pipeline behind) get the default verdict; never stopped forever."""
        now_mono = now_mono if now_mono is not None else time.monotonic()
        out = []
        gated = self.probes.gated()
        for pid in list(self._gate_seen):
            if pid not in gated:
                del self._gate_seen[pid]
        for pid in gated:
            if pid in self.canary_pids:
                continue
            first = self._gate_seen.setdefault(pid, now_mono)
            if self.proc_judge and now_mono - first >= self.proc_judge.grace_s and self.pipeline is not None and \
                    self.proc_judge.judge(pid, self.probes, self.pipeline):
                continue  # judged from /proc: continued or killed by the rules, like its record would have been
            if now_mono - first < self.gate_timeout:
                continue
            self.gate_timeouts += 1
            del self._gate_seen[pid]
            # the record may be the one that is late: ask /proc, not only the table
            p = self.tracker.process_of(pid)
            # outside episodes (a scope = "all" gate) a late verdict never
            # kills: a slow tracer must not take the node's own processes down
            if self.gate_default == "allow" or self.monitor or (p is not None and not p.episode):
                self._continue(pid)
                verdict = "allowed"
            else:
                self.probes.release_gated(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                verdict = "killed"
            out.append({"type": "gate_timeout", "ts": time.time(), "pid": pid,
                        "episode": p.episode if p else None, "exe": p.exe if p else None,
                        "verdict": verdict, "timeout_s": self.gate_timeout})
            log.warning("exec gate: no verdict for pid %d within %.2fs: %s", pid, self.gate_timeout, verdict)
        return out

    def tick(self, now: float) -> list[dict[str, Any]]:
        out = self.poll_gates()
        self.poll_unix_gates(time.monotonic())
        if self._reload_requested or self._policy_mtimes() != self._mtimes:
            self._reload_requested = False
            out.extend(self.reload())
        return out

    # ---------------------------------------------------------------- reload
    def request_reload(self) -> None:
        self._reload_requested = True

    def _policy_mtimes(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in self.policy_paths:
            p = Path(p)
            files = sorted(p.glob("*")) if p.is_dir() else [p]
            for f in files:
                try:
                    st = f.stat()  # follows symlinks: a ConfigMap's ..data swap changes the inode
                    out[str(f)] = (st.st_ino, st.st_mtime_ns)
                except OSError:
                    pass
        return out

    def reload(self) -> list[dict[str, Any]]:
        self._mtimes = self._policy_mtimes()
        try:
            new = load_policy_or_raise(self.policy_paths)
        except PolicyLoadError as e:
            self.reload_failures += 1
            msgs = [str(x) for x in e.errors]
            for m in msgs:
                log.error("policy reload refused: %s", m)
            return [{"type": "policy_error", "ts": time.time(), "episode": None, "errors": msgs,
                     "kept_version": self.policy.version}]
        old = self.policy
        self.policy = new
        if self.probes is not None:
            try:
                self.load_kernel()
            except Exception as e:  # the kernel refused: keep the old policy whole
                self.policy = old
                self.load_kernel()
                self.reload_failures += 1
                return [{"type": "policy_error", "ts": time.time(), "episode": None,
                         "errors": [f"loading kernel maps: {e}"], "kept_version": old.version}]
        self.reloads += 1
        return [{"type": "policy_reload", "ts": time.time(), "episode": None, "old_version": old.version,
                 "policy_version": new.version, "rules": len(new.rules)}]

    # -------------------------------------------------------------- selftest
    def selftest(self) -> dict[str, str]:
        """Prove each kernel enforcement path live, in a canary cgroup, before
        claiming it. Returns path -> 'ok' | 'failed: why' | 'skipped: why'."""
        res: dict[str, str] = {}
        root = self.probes.episode_root
        cg = root / f".canary-{os.getpid()}"
        try:
            cg.mkdir(exist_ok=True)
            self.probes.add_episode_cgroup(cgroups.cgroup_id(cg), CANARY_SLOT)
            self.load_kernel(canary=True)
            with tempfile.TemporaryDirectory(prefix="at-canary-") as tmp:
                res["connect_deny"] = self._canary_connect(cg)
                res["exec_kill"] = self._canary_exec(cg, Path(tmp), CANARY_KILL, expect="killed")
                res["exec_gate"] = self._canary_exec(cg, Path(tmp), CANARY_GATE, expect="gated")
                res["unix_connect_deny"] = self._canary_unix(cg)
                res.update(self.egress.selftest(self._in_cgroup(cg)))
            from .flows import canary_wire

            res["wire_hold"] = canary_wire(self.probes, self._in_cgroup(cg))
        except Exception as e:  # noqa: BLE001 - report, never crash the start
            res.setdefault("connect_deny", f"failed: {e}")
        finally:
            try:
                self.probes.remove_episode_cgroup(cgroups.cgroup_id(cg))
            except OSError:
                pass
            cgroups.remove(cg)
            self.load_kernel(canary=False)
        res["kill_episode"] = "ok" if (root / "cgroup.kill").exists() or Path(cgroups.cgroup2_mount() / "cgroup.kill").exists() else "failed: no cgroup.kill (kernel < 5.14): falls back to per-pid SIGKILL"
        res["freeze_episode"] = "ok" if (root / "cgroup.freeze").exists() else "failed: no cgroup.freeze (kernel < 5.2)"
        if self.monitor:
            res = {k: f"{v} (monitor mode: not enforced)" if v == "ok" else v for k, v in res.items()}
        self.selftest_result = res
        return res

    def _in_cgroup(self, cg: Path):
        procs = str(cg / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return enter

    def _canary_connect(self, cg: Path) -> str:
        """A forked child (no exec: nothing for an exec gate to hold, no
        interpreter to start) joins the canary cgroup and connects to the
        canary address; only EPERM proves the deny path."""
        enter = self._in_cgroup(cg)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 99
            try:
                enter()
                s = socket.socket()
                s.settimeout(3)
                s.connect((CANARY_ADDR, CANARY_PORT))
                code = 0
            except OSError as e:
                code = e.errno or 99
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "failed: canary connect did not return within 10 s"
            time.sleep(0.002)
        rc = os.waitstatus_to_exitcode(status)
        if rc == errno.EPERM:
            return "ok"
        return f"failed: canary connect returned errno {rc}, expected EPERM"

    def _canary_unix(self, cg: Path) -> str:
        """A forked child in the canary cgroup connects to the canary unix
        path. It never exists, so without the hook the connect fails with
        ENOENT; the hook refuses it before the lookup with ECONNREFUSED
        (bpf_set_retval), which proves the unix-connect deny path."""
        if not self._unix_hook():
            return "failed: " + getattr(self.probes, "hooks", {}).get("unix_connect", "absent")
        enter = self._in_cgroup(cg)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 99
            try:
                enter()
                s = socket.socket(socket.AF_UNIX)
                s.connect(CANARY_UNIX)
                code = 0
            except OSError as e:
                code = e.errno or 99
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "failed: canary unix connect did not return within 10 s"
            time.sleep(0.002)
        rc = os.waitstatus_to_exitcode(status)
        if rc == errno.ECONNREFUSED:
            return "ok"
        return f"failed: canary unix connect returned errno {rc}, expected ECONNREFUSED (refused by the hook)"

    def _canary_exec(self, cg: Path, tmp: Path, name: str, expect: str) -> str:
        link = tmp / name
        if not link.exists():
            os.symlink("/bin/sleep", link)
        p = subprocess.Popen([str(link), "5"], preexec_fn=self._in_cgroup(cg))
        self.canary_pids.add(p.pid)
        try:
            if expect == "killed":
                try:
                    rc = p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    return "failed: known-bad exec was not killed"
                return "ok" if rc == -signal.SIGKILL else f"failed: exited {rc}, expected SIGKILL"
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                state = _proc_state(p.pid)
                if state == "T" and p.pid in self.probes.gated():
                    self.probes.release_gated(p.pid)
                    p.kill()
                    p.wait()
                    return "ok"
                time.sleep(0.005)
            return "failed: gated exec was not stopped"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            self.probes.release_gated(p.pid)

    def close(self) -> None:
        # nothing may stay stopped behind us: apply the default verdict to
        # episode processes; a process outside every episode (gated by a
        # scope = "all" rule) is continued: the tracer going away must not
        # kill the node's own processes
        self.egress.close()
        if self.probes is None:
            return
        for pid in list(self.probes.gated()):
            self.probes.release_gated(pid)
            p = self.tracker.table.get(pid) if self.tracker else None
            allow = self.gate_default == "allow" or self.monitor or p is None or not p.episode
            try:
                os.kill(pid, signal.SIGCONT if allow else signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stats(self) -> dict[str, Any]:
        return {"gate_timeouts": self.gate_timeouts, "gate_races": self.gate_races,
                "gates_judged_from_proc": self.proc_judge.judged if self.proc_judge else 0, "unix_gates": self.unix_gates,
                "reloads": self.reloads,
                "reload_failures": self.reload_failures, **(self.enforcer.stats() if self.enforcer else {}),
                **(self.flows.stats() if self.flows is not None else {}), **self.egress.stats()}


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return s[s.rfind(")") + 2]
    except OSError:
        return None
