"""The reverse-tunnel shape: an episode relaying an outside connection into
a local listener (issue 4).

A relay, whatever it is written in, holds two TCP connections at once: one
it dialed to an address outside the node (the outbound leg) and one to a
listener on this node (the local leg: a Jupyter, the trainer's API, sshd...),
and shuttles bytes between them. Every `relay_interval` seconds the runtime
snapshots the established TCP sockets (sock_diag, `episode_tracer.sockets`), maps
them to the processes of running episodes through /proc/<pid>/fd, and asks
the pure `find_relays` which (episode, outbound connection) pairs have the
shape; each is reported once, as a `relay` record that rules match with
`on = "relay"`.

The shape (all of it, for at least `min_age_s` seconds for both legs):
  * outbound leg: an established TCP socket whose remote address is not
    local (not loopback, not one of the node's addresses) and whose local
    port is not a listening port (a connection the process dialed, not one
    it accepted);
  * local leg: an established TCP socket whose remote address is local and
    whose remote port is a LISTEN socket on this node that the same
    process does not own (a process talking to itself is no relay);
  * both legs held by the same process, or by two processes of the same
    episode that share a pipe (`nc host 443 | nc localhost 8888`).

Not seen: UDP, sockets in another network namespace than the tracer's,
relays through a listener that lives inside the episode (the listen rules
cover those), legs younger than min_age_s.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

TCP_ESTABLISHED = 1
TCP_LISTEN = 10


@dataclass(frozen=True)
class Sock:
    """One TCP socket as sock_diag reports it (src: this end)."""

    inode: int
    family: str  # inet | inet6
    state: int
    src: str
    sport: int
    dst: str
    dport: int


@dataclass
class Relay:
    episode: str
    out_pid: int  # holds the outbound leg
    local_pid: int  # holds the local leg
    out: Sock
    local: Sock
    listener_inode: int | None
    age_s: float


def _ip(a: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize(a: str) -> str:
    """v4-mapped v6 as v4; everything else as ipaddress prints it."""
    ip = _ip(a)
    return str(ip) if ip is not None else a


def is_local(addr: str, node_addrs: frozenset[str]) -> bool:
    ip = _ip(addr)
    if ip is None:
        return False
    return ip.is_loopback or ip.is_unspecified or str(ip) in node_addrs


def _listener_for(s: Sock, listeners: list[Sock], node_addrs: frozenset[str]) -> Sock | None:
    """The LISTEN socket that a connection to s.dst:s.dport reaches."""
    dst = normalize(s.dst)
    best = None
    for ln in listeners:
        if ln.sport != s.dport:
            continue
        la = _ip(ln.src)
        if la is None:
            continue
        if str(la) == dst:
            return ln
        if la.is_unspecified and (ln.family == s.family or ln.family == "inet6"):
            best = best or ln
    return best


def find_relays(
    members: dict[str, list[int]],
    fds: dict[int, dict[str, set[int]]],
    socks: Iterable[Sock],
    node_addrs: frozenset[str],
    first_seen: dict[int, float],
    now: float,
    min_age_s: float,
) -> list[Relay]:
    """Relay shapes in a snapshot (pure).

    members: episode -> its live pids; fds: pid -> {"socket": inodes,
    "pipe": inodes}; socks: every TCP socket of the node (ESTABLISHED and
    LISTEN); first_seen: inode -> when the connection was first seen (kept by
    the caller across scans; see `Scanner`). One Relay per (episode,
    outbound inode), the oldest local leg first."""
    socks = list(socks)
    listeners = [s for s in socks if s.state == TCP_LISTEN]
    listen_ports = {(s.family, s.sport) for s in listeners} | {("inet", s.sport) for s in listeners if s.family == "inet6"}
    by_inode = {s.inode: s for s in socks if s.state == TCP_ESTABLISHED}
    out: list[Relay] = []
    for ep, pids in members.items():
        outbound: list[tuple[int, Sock]] = []
        local: list[tuple[int, Sock, Sock]] = []
        for pid in pids:
            mine = fds.get(pid, {}).get("socket", set())
            for ino in mine:
                s = by_inode.get(ino)
                if s is None:
                    continue
                if is_local(s.dst, node_addrs):
                    ln = _listener_for(s, listeners, node_addrs)
                    if ln is not None and ln.inode not in mine:
                        local.append((pid, s, ln))
                elif (s.family, s.sport) not in listen_ports:
                    outbound.append((pid, s))
        if not outbound or not local:
            continue
        for opid, o in outbound:
            o_age = now - first_seen.get(o.inode, now)
            best = None
            for lpid, l_sock, ln in local:
                if lpid != opid and not (fds.get(opid, {}).get("pipe", set()) & fds.get(lpid, {}).get("pipe", set())):
                    continue
                age = min(o_age, now - first_seen.get(l_sock.inode, now))
                if age < min_age_s:
                    continue
                cand = Relay(ep, opid, lpid, o, l_sock, ln.inode, round(age, 3))
                if best is None or (cand.local_pid == opid) > (best.local_pid == opid) or \
                        ((cand.local_pid == opid) == (best.local_pid == opid) and cand.age_s > best.age_s):
                    best = cand
            if best is not None:
                out.append(best)
    return out


# ------------------------------------------------------------------ live side
def fd_inodes(pids: Iterable[int]) -> dict[int, dict[str, set[int]]]:
    """pid -> {"socket": inodes, "pipe": inodes} from /proc/<pid>/fd."""
    from .sockets import fd_links

    out: dict[int, dict[str, set[int]]] = {}
    for pid in pids:
        if not os.path.isdir(f"/proc/{pid}/fd"):
            continue
        got: dict[str, set[int]] = {"socket": set(), "pipe": set()}
        for _fd, t in fd_links(pid):
            if t.startswith("socket:["):
                got["socket"].add(int(t[8:-1]))
            elif t.startswith("pipe:["):
                got["pipe"].add(int(t[6:-1]))
        out[pid] = got
    return out


def node_addresses() -> frozenset[str]:
    """The addresses of this node's interfaces (the tracer's netns)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return frozenset(normalize(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS"))


def snapshot_socks() -> list[Sock]:
    from .sockets import tcp_sockets

    return [Sock(s["inode"], s["family"], s["state"], s["src"], s["sport"], s["dst"], s["dport"])
            for s in tcp_sockets() if s["inode"]]


def owner_of(inode: int) -> int | None:
    """Any process holding socket inode (a full /proc walk: only for a relay
    about to be reported)."""
    from .sockets import fd_links

    want = f"socket:[{inode}]"
    for name in os.listdir("/proc"):
        if name.isdigit() and any(t == want for _fd, t in fd_links(name)):
            return int(name)
    return None


class Scanner:
    """Periodic relay scan over the running episodes of a Tracker."""

    def __init__(self, tracker, min_age_s: float = 5.0,
                 socks: Callable[[], list[Sock]] = snapshot_socks,
                 addrs: Callable[[], frozenset[str]] = node_addresses,
                 fds: Callable[[Iterable[int]], dict[int, dict[str, set[int]]]] = fd_inodes):
        self.tracker = tracker
        self.min_age_s = min_age_s
        self._socks, self._addrs, self._fds = socks, addrs, fds
        self.first_seen: dict[int, float] = {}
        self.reported: set[tuple[str, int]] = set()
        self.scans = 0

    def members(self) -> dict[str, list[int]]:
        tr = self.tracker
        out: dict[str, list[int]] = {}
        for p in tr.table.live():
            if p.episode is None:
                continue
            e = tr.episodes.get(p.episode)
            if e is not None and not e.ended:
                out.setdefault(p.episode, []).append(p.pid)
        return out

    def scan(self, now: float | None = None) -> list[dict[str, Any]]:
        now = now if now is not None else time.time()
        self.scans += 1
        members = self.members()
        fds = self._fds([pid for pids in members.values() for pid in pids])
        held = {ino for d in fds.values() for ino in d["socket"]}
        if len(held) < 2:  # no episode holds two sockets: nothing to look at
            self.first_seen.clear()
            return []
        socks = self._socks()
        live = {s.inode for s in socks if s.state == TCP_ESTABLISHED and s.inode in held}
        for ino in live:
            self.first_seen.setdefault(ino, now)
        for ino in list(self.first_seen):
            if ino not in live:
                del self.first_seen[ino]
        self.reported = {k for k in self.reported if k[1] in live}
        if len(live) < 2:
            return []
        relays = find_relays(members, fds, socks, self._addrs(), self.first_seen, now, self.min_age_s)
        out = []
        for r in relays:
            key = (r.episode, r.out.inode)
            if key in self.reported:
                continue
            self.reported.add(key)
            out.append(self.record(r, now))
        return out

    def record(self, r: Relay, now: float) -> dict[str, Any]:
        table = self.tracker.table
        p = table.get(r.out_pid)
        lpid = owner_of(r.listener_inode) if r.listener_inode else None
        lp = table.get(lpid) if lpid is not None else None
        lexe = (lp.exe if lp is not None else None) or (_readlink(f"/proc/{lpid}/exe") if lpid else None)
        return {
            "type": "relay", "ts": now, "episode": r.episode,
            "pid": r.out_pid, "pids": sorted({r.out_pid, r.local_pid}),
            "same_process": r.out_pid == r.local_pid,
            "comm": p.comm if p else None, "uid": p.uid if p else None,
            "exe": p.exe if p else None, "argv": list(p.argv) if p else None,
            "family": r.out.family, "addr": normalize(r.out.dst), "port": r.out.dport,
            "local_addr": normalize(r.local.dst), "local_port": r.local.dport,
            "listener_pid": lpid, "listener_exe": lexe, "age_s": r.age_s,
        }


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
