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

    # live ------------------------------------------------------------------
    def feed_raw(self, buf: bytes) -> None:
        try:
            rec = events.decode(buf)
        except events.DecodeError as e:
            self.decode_errors += 1
            log.warning("dropping undecodable record: %s", e)
            return
        rec["ts"] = rec["ktime"] / 1e9 + self.offset
        self.handle(rec)

    # both ------------------------------------------------------------------
    def handle(self, rec: dict[str, Any]) -> None:
        for r in self.tracker.observe(rec):
            self.emit(r)
            if self.engine is not None:
                for extra in self.engine.process(r):
                    self.emit(extra)

    def emit(self, rec: dict[str, Any]) -> None:
        rec.setdefault("ts", time.time())
        rec.setdefault("episode", None)
        self.count += 1
        self.by_kind[rec["type"]] += 1
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
