"""`agent-tracer episode list|freeze|thaw|kill`: through the running tracer's
control socket when there is one (so its state and alerts stay in step),
else directly on the episode cgroups and /proc."""
from __future__ import annotations

from typing import Any

from . import cgroups
from .ids import check_episode_id
from .commands import ACTIONS as COMMANDS, COMMAND_TIMEOUT_S, EpisodeOpError, execute, parse, parse_trainer
from .paths import CONTROL_SOCKET

__all__ = ["COMMANDS", "EpisodeOpError", "apply_episode_command", "episode_command", "list_episodes",
           "offline_episodes", "last_retention"]




def _client():
    from .control import ControlClient

    return ControlClient(CONTROL_SOCKET)


def _episode_root():
    return cgroups.cgroup2_mount() / "agent-tracer"


def offline_episodes() -> list[dict[str, Any]]:
    """Episodes seen without a tracer: cgroups under agent-tracer/ and
    processes with an AGENT_EPISODE_ID marker."""
    from .proctable import env_marker
    import os

    rows: dict[str, dict[str, Any]] = {}
    root = _episode_root()
    if root.exists():
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                rows[d.name] = {"id": d.name, "state": "frozen" if cgroups.is_frozen(d) else "running",
                                "source": "cgroup", "processes": len(cgroups.all_procs(d)),
                                "cgroup_path": str(d)}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ep = env_marker(name)
            if ep and ep not in rows:
                rows[ep] = {"id": ep, "state": "running", "source": "env", "processes": 0, "cgroup_path": None}
            if ep and rows[ep]["source"] == "env":
                rows[ep]["processes"] += 1
    return list(rows.values())


_LAST_RETENTION: dict[str, Any] = {}


def last_retention() -> dict[str, Any]:
    """The running tracer's retention of ended episodes as the last
    list_episodes() call saw it: keep, keep_s, dropped (from view)."""
    return dict(_LAST_RETENTION)


def list_episodes() -> list[dict[str, Any]]:
    from .control import ControlError

    _LAST_RETENTION.clear()
    try:
        reply = _client().command("list")
        if reply.get("ok", True) and "episodes" in reply:
            _LAST_RETENTION.update(reply.get("retention") or {})
            return reply["episodes"]
    except ControlError:
        pass
    return offline_episodes()


def episode_command(cmd: str, episode: str) -> str:
    from .control import ControlError, TracerNotRunning

    check_episode_id(episode)
    try:
        reply = _client().command(cmd, id=episode)
    except TracerNotRunning:
        return _offline_command(cmd, episode)
    except ControlError as e:
        raise EpisodeOpError(str(e)) from None
    if not reply.get("ok"):
        raise EpisodeOpError(reply.get("error") or f"{cmd} {episode} failed")
    return reply.get("message") or f"{cmd} {episode}: ok"


def _offline_command(cmd: str, episode: str) -> str:
    cg = _episode_root() / episode
    if not cg.exists():
        raise EpisodeOpError(f"no episode {episode!r} (no cgroup {cg}, and no tracer running)")
    if cmd == "kill":
        cgroups.kill(cg)
    else:
        if not cgroups.freeze(cg, cmd == "freeze"):
            raise EpisodeOpError(f"{cmd} {episode}: the kernel did not report the new state")
    return f"{cmd} {episode}: ok (no tracer running: applied to {cg})"


def _attach_command(rt, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """attach / detach (episode_tracer/attach_ops.py): run on the tracer's loop thread."""
    from .attach_ops import AttachError, control_attach, control_detach

    try:
        return control_attach(rt, args) if cmd == "attach" else control_detach(rt, args)
    except (AttachError, ValueError) as e:
        raise EpisodeOpError(str(e)) from None


def attach_command(episode: str, cgroup: str | None = None, pid: int | None = None) -> dict[str, Any]:
    """Client side of `episode attach`: the running tracer must do it (it is
    what makes the cgroup an episode)."""
    from .control import ControlError

    check_episode_id(episode)
    extra: dict[str, Any] = {}
    if cgroup is not None:
        extra["cgroup"] = cgroup
    if pid is not None:
        extra["pid"] = pid
    try:
        reply = _client().command("attach", id=episode, **extra)
    except ControlError as e:
        raise EpisodeOpError(f"attach {episode}: {e}") from None
    if not reply.get("ok"):
        raise EpisodeOpError(reply.get("error") or f"attach {episode} failed")
    return reply


def detach_command(episode: str) -> dict[str, Any]:
    from .control import ControlError

    check_episode_id(episode)
    try:
        reply = _client().command("detach", id=episode)
    except ControlError as e:
        raise EpisodeOpError(f"detach {episode}: {e}") from None
    if not reply.get("ok"):
        raise EpisodeOpError(reply.get("error") or f"detach {episode} failed")
    return reply


def apply_episode_command(rt, state, cmd: str, args: dict[str, Any],
                          timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
    """Server side of the control socket's episode commands: validated once
    into a typed command (episode_tracer/commands.py), which the loop thread runs;
    this (the control thread) waits for its reply. With no runtime (a live
    view only) the command reads that view here."""
    if cmd in ("attach", "detach"):
        if rt is None:
            raise EpisodeOpError(f"{cmd}: needs the running tracer")
        return _attach_command(rt, cmd, args)
    op = parse(cmd, args)
    if rt is None:
        return execute(None, state, op)
    return rt.commands.submit(rt, state, op, timeout)


def apply_trainer_op(rt, op: str, req: dict[str, Any], timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
    """Server side of the trainer ops (episode_open, episode_close,
    episode_verdicts): typed, run by the loop thread like every command."""
    cmd = parse_trainer(op, req)
    return rt.commands.submit(rt, None, cmd, timeout)
