"""The GPU watcher: NVML samples -> `gpu` records attributed to episodes.

A background thread (started lazily, after the tracer is ready) reads one
sample every `interval` seconds through episode_tracer.gpu (every NVML call through
its one helper). The tracer's loop thread calls :meth:`GpuWatcher.poll`,
which turns the samples queued since into records:

* `gpu_status`: when the watcher's status changes (`ok`, or why there is
  nothing to watch: no nvidia-ml-py, no driver, no GPU, NVML errors);
* `gpu_node`: one per sample, the node's GPUs (utilisation, memory, power);
* `gpu`: one per (process, GPU) per sample, attributed to the process's
  episode through the process table (and /proc for processes the table does
  not hold), with `gpu_allowed` (episode_tracer.gpu_allow) and `interval_s`; these
  go through the policy like any other event;
* `gpu_total`: per episode that used a GPU, its running totals (peak memory,
  SM-seconds, MiB-seconds, processes), one per sample, and a final one
  (`final: true`) when the episode ends.
* `gpu_budget`: per episode whose processes *without the GPU right* used a
  GPU in the last BUDGET_WINDOWS seconds, their SM-seconds and MiB-seconds
  summed over each window across all such processes: pulsing under a
  per-process threshold, or cycling through short-lived pids, adds up here
  (rules in gpu.toml: gpu-*-budget-in-episode).

Attribution and totals run in the loop thread, so the process table is
never read from two threads. An NVML call that hangs delays only the
sampling thread.
"""
from __future__ import annotations

import logging
import queue
from collections import deque
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .gpu import Sample, Sampler
from .gpu_allow import GpuAllow
from .proctable import Proc, read_proc

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 1.0
QUEUE_MAX = 64  # samples waiting for the loop thread; older ones are dropped (counted)
BUDGET_WINDOWS = (60, 600)  # seconds: gpu_budget sums over each (fields sm_s_60, mib_s_600, ...)


@dataclass
class EpisodeGpu:
    """Running GPU totals of one episode."""

    peak_mib: float = 0.0  # highest sum of its processes' GPU memory in one sample
    mib_s: float = 0.0  # integral of that sum over time
    sm_s: float = 0.0  # SM-seconds: 100 % SM of one GPU for one second is 1
    pids: set[int] = field(default_factory=set)
    samples: int = 0
    last_ts: float = 0.0

    def record(self, episode: str, ts: float, final: bool = False) -> dict[str, Any]:
        return {"type": "gpu_total", "ts": ts, "episode": episode, "peak_mib": round(self.peak_mib, 1),
                "mib_s": round(self.mib_s, 1), "sm_s": round(self.sm_s, 2), "pids": sorted(self.pids),
                "samples": self.samples, "final": final}


class GpuWatcher:
    def __init__(self, tracker: Any, interval: float = DEFAULT_INTERVAL_S, sampler: Sampler | None = None,
                 allow: GpuAllow | None = None):
        self.tracker = tracker
        self.interval = interval
        self.sampler = sampler or Sampler()
        self.allow = allow or GpuAllow.for_tracker(tracker)
        self.status: str | None = None
        self.totals: dict[str, EpisodeGpu] = {}
        self.dropped = 0
        self.samples = 0
        self._q: queue.Queue[Sample] = queue.Queue(QUEUE_MAX)
        self._ended: list[tuple[str, float]] = []
        # per episode: (ts, sm_s, mib_s, pids) of its processes without the GPU
        # right, one entry per sample, the last max(BUDGET_WINDOWS) seconds
        self.budget: dict[str, deque[tuple[float, float, float, frozenset[int]]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- thread side
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpu-watcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                s = self.sampler.sample()
            except Exception as e:  # noqa: BLE001 - the watcher never takes the tracer down
                log.warning("GPU sample failed: %s", e)
                s = Sample(time.time(), f"sampling failed: {e}")
            self._put(s)
            if s.status != "ok" and s.status.startswith(("nvidia-ml-py", "NVML unavailable", "no GPU")):
                return  # nothing to watch on this node: said once, then quiet
            next_t += self.interval
            self._stop.wait(max(0.0, next_t - time.monotonic()))
            if time.monotonic() - next_t > 5 * self.interval:
                next_t = time.monotonic()  # fell far behind (suspend, hung call): do not burst

    def _put(self, s: Sample) -> None:
        try:
            self._q.put_nowait(s)
        except queue.Full:
            try:
                self._q.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            self._q.put_nowait(s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------- loop side
    def episode_ended(self, episode: str, ts: float) -> None:
        """Called (loop thread) for an episode_end record; the final totals
        come out of the next poll()."""
        if episode in self.totals:
            self._ended.append((episode, ts))

    def poll(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                s = self._q.get_nowait()
            except queue.Empty:
                break
            out.extend(self.records_for(s))
        for ep, ts in self._ended:
            self.budget.pop(ep, None)
            t = self.totals.pop(ep, None)
            if t is not None:
                out.append(t.record(ep, ts, final=True))
        self._ended.clear()
        return out

    def records_for(self, s: Sample) -> list[dict[str, Any]]:
        """Records of one sample (pure but for the process table and the
        totals it updates)."""
        self.samples += 1
        out: list[dict[str, Any]] = []
        if s.status != self.status:
            self.status = s.status
            out.append({"type": "gpu_status", "ts": s.ts, "episode": None, "status": s.status})
        if s.status != "ok":
            return out
        out.append({"type": "gpu_node", "ts": s.ts, "episode": None, "gpus": [
            {"index": d.index, "uuid": d.uuid, "name": d.name, "util": d.util, "mem_util": d.mem_util,
             "mem_used_mib": d.mem_used_mib, "mem_total_mib": d.mem_total_mib, "power_w": d.power_w}
            for d in s.devices]})
        per_ep: dict[str, tuple[float, float]] = {}
        unallowed: dict[str, tuple[float, float, set[int]]] = {}
        procs: dict[int, tuple[Proc | None, str | None, str | None]] = {}
        for ps in s.procs:
            if ps.pid not in procs:
                procs[ps.pid] = self._attribute(ps.pid)
            p, ep, membership = procs[ps.pid]
            rec: dict[str, Any] = {
                "type": "gpu", "ts": s.ts, "episode": ep, "membership": membership, "pid": ps.pid,
                "ppid": p.ppid if p else None, "exe": p.exe if p else None, "comm": p.comm if p else None,
                "uid": p.uid if p else None, "argv": p.argv if p else None,
                "gpu_index": ps.gpu_index, "gpu_uuid": ps.gpu_uuid, "used_mib": ps.used_mib,
                "sm_util": ps.sm_util, "mem_util": ps.mem_util,
                "gpu_allowed": self.allow.allowed_proc(p, ep) if p is not None else False,
                "interval_s": self.interval,
            }
            out.append(rec)
            if ep is not None and not rec["gpu_allowed"]:
                umib, usm, upids = unallowed.setdefault(ep, (0.0, 0.0, set()))
                upids.add(ps.pid)
                unallowed[ep] = (umib + (ps.used_mib or 0.0), usm + (ps.sm_util or 0.0), upids)
            if ep is not None:
                mib, sm = per_ep.get(ep, (0.0, 0.0))
                per_ep[ep] = (mib + (ps.used_mib or 0.0), sm + (ps.sm_util or 0.0))
                self.totals.setdefault(ep, EpisodeGpu()).pids.add(ps.pid)
        for ep, (mib, sm) in per_ep.items():
            t = self.totals[ep]
            dt = min(s.ts - t.last_ts, 2.5 * self.interval) if t.samples else self.interval
            if ep in unallowed:
                umib, usm, upids = unallowed[ep]
                self.budget.setdefault(ep, deque()).append((s.ts, usm / 100.0 * dt, umib * dt, frozenset(upids)))
            t.samples += 1
            t.last_ts = s.ts
            t.peak_mib = max(t.peak_mib, mib)
            t.mib_s += mib * dt
            t.sm_s += sm / 100.0 * dt
            out.append(t.record(ep, s.ts))
        out.extend(self._budget_records(s.ts))
        return out

    def _budget_records(self, now: float) -> list[dict[str, Any]]:
        """Windowed sums of GPU use without the GPU right, per episode."""
        out = []
        keep = max(BUDGET_WINDOWS)
        for ep in list(self.budget):
            q = self.budget[ep]
            while q and now - q[0][0] >= keep:
                q.popleft()
            if not q:
                del self.budget[ep]
                continue
            rec: dict[str, Any] = {"type": "gpu_budget", "ts": now, "episode": ep, "interval_s": self.interval}
            pids: set[int] = set()
            for w in BUDGET_WINDOWS:
                sm = mib = 0.0
                for ts, s_sm, s_mib, s_pids in q:
                    if now - ts < w:
                        sm += s_sm
                        mib += s_mib
                        if w == keep:
                            pids |= s_pids
                rec[f"sm_s_{w}"] = round(sm, 2)
                rec[f"mib_s_{w}"] = round(mib, 1)
            rec["pids"] = sorted(pids)
            rec["pid"] = max(q[-1][3]) if q[-1][3] else None  # the latest such process (for the alert)
            out.append(rec)
        return out

    def _attribute(self, pid: int) -> tuple[Proc | None, str | None, str | None]:
        """(process, episode, membership) of an NVML pid."""
        tr = self.tracker
        p = tr.table.get(pid) if tr is not None else None
        if p is not None and p.exited is None:
            return p, p.episode, p.membership
        p = read_proc(pid)
        if p is None or tr is None:
            return p, None, None
        # a process the table does not hold (outside episodes in the default
        # scope): resolve it the way the tracker would, without keeping it
        ep = tr.cgroups.episode_of(p.cgroup)
        if ep is not None:
            return p, ep, "cgroup"
        if p.env_episode:
            return p, p.env_episode, "env"
        parent = tr.table.get(p.ppid) if p.ppid else None
        if parent is not None and parent.episode and parent.exited is None:
            return p, parent.episode, "lineage"
        return p, None, None
