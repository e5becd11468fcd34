"""Episodes outlive no runner (issue 17, docs/faults.md).

`episode run` / `run_episode` write their own pid and start time into
RUNNER_DIR/<episode> before the command starts and remove the file before
they return (whatever happens to the command, also with keep_stragglers).
The tracer watches each registered runner through a pidfd: a runner that is
gone while its file is still there died without cleaning up (SIGKILL, OOM
kill). After `grace` seconds its episode is ended by the `orphan_episode`
policy: kill (its cgroup killed and removed, `episode_end` reason
`runner-died`), freeze (its cgroup frozen) or keep. Episodes without a
runner file (containers, cgroups made by hand, env-marker episodes) are
never touched.
"""
from __future__ import annotations

import logging
import os
import select
from pathlib import Path
from typing import Any

from . import cgroups
from .paths import RUN_DIR

log = logging.getLogger(__name__)

RUNNER_DIR = RUN_DIR / "runners"
ORPHAN_POLICIES = ("kill", "freeze", "keep")


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def register(episode: str, pid: int | None = None, reg_dir: Path = RUNNER_DIR) -> None:
    pid = pid or os.getpid()
    reg_dir.mkdir(parents=True, exist_ok=True)
    tmp = reg_dir / f".{episode}.tmp"
    tmp.write_text(f"{pid} {_start_time(pid) or 0}\n")
    os.replace(tmp, reg_dir / episode)


def unregister(episode: str, reg_dir: Path = RUNNER_DIR) -> None:
    try:
        (reg_dir / episode).unlink()
    except FileNotFoundError:
        pass


class RunnerWatch:
    def __init__(self, policy: str = "kill", grace: float = 5.0, reg_dir: Path = RUNNER_DIR):
        if policy not in ORPHAN_POLICIES:
            raise ValueError(f"orphan_episode: expected one of {', '.join(ORPHAN_POLICIES)}, got {policy!r}")
        self.policy, self.grace, self.reg_dir = policy, grace, reg_dir
        self._fds: dict[str, tuple[int, int]] = {}  # episode -> (pidfd, runner pid)
        self._dead: dict[str, tuple[float, int]] = {}  # episode -> (noticed at, runner pid)
        self.handled = 0

    def close(self) -> None:
        for fd, _pid in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _forget(self, ep: str) -> None:
        fd = self._fds.pop(ep, (None, 0))[0]
        if fd is not None:
            os.close(fd)
        self._dead.pop(ep, None)

    def _watch(self, ep: str, now: float) -> None:
        try:
            pid_s, start_s = (self.reg_dir / ep).read_text().split()
            pid, start = int(pid_s), int(start_s)
        except (OSError, ValueError):
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already gone
            self._dead[ep] = (now, pid)
            return
        if start and _start_time(pid) != start:  # the pid is another process now
            os.close(fd)
            self._dead[ep] = (now, pid)
            return
        self._fds[ep] = (fd, pid)

    def poll(self, tracker: Any, now: float, wall: float) -> list[dict[str, Any]]:
        """Records of the orphaned episodes handled now."""
        running = {ep: e for ep, e in tracker.episodes.items() if not e.ended and e.cgroup_path}
        for ep in [ep for ep in (*self._fds, *self._dead) if ep not in running]:
            self._forget(ep)
        for ep in running:
            if ep not in self._fds and ep not in self._dead:
                self._watch(ep, now)
        if self._fds:
            fds = {fd: ep for ep, (fd, _pid) in self._fds.items()}
            ready, _, _ = select.select(list(fds), [], [], 0)
            for fd in ready:
                ep = fds[fd]
                pid = self._fds.pop(ep)[1]
                os.close(fd)
                self._dead[ep] = (now, pid)
        out = []
        for ep, (since, pid) in list(self._dead.items()):
            if not (self.reg_dir / ep).exists():  # the runner removed it: it ended as it should
                self._dead.pop(ep)
                continue
            if now - since < self.grace:
                continue
            self._dead.pop(ep)
            unregister(ep, self.reg_dir)
            out.extend(self._act(tracker, running[ep], ep, pid, wall))
        return out

    def _act(self, tracker: Any, e: Any, ep: str, pid: int, wall: float) -> list[dict[str, Any]]:
        self.handled += 1
        cg = Path(e.cgroup_path)
        rec = {"type": "episode_command", "ts": wall, "episode": ep, "cmd": self.policy, "by": "runner-died",
               "runner_pid": pid, "grace_s": self.grace}
        log.warning("episode %s: its runner (pid %d) died; orphan_episode = %s", ep, pid, self.policy)
        if self.policy == "keep":
            return [rec]
        if self.policy == "freeze":
            rec["ok"] = cgroups.freeze(cg)
            return [rec]
        cgroups.kill(cg)
        try:
            cgroups.remove(cg)
        except OSError as err:
            log.warning("episode %s: removing %s: %s", ep, cg, err)
        end = tracker._end(ep, wall, "runner-died")
        return [rec, end] if end else [rec]
