"""CPU use of episodes and their processes, for `agent-tracer top`.

Read on demand by the control socket's thread (never the loop's): an
episode's CPU is its cgroup's ``cpu.stat`` ``usage_usec`` (the whole
cgroup, whatever forked inside it), or the sum of its processes'
``/proc/PID/stat`` utime+stime when it has no cgroup (env and lineage
episodes). A percentage is the CPU time used between two samples divided by
the wall time between them (100 = one core); the first sample of a thing
has none (None). Files are read at most once per ``min_interval`` seconds.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

__all__ = ["CpuSampler", "proc_stat"]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_stat(pid: int, proc: str = "/proc") -> tuple[str, float, int] | None:
    """(state letter, CPU seconds used, start time in ticks) of `pid`, None when it is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            s = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = s[s.rfind(")") + 2:].split()
    try:
        return rest[0], (int(rest[11]) + int(rest[12])) / _CLK_TCK, int(rest[19])
    except (IndexError, ValueError):
        return None


def _cgroup_usage(path: str) -> float | None:
    try:
        with open(Path(path) / "cpu.stat") as f:
            for line in f:
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        return None
    return None


class CpuSampler:
    def __init__(self, min_interval: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 proc: str = "/proc") -> None:
        self.min_interval = min_interval
        self.clock = clock
        self.proc = proc
        self._ep_prev: dict[str, tuple[float, float]] = {}       # id -> (mono, cpu seconds)
        self._ep_pct: dict[str, float | None] = {}
        self._ep_last = float("-inf")
        self._pid_prev: dict[tuple[int, int], tuple[float, float]] = {}   # (pid, start) -> (mono, cpu s)
        self._pid_out: dict[int, tuple[str, float | None]] = {}
        self._pid_last: dict[int, float] = {}

    def _episode_cpu(self, cgroup_path: str | None, pids: list[int]) -> float | None:
        if cgroup_path:
            usage = _cgroup_usage(cgroup_path)
            if usage is not None:
                return usage
        total, any_ = 0.0, False
        for pid in pids:
            st = proc_stat(pid, self.proc)
            if st is not None:
                total += st[1]
                any_ = True
        return total if any_ else None

    def episodes(self, members: dict[str, tuple[str | None, list[int]]]) -> dict[str, float | None]:
        """Running episode id -> CPU % since the previous sample (None on the first)."""
        now = self.clock()
        if now - self._ep_last < self.min_interval:
            return {k: self._ep_pct.get(k) for k in members}
        self._ep_last = now
        pct: dict[str, float | None] = {}
        prev = self._ep_prev
        cur: dict[str, tuple[float, float]] = {}
        for ep, (cg, pids) in members.items():
            used = self._episode_cpu(cg, pids)
            if used is None:
                pct[ep] = None
                continue
            cur[ep] = (now, used)
            p = prev.get(ep)
            pct[ep] = max(0.0, (used - p[1]) / (now - p[0]) * 100) if p is not None and now > p[0] else None
        self._ep_prev = cur
        self._ep_pct = pct
        return pct

    def processes(self, pids: list[int]) -> dict[int, tuple[str, float | None]]:
        """pid -> (state letter from /proc, CPU % since this pid's previous sample)."""
        now = self.clock()
        out: dict[int, tuple[str, float | None]] = {}
        for pid in pids:
            if now - self._pid_last.get(pid, float("-inf")) < self.min_interval and pid in self._pid_out:
                out[pid] = self._pid_out[pid]
                continue
            st = proc_stat(pid, self.proc)
            if st is None:
                continue
            letter, used, start = st
            key = (pid, start)
            p = self._pid_prev.get(key)
            pct = max(0.0, (used - p[1]) / (now - p[0]) * 100) if p is not None and now > p[0] else None
            self._pid_prev[key] = (now, used)
            self._pid_out[pid] = out[pid] = (letter, pct)
            self._pid_last[pid] = now
        if len(self._pid_prev) > 4 * max(64, len(pids)):        # forget gone processes
            keep = set(pids)
            self._pid_prev = {k: v for k, v in self._pid_prev.items() if k[0] in keep}
            self._pid_out = {k: v for k, v in self._pid_out.items() if k in keep}
            self._pid_last = {k: v for k, v in self._pid_last.items() if k in keep}
        return out
