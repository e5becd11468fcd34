"""Python API for trainers: run an episode and read its verdicts.

    from episode_tracer.api import run_episode, read_verdicts

    result = run_episode("rollout-17", ["python", "agent.py"])
    if result.killed_by_policy:
        reward -= penalty
    for alert in result.alerts:
        print(alert["rule"], alert["action"], alert["enforced"])

The episode runs in its own cgroup v2 (<cgroup2>/agent-tracer/<ID>); a
running tracer attributes every process in it to the episode and writes the
episode's alerts to /run/agent-tracer/verdicts/<ID>.jsonl, which is what
`read_verdicts` reads. As root it makes the cgroup itself; without root (a
trainer the tracer lets in, docs/episodes.md "Trainer API") it asks the
running tracer through the control socket. No preexec_fn: safe in threaded
processes (an exec helper enters the cgroup before argv runs).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import cgroups
from .ids import check_episode_id
from .paths import CONTROL_SOCKET, RUN_DIR

if TYPE_CHECKING:
    from typing import Any, Sequence

# imports kept to what starting an episode needs (no dataclasses, typing or
# orjson until used): `episode run` is started once per rollout

POLICY_KILLED_EXIT = 86  # `episode run` exit code when policy killed the episode
VERDICT_DIR = RUN_DIR / "verdicts"
KILL_ACTIONS = frozenset({"kill-episode", "kill", "deny"})
REGISTER_TIMEOUT_S = 10.0  # a running tracer must give a new episode its identity this fast


class EpisodeError(RuntimeError):
    pass


class EpisodeResult:
    """What run_episode returns. gpu: the latest gpu_total record of the episode."""

    __slots__ = ("episode", "exit_code", "signal", "killed_by_policy", "alerts", "duration_s", "gpu")

    def __init__(self, episode: str, exit_code: int | None, signal: int | None, killed_by_policy: bool,
                 alerts: list[dict[str, Any]] | None = None, duration_s: float = 0.0,
                 gpu: dict[str, Any] | None = None):
        self.episode, self.exit_code, self.signal = episode, exit_code, signal
        self.killed_by_policy = killed_by_policy
        self.alerts = [] if alerts is None else alerts
        self.duration_s, self.gpu = duration_s, gpu

    def _fields(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EpisodeResult) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return "EpisodeResult(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    @property
    def cli_exit_code(self) -> int:
        if self.killed_by_policy:
            return POLICY_KILLED_EXIT
        if self.signal:
            return 128 + self.signal
        return self.exit_code or 0

    def summary(self) -> dict[str, Any]:
        from collections import Counter

        actions = Counter(a.get("action") for a in self.alerts)
        enforced = Counter(a.get("action") for a in self.alerts if a.get("enforced"))
        rules = Counter(a.get("rule") for a in self.alerts)
        return {
            "episode": self.episode,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "killed_by_policy": self.killed_by_policy,
            "cli_exit_code": self.cli_exit_code,
            "duration_s": round(self.duration_s, 3),
            "counts": {"alerts": len(self.alerts), "by_rule": dict(rules),
                       "by_action": dict(actions), "enforced": dict(enforced)},
            "alerts": self.alerts,
            "gpu": None if self.gpu is None else {k: self.gpu.get(k) for k in
                                                  ("peak_mib", "mib_s", "sm_s", "pids", "samples")},
        }


def episode_cgroup(episode: str) -> Path:
    return cgroups.cgroup2_mount() / "agent-tracer" / check_episode_id(episode)


def _verdict_lines(episode: str, verdict_dir: Path) -> list[dict[str, Any]]:
    path = verdict_dir / f"{check_episode_id(episode)}.jsonl"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    import orjson

    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def read_verdicts(episode: str, verdict_dir: Path = VERDICT_DIR) -> list[dict[str, Any]]:
    """The episode's alerts, in order."""
    return [r for r in _verdict_lines(episode, verdict_dir) if r.get("type", "alert") == "alert"]


def read_gpu_total(episode: str, verdict_dir: Path = VERDICT_DIR) -> dict[str, Any] | None:
    """The episode's latest GPU totals (`gpu_total` record: peak_mib, mib_s,
    sm_s, pids), None when it used no GPU the watcher saw."""
    got = [r for r in _verdict_lines(episode, verdict_dir) if r.get("type") == "gpu_total"]
    return got[-1] if got else None


def _operator_killed(episode: str, verdict_dir: Path) -> bool:
    """An operator killed the episode through the tracer (`episode kill`, `top`'s K)."""
    return any(r.get("type") == "episode_command" and r.get("cmd") == "kill"
               for r in _verdict_lines(episode, verdict_dir))


def _killed_by_policy(alerts: list[dict[str, Any]], root_pid: int, sig: int | None) -> bool:
    for a in alerts:
        if not a.get("enforced"):
            continue
        if a.get("action") in ("kill-episode", "freeze-episode"):
            return True
        if sig and a.get("action") in KILL_ACTIONS and a.get("pid") == root_pid:
            return True
    return False


def await_registration(episode: str, control_socket: str | os.PathLike[str] | None = CONTROL_SOCKET,
                       timeout: float = REGISTER_TIMEOUT_S) -> str:
    """Wait until a running tracer has given episode `episode` (whose cgroup
    exists) its kernel identity, so every rule of the episode applies from
    its first instruction. Returns "registered", or "no tracer" when none
    answers on the control socket (or an older one without `status`).
    Raises EpisodeError when the tracer refused it (at its --max-episodes
    limit) or did not register it within `timeout` (fail closed)."""
    import socket as _socket

    if control_socket is None:
        return "no tracer"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fspath(control_socket))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return "no tracer"
        import orjson

        req = orjson.dumps({"op": "episode", "cmd": "status", "id": episode}) + b"\n"
        deadline = time.monotonic() + timeout
        buf = b""
        delay = 0.0002
        while True:
            sock.sendall(req)
            while b"\n" not in buf:
                try:
                    chunk = sock.recv(65536)
                except _socket.timeout:
                    chunk = b""
                if not chunk:
                    raise EpisodeError(f"the tracer on {control_socket} stopped answering while episode "
                                       f"{episode!r} started; not starting it")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            msg = orjson.loads(line)
            if msg.get("ok") is False:
                return "no tracer"  # a tracer without the status command (or not ours to ask)
            state = msg.get("state")
            if state == "registered":
                return "registered"
            if state == "refused":
                raise EpisodeError(str(msg.get("error") or f"episode {episode!r} refused by the tracer"))
            if time.monotonic() > deadline:
                raise EpisodeError(f"the tracer did not register episode {episode!r} within {timeout:g} s "
                                   "(overloaded?); not starting it")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
    finally:
        sock.close()


# the exec helper: "$1" is the cgroup.procs file to enter ('' none), "$2" a
# gate fd to read one line from first ('' none); then argv is exec'd, already
# inside the episode's cgroup (dash: about a millisecond; docs/scale.md)
HELPER = ('[ -z "$1" ] || { echo $$ > "$1" || exit 125; }; '
          '[ -z "$2" ] || { read _ < /proc/self/fd/"$2" || exit 125; }; shift 2; exec "$@"')
# (the gate fd is read through /proc: dash redirects only fds 0-9)
HELPER_FAILED = 125  # the helper could not enter the cgroup or was not released


def _helper_argv(argv: Sequence[str], procs_file: str | None, gate_fd: int | None) -> list[str]:
    return ["/bin/sh", "-c", HELPER, "agent-tracer-exec", procs_file or "",
            "" if gate_fd is None else str(gate_fd), *argv]


def _wait(proc, cg: Path | None, timeout: float | None, kill=None) -> int:
    """Wait for proc, forwarding SIGINT/SIGTERM (main thread only) and a
    timeout as a kill of the episode's cgroup."""
    import threading

    kill = kill or (lambda: cgroups.kill(cg))
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}

    def forward(signum, _frame):
        kill()

    for s in old:
        signal.signal(s, forward)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill()
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _result(episode: str, rc: int, root_pid: int, lines, t0: float, verdict_file: Path | None) -> EpisodeResult:
    """The result of an ended episode from its verdict lines (lines():
    re-read them; a kernel kill's alert lands just after the process dies)."""
    sig = -rc if rc < 0 else None
    code = rc if rc >= 0 else None

    def judge(recs):
        alerts = [r for r in recs if r.get("type", "alert") == "alert"]
        op_kill = any(r.get("type") == "episode_command" and r.get("cmd") == "kill" for r in recs)
        return alerts, _killed_by_policy(alerts, root_pid, sig) or (sig is not None and op_kill)

    recs = lines()
    alerts, killed = judge(recs)
    if sig is not None:
        deadline = time.monotonic() + 0.5
        while not killed and time.monotonic() < deadline:
            time.sleep(0.05)
            recs = lines()
            alerts, killed = judge(recs)
    gpu = [r for r in recs if r.get("type") == "gpu_total"]
    res = EpisodeResult(episode, code, sig, killed, alerts, time.monotonic() - t0, gpu[-1] if gpu else None)
    if verdict_file is not None:
        import orjson

        Path(verdict_file).write_bytes(orjson.dumps(res.summary(), option=orjson.OPT_INDENT_2))
    return res


def _run_via_tracer(episode: str, argv: Sequence[str], *, env, cwd, timeout, verdict_file,
                    control_socket, register_timeout) -> EpisodeResult:
    """run_episode without root (a trainer, docs/episodes.md "Trainer API"):
    the child starts blocked in the exec helper; the tracer (root) checks it
    is our child, makes the episode's cgroup and moves it in; once the
    episode is registered the helper is released and execs argv inside."""
    from .control import ControlClient, ControlError

    if control_socket is None:
        raise EpisodeError("run_episode without root needs a running tracer (control_socket is None)")
    client = ControlClient(control_socket, timeout=max(register_timeout, 10.0))

    def ask(req: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = client.request(req)
        except ControlError as e:
            raise EpisodeError(str(e)) from None
        if not reply.get("ok"):
            raise EpisodeError(str(reply.get("error") or f"{req['op']} {episode} failed"))
        return reply

    gate_r, gate_w = os.pipe()
    try:
        proc = subprocess.Popen(_helper_argv(argv, None, gate_r), env=env, cwd=cwd, pass_fds=(gate_r,))
    finally:
        os.close(gate_r)
    t0 = time.monotonic()
    opened = False
    try:
        try:
            ask({"op": "episode_open", "id": episode, "pid": proc.pid})
            opened = True
            if await_registration(episode, control_socket, register_timeout) != "registered":
                raise EpisodeError(f"the tracer on {control_socket} did not answer the start handshake")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        os.write(gate_w, b"go\n")
        os.close(gate_w)
        gate_w = -1
        rc = _wait(proc, None, timeout, kill=lambda: ask({"op": "episode", "cmd": "kill", "id": episode}))
    finally:
        if gate_w >= 0:
            os.close(gate_w)
        if opened:
            ask({"op": "episode_close", "id": episode})
    return _result(episode, rc, proc.pid, lambda: ask({"op": "episode_verdicts", "id": episode})["records"],
                   t0, verdict_file)


def run_episode(episode: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                cwd: str | None = None, verdict_dir: Path = VERDICT_DIR, keep_stragglers: bool = False,
                verdict_file: Path | None = None, timeout: float | None = None,
                gpu: bool = False, gpu_exes: Sequence[str] = (),
                control_socket: str | os.PathLike[str] | None = CONTROL_SOCKET,
                register_timeout: float = REGISTER_TIMEOUT_S) -> EpisodeResult:
    """Run argv as episode `episode` in its own cgroup and wait for it.

    When a tracer runs (it answers on `control_socket`), argv starts only
    once the tracer has registered the episode; EpisodeError when it refused
    it (its concurrent-episode limit) or did not answer within
    register_timeout. When argv exits, processes it left behind in the
    cgroup are killed (unless keep_stragglers) and the cgroup is removed.
    gpu=True registers argv's process as the episode's GPU process; gpu_exes
    (globs) are the executables that keep the GPU right through an exec
    (docs/gpu.md)."""
    if not argv:
        raise EpisodeError("no command given")
    import shutil

    relative = "/" in argv[0] and not argv[0].startswith("/") and cwd is not None  # found from cwd, later
    if not relative and shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
        raise EpisodeError(f"command not found: {argv[0]}")
    if os.geteuid() != 0:
        if gpu:
            raise EpisodeError("gpu=True needs root (the GPU registration); a trainer runs without it")
        return _run_via_tracer(episode, argv, env=env, cwd=cwd, timeout=timeout, verdict_file=verdict_file,
                               control_socket=control_socket, register_timeout=register_timeout)
    cg = episode_cgroup(episode)
    # a stale verdict file from an earlier episode of the same id would lie
    try:
        (verdict_dir / f"{episode}.jsonl").unlink()
    except FileNotFoundError:
        pass
    try:
        cg.mkdir()
    except FileNotFoundError:
        cg.parent.mkdir(exist_ok=True)
        try:
            cg.mkdir()
        except FileExistsError:
            raise EpisodeError(f"episode {episode!r} is already running (cgroup {cg} exists)") from None
    except FileExistsError:
        raise EpisodeError(f"episode {episode!r} is already running (cgroup {cg} exists)") from None
    t0 = time.monotonic()
    from .runners import register as register_runner, unregister as unregister_runner  # issue 17: runner death

    try:
        register_runner(episode)
        await_registration(episode, control_socket, register_timeout)
    except BaseException:
        unregister_runner(episode)
        cgroups.remove(cg)
        raise
    procs_file = str(cg / "cgroup.procs")

    if gpu:
        from .gpu_allow import GPU_REG_DIR, register, unregister

        unregister(episode)
        GPU_REG_DIR.mkdir(parents=True, exist_ok=True)

    proc = None
    gate_w = None
    try:
        # no preexec_fn (unsafe in threaded trainers): the exec helper, a
        # shell, moves itself into the cgroup and execs argv there; with
        # gpu=True it also waits for the registration of its pid
        gate_r = None
        if gpu:
            gate_r, gate_w = os.pipe()
        try:
            proc = subprocess.Popen(_helper_argv(argv, procs_file, gate_r), env=env, cwd=cwd,
                                    pass_fds=() if gate_r is None else (gate_r,))
        finally:
            if gate_r is not None:
                os.close(gate_r)
        if gpu:
            register(episode, proc.pid, exes=gpu_exes)  # before the command runs an instruction
            os.write(gate_w, b"go\n")
        rc = _wait(proc, cg, timeout)
    finally:
        if gate_w is not None:
            os.close(gate_w)
        unregister_runner(episode)  # before the cgroup goes: a tracer never takes this for a runner's death
        if not keep_stragglers or proc is None:
            cgroups.remove(cg)
        if gpu:
            unregister(episode)
    return _result(episode, rc, proc.pid, lambda: _verdict_lines(episode, verdict_dir), t0, verdict_file)


def attach_episode(episode: str, *, cgroup: str | os.PathLike[str] | None = None, pid: int | None = None,
                   control_socket: str | os.PathLike[str] = CONTROL_SOCKET) -> dict[str, Any]:
    """Make an existing cgroup (or the cgroup of running process `pid`)
    episode `episode`, through the running tracer (docs/episodes.md). What
    runs there now or later is a member; kill and freeze act on that cgroup.
    Returns the tracer's reply (cgroup_path, slot, processes); EpisodeError
    with the tracer's reason otherwise."""
    from .control import ControlClient, ControlError

    check_episode_id(episode)
    extra: dict[str, Any] = {}
    if cgroup is not None:
        extra["cgroup"] = os.fspath(cgroup)
    if pid is not None:
        extra["pid"] = pid
    try:
        reply = ControlClient(control_socket).command("attach", id=episode, **extra)
    except ControlError as e:
        raise EpisodeError(f"attach {episode}: {e}") from None
    if not reply.get("ok"):
        raise EpisodeError(str(reply.get("error") or f"attach {episode} failed"))
    return reply


def detach_episode(episode: str, *, control_socket: str | os.PathLike[str] = CONTROL_SOCKET) -> dict[str, Any]:
    """End an attached (or container) episode without killing its processes."""
    from .control import ControlClient, ControlError

    check_episode_id(episode)
    try:
        reply = ControlClient(control_socket).command("detach", id=episode)
    except ControlError as e:
        raise EpisodeError(f"detach {episode}: {e}") from None
    if not reply.get("ok"):
        raise EpisodeError(str(reply.get("error") or f"detach {episode} failed"))
    return reply
