"""`agent-tracer run`'s foreground service: the event loop, the control
socket for `agent-tracer top` and episode commands, and the in-process view."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from .episode_ops import EpisodeOpError, apply_episode_command, apply_trainer_op

log = logging.getLogger(__name__)

STATE_BATCH = 256  # records handed to the dashboard state at once (at the latest after each poll)


def _make_state(rt):
    from .state import State

    ready = rt.ready_record or {}
    st = State(node=ready.get("node", ""), mode=ready.get("mode", "enforce"),
               policy_version=ready.get("policy_version") or "", started=rt.started,
               scope=ready.get("scope", "episodes"), ended_keep=rt.opts.ended_keep,
               ended_keep_s=rt.opts.ended_keep_s)
    st.observe(ready)
    return st


def trainer_ids(opts) -> tuple[frozenset[int], frozenset[int]]:
    """The trainers' uids and gids of the run options (a group by name or
    number); ValueError naming an unknown group."""
    import grp

    gids: set[int] = set()
    g = opts.trainer_group
    if g not in (None, ""):
        if str(g).isdigit():
            gids.add(int(g))
        else:
            try:
                gids.add(grp.getgrnam(str(g)).gr_gid)
            except KeyError:
                raise ValueError(f"trainer_group: no group {g!r} on this node") from None
    return frozenset(int(u) for u in opts.trainer_uids), frozenset(gids)


def control_server(rt, snapshot, handle, detail):
    """The tracer's control socket: root's, and the trainers' when
    trainer_group / trainer_uids are set (docs/episodes.md "Trainer API")."""
    from .control import ControlServer

    uids, gids = trainer_ids(rt.opts)

    def trainer(op: str, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return apply_trainer_op(rt, op, req)
        except EpisodeOpError as e:
            return {"ok": False, "error": str(e)}

    return ControlServer(rt.opts.control_socket, snapshot, handle, get_detail=detail,
                         trainer_uids=uids, trainer_gids=gids, handle_trainer=trainer)


def serve(rt, dashboard: bool = False) -> None:
    state = _make_state(rt)  # State locks itself: observe() and snapshot() run on different threads
    server = None
    # appended by the loop's thread only (operator commands run there too,
    # episode_tracer/commands.py); a deque all the same: cheap, and safe to flush
    pending: deque[dict[str, Any]] = deque()

    def observe(rec: dict[str, Any]) -> None:
        # the state takes a poll's records at once (one lock, not one per
        # record: the per-event budget); alerts go to `top` as they happen
        pending.append(rec)
        if len(pending) >= STATE_BATCH:  # a long poll under load must not hold records in memory
            flush()
        if server is not None:
            t = rec.get("type")
            if t == "alert":
                server.publish_alert(rec)
            elif t == "episode_end":
                server.publish_end(rec)  # the end of an episode_watch stream

    def flush() -> None:
        if pending:
            state.observe_many([pending.popleft() for _ in range(len(pending))])

    rt.add_observer(observe)
    rt.add_poll_hook(flush)
    # episodes already known at start
    for e in rt.tracker.episodes.values():
        if not e.ended:
            observe({"type": "episode_start", "ts": e.started or time.time(), "episode": e.id,
                     "source": e.source, "cgroup_path": e.cgroup_path, "root_pid": e.root_pid})

    from .console_feed import ConsoleFeed

    feed = ConsoleFeed(rt, state)       # CPU, detail views and held-right-now for `top`
    rt.add_poll_hook(feed.poll_held)
    snapshot = feed.snapshot

    def handle(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return apply_episode_command(rt, state, cmd, args)
        except EpisodeOpError as e:
            return {"ok": False, "error": str(e)}

    if rt.opts.control_socket is not None:
        try:
            server = control_server(rt, snapshot, handle, feed.detail)
            server.start()
        except OSError as e:
            log.warning("control socket %s unavailable: %s", rt.opts.control_socket, e)
            server = None
    try:
        if dashboard:
            from .dashboard import run_inline

            loop = threading.Thread(target=rt.loop, name="tracer-loop", daemon=True)
            loop.start()
            try:
                run_inline(snapshot, rt.stop_event)
            finally:
                rt.stop_event.set()
                loop.join(timeout=5)
        else:
            rt.loop()
    finally:
        if server is not None:
            server.close()
