"""Attach and detach: a cgroup the tracer did not make becomes an episode
(`agent-tracer episode attach --id ID (--cgroup PATH | --pid PID)`, the
control socket's `attach` / `detach`, episode_tracer.api.attach_episode), and the
runtime's side of container episodes (episode_tracer/sources.py).

The tracker's state belongs to the loop thread: requests from the control
thread are queued here and run by a poll hook of the loop (the caller waits
for the answer). Everything a request does is in `attach_now` /
`detach_now`, which run on the loop thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .events import TRACK_CGROUP

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
SOURCES_POLL_S = 0.05  # pending containers are retried this often


class AttachError(RuntimeError):
    pass


def cgroup_of_pid(pid: int) -> Path:
    from . import cgroups

    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise AttachError(f"pid: expected a positive integer, got {pid!r}")
    p = cgroups.pid_cgroup_path(pid)
    if p is None:
        raise AttachError(f"no process {pid} (or it has no cgroup v2 membership)")
    return p


def resolve_target(cgroup: str | None, pid: int | None) -> Path:
    """--cgroup PATH (absolute, or relative to the cgroup2 mount) or --pid PID."""
    from . import cgroups

    if (cgroup is None) == (pid is None):
        raise AttachError("attach: exactly one of 'cgroup' or 'pid' is required")
    if pid is not None:
        return cgroup_of_pid(pid)
    if not isinstance(cgroup, str) or not cgroup:
        raise AttachError(f"cgroup: expected a path, got {cgroup!r}")
    mount = cgroups.cgroup2_mount()
    p = Path(cgroup)
    if not p.is_absolute() or not str(p).startswith(str(mount)):
        p = mount / cgroup.lstrip("/")
    return p


class _Request:
    __slots__ = ("fn", "box", "done", "claimed")

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.box, self.done, self.claimed = fn, [], threading.Event(), threading.Lock()


def _run(req: _Request) -> None:
    """Run a request once (the loop, or the caller when no loop runs)."""
    if not req.claimed.acquire(blocking=False):
        return
    try:
        req.box.append(("ok", req.fn()))
    except Exception as e:  # the caller gets it
        req.box.append(("err", e))
    req.done.set()


class SourceOps:
    """Installed on a Runtime at start: the request queue, container episodes."""

    def __init__(self, rt: Any):
        self.rt = rt
        self.requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self.loop_thread: int | None = None
        self._last_sources = 0.0

    def poll(self) -> None:
        self.loop_thread = threading.get_ident()
        while True:
            try:
                req = self.requests.get_nowait()
            except queue.Empty:
                break
            _run(req)
        tr = self.rt.tracker
        if tr.containers is not None and tr.containers.pending:
            now = time.monotonic()
            if now - self._last_sources >= SOURCES_POLL_S:
                self._last_sources = now
                for r in tr.poll_sources(time.time()):
                    self.rt.pipeline.emit(r)

    def call(self, fn: Callable[[], Any], timeout: float = REQUEST_TIMEOUT_S) -> Any:
        """fn() on the loop thread; its result, or its exception raised here."""
        if self.loop_thread == threading.get_ident():
            return fn()
        req = _Request(fn)
        self.requests.put(req)
        if self.loop_thread is None and not req.done.wait(1.0):
            # no loop has polled yet (a tracer driven without its loop): run
            # it here unless the loop claimed it meanwhile
            _run(req)
        if not req.done.wait(timeout):
            raise AttachError(f"the tracer's loop did not answer within {timeout:.0f}s")
        kind, val = req.box[0]
        if kind == "err":
            raise val
        return val


def install(rt: Any) -> SourceOps:
    """At Runtime.start, after the tracker exists: container episodes from
    the config, kernel registration of cgroups that join attached episodes."""
    from .sources import ContainerSource, parse_config

    ops = SourceOps(rt)
    tr = rt.tracker
    cfg = parse_config(getattr(rt.opts, "containers", None) or {})
    if cfg.enabled:
        tr.containers = ContainerSource(cfg)

    def added(ep: str, cg: int) -> None:
        slot = tr.episode_slot(ep)
        if slot is not None and not rt.probes.add_episode_cgroup(cg, slot):
            rt._fail_closed(ep, "episode_cgroups map full")

    tr.on_cgroup_added = added
    rt.add_poll_hook(ops.poll)
    return ops


def track_members(rt: Any, e: Any) -> None:
    """An attached/container episode started: what already runs in its
    cgroups is tracked in the kernel (it stays a member if moved out)."""
    for p in rt.tracker.table.members(e.id):
        if not rt.probes.track_pid(p.pid, TRACK_CGROUP, e.slot):
            rt._kill_pid(p.pid, "tracked map full")


def attach_now(rt: Any, ep: str, path: Path, labels: dict[str, Any] | None = None) -> dict[str, Any]:
    """On the loop thread: episode `ep` from the cgroup at `path`."""
    tr = rt.tracker
    try:
        recs = tr.attach(ep, path, time.time(), "attach")
    except ValueError as e:
        raise AttachError(f"attach {ep}: {e}") from None
    for r in recs:
        rt.pipeline.emit(r)
    rt.pipeline.flush()
    e = tr.episodes.get(ep)
    if not recs or recs[0]["type"] != "episode_start" or e is None:
        why = recs[0].get("reason") if recs else "refused"
        raise AttachError(f"attach {ep}: {why}")
    return {"ok": True, "episode": ep, "cgroup_path": e.cgroup_path, "slot": e.slot,
            "processes": len(tr.table.members(ep)), "message": f"attach {ep}: {e.cgroup_path}"}


def detach_now(rt: Any, ep: str) -> dict[str, Any]:
    """On the loop thread: end episode `ep` without killing; its processes
    leave the kernel's tracked map."""
    tr = rt.tracker
    members = [p.pid for p in tr.table.members(ep)]
    try:
        recs = tr.detach(ep, time.time())
    except ValueError as e:
        raise AttachError(f"detach {ep}: {e}") from None
    for r in recs:
        rt.pipeline.emit(r)
    for pid in members:
        rt.probes.untrack_pid(pid)
    rt.pipeline.flush()
    return {"ok": True, "episode": ep, "released": len(members),
            "message": f"detach {ep}: {len(members)} processes released, none killed"}


def control_attach(rt: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The control socket's `attach` (the control thread)."""
    from .ids import check_episode_id

    ep = args.get("id")
    check_episode_id(ep or "")
    path = resolve_target(args.get("cgroup"), args.get("pid"))
    ops: SourceOps = rt.source_ops
    return ops.call(lambda: attach_now(rt, ep, path))


def control_detach(rt: Any, args: dict[str, Any]) -> dict[str, Any]:
    from .ids import check_episode_id

    ep = args.get("id")
    check_episode_id(ep or "")
    ops: SourceOps = rt.source_ops
    return ops.call(lambda: detach_now(rt, ep))

