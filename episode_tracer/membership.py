"""Membership an episode cannot leave (the tracker's side of episode_tracer/bpf/membership.h).

A process in an episode cgroup that is moved to a cgroup outside its
episode (root inside the episode writing a pid into another cgroup's
`cgroup.procs`) stays a member: the kernel keeps it in `tracked` with its
episode's slot and says so with an `escape` record; here the process table
keeps its episode, with membership `escaped`, for this process and (through
lineage) everything it starts. The record goes through the policy like any
other (default rule `episode-escape`, kill-episode: episode_tracer/policies/membership.toml).

A member can also turn up in a cgroup outside its episode without an
attach record (a child made by clone3(CLONE_INTO_CGROUP) into another
cgroup): the first record that shows it there makes the same `escape`
record (`via: "cgroup-change"`), and the runtime marks it escaped in the
kernel's `tracked` map.

Pure bookkeeping over the tracker's table; nothing here touches the kernel.
"""
from __future__ import annotations

from typing import Any

from .proctable import Proc


def _episode_of_slot(tracker: Any, slot: int | None) -> str | None:
    if not slot:
        return None
    for e in tracker.episodes.values():
        if e.slot == slot and not e.ended:
            return e.id
    return None


def _episode_of_path(tracker: Any, path: str | None) -> str | None:
    root = tracker.cgroups.foreign_root_of(path)  # an attached cgroup or container (episode_tracer/sources.py)
    if root is not None:
        return tracker.cgroups.foreign[root]
    pre = tracker.cgroups.kernel_prefix
    if not path or not pre or not path.startswith(pre):
        return None
    ep = path[len(pre):].split("/", 1)[0]
    return ep or None


def _enrich(rec: dict[str, Any], p: Proc) -> None:
    rec["episode"] = p.episode
    rec["membership"] = p.membership
    rec["ppid"] = p.ppid
    rec["exe"] = p.exe
    rec["argv"] = p.argv
    rec["comm"] = p.comm
    rec["uid"] = p.uid


def observe_escape(tracker: Any, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A kernel `escape` record: rec["pid"] (the moved process) was moved to
    rec["dst_path"] by rec["by_pid"]. Returns the records to emit."""
    table = tracker.table
    pid = rec["pid"]
    p = table.get(pid)
    known = p is not None and p.episode is not None and p.membership in ("cgroup", "escaped", "lineage", "env")
    if p is None and tracker.live:
        p = table.lookup_or_read(pid)
    if p is None:
        p = Proc(pid=pid)
        table.procs[pid] = p
    ep = p.episode if known else None
    if ep is None and not tracker.live:
        ep = rec.get("episode")  # recorded: the record says
    if ep is None:
        ep = _episode_of_slot(tracker, rec.get("slot"))
    if ep is None:
        mover = table.get(rec.get("by_pid"))
        if mover is not None and mover.episode:
            ep = mover.episode
    if ep is None:
        # the mover's cgroup, as the kernel saw it before the move
        ep = tracker.cgroups.episode_of(rec.get("by_cgroup"))
    dst_ep = _episode_of_path(tracker, rec.get("dst_path"))
    dst = rec.get("dst_cgroup")
    if ep is not None and dst_ep == ep:
        # a move inside its own episode (a sub-cgroup the registry had not
        # seen yet): not an escape
        if dst is not None:
            new = tracker.cgroups.by_cgroup.get(dst) != ep
            tracker.cgroups.by_cgroup[dst] = ep
            tracker.cgroups._unknown.discard(dst)
            p.cgroup = dst
            if new and tracker.cgroups.foreign_root_of(rec.get("dst_path")) is not None:
                # a sub-cgroup of an attached root whose cgroup_mkdir record
                # is not in yet: named in the kernel now (the process stays
                # tracked with its slot meanwhile)
                tracker._foreign_id_found(ep, dst)
        return []
    if dst is not None:
        p.cgroup = dst
    p.episode = ep
    p.membership = "escaped" if ep else None
    _enrich(rec, p)
    rec["dst_episode"] = dst_ep
    rec["via"] = "cgroup.procs"
    out = list(tracker.pending)
    tracker.pending.clear()
    for r in out:
        if r.get("ts") is None:
            r["ts"] = rec.get("ts")
    out.append(rec)
    return out


def left_cgroup(tracker: Any, p: Proc) -> bool:
    """_resolve of a cgroup member whose record shows it outside its
    episode's cgroups. True when it stays a member (membership escaped);
    False when its episode has ended (resolution goes on as before)."""
    if p.membership == "escaped":
        return True
    e = tracker.episodes.get(p.episode)
    if e is None or e.ended:
        return False
    p.membership = "escaped"
    if tracker.live:
        # ts: the record that showed it (Tracker.observe fills it in)
        rec: dict[str, Any] = {"type": "escape", "ts": None, "pid": p.pid, "tid": p.pid,
                               "cgroup": p.cgroup, "dst_cgroup": p.cgroup, "dst_path": None,
                               "dst_episode": tracker.cgroups.episode_of(p.cgroup), "outside": True,
                               "by_pid": None, "by_other": False, "untracked": True, "via": "cgroup-change",
                               "slot": e.slot}
        _enrich(rec, p)
        tracker.pending.append(rec)
    return True
