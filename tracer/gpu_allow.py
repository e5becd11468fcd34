"""Which episode processes may use GPUs: the episode's registered GPU process.

`agent-tracer episode run --gpu` (tracer.api.run_episode(..., gpu=True))
registers the episode's command, before it execs, in
/run/agent-tracer/gpu/<episode> (one pid a line; root-owned, removed when the
episode ends). A process may use GPUs (`gpu_allowed = true` in policies) when

* it is a registered process, or
* it descends from one through processes that all run the registered
  process's executable: fork workers (DataLoader), `multiprocessing` spawn
  children and `torchrun` workers of the same Python are allowed; whatever
  the trainer starts through another program (`sh -c ...`, `curl`, a
  downloaded binary) is a spawned process and is not.

Anything else in an episode is not allowed; a process outside every episode
is never "allowed" by registration (the node's allowlist is a policy list).
See docs/gpu.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .paths import RUN_DIR
from .proctable import Proc, read_proc

GPU_REG_DIR = RUN_DIR / "gpu"
MAX_DEPTH = 64


def register(episode: str, pid: int, directory: Path = GPU_REG_DIR) -> Path:
    """Add pid to the episode's registered GPU processes (needs root)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / episode
    with open(path, "a") as f:
        f.write(f"{pid}\n")
    return path


def unregister(episode: str, directory: Path = GPU_REG_DIR) -> None:
    try:
        (directory / episode).unlink()
    except FileNotFoundError:
        pass


class GpuAllow:
    """Answers gpu_allowed(pid) from the tracker's process table (and /proc
    for processes the table does not hold) and the registration files."""

    def __init__(self, tracker: Any, directory: Path = GPU_REG_DIR):
        self.tracker = tracker
        self.dir = directory
        self._cache: dict[str, tuple[int, frozenset[int]]] = {}

    def registered(self, episode: str) -> frozenset[int]:
        path = self.dir / episode
        try:
            st = path.stat()
        except OSError:
            self._cache.pop(episode, None)
            return frozenset()
        got = self._cache.get(episode)
        if got is not None and got[0] == st.st_mtime_ns:
            return got[1]
        try:
            pids = frozenset(int(x) for x in path.read_text().split() if x.isdigit())
        except OSError:
            pids = frozenset()
        self._cache[episode] = (st.st_mtime_ns, pids)
        return pids

    def _proc(self, pid: int) -> Proc | None:
        p = self.tracker.table.get(pid) if self.tracker is not None else None
        return p if p is not None else read_proc(pid)

    def _chain(self, p: Proc) -> Iterator[Proc]:
        """p and its ancestors, nearest first."""
        seen = set()
        for _ in range(MAX_DEPTH):
            if p is None or p.pid in seen:
                return
            seen.add(p.pid)
            yield p
            if not p.ppid:
                return
            p = self._proc(p.ppid)

    def allowed_proc(self, p: Proc | None, episode: str | None = None) -> bool:
        episode = episode or (p.episode if p is not None else None)
        if p is None or not episode:
            return False
        regs = self.registered(episode)
        if not regs:
            return False
        if p.pid in regs:
            return True
        for a in self._chain(p):
            if a.exe != p.exe or not p.exe:
                return False
            if a.pid in regs:
                return True
        return False

    def allowed(self, pid: int) -> bool | None:
        """For EvalContext.gpu_allowed; None when the process is unknown."""
        if not isinstance(pid, int) or pid <= 0:
            return None
        p = self._proc(pid)
        if p is None:
            return None
        return self.allowed_proc(p)
