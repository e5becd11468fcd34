"""Episodes: which agent run every process belongs to.

Membership, strongest first:
  1. cgroup: the process is in <cgroup2>/agent-tracer/<ID> (or below it);
  2. env marker: AGENT_EPISODE_ID=<ID> in the environment of an exec;
  3. lineage: the process descends from an episode member (kept across
     double fork, setsid and reparenting to init, because it is inherited at
     fork time, not looked up through the parent later).

The Tracker enriches every record with `episode`, `membership`, `ppid` and
`exe`, and emits `episode_start` / `episode_end` records. It works the same
on live kernel records and on recorded JSONL (`live=False`: nothing is read
from /proc).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .proctable import Proc, ProcessTable

EPISODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$")
KERNEL_TYPES = frozenset(
    {"fork", "exec", "exit", "connect", "socket", "bind", "listen", "memfd", "gpu_open", "deny", "gate_race",
     "protocol", "egress", "datagram"}
)

# kinds that neither create, change nor end a process (listen is not here: it
# may read the socket's local address from /proc)
_FAST_TYPES = frozenset({"connect", "socket", "bind", "memfd", "gpu_open", "deny", "gate_race", "protocol",
                         "egress", "datagram"})


def check_episode_id(ep: str) -> str:
    if not EPISODE_ID_RE.match(ep):
        raise ValueError(
            f"invalid episode id {ep!r}: 1-63 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return ep


@dataclass
class Episode:
    id: str
    source: str  # cgroup | env | preexisting
    slot: int
    cgroup_path: str | None = None
    cgroup_ids: set[int] = field(default_factory=set)
    root_pid: int | None = None
    started: float = 0.0
    ended: bool = False


class CgroupRegistry:
    """Maps cgroup ids under <cgroup2>/agent-tracer to episode ids."""

    def __init__(self, root: Path | None):
        self.root = root
        self.by_cgroup: dict[int, str] = {}
        self.paths: dict[str, Path] = {}
        self._last_scan = 0.0
        self._unknown: set[int] = set()
        # the root as the kernel's cgroup_mkdir tracepoint names it (its path
        # below the cgroup2 mount), e.g. "/agent-tracer/"
        self.kernel_prefix: str | None = None
        if root is not None:
            try:
                from .cgroups import cgroup2_mount

                self.kernel_prefix = "/" + str(root.relative_to(cgroup2_mount())).strip("/") + "/"
            except (ValueError, OSError):
                self.kernel_prefix = None

    def made(self, cg: int, path: str) -> tuple[str, Path] | None:
        """A cgroup_mkdir record: (episode, episode dir) when `path` is an
        episode cgroup or one below it; registers its id at once, so a
        process that runs and dies there before the next scan is still
        attributed (the scan would find the directory gone)."""
        pre = self.kernel_prefix
        if pre is None or self.root is None or not path.startswith(pre):
            return None
        ep = path[len(pre):].split("/", 1)[0]
        if not ep or ep.startswith(".") or not EPISODE_ID_RE.match(ep):
            return None
        self.by_cgroup[cg] = ep
        self._unknown.discard(cg)
        self.paths.setdefault(ep, self.root / ep)
        return ep, self.root / ep

    def scan(self) -> tuple[list[tuple[str, Path, set[int]]], list[str]]:
        """Rescan; returns (added (id, path, cgroup ids), removed ids)."""
        self._last_scan = time.monotonic()
        # ids that stay unknown after this scan are not episode cgroups (a
        # cgroup id is never reused and a new cgroup below the episode root
        # is named by its cgroup_mkdir record): they do not rescan again, or
        # every record from outside the episodes (scope = "all", env/lineage
        # members) would walk the episode root
        if len(self._unknown) > 65536:
            self._unknown.clear()
        if self.root is None or not self.root.exists():
            return [], []
        found: dict[str, tuple[Path, set[int]]] = {}
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            entries = []
        for d in entries:
            if not d.is_dir(follow_symlinks=False) or d.name.startswith("."):
                continue
            ids = set()
            try:
                ids.add(d.inode())
                for dirpath, dirs, _ in os.walk(d.path):
                    for sub in dirs:
                        ids.add(os.stat(os.path.join(dirpath, sub)).st_ino)
            except FileNotFoundError:
                continue
            found[d.name] = (Path(d.path), ids)
        added, removed = [], []
        for ep, (path, ids) in found.items():
            if ep not in self.paths:
                added.append((ep, path, ids))
            self.paths[ep] = path
            for i in ids:
                self.by_cgroup[i] = ep
                self._unknown.discard(i)
        for ep in list(self.paths):
            if ep not in found:
                removed.append(ep)
                del self.paths[ep]
                for i in [i for i, e in self.by_cgroup.items() if e == ep]:
                    del self.by_cgroup[i]
        return added, removed

    def episode_of(self, cg: int | None) -> str | None:
        return None if cg is None else self.by_cgroup.get(cg)

    def first_miss(self, cg: int | None) -> bool:
        """True the first time an unknown cgroup id is seen: the caller
        rescans (a new episode cgroup appears this way before the periodic
        scan finds it); an id the rescan does not find stays unknown."""
        if cg is None or cg in self.by_cgroup or cg in self._unknown or self.root is None:
            return False
        self._unknown.add(cg)
        return True


class Tracker:
    """Process table + episode resolution over a stream of records."""

    def __init__(self, cgroup_root: Path | None = None, live: bool = True):
        self.table = ProcessTable()
        self.cgroups = CgroupRegistry(cgroup_root if live else None)
        self.live = live
        self.episodes: dict[str, Episode] = {}
        self._next_slot = 1
        self.pending: list[dict[str, Any]] = []  # records produced outside observe()

    # ------------------------------------------------------------- episodes
    def _start(self, ep: str, source: str, now: float, cgroup_path: str | None = None,
               root_pid: int | None = None, ids: set[int] | None = None) -> dict[str, Any]:
        e = self.episodes.get(ep)
        if e is not None and not e.ended:
            if ids:
                e.cgroup_ids |= ids
            return {}
        slot = self._next_slot
        self._next_slot += 1
        self.episodes[ep] = Episode(ep, source, slot, cgroup_path, set(ids or ()), root_pid, now)
        return {"type": "episode_start", "ts": now, "episode": ep, "source": source,
                "cgroup_path": cgroup_path, "root_pid": root_pid}

    def _end(self, ep: str, now: float, reason: str, exit_code: int | None = None) -> dict[str, Any]:
        e = self.episodes.get(ep)
        if e is None or e.ended:
            return {}
        e.ended = True
        return {"type": "episode_end", "ts": now, "episode": ep, "reason": reason, "exit_code": exit_code}

    def seed(self, now: float) -> list[dict[str, Any]]:
        """At start: read /proc and the episode cgroups, and report the
        episodes that were already running."""
        out = []
        added, _ = self.cgroups.scan()
        for ep, path, ids in added:
            r = self._start(ep, "preexisting", now, str(path), None, ids)
            if r:
                out.append(r)
        if self.live:
            self.table.seed_from_proc()
        # resolve every process, parents first, so lineage flows down
        for p in sorted(self.table.procs.values(), key=lambda p: (p.start or 0, p.pid)):
            self._resolve(p)
            if p.episode and p.episode not in self.episodes:
                r = self._start(p.episode, "preexisting", now)
                if r:
                    out.append(r)
        return out

    def scan_cgroups(self, now: float) -> list[dict[str, Any]]:
        out = []
        added, removed = self.cgroups.scan()
        for ep, path, ids in added:
            r = self._start(ep, "cgroup", now, str(path), None, ids)
            if r:
                out.append(r)
        for ep in removed:
            e = self.episodes.get(ep)
            if e is not None and e.source in ("cgroup", "preexisting") and e.cgroup_path:
                r = self._end(ep, now, "removed")
                if r:
                    out.append(r)
        return out

    def episode_slot(self, ep: str) -> int | None:
        e = self.episodes.get(ep)
        return e.slot if e else None

    def process_of(self, pid: int) -> Proc | None:
        """The table's process, read from /proc and resolved when the
        table has not seen it yet (e.g. its exec record is still queued)."""
        p = self.table.get(pid)
        if p is None and self.live:
            p = self.table.lookup_or_read(pid)
            if p is not None:
                self._resolve(p)
        return p

    # ----------------------------------------------------------- resolution
    def _resolve(self, p: Proc) -> None:
        if self.cgroups.first_miss(p.cgroup):
            self.pending.extend(self.scan_cgroups(time.time()))
        ep = self.cgroups.episode_of(p.cgroup)
        if ep is not None:
            p.episode, p.membership = ep, "cgroup"
            return
        if p.env_episode:
            p.episode, p.membership = p.env_episode, "env"
            return
        if p.membership in ("lineage", "env") and p.episode:
            if p.membership == "env" and not p.env_episode:
                p.membership = "lineage"
            return
        parent = self.table.get(p.ppid) if p.ppid else None
        if parent is not None and parent.episode:
            p.episode, p.membership = parent.episode, "lineage"
        else:
            p.episode, p.membership = None, None

    def observe(self, rec: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
        """Enrich rec in place; return the records to emit, rec included,
        with any episode_start/episode_end around it."""
        t = rec.get("type")
        if t == "cgroup_mkdir":
            return self._cgroup_made(rec)
        if t not in KERNEL_TYPES:
            if t == "episode_start" and rec.get("episode"):
                self._start(rec["episode"], rec.get("source", "cgroup"), rec.get("ts", 0.0),
                            rec.get("cgroup_path"), rec.get("root_pid"))
            elif t == "episode_end" and rec.get("episode"):
                self._end(rec["episode"], rec.get("ts", 0.0), rec.get("reason", "exited"))
            return [rec]
        if t == "egress" and not rec.get("pid"):
            # refused in the packet path (raw/ICMP socket): no task there, the
            # socket's cgroup names the episode
            rec["episode"] = self.cgroups.by_cgroup.get(rec.get("cgroup"))
            return [rec]
        if t in _FAST_TYPES and self.live and not self.pending:
            fast = self._observe_settled(rec, t)
            if fast is not None:
                return fast
        now = rec.get("ts", now if now is not None else time.time())
        out: list[dict[str, Any]] = []
        pid = rec["pid"]
        table = self.table
        recorded_ep = rec.get("episode") if not self.live else None
        if t == "fork":
            if table.get(pid) is None and self.live:
                table.lookup_or_read(pid)
            child = table.fork(pid, rec["child_pid"], now)
            if rec.get("cgroup") is not None:
                child.cgroup = rec["cgroup"]
            self._resolve(child)
        p = table.get(pid)
        if p is None:
            p = table.lookup_or_read(pid) if self.live else None
            if p is None:
                p = Proc(pid=pid, ppid=rec.get("ppid"))
                table.procs[pid] = p
        if rec.get("cgroup") is not None:
            p.cgroup = rec["cgroup"]
        if rec.get("comm"):
            p.comm = rec["comm"]
        if t == "exec":
            exe, cwd = rec.get("exe"), rec.get("cwd")
            if self.live:
                if rec.pop("argv_from_proc", False):
                    # out of scope at execve (gated or killed by a scope = "all"
                    # rule): the process is stopped right after exec, so its
                    # cmdline is the new image's argv
                    rec["argv"] = _cmdline(pid)
                exe = _readlink(f"/proc/{pid}/exe") or _absolute(rec.get("filename"), cwd)
                cwd = _readlink(f"/proc/{pid}/cwd")
                rec["exe"], rec["cwd"] = exe, cwd
                rec["fileless"] = _fileless(exe, rec.get("filename"))
            table.exec(pid, exe, rec.get("argv") or [], cwd)
            # the new image's environment is what counts
            p.env_episode = rec.get("env_episode")
        if recorded_ep is not None:
            p.episode = recorded_ep
            p.membership = rec.get("membership") or p.membership
        else:
            self._resolve(p)
        if self.pending:
            out.extend(self.pending)
            self.pending.clear()
        rec["episode"] = p.episode
        rec["membership"] = p.membership
        rec["ppid"] = p.ppid
        rec.setdefault("exe", p.exe)
        if p.episode is not None and (p.episode not in self.episodes or self.episodes[p.episode].ended):
            e = self.episodes.get(p.episode)
            if e is None or (e.ended and p.membership != "cgroup"):
                src = "cgroup" if p.membership == "cgroup" else "env"
                path = str(self.cgroups.paths.get(p.episode)) if p.membership == "cgroup" else None
                r = self._start(p.episode, src, now, path, pid)
                if r:
                    out.append(r)
        out.append(rec)
        if t == "socket" and (rec.get("result") or -1) >= 0:
            if len(p.sock_types) > 4096:
                p.sock_types.clear()
            p.sock_types[rec["result"]] = rec.get("sock_type")
        elif t in ("connect", "bind", "listen") and "sock_type" not in rec and rec.get("fd") in p.sock_types:
            rec["sock_type"] = p.sock_types[rec["fd"]]
        if t == "listen" and self.live and not rec.get("port") and rec.get("result") == 0:
            from .sockets import local_addr_of

            got = local_addr_of(pid, rec.get("fd"))
            if got:
                rec["family"], rec["addr"], rec["port"] = got
        if t == "exit":
            table.exit(pid, time.monotonic())
            if p.episode:
                e = self.episodes.get(p.episode)
                if e is not None and e.source == "env" and not table.members(p.episode):
                    r = self._end(p.episode, now, "exited",
                                  rec.get("code") if e.root_pid == pid else None)
                    if r:
                        out.append(r)
        return out

    def _observe_settled(self, rec: dict[str, Any], t: str) -> list[dict[str, Any]] | None:
        """observe() of a socket-like record from a known process whose
        cgroup is unchanged and whose membership `_resolve` would leave as
        it is (and whose episode is running): the same enrichment without
        the general path. None when any of that does not hold."""
        p = self.table.procs.get(rec["pid"])
        if p is None:
            return None
        cg = rec.get("cgroup")
        if cg is None or cg != p.cgroup:
            return None
        ep, mem = p.episode, p.membership
        reg = self.cgroups
        cep = reg.by_cgroup.get(cg)
        if cep is not None:
            if mem != "cgroup" or cep != ep:
                return None
        elif cg not in reg._unknown and reg.root is not None:
            return None  # a first miss: the general path rescans
        elif p.env_episode:
            if mem != "env" or ep != p.env_episode:
                return None
        elif mem == "lineage" and ep:
            pass
        elif ep is None and mem is None:
            parent = self.table.procs.get(p.ppid) if p.ppid else None
            if parent is not None and parent.episode:
                return None
        else:
            return None
        if ep is not None:
            e = self.episodes.get(ep)
            if e is None or e.ended:
                return None
        comm = rec.get("comm")
        if comm:
            p.comm = comm
        rec["episode"] = ep
        rec["membership"] = mem
        rec["ppid"] = p.ppid
        rec.setdefault("exe", p.exe)
        if t == "socket":
            if (rec.get("result") or -1) >= 0:
                if len(p.sock_types) > 4096:
                    p.sock_types.clear()
                p.sock_types[rec["result"]] = rec.get("sock_type")
        elif (t == "connect" or t == "bind") and "sock_type" not in rec and rec.get("fd") in p.sock_types:
            rec["sock_type"] = p.sock_types[rec["fd"]]
        return [rec]

    def _cgroup_made(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Not a record of its own: a new episode cgroup starts its episode."""
        got = self.cgroups.made(rec["cgroup_id"], rec.get("path") or "")
        if got is None:
            return []
        ep, path = got
        e = self.episodes.get(ep)
        if e is not None and not e.ended:
            e.cgroup_ids.add(rec["cgroup_id"])
            return []
        r = self._start(ep, "cgroup", rec.get("ts", time.time()), str(path), None, {rec["cgroup_id"]})
        return [r] if r else []

    def reap(self) -> None:
        self.table.reap(time.monotonic())

    def ancestors_exe(self, pid: int) -> list[str]:
        return [a.exe or "" for a in self.table.ancestors(pid)]


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else []


def _absolute(filename: str | None, cwd: str | None) -> str | None:
    if not filename:
        return None
    if filename.startswith("/") or not cwd:
        return filename
    return os.path.normpath(os.path.join(cwd, filename))


def _fileless(exe: str | None, filename: str | None) -> bool:
    if exe and (exe.startswith("/memfd:") or exe.endswith(" (deleted)")):
        return True
    if filename and (filename.startswith("/dev/fd/") or filename.startswith("/proc/self/fd/")):
        return True
    return False
