"""Python API for trainers: run an episode and read its verdicts.

    from tracer.api import run_episode, read_verdicts

    result = run_episode("rollout-17", ["python", "agent.py"])
    if result.killed_by_policy:
        reward -= penalty
    for alert in result.alerts:
        print(alert["rule"], alert["action"], alert["enforced"])

The episode runs in its own cgroup v2 (<cgroup2>/agent-tracer/<ID>); a
running tracer attributes every process in it to the episode and writes the
episode's alerts to /run/agent-tracer/verdicts/<ID>.jsonl, which is what
`read_verdicts` reads. Needs root (cgroup creation).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import orjson

from . import cgroups
from .episodes import check_episode_id
from .paths import RUN_DIR

POLICY_KILLED_EXIT = 86  # `episode run` exit code when policy killed the episode
VERDICT_DIR = RUN_DIR / "verdicts"
KILL_ACTIONS = frozenset({"kill-episode", "kill", "deny"})


class EpisodeError(RuntimeError):
    pass


@dataclass
class EpisodeResult:
    episode: str
    exit_code: int | None
    signal: int | None
    killed_by_policy: bool
    alerts: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    gpu: dict[str, Any] | None = None  # latest gpu_total record of the episode

    @property
    def cli_exit_code(self) -> int:
        if self.killed_by_policy:
            return POLICY_KILLED_EXIT
        if self.signal:
            return 128 + self.signal
        return self.exit_code or 0

    def summary(self) -> dict[str, Any]:
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
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def read_verdicts(episode: str, verdict_dir: Path = VERDICT_DIR) -> list[dict[str, Any]]:
    """The episode's alerts, in order."""
    return [r for r in _verdict_lines(episode, verdict_dir) if r.get("type", "alert") == "alert"]


def read_gpu_total(episode: str, verdict_dir: Path = VERDICT_DIR) -> dict[str, Any] | None:
    """The episode's latest GPU totals (`gpu_total` record: peak_mib, mib_s,
    sm_s, pids), None when it used no GPU the watcher saw."""
    got = [r for r in _verdict_lines(episode, verdict_dir) if r.get("type") == "gpu_total"]
    return got[-1] if got else None


def _killed_by_policy(alerts: list[dict[str, Any]], root_pid: int, sig: int | None) -> bool:
    for a in alerts:
        if not a.get("enforced"):
            continue
        if a.get("action") in ("kill-episode", "freeze-episode"):
            return True
        if sig and a.get("action") in KILL_ACTIONS and a.get("pid") == root_pid:
            return True
    return False


def run_episode(episode: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                cwd: str | None = None, verdict_dir: Path = VERDICT_DIR, keep_stragglers: bool = False,
                verdict_file: Path | None = None, timeout: float | None = None,
                gpu: bool = False, gpu_exes: Sequence[str] = ()) -> EpisodeResult:
    """Run argv as episode `episode` in its own cgroup and wait for it.

    When argv exits, processes it left behind in the cgroup are killed
    (unless keep_stragglers) and the cgroup is removed. gpu=True registers
    argv's process as the episode's GPU process; gpu_exes (globs) are the
    executables that keep the GPU right through an exec (docs/gpu.md)."""
    if not argv:
        raise EpisodeError("no command given")
    cg = episode_cgroup(episode)
    cg.parent.mkdir(exist_ok=True)
    try:
        cg.mkdir()
    except FileExistsError:
        raise EpisodeError(f"episode {episode!r} is already running (cgroup {cg} exists)") from None
    # a stale verdict file from an earlier episode of the same id would lie
    try:
        (verdict_dir / f"{episode}.jsonl").unlink()
    except FileNotFoundError:
        pass
    t0 = time.monotonic()
    procs_file = str(cg / "cgroup.procs")

    if gpu:
        from .gpu_allow import GPU_REG_DIR, register, unregister

        unregister(episode)
        GPU_REG_DIR.mkdir(parents=True, exist_ok=True)

    def enter_cgroup() -> None:  # runs in the child, before exec
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        if gpu:  # registered before the command runs an instruction
            register(episode, os.getpid(), exes=gpu_exes)

    proc = None
    try:
        try:
            proc = subprocess.Popen(list(argv), env=env, cwd=cwd, preexec_fn=enter_cgroup)
        except FileNotFoundError as e:
            raise EpisodeError(f"command not found: {argv[0]}") from e
        import threading

        main_thread = threading.current_thread() is threading.main_thread()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}

        def forward(signum, _frame):
            cgroups.kill(cg)

        for s in old:
            signal.signal(s, forward)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            cgroups.kill(cg)
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        if not keep_stragglers or proc is None:
            cgroups.remove(cg)
        if gpu:
            unregister(episode)
    sig = -rc if rc < 0 else None
    code = rc if rc >= 0 else None
    # a kernel kill's alert lands just after the process dies: give it a moment
    alerts = read_verdicts(episode, verdict_dir)
    if sig is not None:
        deadline = time.monotonic() + 0.5
        while not _killed_by_policy(alerts, proc.pid, sig) and time.monotonic() < deadline:
            time.sleep(0.05)
            alerts = read_verdicts(episode, verdict_dir)
    res = EpisodeResult(episode, code, sig, _killed_by_policy(alerts, proc.pid, sig), alerts,
                        time.monotonic() - t0, read_gpu_total(episode, verdict_dir))
    if verdict_file is not None:
        Path(verdict_file).write_bytes(orjson.dumps(res.summary(), option=orjson.OPT_INDENT_2))
    return res
