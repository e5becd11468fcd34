"""Sockets that existed before the tracer (re)started.

A tunnel opened before a restart must still be seen and judged: enumerate
established TCP connections and listening sockets with sock_diag (pyroute2),
map each socket inode to its processes through /proc/<pid>/fd, and emit
`connect` / `listen` records marked `preexisting`.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Iterator

TCP_ESTABLISHED = 1
TCP_LISTEN = 10
STATES = (1 << TCP_ESTABLISHED) | (1 << TCP_LISTEN)


def fd_links(pid: int | str) -> Iterator[tuple[int, str]]:
    """(fd, link target such as "socket:[123]") of a process's open fds;
    nothing for a process that is gone or cannot be read."""
    d = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(d)
    except OSError:
        return
    for fd in fds:
        try:
            yield int(fd), os.readlink(f"{d}/{fd}")
        except OSError:
            continue


def socket_inodes(pids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """inode -> [(pid, fd)] for the given processes' socket fds."""
    out: dict[int, list[tuple[int, int]]] = {}
    for pid in pids:
        for fd, target in fd_links(pid):
            if target.startswith("socket:["):
                out.setdefault(int(target[8:-1]), []).append((pid, fd))
    return out


def tcp_sockets() -> Iterator[dict[str, Any]]:
    from pyroute2 import DiagSocket

    with DiagSocket() as ds:
        ds.bind()
        for fam in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=fam, states=STATES):
                yield {
                    "family": "inet" if fam == socket.AF_INET else "inet6",
                    "state": m["idiag_state"],
                    "src": m["idiag_src"],
                    "sport": m["idiag_sport"],
                    "dst": m["idiag_dst"],
                    "dport": m["idiag_dport"],
                    "inode": m["idiag_inode"],
                    "uid": m["idiag_uid"],
                }


def preexisting_records(tracker, include_all: bool = False) -> list[dict[str, Any]]:
    """Records for the existing TCP sockets of episode processes (or of every
    process with include_all)."""
    procs = [p for p in tracker.table.live() if include_all or p.episode]
    if not procs:
        return []
    owners = socket_inodes([p.pid for p in procs])
    now = time.time()
    out = []
    for s in tcp_sockets():
        for pid, fd in owners.get(s["inode"], ()):
            p = tracker.table.get(pid)
            base = {
                "ts": now, "pid": pid, "tid": pid, "uid": s["uid"], "comm": p.comm if p else None,
                "cgroup": p.cgroup if p else None, "fd": fd, "family": s["family"], "path": None,
                "result": 0, "preexisting": True,
            }
            if s["state"] == TCP_LISTEN:
                out.append({**base, "type": "listen", "addr": s["src"], "port": s["sport"], "backlog": None})
            else:
                out.append({**base, "type": "connect", "addr": s["dst"], "port": s["dport"],
                            "local_addr": s["src"], "local_port": s["sport"]})
    return out


def local_addr_of(pid: int, fd: int | None) -> tuple[str, str, int] | None:
    """(family, address, port) a TCP socket fd of pid is bound to, from
    /proc/<pid>/net/tcp{,6}: the kernel picks the port of a bind to port 0."""
    if fd is None:
        return None
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not target.startswith("socket:["):
        return None
    inode = target[8:-1]
    for fam, name in (("inet", "tcp"), ("inet6", "tcp6")):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] == inode:
                        hexaddr, hexport = cols[1].split(":")
                        raw = bytes.fromhex(hexaddr)
                        if fam == "inet":
                            addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                        else:
                            addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                        return fam, addr, int(hexport, 16)
        except OSError:
            continue
    return None
