"""Durations: state for rules with `for_s` ("for longer than T seconds").

A `gpu` rule with `for_s = T` fires when its conditions have held on every
GPU sample of the same process and GPU for at least T seconds: the first
matching sample starts the hold, a sample where they do not hold ends it,
and so does a gap in the samples (the process left the GPU, or the watcher
missed samples) longer than `GAP_FACTOR` sample intervals. It fires once per
hold; after the conditions stop holding it can fire again.

Time is the records' own `ts` (and `interval_s`, which the GPU watcher puts
on every sample), never a clock: the same sequence of records gives the same
verdicts live, in replay and in tests. The evaluator stays pure; this small
object is the only state, owned by whoever evaluates a stream (the engine,
a replay).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

GAP_FACTOR = 2.5  # a sample missing for longer than this many intervals ends a hold
DEFAULT_INTERVAL_S = 1.0
PRUNE_EVERY = 512  # updates between sweeps of holds whose process stopped sending samples


@dataclass
class Hold:
    start: float
    last: float
    gap: float  # longest allowed pause between samples
    fired: bool = False


class Holds:
    """Per (rule, pid, GPU) hold of a duration rule."""

    def __init__(self) -> None:
        self.holds: dict[tuple[str, Any, Any], Hold] = {}
        self._updates = 0

    @staticmethod
    def key(rule: str, event: Mapping[str, Any]) -> tuple[str, Any, Any]:
        gpu = event.get("gpu_uuid")
        return (rule, event.get("pid"), gpu if gpu is not None else event.get("gpu_index"))

    def update(self, rule: str, for_s: float, event: Mapping[str, Any], matched: bool) -> float | None:
        """Feed one evaluation of `rule` on `event`. Returns how long the
        conditions have held (seconds) when the rule fires now, else None."""
        ts = event.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            return None  # no time, no duration
        key = self.key(rule, event)
        self._updates += 1
        if self._updates % PRUNE_EVERY == 0:
            self.prune(ts)
        if not matched:
            self.holds.pop(key, None)
            return None
        interval = event.get("interval_s")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            interval = DEFAULT_INTERVAL_S
        h = self.holds.get(key)
        if h is None or ts - h.last > h.gap or ts < h.last:
            h = self.holds[key] = Hold(ts, ts, GAP_FACTOR * interval)
        h.last = ts
        h.gap = GAP_FACTOR * interval
        held = ts - h.start
        if h.fired or held < for_s:
            return None
        h.fired = True
        return held

    def prune(self, now: float) -> None:
        """Forget holds that a gap has already ended (their process left)."""
        for k in [k for k, h in self.holds.items() if now - h.last > h.gap]:
            del self.holds[k]

    def __len__(self) -> int:
        return len(self.holds)
