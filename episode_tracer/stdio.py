"""What a process's stdin, stdout and stderr are connected to (issue 11.6).

A reverse shell is a command interpreter whose standard streams are a
network connection to someone outside: `ncat -e /bin/sh`, a C or Python
program that dup2()s a socket onto fds 0-2 and execs a (renamed) shell,
`sh <&3 >&3` after `exec 3<>/dev/tcp/...`. Whatever the source text, the
exec of that program is held by the exec gate with those fds already in
place, so the tracer can look: `/proc/<pid>/fd/{0,1,2}` name the socket
inodes, and the process's own network namespace tables
(`/proc/<pid>/net/{tcp,tcp6,udp,udp6}`, the same facts sock_diag reports)
give each inode's local and remote address.

The policy field `stdio_remote` (episode_tracer/policy/conditions.py) is the list
of remote addresses of those sockets that are not on this node (loopback,
the socket's own local address, an address of the node's interfaces); the
rule `reverse-shell` (episode_tracer/policies/tunnels.toml) kills the exec when it is not
empty. Unix sockets (a journal or a container runtime on stdout) and
sockets that are not connected (a listener, an unconnected UDP socket) are
not reported.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

from .relay import _ip  # one parser of /proc and sock_diag address text

TABLES = (("tcp", "inet", "tcp"), ("tcp6", "inet6", "tcp"), ("udp", "inet", "udp"), ("udp6", "inet6", "udp"))


def _addr(hexaddr: str, family: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if family == "inet":
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def parse_table(text: str, family: str, inodes: set[int]) -> list[tuple[int, str, int, str, int]]:
    """(inode, local address, local port, remote address, remote port) of
    the rows of a /proc/net/{tcp,udp}{,6} table whose inode is in `inodes`
    (pure)."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or not cols[9].isdigit() or int(cols[9]) not in inodes:
            continue
        try:
            la, lp = cols[1].split(":")
            ra, rp = cols[2].split(":")
            out.append((int(cols[9]), _addr(la, family), int(lp, 16), _addr(ra, family), int(rp, 16)))
        except ValueError:
            continue
    return out


def peer_is_local(peer: str, local: str, node_addrs: frozenset[str]) -> bool:
    """A peer on this node: loopback, unspecified, the socket's own local
    address, or one of the node's interface addresses (pure)."""
    ip = _ip(peer)
    if ip is None:
        return False
    lip = _ip(local)
    return ip.is_loopback or ip.is_unspecified or ip == lip or str(ip) in node_addrs


def stdio_sockets(pid: int, node_addrs: Callable[[], frozenset[str]], proc: str = "/proc") -> list[dict[str, Any]] | None:
    """The connected inet sockets on fds 0-2 of `pid` (see the module doc);
    [] when there are none, None when the process cannot be read."""
    fds: dict[int, list[int]] = {}
    readable = False
    for fd in (0, 1, 2):
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{fd}")
        except FileNotFoundError:
            readable = readable or os.path.isdir(f"{proc}/{pid}/fd")
            continue
        except OSError:
            continue
        readable = True
        if target.startswith("socket:["):
            fds.setdefault(int(target[8:-1]), []).append(fd)
    if not readable:
        return None
    if not fds:
        return []
    out: list[dict[str, Any]] = []
    inodes = set(fds)
    addrs: frozenset[str] | None = None
    for table, family, proto in TABLES:
        try:
            with open(f"{proc}/{pid}/net/{table}") as f:
                text = f.read()
        except OSError:
            continue
        for inode, la, lp, ra, rp in parse_table(text, family, inodes):
            if rp == 0 or _ip(ra) is None or _ip(ra).is_unspecified:
                continue  # not connected: a listener or an unconnected datagram socket
            if addrs is None:
                addrs = node_addrs()
            local = peer_is_local(ra, la, addrs)
            for fd in fds[inode]:
                out.append({"fd": fd, "proto": proto, "family": family, "peer": ra, "peer_port": rp,
                            "local_addr": la, "local_port": lp, "local": local})
    return sorted(out, key=lambda s: s["fd"])


class NodeAddrs:
    """The node's interface addresses, re-read at most every `ttl_s` seconds."""

    def __init__(self, ttl_s: float = 10.0):
        self.ttl_s = ttl_s
        self._at = -1e9
        self._addrs: frozenset[str] = frozenset()

    def __call__(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._at > self.ttl_s:
            try:
                from .relay import node_addresses

                self._addrs = node_addresses()
            except Exception:  # noqa: BLE001 - loopback and the socket's own address still count as local
                self._addrs = frozenset()
            self._at = now
        return self._addrs
