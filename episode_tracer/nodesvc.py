"""Node services and fail-closed-under-load, the user-space side.

* unix deny (episode_tracer/bpf/nodesvc.h): the kernel map entries of the unix deny rules
  (`unix_deny_entries`), and which rules a refused unix connect names
  (`unix_deny_rules`);
* the exec gate's /proc judgement (`ProcJudge`): a process held by the gate
  whose exec record did not come (ring buffer full, rate limit, user space
  behind) is judged from /proc of the stopped process, like its record
  would have been; its late record, if it comes, is recognised by the gate's
  ktime and not judged twice;
* per-episode loss (`EpisodeLoss`): the records the kernel's per-episode rate
  limit dropped, as `lost` records naming the episode.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable

from . import events

log = logging.getLogger(__name__)

CANARY_RULE_BIT = events.RULE_CANARY
OWNER_SLOT_BIT = 1 << 63  # unix_owned value of an env/lineage member: 1<<63 | slot

from .limits import EPISODE_BURST, EPISODE_RATE  # noqa: F401 - re-exported (rate limit defaults)


# ----------------------------------------------------------------- unix deny
def path_bytes(path: str) -> bytes:
    """A policy path as the kernel compares it: '@name' is the abstract
    socket name (a leading NUL byte)."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode("utf-8", "surrogateescape")
    return path.encode("utf-8", "surrogateescape")


def _resolved(path: str, prefix: bool) -> str | None:
    """The same path through the node's symlinked directories (/var/run ->
    /run): a listener binds one spelling, a client may use the other."""
    if path.startswith("@") or not path.startswith("/"):
        return None
    head, tail = os.path.split(path)
    if prefix and not tail:
        head = path.rstrip("/")
    try:
        real = os.path.realpath(head)
    except OSError:
        return None
    if real == head:
        return None
    return os.path.join(real, tail) if tail else real + "/"


def unix_deny_entries(rules: Iterable[Any], canary: str | None = None) -> dict[tuple[bytes, bool], int]:
    """(path bytes, is a prefix) -> rule mask for the unix_deny LPM trie.

    The trie returns only the longest matching entry, so every entry also
    carries the bits of the prefix entries it starts with."""
    raw: dict[tuple[bytes, bool], int] = {}

    def add(text: str, prefix: bool, bit: int) -> None:
        for t in filter(None, (text, _resolved(text, prefix))):
            key = (path_bytes(t), prefix)
            raw[key] = raw.get(key, 0) | bit

    for r in rules:
        bit = 1 << r.index
        for p in r.paths:
            add(p, False, bit)
        for p in r.prefixes:
            add(p, True, bit)
    if canary:
        add(canary, False, 1 << CANARY_RULE_BIT)
    out = {}
    for (b, prefix), mask in raw.items():
        m = mask
        for (ob, oprefix), om in raw.items():
            if oprefix and (ob, oprefix) != (b, prefix) and b.startswith(ob):
                m |= om
        out[(b, prefix)] = m
    return out


def unix_deny_rules(plan: Any, mask: int, unverified: str | None) -> list[str]:
    """Names of the unix deny rules a unix_deny record stands for: the
    matched bits; a connect refused because its path could not be judged
    (arguments not seen, relative path, '..') is refused because unix deny
    rules are loaded at all: it names the first of them."""
    rules = list(getattr(plan, "unix_deny", ()))
    names = [r.name for r in rules if mask & (1 << r.index)]
    if not names and unverified and rules:
        names = [rules[0].name]
    return names


def reached_nothing(rec: dict[str, Any]) -> bool:
    """A refused unix connect to a pathname that does not exist (seen from
    the process's root): it would have reached no server (ENOENT), so it
    is refused and counted but raises no alert. tmux and screen probe
    their socket like this before starting their own server."""
    path = rec.get("path")
    if not path or path.startswith("@") or rec.get("unverified") or not path.startswith("/"):
        return False
    pid = rec.get("pid")
    root = f"/proc/{pid}/root" if pid else ""
    if root and not os.path.exists(root):
        return False  # the process is gone: cannot tell, alert
    try:
        os.lstat(root + path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


# ------------------------------------------------------------ /proc judgement
def _read(path: str, binary: bool = False) -> Any:
    try:
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    except OSError:
        return None


def _cgroup_id(pid: int) -> int | None:
    from .cgroups import cgroup2_mount

    text = _read(f"/proc/{pid}/cgroup")
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            try:
                return os.stat(str(cgroup2_mount()) + line[3:].rstrip("\n")).st_ino
            except OSError:
                return None
    return None


def exec_record_from_proc(pid: int, ktime: int | None) -> dict[str, Any] | None:
    """An exec record for a process stopped right after its exec, from
    /proc: what the kernel's record would have said. None when /proc does
    not have it (gone, or nothing to judge by)."""
    exe = None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        pass
    cmdline = _read(f"/proc/{pid}/cmdline", binary=True)
    status = _read(f"/proc/{pid}/status")
    if status is None or (not exe and not cmdline):
        return None
    uid = 0
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
            break
    comm = (_read(f"/proc/{pid}/comm") or "").strip()
    env_episode = None
    environ = _read(f"/proc/{pid}/environ", binary=True) or b""
    for entry in environ.split(b"\0"):
        if entry.startswith(b"AGENT_EPISODE_ID="):
            env_episode = entry[17:].decode("utf-8", "replace")[: events.EPISODE_LEN - 1] or None
            break
    return {"type": "exec", "ktime": ktime or time.clock_gettime_ns(time.CLOCK_MONOTONIC),
            "cgroup": _cgroup_id(pid), "pid": pid, "tid": pid, "uid": uid, "comm": comm,
            "old_pid": pid, "filename": exe or "", "argv": [], "argv_from_proc": True,
            "argv_truncated": False, "env_episode": env_episode, "killed_in_kernel": False,
            "gated": True, "judged_from_proc": True}


class ProcJudge:
    """Judges gated processes whose exec record has not come after
    `grace_s`: builds the record from /proc and runs it through the
    pipeline (the rules continue or kill it exactly as for the kernel's
    record). The late kernel record of a judged gate, recognised by
    (pid, gate ktime), is then not judged again."""

    def __init__(self, grace_s: float = 0.5):
        self.grace_s = grace_s
        self.judged = 0
        self._keys: dict[tuple[int, int | None], float] = {}
        self._tried: dict[int, int | None] = {}

    def judge(self, pid: int, probes: Any, pipeline: Any) -> bool:
        ktime = probes.gate_ktime(pid) if hasattr(probes, "gate_ktime") else None
        if self._tried.get(pid, -1) == ktime:
            return False  # tried already for this stop: the gate timeout decides
        self._tried[pid] = ktime
        if len(self._tried) > 4096:
            self._tried.clear()
        rec = exec_record_from_proc(pid, ktime)
        if rec is None:
            return False
        self._keys[(pid, ktime)] = time.monotonic()
        if len(self._keys) > 4096:
            cutoff = time.monotonic() - 60
            self._keys = {k: v for k, v in self._keys.items() if v > cutoff}
        self.judged += 1
        log.warning("exec gate: no record for held pid %d after %.2fs: judged from /proc", pid, self.grace_s)
        pipeline.handle(rec)
        return True

    def already_judged(self, rec: dict[str, Any]) -> bool:
        if rec.get("judged_from_proc"):
            return False
        return self._keys.pop((rec.get("pid"), rec.get("ktime")), None) is not None


# ------------------------------------------------------------ episode loss
class EpisodeLoss:
    """`lost` records for the records each episode's rate limit dropped."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def records(self, probes: Any, episodes: Iterable[Any], wall: float) -> list[dict[str, Any]]:
        out = []
        for e in episodes:
            if e.ended or e.slot is None:
                continue
            total = probes.episode_lost(e.slot)
            seen = self.seen.get(e.id, 0)
            if total > seen:
                out.append({"type": "lost", "ts": wall, "episode": e.id, "kind": "episode_rate",
                            "count": total - seen, "total": total})
                self.seen[e.id] = total
        return out

    def started(self, probes: Any, episode: Any) -> None:
        self.seen.pop(episode.id, None)
        probes.reset_episode_slot(episode.slot)

    def ended(self, probes: Any, episode: Any) -> None:
        owners = set(episode.cgroup_ids) | {OWNER_SLOT_BIT | episode.slot}
        try:
            probes.forget_owned_unix(owners)
        except Exception as e:  # noqa: BLE001 - housekeeping, never fatal
            log.warning("forgetting unix sockets of %s: %s", episode.id, e)


# ------------------------------------------------------------- unix gate
def unix_hash(path: bytes) -> int:
    """FNV-1a 32 of a path NUL-padded to UNIX_KEY_LEN bytes, as episode_tracer/bpf/nodesvc.h
    unix_hash computes it."""
    h = 2166136261
    for b in path[: events.UNIX_KEY_LEN].ljust(events.UNIX_KEY_LEN, b"\0"):
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def unix_target_rules(real: str, target: tuple[int, int] | None, entries: dict[tuple[bytes, bool], int],
                      denied_ids: dict[tuple[int, int], int], owned: bool) -> int:
    """Mask of the unix deny rules the socket a connect leads to falls
    under (0: allowed). Pure.

    real: the path with every symlink, '.', '..' and the cwd resolved (the
    socket's own name); target: its (st_dev, st_ino) when it exists;
    entries: the unix_deny entries (unix_deny_entries); denied_ids: the
    (st_dev, st_ino) of the denied exact paths, so a bind mount or a hard
    link of a denied socket is refused under any name; owned: the episode
    bound `real` itself (a tmux server it started)."""
    if owned:
        return 0
    b = path_bytes(real)
    mask = 0
    for (p, prefix), m in entries.items():
        if p.startswith(b"\0"):
            continue  # abstract names: judged in the kernel
        if (b.startswith(p) if prefix else b == p):
            mask |= m
    if target is not None:
        mask |= denied_ids.get(target, 0)
    return mask


def resolve_unix_target(pid: int, tid: int, path: str) -> tuple[str, tuple[int, int] | None]:
    """(resolved path, (st_dev, st_ino) or None when nothing is there) of
    the unix socket path a thread connects to, as that thread sees it: a
    relative path from its own cwd. Raises OSError when the thread's cwd
    cannot be read (it is gone)."""
    if not path.startswith("/"):
        base = os.readlink(f"/proc/{pid}/task/{tid}/cwd")
        path = os.path.join(base, path)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def denied_ids(entries: dict[tuple[bytes, bool], int]) -> dict[tuple[int, int], int]:
    """(st_dev, st_ino) -> mask of the exact denied paths that exist now."""
    out: dict[tuple[int, int], int] = {}
    for (p, prefix), m in entries.items():
        if prefix or p.startswith(b"\0"):
            continue
        try:
            st = os.stat(p.decode("utf-8", "surrogateescape"))
        except OSError:
            continue
        k = (st.st_dev, st.st_ino)
        out[k] = out.get(k, 0) | m
    return out


def wait_stopped(pid: int, timeout_s: float = 0.2) -> bool:
    """Wait until the thread group is in stopped state (a SIGCONT sent
    before the SIGSTOP took effect would leave the connect without its
    restart). False when it did not stop in time or is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                st = f.read()
        except OSError:
            return False
        state = st[st.rfind(b")") + 2: st.rfind(b")") + 3]
        if state in (b"T", b"t"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0002)
