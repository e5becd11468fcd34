"""Which episode processes may use GPUs: the GPU right.

`agent-tracer episode run --gpu [--gpu-exe GLOB ...]`
(episode_tracer.api.run_episode(..., gpu=True, gpu_exes=[...])) registers the
episode's command, before it execs, in /run/agent-tracer/gpu/<episode>
(root-owned, removed when the episode ends): a line per registered pid, and
a line `exe GLOB` per executable the registration names. A process holds
the GPU right (`gpu_allowed = true` in policies) when

* it is a registered process (through every exec it makes itself: a shell
  script ending in `exec python train.py` stays registered), or
* it got the right from its parent: a fork that did not exec (DataLoader
  fork workers, a `multiprocessing` fork child), or an exec of an
  executable the registration names (`--gpu-exe /usr/bin/python3.11` lets
  `multiprocessing` spawn children and `torchrun` workers of that Python
  in), and its parent holds the right.

Running the same executable is not enough: a `python` the agent starts
under a registered Python trainer (exec'd, not named) has no right, nor has
what a process without the right starts, nor a process that exec'd an
unnamed executable and then a named one (the right does not come back).
The kernel keeps the same right in its `gpu_right` map (inherited at fork,
dropped at exec; GpuRights re-grants it in the exec gate), so that
`gpu.toml` can have episode processes without it killed in the kernel at
a GPU device open.

Processes whose history the tracer did not see (running before it started:
no fork record) fall back to "same executable as the parent". A process
outside every episode is never allowed by registration (the node's
allowlist is a policy list). See docs/gpu.md.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .paths import RUN_DIR
from .proctable import Proc, read_proc

GPU_REG_DIR = RUN_DIR / "gpu"
MAX_DEPTH = 64


def register(episode: str, pid: int, directory: Path = GPU_REG_DIR, exes: Iterable[str] = ()) -> Path:
    """Add pid (and executables, globs, that keep the right through an exec)
    to the episode's registration (needs root)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / episode
    lines = [f"{pid}\n"] + [f"exe {e}\n" for e in exes]
    with open(path, "a") as f:
        f.write("".join(lines))
    return path


def unregister(episode: str, directory: Path = GPU_REG_DIR) -> None:
    try:
        (directory / episode).unlink()
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class Registration:
    pids: frozenset[int] = frozenset()
    exes: tuple[str, ...] = ()  # globs

    def names(self, exe: str | None) -> bool:
        return bool(exe) and any(fnmatch.fnmatchcase(exe, g) for g in self.exes)


_NONE = Registration()


def parse_registration(text: str) -> Registration:
    pids, exes = set(), []
    for line in text.splitlines():
        line = line.strip()
        if line.isdigit():
            pids.add(int(line))
        elif line.startswith("exe "):
            g = line[4:].strip()
            if g and g not in exes:
                exes.append(g)
    return Registration(frozenset(pids), tuple(exes))


class GpuAllow:
    """Answers gpu_allowed(pid) from the tracker's process table (and /proc
    for processes the table does not hold) and the registration files.
    One per tracker (for_tracker): the engine (exec records) and the GPU
    watcher share what it learnt from execs."""

    def __init__(self, tracker: Any, directory: Path = GPU_REG_DIR):
        self.tracker = tracker
        self.dir = directory
        self._cache: dict[str, tuple[int, Registration]] = {}
        # (pid, start) of processes that exec'd without keeping the right
        self._dropped: set[tuple[int, float | None]] = set()

    @classmethod
    def for_tracker(cls, tracker: Any, directory: Path = GPU_REG_DIR) -> "GpuAllow":
        got = getattr(tracker, "_gpu_allow", None) if tracker is not None else None
        if got is None or got.dir != directory:
            got = cls(tracker, directory)
            if tracker is not None:
                tracker._gpu_allow = got
        return got

    def registration(self, episode: str) -> Registration:
        path = self.dir / episode
        try:
            st = path.stat()
        except OSError:
            self._cache.pop(episode, None)
            return _NONE
        got = self._cache.get(episode)
        if got is not None and got[0] == st.st_mtime_ns:
            return got[1]
        try:
            reg = parse_registration(path.read_text())
        except OSError:
            reg = _NONE
        self._cache[episode] = (st.st_mtime_ns, reg)
        return reg

    def registered(self, episode: str) -> frozenset[int]:
        return self.registration(episode).pids

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

    def _kept(self, p: Proc, parent: Proc | None, reg: Registration) -> bool:
        """Did p get the right its parent has (when the parent has it)?"""
        if (p.pid, p.start) in self._dropped:
            return False
        if p.forked:
            return p.execs == 0 or reg.names(p.exe)
        # history not seen (predates the tracer): same executable as the parent
        return reg.names(p.exe) or (parent is not None and bool(p.exe) and p.exe == parent.exe)

    def allowed_proc(self, p: Proc | None, episode: str | None = None) -> bool:
        episode = episode or (p.episode if p is not None else None)
        if p is None or not episode:
            return False
        reg = self.registration(episode)
        if not reg.pids:
            return False
        chain = list(self._chain(p))
        for i, a in enumerate(chain):
            if a.pid in reg.pids:
                return True
            if not self._kept(a, chain[i + 1] if i + 1 < len(chain) else None, reg):
                return False
        return False

    def allowed(self, pid: int) -> bool | None:
        """For EvalContext.gpu_allowed; None when the process is unknown."""
        if not isinstance(pid, int) or pid <= 0:
            return None
        p = self._proc(pid)
        if p is None:
            return None
        return self.allowed_proc(p)

    def on_exec(self, p: Proc) -> bool:
        """After the tracker applied an exec record to p: does p hold the
        right now? A process that exec'd without keeping it never gets it
        back by a later exec (remembered until it exits)."""
        if not p.episode:
            return False
        reg = self.registration(p.episode)
        if not reg.pids:
            return False
        if p.pid in reg.pids:
            self._dropped.discard((p.pid, p.start))
            return True
        key = (p.pid, p.start)
        parent = self._proc(p.ppid) if p.ppid else None
        held = key not in self._dropped and parent is not None and self.allowed_proc(parent, p.episode)
        if held and reg.names(p.exe):
            return True
        self._dropped.add(key)
        return False

    def forget(self, p: Proc) -> None:
        self._dropped.discard((p.pid, p.start))


class GpuRights:
    """Keeps the kernel's gpu_right map (episode_tracer/bpf/maps.h) in step with GpuAllow:
    the kernel passes the right on at fork and drops it at exec; an exec
    that keeps it (the registered process, a named executable) is granted
    again here, while the exec gate still holds the new image."""

    def __init__(self, allow: GpuAllow, probes: Any):
        self.allow = allow
        self.probes = probes
        self.grants = 0

    def observe(self, rec: dict[str, Any]) -> None:
        t = rec.get("type")
        if t == "exec":
            if not rec.get("episode") or rec.get("killed_in_kernel"):
                return
            p = self.allow.tracker.table.get(rec.get("pid"))
            if p is not None and self.allow.on_exec(p):
                self.probes.gpu_grant(p.pid)
                self.grants += 1
        elif t == "exit":
            p = self.allow.tracker.table.get(rec.get("pid"))
            if p is not None:
                self.allow.forget(p)

    def seed(self) -> None:
        """At start: processes already running that hold the right."""
        for p in self.allow.tracker.table.live():
            if p.episode and self.allow.allowed_proc(p):
                self.probes.gpu_grant(p.pid)
                self.grants += 1
