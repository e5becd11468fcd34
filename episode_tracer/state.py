"""Live aggregate of the tracer's records, for the dashboard and the control socket.

:class:`State` is a pure aggregator: it is fed the records described in
docs/events.md (dicts, one per JSONL line) through :meth:`State.observe` and
answers :meth:`State.snapshot` with a JSON-serialisable summary. It does no
I/O and reads no clock of its own except ``time.time()`` as the default
``now`` of :meth:`snapshot` (pass ``now`` explicitly when replaying).

``observe`` is on the pipeline's hot path: per record it costs one dict
dispatch, one uncontended lock, and a couple of integer updates (about a
microsecond). ``snapshot`` is called a few times per second and does the
sorting, pruning and formatting work.

Record kinds handled (besides every kernel event, which is counted):

* ``ready``           -> mode, scope, policy_version, selftest
* ``episode_start``   -> new episode, ``running``; ``root_pid`` becomes a member
* ``episode_end``     -> ``ended`` (``killed`` when ``reason == "killed"``)
* ``fork``/``exec``/``exit`` -> live process count of the episode
* ``connect``         -> connect count of the episode
* ``alert``           -> alert feed, per-episode alert count; an *enforced*
  ``kill-episode`` marks the episode ``killed``, ``freeze-episode`` ``frozen``
* ``gpu``             -> per-episode GPU memory / SM utilisation (latest
  sample per (pid, GPU))
* ``gpu_node``        -> ``{"type": "gpu_node", "gpus": [...]}`` replaces the
  node's GPU list
* ``gpu_status``      -> ``{"type": "gpu_status", "status": "ok" | reason}``
* ``gpu_total``       -> per-episode GPU totals from the watcher (peak MiB,
  SM-seconds, MiB-seconds), kept after the episode ends
* ``lost``            -> lost event counters
* ``stats``           -> ``lost_total`` is never shown below the pipeline's own
* ``policy_reload``   -> ``policy_version``, reload status
* ``policy_error``    -> reload status (refused, the old policy kept)
* ``ready.programs``  -> the programs attached; ``stats.counters`` -> gate and
  wire holds per second

Every record of an episode also feeds its :class:`episode_tracer.episode_detail.EpisodeDetail`
(process tree, connections, listeners, alerts, recent records), read with
:meth:`State.detail`; :meth:`State.set_held` says which pids the kernel holds
right now (a gated exec or a held flow awaiting its verdict).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Iterable

from .episode_detail import EpisodeDetail

__all__ = [
    "State",
    "EPISODE_STATES",
    "ALERT_HISTORY",
    "ENDED_KEEP_S",
    "ENDED_KEEP_MAX",
    "RATE_HISTORY_S",
]

EPISODE_STATES = ("running", "frozen", "killed", "ended")
ALERT_HISTORY = 200          # alert records kept for the feed
ENDED_KEEP_S = 600.0         # ended/killed-and-ended episodes are kept this long ...
ENDED_KEEP_MAX = 200         # ... and at most this many of them
RATE_HISTORY_S = 60          # seconds of events/s history in a snapshot
RATE_WINDOW_S = 3            # complete seconds averaged for events_per_s
GPU_STALE_S = 5.0            # a per-process GPU sample older than the newest by this much is ignored
_PRUNED_MEMORY = 1000        # ids of pruned episodes remembered, so late records do not revive them

# Record kinds that are not themselves traced events: they are not counted in
# events_total / events_per_s.
_META_KINDS = frozenset(
    {
        "ready", "stats", "lost", "gpu", "gpu_node", "gpu_status", "gpu_total", "alert",
        "episode_start", "episode_end", "policy_reload", "policy_error",
    }
)


class _Episode:
    __slots__ = (
        "id", "state", "pids", "execs", "connects", "alerts", "gpu",
        "started", "ended", "last_alert_ts", "last_event_ts", "source",
        "exit_code", "end_reason", "gpu_total", "detail",
    )

    def __init__(self, episode_id: str, ts: float, source: str | None = None) -> None:
        self.id = episode_id
        self.state = "running"
        self.pids: set[int] = set()
        self.execs = 0
        self.connects = 0
        self.alerts = 0
        # (pid, gpu_index) -> (used_mib, sm_util, ts)
        self.gpu: dict[tuple[int, Any], tuple[float, float | None, float]] = {}
        self.started = ts
        self.ended: float | None = None
        self.last_alert_ts: float | None = None
        self.last_event_ts = ts
        self.source = source
        self.exit_code: int | None = None
        self.end_reason: str | None = None
        self.gpu_total: dict[str, Any] | None = None  # latest gpu_total record's numbers
        self.detail = EpisodeDetail()                  # for the console's detail view


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    return None


class State:
    """Aggregates tracer records into a dashboard snapshot. Thread-safe."""

    def __init__(
        self,
        node: str,
        mode: str,
        policy_version: str,
        started: float,
        scope: str,
        ended_keep: int = ENDED_KEEP_MAX,
        ended_keep_s: float = ENDED_KEEP_S,
    ) -> None:
        # retention of ended episodes (run options --ended-keep, --ended-keep-s):
        # older ones are dropped from view and counted (`retention` in snapshots)
        if not isinstance(ended_keep, int) or ended_keep < 0:
            raise ValueError(f"ended_keep must be a non-negative integer, got {ended_keep!r}")
        if not isinstance(ended_keep_s, (int, float)) or ended_keep_s < 0:
            raise ValueError(f"ended_keep_s must be a non-negative number of seconds, got {ended_keep_s!r}")
        self.ended_keep = ended_keep
        self.ended_keep_s = float(ended_keep_s)
        self._dropped = 0
        self.node = node
        self.mode = mode
        self.policy_version = policy_version
        self.started = started
        self.scope = scope
        self.version: str | None = None
        self.selftest: dict[str, str] = {}
        self.events_total = 0
        self.events_by_kind: dict[str, int] = {}
        self.lost_by_kind: dict[str, int] = {}
        self._lost_reported = 0           # lost_total as reported by `stats` records
        self.gpus: list[dict[str, Any]] = []
        self.gpu_status = "waiting for the GPU watcher"
        self._episodes: dict[str, _Episode] = {}
        self._pruned: dict[str, None] = {}   # insertion-ordered set
        self._pid_ep: dict[int, _Episode] = {}
        self._alerts: deque[dict[str, Any]] = deque(maxlen=ALERT_HISTORY)
        self._alerts_total = 0
        self._last_gpu_ts = 0.0
        self._n_ended = 0
        self.programs: list[str] = []
        self.reload: dict[str, Any] | None = None   # the last policy_reload / policy_error
        self._counters: tuple[float, dict[str, int]] | None = None
        self.holds_per_s: dict[str, float] = {}    # gated, wire_held: per second between stats records
        self.held_now: dict[int, float] = {}       # pid -> since: stopped by the kernel right now
        # events/s: the current second's count, plus completed seconds
        self._cur_sec = 0
        self._cur_n = 0
        self._buckets: dict[int, int] = {}
        self._lock = threading.Lock()
        self._handlers = {
            "ready": self._on_ready,
            "fork": self._on_fork,
            "exec": self._on_exec,
            "exit": self._on_exit,
            "connect": self._on_connect,
            "alert": self._on_alert,
            "gpu": self._on_gpu,
            "gpu_node": self._on_gpu_node,
            "gpu_status": self._on_gpu_status,
            "gpu_total": self._on_gpu_total,
            "lost": self._on_lost,
            "stats": self._on_stats,
            "episode_start": self._on_episode_start,
            "episode_end": self._on_episode_end,
            "policy_reload": self._on_policy_reload,
            "policy_error": self._on_policy_error,
        }

    # ------------------------------------------------------------------ hot path
    def observe(self, record: dict[str, Any]) -> None:
        """Update the aggregate from one record (any kind; unknown kinds count as events)."""
        with self._lock:
            self._observe(record)

    def observe_many(self, records: Iterable[dict[str, Any]]) -> None:
        """observe() for a batch, under one lock (the service hands over a
        poll's worth of records at once)."""
        with self._lock:
            for rec in records:
                self._observe(rec)

    def _observe(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        ts = record.get("ts") or 0.0
        if kind not in _META_KINDS:
            self._count(kind, ts)
        handler = self._handlers.get(kind)  # type: ignore[arg-type]
        if handler is not None:
            handler(record, ts)
        else:
            ep_id = record.get("episode")
            if ep_id is not None:
                self._episode(ep_id, ts)
        ep_id = record.get("episode")
        if ep_id is not None:
            ep = self._episodes.get(ep_id if isinstance(ep_id, str) else str(ep_id))
            if ep is not None:
                ep.detail.observe(record, kind, ts, kind not in _META_KINDS)

    def _count(self, kind: Any, ts: float) -> None:
        self.events_total += 1
        by_kind = self.events_by_kind
        by_kind[kind] = by_kind.get(kind, 0) + 1
        sec = int(ts)
        if sec == self._cur_sec:
            self._cur_n += 1
        elif sec > self._cur_sec:
            if self._cur_n:
                self._buckets[self._cur_sec] = self._buckets.get(self._cur_sec, 0) + self._cur_n
            self._cur_sec = sec
            self._cur_n = 1
            if len(self._buckets) > 2 * RATE_HISTORY_S:
                floor = sec - RATE_HISTORY_S - 1
                for old in [s for s in self._buckets if s < floor]:
                    del self._buckets[old]
        elif sec >= self._cur_sec - RATE_HISTORY_S:   # slightly out-of-order record
            self._buckets[sec] = self._buckets.get(sec, 0) + 1

    def _episode(self, ep_id: Any, ts: float) -> _Episode | None:
        """The episode record `ep_id`, created on first sight; touches its
        activity time. None for a record without an episode (or a pruned one)."""
        if ep_id is None:
            return None
        ep = self._episodes.get(ep_id)
        if ep is None:
            if not isinstance(ep_id, str):
                ep_id = str(ep_id)
                ep = self._episodes.get(ep_id)
            if ep is None:
                if ep_id in self._pruned:
                    return None
                ep = self._episodes[ep_id] = _Episode(ep_id, ts)
        if ts > ep.last_event_ts:
            ep.last_event_ts = ts
        return ep

    def _join(self, ep: _Episode, pid: Any) -> None:
        if not isinstance(pid, int):
            return
        prev = self._pid_ep.get(pid)
        if prev is not ep:
            if prev is not None:         # pid reused, or moved episode: leave the old one
                prev.pids.discard(pid)
                self._drop_gpu(prev, pid)
            self._pid_ep[pid] = ep
        ep.pids.add(pid)

    def _leave(self, pid: Any) -> None:
        ep = self._pid_ep.pop(pid, None)
        if ep is not None:
            ep.pids.discard(pid)
            if ep.gpu:
                self._drop_gpu(ep, pid)

    @staticmethod
    def _drop_gpu(ep: _Episode, pid: int) -> None:
        if ep.gpu:
            for key in [k for k in ep.gpu if k[0] == pid]:
                del ep.gpu[key]

    # ------------------------------------------------------------------ handlers
    def _on_ready(self, rec: dict[str, Any], ts: float) -> None:
        for key in ("mode", "scope", "policy_version", "version", "node"):
            value = rec.get(key)
            if value is not None and value != "":
                setattr(self, key, str(value))
        selftest = rec.get("selftest")
        if isinstance(selftest, dict):
            self.selftest = {str(k): str(v) for k, v in selftest.items()}
        programs = rec.get("programs")
        if isinstance(programs, list):
            self.programs = [str(p) for p in programs]

    def _on_policy_reload(self, rec: dict[str, Any], ts: float) -> None:
        value = rec.get("policy_version")
        if value is not None:
            self.policy_version = str(value)
        self.reload = {"status": "reloaded", "ts": ts, "old_version": rec.get("old_version"),
                       "policy_version": rec.get("policy_version"), "rules": rec.get("rules"), "errors": []}

    def _on_policy_error(self, rec: dict[str, Any], ts: float) -> None:
        errors = rec.get("errors")
        self.reload = {"status": "refused", "ts": ts, "policy_version": rec.get("kept_version") or self.policy_version,
                       "errors": [str(e) for e in errors] if isinstance(errors, list) else [str(errors)]}

    def _on_fork(self, rec: dict[str, Any], ts: float) -> None:
        ep = self._episode(rec.get("episode"), ts)
        if ep is not None:
            self._join(ep, rec.get("pid"))
            self._join(ep, rec.get("child_pid"))

    def _on_exec(self, rec: dict[str, Any], ts: float) -> None:
        ep = self._episode(rec.get("episode"), ts)
        if ep is not None:
            ep.execs += 1
            self._join(ep, rec.get("pid"))

    def _on_exit(self, rec: dict[str, Any], ts: float) -> None:
        self._episode(rec.get("episode"), ts)
        pid = rec.get("pid")
        tid = rec.get("tid")
        if tid is None or tid == pid:    # the process ended, not just one of its threads
            self._leave(pid)

    def _on_connect(self, rec: dict[str, Any], ts: float) -> None:
        ep = self._episode(rec.get("episode"), ts)
        if ep is not None:
            ep.connects += 1

    def _on_alert(self, rec: dict[str, Any], ts: float) -> None:
        self._alerts.append(dict(rec))
        self._alerts_total += 1
        ep = self._episode(rec.get("episode"), ts)
        if ep is None:
            return
        ep.alerts += 1
        if ep.last_alert_ts is None or ts > ep.last_alert_ts:
            ep.last_alert_ts = ts
        if rec.get("enforced"):
            action = rec.get("action")
            if action == "kill-episode":
                ep.state = "killed"
            elif action == "freeze-episode" and ep.state == "running":
                ep.state = "frozen"

    def _on_gpu(self, rec: dict[str, Any], ts: float) -> None:
        if ts > self._last_gpu_ts:
            self._last_gpu_ts = ts
        ep_id = rec.get("episode")
        pid = rec.get("pid")
        if ep_id is None or not isinstance(pid, int):
            return
        ep = self._episode(ep_id, ts)
        if ep is None:
            return
        used = _num(rec.get("used_mib"))
        ep.gpu[(pid, rec.get("gpu_index"))] = (used or 0.0, _num(rec.get("sm_util")), ts)
        if pid not in self._pid_ep:
            self._join(ep, pid)

    def _on_gpu_node(self, rec: dict[str, Any], ts: float) -> None:
        gpus = rec.get("gpus")
        if isinstance(gpus, list):
            self.gpus = [
                {
                    "index": g.get("index", i),
                    "name": g.get("name"),
                    "util": g.get("util"),
                    "mem_used_mib": g.get("mem_used_mib"),
                    "mem_total_mib": g.get("mem_total_mib"),
                    "power_w": g.get("power_w"),
                }
                for i, g in enumerate(gpus)
                if isinstance(g, dict)
            ]
            if self.gpus:
                self.gpu_status = "ok"

    def _on_gpu_status(self, rec: dict[str, Any], ts: float) -> None:
        status = rec.get("status", rec.get("reason"))
        if status is not None:
            self.gpu_status = str(status)
            if status != "ok":
                self.gpus = []

    def _on_gpu_total(self, rec: dict[str, Any], ts: float) -> None:
        ep = self._episode(rec.get("episode"), ts)
        if ep is None:
            return
        pids = rec.get("pids")
        ep.gpu_total = {
            "peak_mib": _num(rec.get("peak_mib")),
            "sm_s": _num(rec.get("sm_s")),
            "mib_s": _num(rec.get("mib_s")),
            "pids": len(pids) if isinstance(pids, list) else None,
        }

    def _on_lost(self, rec: dict[str, Any], ts: float) -> None:
        if rec.get("episode"):
            return  # per-episode detail (kind episode_rate) of losses the per-kind records already count
        kind = str(rec.get("kind") or "unknown")
        total = rec.get("total")
        if isinstance(total, int) and not isinstance(total, bool):
            if total > self.lost_by_kind.get(kind, 0):
                self.lost_by_kind[kind] = total
        else:
            count = rec.get("count")
            if isinstance(count, int) and not isinstance(count, bool):
                self.lost_by_kind[kind] = self.lost_by_kind.get(kind, 0) + count

    def _on_stats(self, rec: dict[str, Any], ts: float) -> None:
        lost = rec.get("lost_total")
        if isinstance(lost, int) and not isinstance(lost, bool) and lost > self._lost_reported:
            self._lost_reported = lost
        counters = rec.get("counters")
        if isinstance(counters, dict):
            cur = {str(k): int(v) for k, v in counters.items() if isinstance(v, int) and not isinstance(v, bool)}
            prev = self._counters
            if prev is not None and ts > prev[0]:
                dt = ts - prev[0]
                self.holds_per_s = {k: max(0, cur.get(k, 0) - prev[1].get(k, 0)) / dt for k in ("gated", "wire_held")}
            self._counters = (ts, cur)

    def _on_episode_start(self, rec: dict[str, Any], ts: float) -> None:
        ep_id = rec.get("episode")
        if ep_id is None:
            return
        ep_id = str(ep_id)
        self._pruned.pop(ep_id, None)
        old = self._episodes.get(ep_id)
        if old is not None and old.state in ("ended", "killed") and old.ended is not None:
            # the id is reused for a new run: start afresh
            for pid in old.pids:
                if self._pid_ep.get(pid) is old:
                    del self._pid_ep[pid]
            del self._episodes[ep_id]
            self._n_ended -= 1
            old = None
        ep = old if old is not None else self._episode(ep_id, ts)
        assert ep is not None
        if old is None or ts < ep.started:
            ep.started = ts
        source = rec.get("source")
        if source is not None:
            ep.source = str(source)
        self._join(ep, rec.get("root_pid"))

    def _on_episode_end(self, rec: dict[str, Any], ts: float) -> None:
        ep = self._episode(rec.get("episode"), ts)
        if ep is None:
            return
        reason = rec.get("reason")
        ep.end_reason = None if reason is None else str(reason)
        ep.exit_code = rec.get("exit_code")
        if reason == "killed" or ep.state == "killed":
            ep.state = "killed"
        else:
            ep.state = "ended"
        if ep.ended is None:
            self._n_ended += 1
        ep.ended = ts
        for pid in ep.pids:
            if self._pid_ep.get(pid) is ep:
                del self._pid_ep[pid]
        ep.pids.clear()
        ep.gpu.clear()
        if self._n_ended > 2 * self.ended_keep:
            self._prune(None)

    # ------------------------------------------------------------------ commands
    def set_episode_state(self, episode_id: str, state: str) -> bool:
        """Set an episode's state after a command (freeze -> frozen, thaw -> running, kill -> killed).

        Returns False when the episode is unknown.
        """
        if state not in EPISODE_STATES:
            raise ValueError(f"unknown episode state {state!r}; expected one of {', '.join(EPISODE_STATES)}")
        with self._lock:
            ep = self._episodes.get(episode_id)
            if ep is None:
                return False
            if ep.ended is not None and state in ("running", "frozen"):
                return True   # an ended episode cannot be thawed back to life
            ep.state = state
            if state == "ended" and ep.ended is None:
                ep.ended = ep.last_event_ts
                self._n_ended += 1
            return True

    def set_policy_version(self, version: str) -> None:
        with self._lock:
            self.policy_version = version

    def episode_ids(self) -> list[str]:
        with self._lock:
            return list(self._episodes)

    def set_held(self, held: dict[int, float]) -> None:
        """The pids the kernel holds right now (exec gate, wire hold): pid -> since (wall clock).
        Called from the loop's thread after each poll (episode_tracer/service.py)."""
        with self._lock:
            old = self.held_now
            self.held_now = dict(held)
            touched = {self._pid_ep.get(pid) for pid in set(old) | set(held)}
            for ep in touched:
                if ep is not None:
                    ep.detail.set_held({pid: since for pid, since in held.items() if self._pid_ep.get(pid) is ep})

    def episode_members(self) -> dict[str, tuple[str | None, list[int]]]:
        """Running episodes: id -> (cgroup path, live pids); for the CPU sampler."""
        with self._lock:
            return {ep.id: (ep.detail.cgroup_path, list(ep.pids))
                    for ep in self._episodes.values() if ep.ended is None}

    def detail(self, episode_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The detail view of one episode (see episode_tracer/episode_detail.py), None when unknown."""
        if now is None:
            now = time.time()
        with self._lock:
            ep = self._episodes.get(episode_id)
            if ep is None:
                return None
            out = ep.detail.view(now, self._last_gpu_ts - GPU_STALE_S)
            out.update(id=ep.id, state=ep.state, source=ep.source, started=ep.started, ended=ep.ended,
                       end_reason=ep.end_reason, exit_code=ep.exit_code, alerts_total=ep.alerts,
                       execs=ep.execs, connects=ep.connects, live_processes=len(ep.pids),
                       gpu_total=dict(ep.gpu_total) if ep.gpu_total else None, now=now,
                       policy_version=self.policy_version, mode=self.mode)
            return out

    # ------------------------------------------------------------------ snapshot
    def _prune(self, now: float | None) -> None:
        ended = [ep for ep in self._episodes.values() if ep.ended is not None]
        drop: list[_Episode] = []
        if now is not None:
            horizon = now - self.ended_keep_s
            # kept ENDED_KEEP_S after the end or after the last record about it, whichever is later
            drop = [ep for ep in ended if max(ep.ended or 0.0, ep.last_event_ts) < horizon]
        if drop:
            dropped = {id(ep) for ep in drop}
            keep = [ep for ep in ended if id(ep) not in dropped]
        else:
            keep = ended
        if len(keep) > self.ended_keep:
            keep.sort(key=lambda e: max(e.ended or 0.0, e.last_event_ts))
            drop.extend(keep[: len(keep) - self.ended_keep])
        for ep in drop:
            if self._episodes.get(ep.id) is ep:
                del self._episodes[ep.id]
                self._n_ended -= 1
                self._dropped += 1
                self._pruned[ep.id] = None
        while len(self._pruned) > _PRUNED_MEMORY:
            del self._pruned[next(iter(self._pruned))]

    def _rate(self, now_sec: int) -> list[int]:
        buckets = self._buckets
        cur_sec, cur_n = self._cur_sec, self._cur_n
        out = []
        for s in range(now_sec - RATE_HISTORY_S, now_sec):
            n = buckets.get(s, 0)
            if s == cur_sec:
                n += cur_n
            out.append(n)
        return out

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-serialisable summary (see module docs and docs of the dashboard)."""
        if now is None:
            now = time.time()
        with self._lock:
            self._prune(now)
            history = self._rate(int(now))
            window = history[-RATE_WINDOW_S:]
            gpu_fresh = self._last_gpu_ts - GPU_STALE_S
            episodes = []
            for ep in self._episodes.values():
                gpu_mem: float | None = None
                gpu_util: float | None = None
                if ep.gpu:
                    per_gpu: dict[Any, float] = {}
                    mem = 0.0
                    n = 0
                    for (_pid, gidx), (used, util, sts) in ep.gpu.items():
                        if sts < gpu_fresh:
                            continue
                        n += 1
                        mem += used
                        if util is not None:
                            per_gpu[gidx] = per_gpu.get(gidx, 0.0) + util
                    if n:
                        gpu_mem = round(mem, 1)
                        if per_gpu:
                            gpu_util = round(
                                sum(min(v, 100.0) for v in per_gpu.values()) / len(per_gpu), 1
                            )
                episodes.append(
                    {
                        "id": ep.id,
                        "state": ep.state,
                        "processes": len(ep.pids),
                        "execs": ep.execs,
                        "connects": ep.connects,
                        "alerts": ep.alerts,
                        "gpu_mem_mib": gpu_mem,
                        "gpu_util": gpu_util,
                        "gpu_total": dict(ep.gpu_total) if ep.gpu_total else None,
                        "started": ep.started,
                        "ended": ep.ended,
                        "last_alert_ts": ep.last_alert_ts,
                        "last_event_ts": ep.last_event_ts,
                        "source": ep.source,
                        "end_reason": ep.end_reason,
                        "exit_code": ep.exit_code,
                        "events": ep.detail.events,
                        "cgroup_path": ep.detail.cgroup_path,
                        "exes": list(ep.detail.exes),
                        "held": ep.detail.held(now) if ep.detail.held_pids else [],
                        "cpu_pct": None,
                    }
                )
            alerts = list(self._alerts)
            lost_by_kind = dict(self.lost_by_kind)
            snap = {
                "node": self.node,
                "now": now,
                "uptime_s": max(0.0, now - self.started),
                "version": self.version,
                "policy_version": self.policy_version,
                "mode": self.mode,
                "scope": self.scope,
                "events_total": self.events_total,
                "events_by_kind": dict(self.events_by_kind),
                "events_per_s": (sum(window) / len(window)) if window else 0.0,
                "rate_history": history,
                "lost_total": max(sum(lost_by_kind.values()), self._lost_reported),
                "lost_by_kind": lost_by_kind,
                "selftest": dict(self.selftest),
                "episodes": episodes,
                "alerts": alerts,
                "alerts_total": self._alerts_total,
                "gpus": [dict(g) for g in self.gpus],
                "gpu_status": self.gpu_status,
                "retention": {"keep": self.ended_keep, "keep_s": self.ended_keep_s, "dropped": self._dropped},
                "programs": list(self.programs),
                "holds_per_s": dict(self.holds_per_s),
                "held_now": len(self.held_now),
                "reload": dict(self.reload) if self.reload else None,
            }
        episodes.sort(
            key=lambda e: (
                e["last_alert_ts"] if e["last_alert_ts"] is not None else float("-inf"),
                e["last_event_ts"],
            ),
            reverse=True,
        )
        return snap
