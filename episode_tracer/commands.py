"""Operator commands as typed operations the loop thread alone carries out.

The loop thread (episode_tracer/runtime.py `Runtime.loop`) is the only writer of the
tracer's core state: the episode tracker and process table, the engine and
its enforcer, the kernel maps, the pipeline. Other threads (the control
socket's selector thread, a trainer's API call) never touch that state: they
build a typed command (:class:`EpisodeAction`, :class:`ListEpisodes`,
:class:`EpisodeStatus`), :meth:`CommandQueue.submit` it, and wait on a future
for the reply, with a timeout. The loop drains the queue after every
ring-buffer poll (:meth:`CommandQueue.drain`) and runs each command through
:func:`execute`, which replies ``{"ok": ...}`` dicts in the control socket's
shape (episode_tracer/control.py).

The GPU watcher follows the same rule: its thread only queues samples, the
loop turns them into records (episode_tracer/gpu_watch.py).

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
class Caller:
    """Who sent a command, from SO_PEERCRED (episode_tracer/control.py). None on a
    command means an admin (root, the tracer's uid, in-process)."""

    pid: int
    uid: int
    trainer: bool  # not root: only its own episodes (docs/episodes.md "Trainer API")


@dataclass(frozen=True)
class EpisodeAction:
    """freeze, thaw or kill one running episode (an operator command:
    applied in monitor mode too)."""

    cmd: str
    episode: str
    caller: Caller | None = None


@dataclass(frozen=True)
class ListEpisodes:
    """The episodes the live view holds, with its retention (a trainer's:
    its own; all=True is root's)."""

    caller: Caller | None = None
    all: bool = False


@dataclass(frozen=True)
class EpisodeStatus:
    """Whether the tracer gave the episode its kernel identity (the start
    handshake of run_episode, docs/scale.md)."""

    episode: str
    caller: Caller | None = None


@dataclass(frozen=True)
class EpisodeOpen:
    """Trainer API: make the episode's cgroup and put the caller's child
    `pid` (blocked in the exec helper, episode_tracer/api.py) in it."""

    episode: str
    pid: int
    caller: Caller | None = None


@dataclass(frozen=True)
class EpisodeClose:
    """Trainer API: end an opened episode (leftovers killed, cgroup removed)."""

    episode: str
    caller: Caller | None = None


@dataclass(frozen=True)
class EpisodeVerdicts:
    """Trainer API: the lines of the episode's verdict file (alerts, the
    operator's commands, GPU totals) for a caller that cannot read it."""

    episode: str
    caller: Caller | None = None


@dataclass(frozen=True)
class EpisodeWatch:
    """Trainer API: may the caller watch the episode's live verdicts (the
    control socket streams them, episode_tracer/control.py episode_watch)."""

    episode: str
    caller: Caller | None = None


Command = Union[EpisodeAction, ListEpisodes, EpisodeStatus, EpisodeOpen, EpisodeClose, EpisodeVerdicts,
                EpisodeWatch]
OWNERS_KEPT = 10000  # opened episodes whose owner is remembered (verdicts stay readable after the end)


def _caller(args: dict[str, Any]) -> Caller | None:
    peer = args.get("peer")
    if not isinstance(peer, dict) or peer.get("role", "admin") == "admin":
        return None
    return Caller(int(peer.get("pid") or 0), int(peer.get("uid", -1)), True)


def _episode_arg(what: str, args: dict[str, Any]) -> str:
    ep = args.get("id")
    if not ep or not isinstance(ep, str):
        raise EpisodeOpError(f"{what}: an episode id is required")
    return check_episode_id(ep)


def parse(cmd: str, args: dict[str, Any]) -> Command:
    """The one validation of an episode request: a typed command, or
    EpisodeOpError naming what is wrong."""
    caller = _caller(args)
    if cmd == "list":
        return ListEpisodes(caller, bool(args.get("all")))
    if cmd == "status":
        return EpisodeStatus(check_episode_id(args.get("id") or ""), caller)
    if cmd not in ACTIONS:
        raise EpisodeOpError(f"unknown episode command {cmd!r} (expected list, status, {', '.join(ACTIONS)})")
    return EpisodeAction(cmd, _episode_arg(cmd, args), caller)


def parse_trainer(op: str, args: dict[str, Any]) -> Command:
    """A trainer op of the control socket (TRAINER_OPS) as a typed command."""
    caller = _caller(args)
    if op == "episode_open":
        pid = args.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
            raise EpisodeOpError("episode_open: 'pid' (the child to place) must be a process id")
        return EpisodeOpen(_episode_arg(op, args), pid, caller)
    if op == "episode_close":
        return EpisodeClose(_episode_arg(op, args), caller)
    if op == "episode_verdicts":
        return EpisodeVerdicts(_episode_arg(op, args), caller)
    if op == "episode_watch":
        return EpisodeWatch(_episode_arg(op, args), caller)
    raise EpisodeOpError(f"unknown trainer op {op!r}")


# ----------------------------------------------------------------- execution
def execute(rt: Any, state: Any, op: Command) -> dict[str, Any]:
    """Carry out `op` on the loop thread. `rt` is the Runtime (None: only a
    live view, as in tests of the control socket), `state` the live view
    (episode_tracer/state.py; None when there is none)."""
    if isinstance(op, ListEpisodes):
        if state is None:
            raise EpisodeOpError("list: this tracer keeps no live view")
        if op.caller is not None and op.all:
            raise EpisodeOpError("permission denied: list --all is for root")
        snap = state.snapshot()
        rows = snap.get("episodes", [])
        if op.caller is not None:
            owners = rt.commands.owners if rt is not None else {}
            rows = [r for r in rows if owners.get(r.get("id")) == op.caller.uid]
        return {"ok": True, "episodes": rows, "retention": snap.get("retention")}
    if rt is None:
        raise EpisodeOpError("this control socket serves no tracer")
    if isinstance(op, EpisodeOpen):
        return _episode_open(rt, op)
    _check_owner(rt, op)
    if isinstance(op, EpisodeStatus):
        return episode_status(rt.tracker, op.episode)
    if isinstance(op, EpisodeAction):
        return _episode_action(rt, state, op)
    if isinstance(op, EpisodeClose):
        return _episode_close(rt, op)
    if isinstance(op, EpisodeVerdicts):
        return _episode_verdicts(rt, op)
    if isinstance(op, EpisodeWatch):
        e = rt.tracker.episodes.get(op.episode)
        state = "unknown" if e is None else "ended" if e.ended else "running"
        return {"ok": True, "episode": op.episode, "state": state}
    raise EpisodeOpError(f"not a command: {op!r}")  # pragma: no cover - parse() makes only these


def _check_owner(rt: Any, op: Any) -> None:
    """A trainer acts on the episodes it opened, nothing else."""
    c = op.caller
    if c is not None and rt.commands.owners.get(op.episode) != c.uid:
        raise EpisodeOpError(f"permission denied: episode {op.episode!r} was not opened by uid {c.uid}")


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _episode_open(rt: Any, op: EpisodeOpen) -> dict[str, Any]:
    from . import cgroups

    c = op.caller
    try:
        st = _proc_status(op.pid)
    except OSError:
        raise EpisodeOpError(f"episode_open: no process {op.pid}") from None
    if c is not None:
        # only the caller's own child, still the caller's uid: nobody else's process
        if int(st.get("PPid", "0")) != c.pid or int(st.get("Uid", "-1").split()[0]) != c.uid:
            raise EpisodeOpError(f"permission denied: process {op.pid} is not a child of the caller "
                                 f"(pid {c.pid}, uid {c.uid})")
    if rt.opts.verdict_dir is not None:  # a stale verdict file of an earlier episode of this id would lie
        try:
            (rt.opts.verdict_dir / f"{op.episode}.jsonl").unlink()
        except FileNotFoundError:
            pass
    root = rt.probes.episode_root
    cg = root / op.episode
    try:
        root.mkdir(exist_ok=True)
        cg.mkdir()
    except FileExistsError:
        raise EpisodeOpError(f"episode {op.episode!r} is already running (cgroup {cg} exists)") from None
    try:
        cgroups.move(op.pid, cg)
    except OSError as e:
        cgroups.remove(cg)
        raise EpisodeOpError(f"episode_open: could not move process {op.pid} into {cg}: {e}") from None
    owners = rt.commands.owners
    owners.pop(op.episode, None)
    owners[op.episode] = c.uid if c is not None else 0
    while len(owners) > OWNERS_KEPT:
        del owners[next(iter(owners))]
    return {"ok": True, "episode": op.episode, "cgroup": str(cg)}


def _episode_close(rt: Any, op: EpisodeClose) -> dict[str, Any]:
    from . import cgroups

    cg = rt.probes.episode_root / op.episode
    if cg.exists():
        cgroups.remove(cg)  # leftovers killed first
    return {"ok": True, "episode": op.episode}


def _episode_verdicts(rt: Any, op: EpisodeVerdicts) -> dict[str, Any]:
    vdir = rt.opts.verdict_dir
    if vdir is None:
        raise EpisodeOpError("episode_verdicts: this tracer writes no verdict files (--verdict-dir '')")
    try:
        data = (vdir / f"{op.episode}.jsonl").read_bytes()
    except FileNotFoundError:
        data = b""
    import orjson

    return {"ok": True, "episode": op.episode,
            "records": [orjson.loads(line) for line in data.splitlines() if line.strip()]}


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

    def __init__(self, rt: Any = None) -> None:
        self.rt = rt
        # the start handshake's answers, published by the loop thread (observe)
        # and replaced whole, never changed: an admin's status reads it at once
        self.status_view: dict[str, dict[str, Any]] = {}
        self._q: deque[tuple[Command, Any, Future]] = deque()
        self.owners: dict[str, int] = {}  # episode -> uid that opened it (EpisodeOpen; loop thread only)
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
        if isinstance(op, EpisodeStatus) and op.caller is None:
            # read from the view the loop published: no wait for its next poll
            got = self.status_view.get(op.episode)
            return dict(got) if got is not None else {"ok": True, "episode": op.episode, "state": "unknown"}
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

    def observe(self, rec: dict[str, Any]) -> None:
        """Pipeline observer (loop thread, after the kernel sync): publish
        the start handshake's answer of an episode that started, ended or
        was refused."""
        t = rec.get("type")
        if t not in ("episode_start", "episode_end", "episode_refused") or self.rt is None:
            return
        ep = rec.get("episode")
        if not ep:
            return
        view = dict(self.status_view)
        if t == "episode_end":
            view.pop(ep, None)
        else:
            reply = episode_status(self.rt.tracker, ep)
            if reply["state"] == "unknown":
                view.pop(ep, None)
            else:
                view[ep] = reply
        while len(view) > OWNERS_KEPT:
            del view[next(iter(view))]
        self.status_view = view

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
