"""cgroup v2 helpers: find the mount, ids, episode cgroups, kill and freeze."""
from __future__ import annotations

import errno
import os
import time
from functools import lru_cache
from pathlib import Path


class CgroupError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (/sys/fs/cgroup on pure v2 nodes,
    /sys/fs/cgroup/unified on hybrid ones), from /proc/mounts."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return Path(parts[1])
    raise CgroupError("no cgroup v2 hierarchy is mounted (see /proc/mounts)")


def cgroup_id(path: Path | str) -> int:
    """The cgroup id the kernel reports (bpf_get_current_cgroup_id) is the
    inode number of the cgroup directory."""
    return os.stat(path).st_ino


def pid_cgroup_path(pid: int) -> Path | None:
    """Absolute path of the v2 cgroup of pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line[3:].strip()
                    return cgroup2_mount() / rel.lstrip("/")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def procs(cg: Path) -> list[int]:
    try:
        return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def all_procs(cg: Path) -> list[int]:
    """Processes of cg and every cgroup below it."""
    out: list[int] = []
    for dirpath, _dirs, _files in os.walk(cg):
        out.extend(procs(Path(dirpath)))
    return out


def move(pid: int, cg: Path) -> None:
    (cg / "cgroup.procs").write_text(str(pid))


def kill(cg: Path) -> bool:
    """Kill every process in cg and below (cgroup.kill, kernel >= 5.14).
    Falls back to SIGKILL of each pid. Returns True when it took effect."""
    f = cg / "cgroup.kill"
    if f.exists():
        try:
            f.write_text("1")
            return True
        except OSError:
            pass
    ok = False
    for pid in all_procs(cg):
        try:
            os.kill(pid, 9)
            ok = True
        except ProcessLookupError:
            pass
    return ok


def freeze(cg: Path, frozen: bool = True, timeout: float = 2.0) -> bool:
    """Freeze (or thaw) every process in cg; waits until the kernel reports
    the new state in cgroup.events. Returns True when it took effect."""
    (cg / "cgroup.freeze").write_text("1" if frozen else "0")
    want = f"frozen {1 if frozen else 0}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if want in (cg / "cgroup.events").read_text():
                return True
        except FileNotFoundError:
            return False
        time.sleep(0.01)
    return False


def is_frozen(cg: Path) -> bool:
    try:
        return "frozen 1" in (cg / "cgroup.events").read_text()
    except FileNotFoundError:
        return False


def remove(cg: Path, timeout: float = 5.0) -> None:
    """Remove cg and its children, killing what is left inside first."""
    if not cg.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        if all_procs(cg):
            kill(cg)
        try:
            for dirpath, dirs, _files in os.walk(cg, topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(dirpath, d))
            os.rmdir(cg)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {cg}: {e}") from e
            time.sleep(0.02)
