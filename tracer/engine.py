"""Policy engine: evaluates records, runs actions, owns the exec gate and the
kernel enforcement maps, and self-tests every enforcement path at start.

The decisions themselves are pure (tracer.policy); this module wires them to
the kernel (probes) and to the one monitor/enforce switch (tracer.enforce).
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

CANARY_SLOT = SLOT_CANARY  # bpf/events.h AT_SLOT_CANARY: never gated by gate-all
CANARY_BIT = RULE_CANARY
CANARY_ADDR = "127.255.255.254"
CANARY_PORT = 9
CANARY_KILL = "at-canary-kill"
CANARY_GATE = "at-canary-gate"
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
    return km


def wire_hold(policy) -> bool:
    """Hold the writer of a candidate first write (SSH-, '{', TLS) until
    user space rules: only when some enabled protocol rule enforces."""
    return any(getattr(r.on, "value", r.on) == "protocol" and r.enabled and r.action.enforces
               for r in policy.rules)


# ------------------------------------------------------------------ context
class LiveContext:
    """What rules may ask beyond the record: ancestry and executable hash."""

    def __init__(self, tracker):
        self.tracker = tracker
        self._hashes: dict[tuple[int, int, int], str] = {}

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
    return EvalContext(ancestors_exe=live.ancestors_exe, sha256=live.sha256, gpu_allowed=GpuAllow(tracker).allowed)


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
    for k in ("addr", "port", "family", "path", "protocol", "sni", "call", "matched_bytes", "matched_offset",
              "local_addr", "local_port", "listener_exe"):
        if rec.get(k) is not None:
            a[k] = rec[k]
    if outcome.detail:
        a["detail"] = outcome.detail
    return a


class Engine:
    def __init__(self, policy, policy_paths: list[Path], monitor: bool, gate_timeout: float, gate_default: str):
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
        self.canary_pids: set[int] = set()
        self._gate_seen: dict[int, float] = {}
        self.gate_timeouts = 0
        self.gate_races = 0
        self._reload_requested = False
        self._mtimes = self._policy_mtimes()
        self.selftest_result: dict[str, str] = {}
        self.reloads = 0
        self.reload_failures = 0
        self.hold_observers: list = []  # fn(kind, rec) when a held exec or first write got its verdict (metrics)
        from .policy import Holds

        self.holds = Holds()

    @classmethod
    def from_options(cls, opts) -> "Engine":
        paths = [Path(p) for p in opts.policy_dirs]
        policy = load_policy_or_raise(paths)
        return cls(policy, paths, opts.monitor, opts.gate_timeout, opts.gate_default)

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
        self.ctx = make_context(tracker)

    def _slots(self) -> dict[int, str]:
        return {e.slot: e.id for e in self.tracker.episodes.values() if not e.ended}

    def load_kernel(self, canary: bool = False) -> None:
        km = build_kernel_maps(self.policy.kernel_plan(), self._slots(), canary=canary, monitor=self.monitor)
        km.wire_hold = not self.monitor and wire_hold(self.policy)
        self.probes.load_enforcement(km)

    def on_episode_slot(self, episode) -> None:
        if self.probes is None:
            return
        plan = self.policy.kernel_plan()
        km = build_kernel_maps(plan, {episode.slot: episode.id})
        self.probes.set_slot_mask(episode.slot, km.slot_masks.get(episode.slot, 0))

    # --------------------------------------------------------------- process
    def process(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        t = rec.get("type")
        if t == "deny":
            return self._kernel_denied(rec)
        if t == "gate_race":
            self.gate_races += 1
            return []
        if t == "exec" and rec.get("pid") in self.canary_pids:
            return []
        if t == "exit":
            self._gate_seen.pop(rec.get("pid"), None)
        verdicts = self.policy.evaluate(rec, self.ctx, self.holds)  # holds: durations (for_s) of gpu rules
        out = []
        enforcing_verdict = False
        for v in verdicts:
            action = getattr(v.action, "value", v.action)
            if t == "connect" and action == "deny" and not self.monitor and rec.get("result") == -errno.EPERM:
                continue  # the kernel denied it; the deny record carries the alert
            already = t == "exec" and bool(rec.get("killed_in_kernel"))
            held = (t == "exec" and rec.get("gated")) or (t == "protocol" and rec.get("held"))
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
        elif t == "protocol" and rec.get("held"):
            if not enforcing_verdict:
                self._continue(rec["pid"])
            for h in self.hold_observers:
                h(t, rec)
        return out

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
        return {"gate_timeouts": self.gate_timeouts, "gate_races": self.gate_races, "reloads": self.reloads,
                "reload_failures": self.reload_failures, **(self.enforcer.stats() if self.enforcer else {})}


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return s[s.rfind(")") + 2]
    except OSError:
        return None
