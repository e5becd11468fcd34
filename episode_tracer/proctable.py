"""Process table: seeded from /proc, then kept by fork/exec/exit records.

Pure bookkeeping: it never touches the kernel maps. Every entry carries the
episode it belongs to and how that was decided (cgroup > env > lineage);
the episode resolver (episode_tracer.episodes) fills those in.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

EXITED_GRACE_S = 5.0  # exited entries are kept this long for late records


@dataclass
class Proc:
    pid: int
    ppid: int | None = None
    exe: str | None = None
    argv: list[str] = field(default_factory=list)
    cwd: str | None = None
    cgroup: int | None = None
    start: float | None = None  # seconds since boot (from /proc) or ktime/1e9
    comm: str | None = None
    uid: int | None = None
    env_episode: str | None = None
    episode: str | None = None
    membership: str | None = None  # cgroup | env | lineage
    exited: float | None = None  # monotonic time of exit
    execs: int = 0
    forked: bool = False  # seen forked (a fork record): execs counts every exec since
    sock_types: dict[int, str] = field(default_factory=dict)  # fd -> stream/dgram/...


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def env_marker(pid: int | str) -> str | None:
    raw = _read(f"/proc/{pid}/environ")
    if not raw:
        return None
    for entry in raw.split("\0"):
        if entry.startswith("AGENT_EPISODE_ID="):
            return entry[len("AGENT_EPISODE_ID=") :] or None
    return None


def read_proc(pid: int, cgroup_ids: dict[str, int] | None = None) -> Proc | None:
    """Read one process from /proc, or None when it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # comm may contain spaces and parentheses: split at the last ')'
    rp = stat.rfind(")")
    comm = stat[stat.find("(") + 1 : rp]
    rest = stat[rp + 2 :].split()
    ppid = int(rest[1])
    start_ticks = int(rest[19])
    cmdline = _read(f"/proc/{pid}/cmdline") or ""
    argv = cmdline.split("\0")[:-1] if cmdline else []
    uid = None
    status = _read(f"/proc/{pid}/status")
    if status:
        for line in status.splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
                break
    cg = None
    cgtext = _read(f"/proc/{pid}/cgroup")
    if cgtext:
        for line in cgtext.splitlines():
            if line.startswith("0::"):
                rel = line[3:]
                if cgroup_ids is not None:
                    cg = cgroup_ids.get(rel)
                    if cg is None:
                        cg = _cgroup_id_of(rel)
                        cgroup_ids[rel] = cg
                else:
                    cg = _cgroup_id_of(rel)
    return Proc(
        pid=pid,
        ppid=ppid,
        exe=_readlink(f"/proc/{pid}/exe"),
        argv=argv,
        cwd=_readlink(f"/proc/{pid}/cwd"),
        cgroup=cg,
        start=start_ticks / os.sysconf("SC_CLK_TCK"),
        comm=comm,
        uid=uid,
        env_episode=env_marker(pid),
    )


def _cgroup_id_of(rel: str) -> int | None:
    from .cgroups import cgroup2_mount

    try:
        return os.stat(cgroup2_mount() / rel.lstrip("/")).st_ino
    except (OSError, RuntimeError):
        return None


class ProcessTable:
    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}
        self._exited: deque[tuple[float, int]] = deque()

    def __len__(self) -> int:
        return len(self.procs)

    def get(self, pid: int) -> Proc | None:
        return self.procs.get(pid)

    def seed_from_proc(self) -> int:
        cache: dict[str, int] = {}
        n = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            p = read_proc(int(name), cache)
            if p is not None:
                self.procs[p.pid] = p
                n += 1
        return n

    def lookup_or_read(self, pid: int) -> Proc | None:
        p = self.procs.get(pid)
        if p is None:
            p = read_proc(pid)
            if p is not None:
                self.procs[pid] = p
        return p

    def fork(self, parent: int, child: int, now: float) -> Proc:
        pp = self.procs.get(parent)
        c = Proc(pid=child, ppid=parent, start=now, forked=True)
        if pp is not None:
            c.exe, c.argv, c.cwd, c.cgroup = pp.exe, pp.argv, pp.cwd, pp.cgroup
            c.comm, c.uid, c.env_episode = pp.comm, pp.uid, pp.env_episode
            c.episode = pp.episode
            c.membership = "lineage" if pp.episode else None
        self.procs[child] = c
        return c

    def exec(self, pid: int, exe: str | None, argv: list[str], cwd: str | None) -> Proc:
        p = self.procs.get(pid)
        if p is None:
            p = Proc(pid=pid)
            self.procs[pid] = p
        p.exe, p.argv = exe, argv
        if cwd is not None:
            p.cwd = cwd
        p.execs += 1
        return p

    def exit(self, pid: int, now_mono: float) -> Proc | None:
        p = self.procs.get(pid)
        if p is not None and p.exited is None:
            p.exited = now_mono
            self._exited.append((now_mono, pid))
        return p

    def reap(self, now_mono: float, grace: float = EXITED_GRACE_S) -> list[int]:
        """Drop entries that exited more than `grace` seconds ago."""
        gone = []
        while self._exited and now_mono - self._exited[0][0] >= grace:
            _, pid = self._exited.popleft()
            p = self.procs.get(pid)
            if p is not None and p.exited is not None and now_mono - p.exited >= grace:
                del self.procs[pid]
                gone.append(pid)
        return gone

    def sweep_outside(self) -> list[int]:
        """Drop processes outside every episode whose /proc entry is gone.

        Without --all the kernel sends nothing for them, exits included, so
        entries seeded from /proc at start (or read for a fork, a gate, a
        GPU sample) would otherwise stay forever. Episode members keep
        their entries until their exit record reaps them."""
        gone = [pid for pid, p in self.procs.items()
                if p.episode is None and p.exited is None and not os.path.exists(f"/proc/{pid}")]
        for pid in gone:
            del self.procs[pid]
        return gone

    def ancestors(self, pid: int, limit: int = 64) -> Iterator[Proc]:
        """Ancestors of pid, nearest first (stops at init or a gap)."""
        seen = {pid}
        p = self.procs.get(pid)
        while p is not None and p.ppid and limit > 0:
            if p.ppid in seen:
                return
            seen.add(p.ppid)
            p = self.procs.get(p.ppid)
            if p is None:
                return
            yield p
            limit -= 1

    def live(self) -> Iterator[Proc]:
        return (p for p in self.procs.values() if p.exited is None)

    def members(self, episode: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.episode == episode and p.exited is None]


def proc_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
