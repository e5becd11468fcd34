"""What the tracer adds to its State for `agent-tracer top` (episode_tracer/service.py wires it).

* :meth:`ConsoleFeed.poll_held` runs on the loop's thread after each poll (at
  most every :data:`HELD_POLL_S`): the pids the kernel holds right now (the
  ``gated`` map: an exec gate or a wire hold awaiting its verdict) go to
  :meth:`State.set_held` with the time each was first seen held.
* :meth:`ConsoleFeed.snapshot` and :meth:`ConsoleFeed.detail` run on the
  control socket's thread: the State's snapshot (detail) with the CPU use of
  every running episode (of each process of the episode) added (episode_tracer/cpu.py).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from .cpu import CpuSampler

HELD_POLL_S = 0.2


class ConsoleFeed:
    def __init__(self, rt: Any, state: Any, cpu: CpuSampler | None = None) -> None:
        self.rt = rt
        self.state = state
        self.cpu = cpu or CpuSampler()
        self._held: dict[int, float] = {}
        self._last_held = 0.0
        self.held_errors = 0
        self._cpu_lock = threading.Lock()   # the control thread and the inline view both take snapshots

    # ------------------------------------------------------------ loop thread
    def poll_held(self) -> None:
        now = time.monotonic()
        if now - self._last_held < HELD_POLL_S:
            return
        self._last_held = now
        probes = getattr(self.rt, "probes", None)
        if probes is None:
            return
        try:
            gated = probes.gated()
        except Exception:            # the map is gone (closing): nothing is held any more
            self.held_errors += 1
            gated = {}
        eng = self.rt.pipeline.engine if getattr(self.rt, "pipeline", None) is not None else None
        canary = getattr(eng, "canary_pids", ()) or ()
        pids = [pid for pid in gated if pid not in canary]
        if not pids and not self._held:
            return
        wall = time.time()
        held = {pid: self._held.get(pid, wall) for pid in pids}
        if held != self._held:
            self._held = held
            self.state.set_held(held)

    # ------------------------------------------------------- control thread
    def snapshot(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        try:
            with self._cpu_lock:
                pct = self.cpu.episodes(self.state.episode_members())
        except Exception:            # CPU is a nicety: never fail the snapshot for it
            pct = {}
        for e in snap.get("episodes", []):
            if e.get("id") in pct:
                e["cpu_pct"] = None if pct[e["id"]] is None else round(pct[e["id"]], 1)
        return snap

    def detail(self, episode_id: str) -> dict[str, Any] | None:
        d = self.state.detail(episode_id)
        if d is None:
            return None
        live = [p["pid"] for p in d.get("processes", []) if p.get("state") != "exited"]
        try:
            with self._cpu_lock:
                per = self.cpu.processes(live)
        except Exception:
            per = {}
        for p in d.get("processes", []):
            got = per.get(p["pid"])
            if got is not None:
                p["proc_state"], pct = got
                p["cpu_pct"] = None if pct is None else round(pct, 1)
        return d
