"""The one monitor/enforce switch.

Every action the tracer takes on a process or an episode goes through
Enforcer.apply(). In monitor mode nothing is killed, frozen or denied; the
enforcer counts what it would have done and the alert says so (`would`).
The kernel side follows the same switch: in monitor mode the enforcement
maps are left empty (episode_tracer.engine asks `enforcing` before loading them).
"""
from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import cgroups

log = logging.getLogger(__name__)

ENFORCING_ACTIONS = frozenset({"deny", "kill", "kill-episode", "freeze-episode"})


@dataclass
class Outcome:
    action: str
    enforced: bool
    would: str | None = None
    detail: str | None = None


class Enforcer:
    def __init__(self, monitor: bool, episode_cgroup: Callable[[str], Path | None],
                 episode_pids: Callable[[str], list[int]], release_gated: Callable[[int], bool] | None = None):
        self.monitor = monitor
        self._episode_cgroup = episode_cgroup
        self._episode_pids = episode_pids
        self._release_gated = release_gated or (lambda pid: False)
        self.done: Counter[str] = Counter()
        self.would: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    @property
    def enforcing(self) -> bool:
        return not self.monitor

    def apply(self, action: str, rec: dict[str, Any], already: bool = False) -> Outcome:
        """Carry out `action` for the process/episode of rec.

        already=True: the kernel has done it (exec killed at the tracepoint,
        connect denied by the cgroup program); only counted."""
        if action not in ENFORCING_ACTIONS:
            return Outcome(action, False)
        if self.monitor:
            self.would[action] += 1
            return Outcome(action, False, would=action)
        if already:
            self.done[action] += 1
            return Outcome(action, True, detail="in kernel")
        try:
            ok, detail = self._do(action, rec)
        except OSError as e:
            ok, detail = False, str(e)
        (self.done if ok else self.failed)[action] += 1
        if not ok:
            log.warning("action %s on pid %s episode %s failed: %s", action, rec.get("pid"), rec.get("episode"), detail)
        return Outcome(action, ok, detail=detail)

    def _do(self, action: str, rec: dict[str, Any]) -> tuple[bool, str | None]:
        pid = rec.get("pid")
        ep = rec.get("episode")
        if action in ("kill", "deny"):
            if rec.get("type") == "connect" and action == "deny":
                return False, "connect deny is enforced by the kernel maps only"
            return self.kill_pid(pid)
        if action == "kill-episode":
            if not ep:
                return self.kill_pid(pid)
            return self.kill_episode(ep)
        if action == "freeze-episode":
            if not ep:
                return self._signal(pid, signal.SIGSTOP)
            return self.freeze_episode(ep, True)
        return False, f"unknown action {action}"

    # primitives, also used by `agent-tracer episode kill|freeze|thaw` -------
    def _signal(self, pid: int | None, sig: int) -> tuple[bool, str | None]:
        if not pid:
            return False, "no pid"
        try:
            os.kill(pid, sig)
            return True, None
        except ProcessLookupError:
            return False, "process already gone"

    def kill_pid(self, pid: int | None) -> tuple[bool, str | None]:
        if pid:
            self._release_gated(pid)
        return self._signal(pid, signal.SIGKILL)

    def kill_episode(self, ep: str) -> tuple[bool, str | None]:
        cg = self._episode_cgroup(ep)
        ok = False
        if cg is not None and cg.exists():
            ok = cgroups.kill(cg)
        # env/lineage members live outside the cgroup
        for pid in self._episode_pids(ep):
            self._release_gated(pid)
            ok = self._signal(pid, signal.SIGKILL)[0] or ok
        return ok, None if ok else "no live process in episode"

    def freeze_episode(self, ep: str, frozen: bool) -> tuple[bool, str | None]:
        cg = self._episode_cgroup(ep)
        if cg is not None and cg.exists():
            return cgroups.freeze(cg, frozen), "cgroup.freeze"
        sig = signal.SIGSTOP if frozen else signal.SIGCONT
        ok = False
        for pid in self._episode_pids(ep):
            ok = self._signal(pid, sig)[0] or ok
        return ok, "signals (episode has no cgroup)"

    def stats(self) -> dict[str, dict[str, int]]:
        return {"done": dict(self.done), "would": dict(self.would), "failed": dict(self.failed)}
