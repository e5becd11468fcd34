"""Operator commands as typed operations the loop thread alone carries out.

The loop thread (tracer/runtime.py `Runtime.loop`) is the only writer of the
tracer's core state: the episode tracker and process table, the engine and
its enforcer, the kernel maps, the pipeline. Other threads (the control
socket's selector thread, a trainer's API call) never touch that state: they
build a typed command (:class:`EpisodeAction`, :class:`ListEpisodes`,
:class:`EpisodeStatus`), :meth:`CommandQueue.submit` it, and wait on a future
for the reply, with a timeout. The loop drains the queue after every
ring-buffer poll (:meth:`CommandQueue.drain`) and runs each command through
:func:`execute`, which replies ``{"ok": ...}`` dicts in the control socket's
shape (tracer/control.py).

The GPU watcher follows the same rule: its thread only queues samples, the
loop turns them into records (tracer/gpu_watch.py).

A command submitted from the loop thread itself runs at once (no deadlock).
One submitted while no loop runs (stopped, or a test driving the runtime by
hand) times out with a clear error; so does one the loop has not taken
within `timeout`: it is withdrawn, and never runs later.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Union

from .ids import check_episode_id

COMMAND_TIMEOUT_S = 10.0  # how long a submitter waits for the loop to take and answer a command
ACTIONS = ("freeze", "thaw", "kill")
FAST_POLL_MS = 5  # the loop's poll timeout right after it answered commands (docs/control.md)
FAST_POLL_S = 0.5  # ... for this long: a status handshake's next question is answered at once


class EpisodeOpError(RuntimeError):
    """A command that cannot run (bad arguments, no such episode, failed)."""


class CommandTimeout(EpisodeOpError):
    """The loop did not take or answer the command in time."""


@dataclass(frozen=True)
class EpisodeAction:
    """freeze, thaw or kill one running episode (an operator command:
    applied in monitor mode too)."""

    cmd: str
    episode: str


@dataclass(frozen=True)
class ListEpisodes:
    """The episodes the live view holds, with its retention."""


@dataclass(frozen=True)
class EpisodeStatus:
    """Whether the tracer gave the episode its kernel identity (the start
    handshake of run_episode, docs/scale.md)."""

    episode: str


Command = Union[EpisodeAction, ListEpisodes, EpisodeStatus]


def parse(cmd: str, args: dict[str, Any]) -> Command:
    """The one validation of an episode request: a typed command, or
    EpisodeOpError naming what is wrong."""
    if cmd == "list":
        return ListEpisodes()
    if cmd == "status":
        return EpisodeStatus(check_episode_id(args.get("id") or ""))
    if cmd not in ACTIONS:
        raise EpisodeOpError(f"unknown episode command {cmd!r} (expected list, status, {', '.join(ACTIONS)})")
    ep = args.get("id")
    if not ep:
        raise EpisodeOpError(f"{cmd}: an episode id is required")
    return EpisodeAction(cmd, check_episode_id(ep))


# ----------------------------------------------------------------- execution
def execute(rt: Any, state: Any, op: Command) -> dict[str, Any]:
    """Carry out `op` on the loop thread. `rt` is the Runtime (None: only a
    live view, as in tests of the control socket), `state` the live view
    (tracer/state.py; None when there is none)."""
    if isinstance(op, ListEpisodes):
        if state is None:
            raise EpisodeOpError("list: this tracer keeps no live view")
        snap = state.snapshot()
        return {"ok": True, "episodes": snap.get("episodes", []), "retention": snap.get("retention")}
    if rt is None:
        raise EpisodeOpError("this control socket serves no tracer")
    if isinstance(op, EpisodeStatus):
        return episode_status(rt.tracker, op.episode)
    if isinstance(op, EpisodeAction):
        return _episode_action(rt, state, op)
    raise EpisodeOpError(f"not a command: {op!r}")  # pragma: no cover - parse() makes only these


def episode_status(tracker: Any, ep: str) -> dict[str, Any]:
    e = tracker.episodes.get(ep)
    if e is not None and not e.ended and e.kernel:
        return {"ok": True, "episode": ep, "state": "registered", "slot": e.slot}
    if ep in tracker.refused:
        s = tracker.slots
        return {"ok": True, "episode": ep, "state": "refused",
                "error": f"episode {ep!r} refused: the tracer already runs {len(s)} episodes, its limit "
                         f"(--max-episodes {s.capacity})"}
    return {"ok": True, "episode": ep, "state": "unknown"}


def enforcer_of(rt: Any) -> Any:
    """The tracer's one Enforcer: the engine's; a tracer without policy gets
    one (monitor off: operator commands are not policy actions) the first
    time an operator command needs it, kept on the runtime."""
    eng = rt.pipeline.engine if rt.pipeline is not None else None
    if eng is not None and eng.enforcer is not None:
        return eng.enforcer
    enf = getattr(rt, "operator_enforcer", None)
    if enf is None:
        from .enforce import Enforcer

        tracker = rt.tracker
        enf = Enforcer(False, lambda x: tracker.cgroups.paths.get(x),
                       lambda x: [p.pid for p in tracker.table.members(x)], rt.probes.release_gated)
        rt.operator_enforcer = enf
    return enf


def _episode_action(rt: Any, state: Any, op: EpisodeAction) -> dict[str, Any]:
    cmd, ep = op.cmd, op.episode
    e = rt.tracker.episodes.get(ep)
    if e is None or e.ended:
        raise EpisodeOpError(f"no running episode {ep!r}")
    enf = enforcer_of(rt)
    # operator commands are not policy actions: they apply in monitor mode
    # too, so they call the enforcer's episode operations, not apply()
    if cmd == "kill":
        ok, detail = enf.kill_episode(ep)
        new = "killed"
    else:
        ok, detail = enf.freeze_episode(ep, cmd == "freeze")
        new = "frozen" if cmd == "freeze" else "running"
    if not ok:
        raise EpisodeOpError(f"{cmd} {ep} failed: {detail}")
    if state is not None:
        state.set_episode_state(ep, new)
    rt.pipeline.emit({"type": "episode_command", "ts": time.time(), "episode": ep, "cmd": cmd, "by": "operator"})
    return {"ok": True, "message": f"{cmd} {ep}: ok", "state": new}


# --------------------------------------------------------------------- queue
class CommandQueue:
    """Commands from other threads to the loop thread, answered through futures."""

    def __init__(self) -> None:
        self._q: deque[tuple[Command, Any, Future]] = deque()
        self._owner: int | None = None  # the loop thread's ident, set by drain()
        self.executed = 0
        self.failed = 0
        self.timed_out = 0
        self._fast_until = 0.0

    def submit(self, rt: Any, state: Any, op: Command, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """Hand `op` to the loop thread and wait for its reply (the reply dict;
        EpisodeOpError from the command; CommandTimeout when the loop did not
        answer within `timeout`)."""
        if self._owner == threading.get_ident():
            return execute(rt, state, op)
        fut: Future = Future()
        self._q.append((op, state, fut))
        try:
            return fut.result(timeout)
        except FutureTimeout:
            if fut.cancel():  # not taken yet: withdrawn, it will not run later
                self.timed_out += 1
                raise CommandTimeout(f"the tracer's loop did not take the command within {timeout:g} s "
                                     "(stopped or overloaded)") from None
            # taken just now: it runs; its reply comes soon
            return fut.result(timeout)
        except CancelledError:  # pragma: no cover - only this method cancels
            raise CommandTimeout("the command was withdrawn") from None

    def drain(self, rt: Any) -> int:
        """Run every queued command (loop thread). Returns how many ran."""
        self._owner = threading.get_ident()
        q = self._q
        n = 0
        while q:
            op, state, fut = q.popleft()
            if not fut.set_running_or_notify_cancel():
                continue  # its submitter gave up
            try:
                fut.set_result(execute(rt, state, op))
            except Exception as e:  # noqa: BLE001 - the reply carries it, the loop goes on
                self.failed += 1
                fut.set_exception(e)
            n += 1
        if n:
            self.executed += n
            self._fast_until = time.monotonic() + FAST_POLL_S
        return n

    def poll_ms(self, default_ms: int) -> int:
        """The loop's next poll timeout: short for a moment after commands
        ran (a handshake asks again soon), else `default_ms`."""
        if self._q or time.monotonic() < self._fast_until:
            return min(default_ms, FAST_POLL_MS)
        return default_ms

    def pending(self) -> int:
        return len(self._q)
