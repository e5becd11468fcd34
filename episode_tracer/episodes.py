"""Episodes: which agent run every process belongs to.

Membership, strongest first:
  1. cgroup: the process is in <cgroup2>/agent-tracer/<ID> (or below it);
  2. env marker: AGENT_EPISODE_ID=<ID> in the environment of an exec;
  3. lineage: the process descends from an episode member (kept across
     double fork, setsid and reparenting to init, because it is inherited at
     fork time, not looked up through the parent later).

Membership cannot be left: a cgroup member moved to a cgroup outside its
episode (the kernel's `escape` record, or a record showing it in a cgroup
outside the episode) stays a member with membership `escaped`
(episode_tracer.membership).

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

from .ids import EPISODE_ID_RE, check_episode_id  # noqa: F401 (re-exported)
from .proctable import Proc, ProcessTable
from .slots import DEFAULT_MAX_EPISODES, SlotsExhausted, SlotTable

KERNEL_TYPES = frozenset(
    {"fork", "exec", "exit", "connect", "socket", "bind", "listen", "memfd", "gpu_open", "deny", "gate_race",
    "unix_deny", "unix_gate",
    "protocol", "escape", "egress", "datagram"}
)

# an episode cgroup found gone by a directory scan ends only this long after
# (its cgroup_rmdir record ends it at once, in stream order, after every
# record of what ran there: the scan is the fallback when that record was lost)
SCAN_REMOVE_GRACE_S = 5.0
# ended episodes leave the tracker this long after their end (observers of
# the episode_end record still find them; memory stays flat in ended ones)
ENDED_FORGET_S = 5.0
REFUSED_MEMORY = 4096

# kinds that neither create, change nor end a process (listen is not here: it
# may read the socket's local address from /proc)
_FAST_TYPES = frozenset({"connect", "socket", "bind", "memfd", "gpu_open", "deny", "gate_race", "protocol",
                         "egress", "datagram"})


@dataclass
class Episode:
    id: str
    source: str  # cgroup | env | preexisting | attach | container (docs/episodes.md)
    slot: int  # kernel identity (episode_tracer/slots.py)
    cgroup_path: str | None = None
    cgroup_ids: set[int] = field(default_factory=set)
    root_pid: int | None = None
    started: float = 0.0
    ended: bool = False
    kernel: bool = False  # its identity and cgroups are in the kernel maps (Runtime._sync_kernel)


class CgroupRegistry:
    """Maps cgroup ids under <cgroup2>/agent-tracer to episode ids."""

    def __init__(self, root: Path | None):
        self.root = root
        self.by_cgroup: dict[int, str] = {}
        self.paths: dict[str, Path] = {}
        self._last_scan = 0.0
        self._unknown: set[int] = set()
        self._gone: dict[str, float] = {}  # episode -> when a scan first found its directory gone
        # cgroups outside the episode root that are episodes (attached, containers):
        # path below the cgroup2 mount ("/a/b", no trailing slash) -> episode
        self.foreign: dict[str, str] = {}
        self._foreign_gone: dict[str, float] = {}
        self.on_new_id: Any = None  # (episode, cgroup id) of a foreign sub-cgroup found by a scan
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
        if self.foreign:
            root = self.foreign_root_of(path)
            if root is not None:
                ep = self.foreign[root]
                self.by_cgroup[cg] = ep
                self._unknown.discard(cg)
                return ep, self.paths.get(ep) or Path(root)
        if pre is None or self.root is None or not path.startswith(pre):
            return None
        ep = path[len(pre):].split("/", 1)[0]
        if not ep or ep.startswith(".") or not EPISODE_ID_RE.match(ep):
            return None
        self.by_cgroup[cg] = ep
        self._unknown.discard(cg)
        self.paths.setdefault(ep, self.root / ep)
        self._gone.pop(ep, None)
        return ep, self.root / ep

    # ---------------------------------------------- foreign cgroups (attach, containers)
    def foreign_root_of(self, path: str | None) -> str | None:
        """The attached root `path` (below the cgroup2 mount) is or is below."""
        if not path or not self.foreign:
            return None
        p = "/" + path.strip("/")
        while p:
            if p in self.foreign:
                return p
            p = p.rsplit("/", 1)[0]
        return None

    def attach(self, ep: str, kpath: str, abspath: Path) -> set[int]:
        """Make the cgroup at `abspath` (kpath: below the mount) and every
        cgroup below it episode `ep`'s; returns their ids."""
        ids = _tree_ids(abspath)
        if not ids:
            raise FileNotFoundError(f"no cgroup {abspath}")
        self.foreign[kpath] = ep
        self.paths.setdefault(ep, abspath)
        for i in ids:
            self.by_cgroup[i] = ep
            self._unknown.discard(i)
        return ids

    def detach(self, ep: str) -> None:
        for k in [k for k, e in self.foreign.items() if e == ep]:
            del self.foreign[k]
            self._foreign_gone.pop(k, None)
        if self.root is None or self.paths.get(ep) != self.root / ep:
            self.paths.pop(ep, None)

    def _scan_foreign(self, now: float) -> list[str]:
        """Register sub-cgroups of attached roots whose mkdir record was not
        seen; returns the episodes whose every root is gone (after the grace)."""
        from .cgroups import cgroup2_mount

        gone_eps = []
        mount = str(cgroup2_mount())
        for kpath, ep in list(self.foreign.items()):
            ids = _tree_ids(Path(mount + kpath))
            if not ids:
                first = self._foreign_gone.setdefault(kpath, now)
                if now - first >= SCAN_REMOVE_GRACE_S:
                    del self.foreign[kpath]
                    del self._foreign_gone[kpath]
                    if ep not in self.foreign.values():
                        gone_eps.append(ep)
                continue
            self._foreign_gone.pop(kpath, None)
            for i in ids:
                if i not in self.by_cgroup:
                    self.by_cgroup[i] = ep
                    self._unknown.discard(i)
                    if self.on_new_id is not None:
                        self.on_new_id(ep, i)
        return gone_eps

    def removed_dir(self, cg: int, path: str) -> tuple[str, bool] | None:
        """A cgroup_rmdir record: (episode, whether it was the episode's own
        directory) for an episode cgroup or one below it; forgets the id."""
        pre = self.kernel_prefix
        if self.foreign:
            root = self.foreign_root_of(path)
            if root is not None:
                ep = self.foreign[root]
                self.by_cgroup.pop(cg, None)
                top = "/" + path.strip("/") == root
                if top:
                    del self.foreign[root]
                    self._foreign_gone.pop(root, None)
                    top = ep not in self.foreign.values()  # its last root
                    if top:
                        self.paths.pop(ep, None)
                return ep, top
        if pre is None or self.root is None or not path.startswith(pre):
            return None
        rest = path[len(pre):].strip("/")
        ep = rest.split("/", 1)[0]
        if not ep or ep.startswith(".") or not EPISODE_ID_RE.match(ep):
            return None
        self.by_cgroup.pop(cg, None)
        top = "/" not in rest
        if top:
            self.paths.pop(ep, None)
            self._gone.pop(ep, None)
        return ep, top

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
            return [], self._scan_foreign(self._last_scan) if self.foreign else []
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
            self._gone.pop(ep, None)
            for i in ids:
                self.by_cgroup[i] = ep
                self._unknown.discard(i)
        # a directory gone now may still have records queued in the ring
        # buffer: it is removed by its cgroup_rmdir record, in stream order;
        # the scan removes it only after a grace (that record was lost)
        now = self._last_scan
        foreign_eps = set(self.foreign.values())
        for ep in list(self.paths):
            if ep in found or ep in foreign_eps:
                continue
            first = self._gone.setdefault(ep, now)
            if now - first < SCAN_REMOVE_GRACE_S:
                continue
            del self._gone[ep]
            removed.append(ep)
            del self.paths[ep]
            for i in [i for i, e in self.by_cgroup.items() if e == ep]:
                del self.by_cgroup[i]
        if self.foreign:
            removed.extend(self._scan_foreign(now))
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

    def __init__(self, cgroup_root: Path | None = None, live: bool = True,
                 max_episodes: int = DEFAULT_MAX_EPISODES, slot_start_gen: int = 0):
        self.table = ProcessTable()
        self.cgroups = CgroupRegistry(cgroup_root if live else None)
        self.live = live
        self.episodes: dict[str, Episode] = {}
        self.slots = SlotTable(max_episodes, slot_start_gen)
        self.refused: dict[str, float] = {}  # episode -> when it was refused (no identity free)
        self._ended: list[tuple[float, str, Episode]] = []  # (monotonic end, id, episode), oldest first
        self.pending: list[dict[str, Any]] = []  # records produced outside observe()
        # episode sources beyond the episode root (episode_tracer/sources.py, docs/episodes.md)
        self.containers: Any = None  # episode_tracer.sources.ContainerSource when container episodes are on
        self.tags: dict[str, dict[str, Any]] = {}  # episode -> fields every record of it carries (container, pod)
        # (episode, cgroup id) of a cgroup that joined a running episode outside
        # the episode root (the runtime names it in the kernel's episode_cgroups)
        self.on_cgroup_added: Any = None
        self.cgroups.on_new_id = self._foreign_id_found

    # ------------------------------------------------------------- episodes
    def _start(self, ep: str, source: str, now: float, cgroup_path: str | None = None,
               root_pid: int | None = None, ids: set[int] | None = None) -> dict[str, Any]:
        e = self.episodes.get(ep)
        if e is not None and not e.ended:
            if ids:
                e.cgroup_ids |= ids
            return {}
        if ep in self.refused:
            return {}  # refused once: its records stay its own, with no identity (it is being killed)
        try:
            slot = self.slots.take(ep)
        except SlotsExhausted as err:
            if len(self.refused) >= REFUSED_MEMORY:
                del self.refused[next(iter(self.refused))]
            self.refused[ep] = now
            return {"type": "episode_refused", "ts": now, "episode": ep, "source": source,
                    "cgroup_path": cgroup_path, "root_pid": root_pid, "reason": str(err),
                    "max_episodes": self.slots.capacity}
        self.episodes[ep] = Episode(ep, source, slot, cgroup_path, set(ids or ()), root_pid, now)
        return {"type": "episode_start", "ts": now, "episode": ep, "source": source,
                "cgroup_path": cgroup_path, "root_pid": root_pid, "slot": slot}

    def _end(self, ep: str, now: float, reason: str, exit_code: int | None = None) -> dict[str, Any]:
        e = self.episodes.get(ep)
        if e is None or e.ended:
            return {}
        e.ended = True
        self.slots.give_back(e.slot)
        self._ended.append((time.monotonic(), ep, e))
        for cg in e.cgroup_ids:
            if self.cgroups.by_cgroup.get(cg) == ep:
                del self.cgroups.by_cgroup[cg]
        return {"type": "episode_end", "ts": now, "episode": ep, "reason": reason, "exit_code": exit_code}

    # --------------------------------------------- attached cgroups, containers
    def attach(self, ep: str, abspath: Path, now: float, source: str = "attach",
               tags: dict[str, Any] | None = None, rule: str | None = None) -> list[dict[str, Any]]:
        """An existing cgroup (anywhere under the cgroup2 mount) and every
        cgroup below it become episode `ep`: what runs there now or later is
        a member. Returns the records (episode_start, or episode_refused);
        ValueError when it cannot be (names what is wrong)."""
        from .cgroups import cgroup2_mount

        check_episode_id(ep)
        mount = cgroup2_mount()
        abspath = Path(os.path.realpath(abspath))
        try:
            rel = abspath.relative_to(mount)
        except ValueError:
            raise ValueError(f"{abspath} is not below the cgroup2 mount {mount}") from None
        if str(rel) in ("", "."):
            raise ValueError("the cgroup2 root cannot be an episode")
        if not (abspath / "cgroup.procs").exists():
            raise ValueError(f"no cgroup {abspath} (no cgroup.procs there)")
        root = self.cgroups.root
        if root is not None and (abspath == root or root in abspath.parents):
            raise ValueError(f"{abspath} is inside the episode root {root}: it is an episode cgroup already")
        kpath = "/" + str(rel)
        owner = self.cgroups.foreign_root_of(kpath)
        if owner is not None:
            raise ValueError(f"{abspath} is already episode {self.cgroups.foreign[owner]!r}'s (attached {owner})")
        for k, other in self.cgroups.foreign.items():
            if k.startswith(kpath + "/"):
                raise ValueError(f"{abspath} contains {k}, already episode {other!r}'s")
        e = self.episodes.get(ep)
        if e is not None and not e.ended:
            raise ValueError(f"episode {ep!r} is running already (source {e.source})")
        try:
            ids = self.cgroups.attach(ep, kpath, abspath)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        r = self._start(ep, source, now, str(abspath), None, ids)
        if not r or r["type"] != "episode_start":
            self.cgroups.detach(ep)
            for i in ids:
                self.cgroups.by_cgroup.pop(i, None)
            return [r] if r else []
        if tags:
            self.tags[ep] = dict(tags)
            r.update(tags)
        if rule:
            r["rule"] = rule
        # what runs there already: members now, parents first
        out = [r]
        from .cgroups import all_procs

        procs = []
        for pid in all_procs(abspath):
            p = self.table.lookup_or_read(pid) if self.live else self.table.get(pid)
            if p is not None:
                procs.append(p)
        for p in sorted(procs, key=lambda p: (p.start or 0, p.pid)):
            self._resolve(p)
        return out

    def detach(self, ep: str, now: float) -> list[dict[str, Any]]:
        """End an attached (or container) episode without killing anything:
        its processes are no one's any more. ValueError when it is not one."""
        e = self.episodes.get(ep)
        if e is None or e.ended:
            raise ValueError(f"no running episode {ep!r}")
        if e.source not in ("attach", "container"):
            raise ValueError(f"episode {ep!r} was not attached (source {e.source}): end it with kill, "
                             "or let its command finish")
        members = self.table.members(ep)
        r = self._end(ep, now, "detached")
        self.cgroups.detach(ep)
        for p in members:
            p.episode, p.membership = None, None
        for p in members:
            self._resolve(p)
        return [r] if r else []

    def _foreign_id_found(self, ep: str, cg: int) -> None:
        e = self.episodes.get(ep)
        if e is None or e.ended:
            return
        e.cgroup_ids.add(cg)
        if self.on_cgroup_added is not None:
            self.on_cgroup_added(ep, cg)

    def _container_started(self, cg: int, path: str, d: Any, now: float) -> list[dict[str, Any]]:
        from .cgroups import cgroup2_mount

        tags: dict[str, Any] = {}
        if d.container:
            tags["container"] = d.container
        if d.pod:
            tags["pod"] = d.pod
        try:
            return self.attach(d.episode, cgroup2_mount() / path.strip("/"), now, "container", tags, d.rule)
        except ValueError as err:
            import logging

            logging.getLogger(__name__).warning("container cgroup %s: not episode %s: %s", path, d.episode, err)
            return []

    def poll_sources(self, now: float) -> list[dict[str, Any]]:
        """Containers whose labels were not readable at their cgroup_mkdir, decided now."""
        c = self.containers
        if c is None or not c.pending:
            return []
        out = []
        for cg, path, d in c.retry(now):
            out.extend(self._container_started(cg, path, d, now))
        return out

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
        if self.containers is not None and self.live:
            from .cgroups import cgroup2_mount
            from .sources import scan_existing

            for cg, path in scan_existing(self.containers.cfg, cgroup2_mount()):
                d = self.containers.classify(cg, path, now)
                if d is not None:
                    out.extend(self._container_started(cg, path, d, now))
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
            if e is not None and e.source in ("cgroup", "preexisting", "attach", "container") and e.cgroup_path:
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
        if p.membership in ("cgroup", "escaped") and p.episode and ep != p.episode:
            # a member now in a cgroup outside its episode stays a member
            # (episode_tracer.membership says so once, as an escape record)
            from .membership import left_cgroup

            if left_cgroup(self, p):
                return
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
        if t == "cgroup_rmdir":
            return self._cgroup_removed(rec)
        if t == "escape":
            from .membership import observe_escape

            return observe_escape(self, rec)
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
                    # no syscall-entry record (out of scope at execve, a 32-bit
                    # execve, a full pending map): the process is stopped right
                    # after exec (gated), so its cmdline is the new image's argv
                    argv = _cmdline_or_none(pid)
                    rec["argv"] = argv or []
                    rec["argv_source"] = "proc"
                    if argv is None:
                        rec["argv_unreadable"] = True  # the engine applies the gate default
                real = _readlink(f"/proc/{pid}/exe")
                exe = real or _absolute(rec.get("filename"), cwd)
                cwd = _readlink(f"/proc/{pid}/cwd")
                rec["exe"], rec["cwd"] = exe, cwd
                rec["fileless"] = _fileless(exe, rec.get("filename"), exe_known=real is not None)
            table.exec(pid, exe, rec.get("argv") or [], cwd)
            # the new image's environment is what counts
            p.env_episode = rec.get("env_episode")
        if recorded_ep is not None:
            p.episode = recorded_ep
            p.membership = rec.get("membership") or p.membership
        else:
            self._resolve(p)
        if self.pending:
            for r in self.pending:
                if r.get("ts") is None:
                    r["ts"] = now
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
        elif (mem == "lineage" or mem == "escaped") and ep:
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
            if self.containers is not None and self.live:
                d = self.containers.classify(rec["cgroup_id"], rec.get("path") or "", rec.get("ts", time.time()))
                if d is not None:
                    return self._container_started(rec["cgroup_id"], rec.get("path") or "", d,
                                                   rec.get("ts", time.time()))
            return []
        ep, path = got
        e = self.episodes.get(ep)
        if e is not None and not e.ended:
            e.cgroup_ids.add(rec["cgroup_id"])
            if e.source in ("attach", "container") and self.on_cgroup_added is not None:
                self.on_cgroup_added(ep, rec["cgroup_id"])
            return []
        if ep in self.cgroups.foreign.values():
            return []  # a sub-cgroup of an attached root whose episode is over
        r = self._start(ep, "cgroup", rec.get("ts", time.time()), str(path), None, {rec["cgroup_id"]})
        return [r] if r else []

    def _cgroup_removed(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Not a record of its own: the episode's own cgroup removed ends the
        episode, after every record of what ran in it (stream order)."""
        cg = rec["cgroup_id"]
        got = self.cgroups.removed_dir(cg, rec.get("path") or "")
        if got is None:
            return []
        ep, top = got
        e = self.episodes.get(ep)
        if not top:
            if e is not None:
                e.cgroup_ids.discard(cg)
            return []
        self.refused.pop(ep, None)
        if e is None or e.ended or (e.cgroup_ids and cg not in e.cgroup_ids):
            return []  # another incarnation's directory
        r = self._end(ep, rec.get("ts", time.time()), "removed")
        return [r] if r else []

    def reap(self) -> None:
        now = time.monotonic()
        self.table.reap(now)
        # ended episodes leave memory (their summaries are in the JSONL and
        # the verdict files); a later record of the same id starts it afresh
        ended = self._ended
        n = 0
        while n < len(ended) and now - ended[n][0] >= ENDED_FORGET_S:
            _, ep, e = ended[n]
            if self.episodes.get(ep) is e:
                del self.episodes[ep]
                self.tags.pop(ep, None)
            n += 1
        if n:
            del ended[:n]
        if self.refused:
            wall = time.time()
            for ep in [ep for ep, t in self.refused.items() if wall - t > 60.0]:
                del self.refused[ep]

    def ancestors_exe(self, pid: int) -> list[str]:
        return [a.exe or "" for a in self.table.ancestors(pid)]


def _tree_ids(path: Path) -> set[int]:
    """Cgroup ids (inode numbers) of `path` and every cgroup below it; empty when it is gone."""
    ids: set[int] = set()
    try:
        ids.add(os.stat(path).st_ino)
        for dirpath, dirs, _ in os.walk(path):
            for sub in dirs:
                try:
                    ids.add(os.stat(os.path.join(dirpath, sub)).st_ino)
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return set()
    return ids


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _cmdline_or_none(pid: int) -> list[str] | None:
    """argv from /proc/<pid>/cmdline; None when it cannot be read (gone,
    or an image with no argv left to read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else None


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


_FD_PATH = re.compile(r"^/(dev/fd|proc/(self|thread-self|\d+)(/task/\d+)?/fd)/\d+$")


def _fileless(exe: str | None, filename: str | None, exe_known: bool = False) -> bool:
    """The new image is not a file on disk: a memfd, a deleted (or
    O_TMPFILE) file. Executed through a descriptor (/dev/fd/N,
    /proc/self/fd/N, execveat(fd, "", AT_EMPTY_PATH)), it counts as fileless
    unless the process's real executable (exe_known) is a linked file."""
    if exe and (exe.startswith("/memfd:") or exe.endswith(" (deleted)")):
        return True
    if filename and _FD_PATH.match(filename):
        return not exe_known or not exe or _FD_PATH.match(exe) is not None
    return False
