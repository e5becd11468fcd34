"""Pinned kernel state (docs/faults.md): the tracer's maps and BPF links in
bpffs under /sys/fs/bpf/agent-tracer/<layout version>/, so the kernel side
keeps enforcing while no tracer process runs, and a restart adopts it.

    <base>/<version>/maps/<map>          every map (bcc creates or reuses them, episode_tracer/bpf/maps.h)
    <base>/<version>/links/<kind>:<prog>@<pid>  one BPF link per attached program, pid = the instance

The raw bpf(2) / perf_event_open(2) calls bcc 0.26 has no wrapper for are
here (ctypes, x86_64 numbers); nothing here imports bcc.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
PIN_BASE = BPFFS / "agent-tracer"
LAYOUT = 1  # bump when the pin directory's layout (not the programs) changes

_SYS_BPF = 321
_SYS_PERF_EVENT_OPEN = 298
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_PERF_EVENT = 41  # enum bpf_attach_type
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr, what: str) -> int:
    r = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(r)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE (a cgroup program on a cgroup fd, or a tracepoint
    program on a perf event fd with BPF_PERF_EVENT): the link fd."""
    attr = (ctypes.c_uint32 * 16)()
    attr[0], attr[1], attr[2], attr[3] = prog_fd, target_fd, attach_type, 0
    return _bpf(BPF_LINK_CREATE, attr, f"BPF_LINK_CREATE (attach type {attach_type})")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program of a link in place (cgroup links): atomic, no
    moment without a program."""
    attr = (ctypes.c_uint32 * 8)()
    attr[0], attr[1] = link_fd, prog_fd
    _bpf(BPF_LINK_UPDATE, attr, "BPF_LINK_UPDATE")


def obj_pin(fd: int, path: str | Path) -> None:
    p = ctypes.create_string_buffer(str(path).encode())
    attr = (ctypes.c_uint64 * 4)()
    attr[0] = ctypes.addressof(p)
    attr[1] = fd  # bpf_fd (low 32 bits), file_flags 0
    _bpf(BPF_OBJ_PIN, attr, f"BPF_OBJ_PIN {path}")


def obj_get(path: str | Path) -> int:
    p = ctypes.create_string_buffer(str(path).encode())
    attr = (ctypes.c_uint64 * 4)()
    attr[0] = ctypes.addressof(p)
    return _bpf(BPF_OBJ_GET, attr, f"BPF_OBJ_GET {path}")


def prog_detach(cgroup_fd: int, prog_id: int, attach_type: int) -> None:
    """BPF_PROG_DETACH of a program attached without a link (legacy)."""
    a = (ctypes.c_uint32 * 4)()
    a[0] = prog_id
    prog_fd = _bpf(BPF_PROG_GET_FD_BY_ID, a, f"BPF_PROG_GET_FD_BY_ID {prog_id}")
    try:
        attr = (ctypes.c_uint32 * 8)()
        attr[0], attr[1], attr[2] = cgroup_fd, prog_fd, attach_type
        _bpf(BPF_PROG_DETACH, attr, f"BPF_PROG_DETACH prog {prog_id}")
    finally:
        os.close(prog_fd)


def tracepoint_perf_fd(category: str, name: str) -> int:
    """perf_event_open of a tracepoint (as bcc does, without its ioctl):
    the fd a BPF_PERF_EVENT link attaches to."""
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        try:
            tp_id = int(Path(f"{base}/events/{category}/{name}/id").read_text())
            break
        except OSError:
            continue
    else:
        raise OSError(2, f"tracepoint {category}:{name} not found in tracefs")
    attr = (ctypes.c_uint64 * 16)()  # struct perf_event_attr, 128 bytes
    attr[0] = PERF_TYPE_TRACEPOINT | (128 << 32)  # type, size
    attr[1] = tp_id  # config
    attr[2] = 1  # sample_period
    attr[6] = 1  # wakeup_events (u32 at offset 48)
    fd = _libc.syscall(_SYS_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open {category}:{name}: {os.strerror(err)}")
    return int(fd)


def layout_version(source: str, cflags: list[str]) -> str:
    """The pins of two instances are the same kernel layout when their
    program text and settings are equal."""
    h = hashlib.sha256()
    h.update(f"layout {LAYOUT}\n".encode())
    h.update(source.encode())
    for f in sorted(cflags):
        h.update(b"\0" + f.encode())
    return "v" + h.hexdigest()[:16]


def ensure_bpffs() -> None:
    """bpffs at /sys/fs/bpf, mounted when it is not."""
    try:
        with open("/proc/self/mounts") as f:
            if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f):
                return
    except OSError:
        pass
    BPFFS.mkdir(parents=True, exist_ok=True)
    if os.system(f"mount -t bpf bpf {BPFFS} >/dev/null 2>&1") != 0:
        raise OSError(f"bpffs is not mounted at {BPFFS} and could not be mounted")


def link_pins(version_dir: Path) -> dict[str, Path]:
    """links/<prog>@<pid> -> {prog: path} (several for one prog: the last)."""
    out: dict[str, Path] = {}
    d = version_dir / "links"
    if d.is_dir():
        for p in sorted(d.iterdir()):
            out[p.name.split("@", 1)[0]] = p
    return out


def remove_tree(path: Path) -> None:
    """Unpin a directory of pins (the objects go when nothing else holds
    them: an unpinned link detaches)."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def pinned_map_keys(path: Path) -> list[int]:
    """Keys (u32, little endian) of a pinned hash map, read with bpftool:
    the gated processes of an older layout's instance."""
    try:
        out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(path)],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        keys = []
        for e in json.loads(out or "[]"):
            k = e.get("key")
            if isinstance(k, list):
                keys.append(int.from_bytes(bytes(int(b, 16) for b in k), "little"))
            elif isinstance(k, int):
                keys.append(k)
        return keys
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("reading pinned map %s: %s", path, e)
        return []


def legacy_attachments(cgroup: Path, names: set[str]) -> list[tuple[int, int | str, str]]:
    """Programs named like ours attached to `cgroup` without a BPF link
    (a tracer before links, killed): [(prog id, attach type, name)].
    bpftool lists the cgroup's programs; those a link holds are not legacy."""
    try:
        cg = json.loads(subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True,
                                       text=True, timeout=10, check=True).stdout or "[]")
        links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                                          text=True, timeout=10, check=True).stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("listing cgroup programs with bpftool: %s", e)
        return []
    linked = {int(lk.get("prog_id", -1)) for lk in links}
    short = {n[:15] for n in names}
    return [(int(e["id"]), e.get("attach_type"), e.get("name", "")) for e in cg
            if e.get("name", "")[:15] in short and int(e["id"]) not in linked]
