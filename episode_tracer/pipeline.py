"""One pipeline for live kernel records and recorded JSONL.

    decode (live only) -> tracker (process table, episodes) -> engine
    (policy, actions) -> sinks

Everything after decoding is the same for both sources, so most of the
tracer's logic is tested from recorded JSONL without root.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable, Iterable, Protocol

from . import events
from .episodes import Tracker

_decode = events.decode

log = logging.getLogger(__name__)


class Sink(Protocol):
    def write(self, rec: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class Engine(Protocol):
    def process(self, rec: dict[str, Any]) -> list[dict[str, Any]]: ...


def monotonic_to_wall_offset() -> float:
    """Seconds to add to CLOCK_MONOTONIC (bpf_ktime_get_ns) for wall time."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


class Pipeline:
    def __init__(self, tracker: Tracker, sinks: Iterable[Sink] = (), engine: Engine | None = None,
                 observers: Iterable[Callable[[dict[str, Any]], None]] = ()):
        self.tracker = tracker
        self.sinks = list(sinks)
        self.engine = engine
        self.observers = list(observers)
        self.offset = monotonic_to_wall_offset()
        self.count = 0
        self.by_kind: Counter[str] = Counter()
        self.decode_errors = 0
        self.wire: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None  # episode_tracer.flows: report -> records
        self.tags = tracker.tags  # episode -> fields every record of it carries (container, pod)

    # live ------------------------------------------------------------------
    def feed_raw(self, buf: bytes) -> None:
        # the per-event hot path (one call per ring-buffer record): names are
        # bound locally and the common case (tracker returns just the record)
        # skips the generic loops; see docs/benchmarks.md for the profile
        try:
            rec = _decode(buf)
        except events.DecodeError as e:
            self.decode_errors += 1
            log.warning("dropping undecodable record: %s", e)
            return
        rec["ts"] = rec["ktime"] / 1e9 + self.offset
        if rec["type"] == "wire_report":  # a flow's first bytes: judged into protocol records
            if self.wire is not None:
                for r in self.wire(rec):
                    r["ts"] = rec["ts"]
                    if r["pid"] is None:  # no connect seen (a socket of the episode's cgroup): by cgroup
                        r["episode"] = self.tracker.cgroups.episode_of(r["cgroup"])
                        self.emit(r)
                        if self.engine is not None:
                            for x in self.engine.process(r):
                                self.emit(x)
                    else:
                        self.handle(r)
            return
        out = self.tracker.observe(rec)
        engine = self.engine
        if len(out) == 1 and out[0] is rec:
            self._emit_kernel(rec)
            if engine is not None:
                extra = engine.process(rec)
                if extra:
                    for x in extra:
                        self.emit(x)
            return
        for r in out:
            self.emit(r)
            if engine is not None:
                for x in engine.process(r):
                    self.emit(x)

    # both ------------------------------------------------------------------
    def handle(self, rec: dict[str, Any]) -> None:
        for r in self.tracker.observe(rec):
            self.emit(r)
            if self.engine is not None:
                for extra in self.engine.process(r):
                    self.emit(extra)

    def emit(self, rec: dict[str, Any]) -> None:
        if "ts" not in rec:
            rec["ts"] = time.time()
        if "episode" not in rec:
            rec["episode"] = None
        self._emit_kernel(rec)

    def _emit_kernel(self, rec: dict[str, Any]) -> None:
        """emit() for a record that has its ts and episode already."""
        self.count += 1
        tags = self.tags
        if tags:
            extra = tags.get(rec.get("episode"))
            if extra:
                rec.update(extra)
        by_kind = self.by_kind
        t = rec["type"]
        by_kind[t] = by_kind.get(t, 0) + 1
        for s in self.sinks:
            s.write(rec)
        for o in self.observers:
            o(rec)

    def run_records(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            self.handle(rec)
        self.flush()

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
