"""Decoding of the kernel's ring-buffer records into JSONL-shaped dicts.

The layouts below mirror episode_tracer/bpf/events.h, which is the one definition of every
record; tests/test_layout.py compiles that header and checks each offset and
size against these tables. Decoding is one ``struct.unpack_from`` per record
(no per-field ctypes): the per-event Python cost is the tracer's budget.
"""
from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable


class Kind(enum.IntEnum):
    FORK = 1
    EXEC = 2
    EXIT = 3
    CONNECT = 4
    SOCKET = 5
    BIND = 6
    LISTEN = 7
    MEMFD = 8
    GPU_OPEN = 9
    DENY = 10
    GATE_RACE = 11
    PROTOCOL = 12  # first bytes of a new outbound TCP flow (wire_event, decoded as a wire_report)
    CGROUP_MKDIR = 13  # a cgroup2 directory below the top level was made (cgroup_event)
    ESCAPE = 18  # an episode member was moved to a cgroup outside its episode (escape_event)
    UNIX_DENY = 22  # the cgroup unix-connect program refused a connect (unix_deny_event)
    EGRESS = 24  # egress mode refused (monitor: would refuse) a connect/sendmsg (egress_event)
    DATAGRAM = 25  # first bytes of an episode's UDP datagram to a non-loopback host (datagram_event)
    CGROUP_RMDIR = 28  # ... was removed, after every record of what ran in it (cgroup_event)

    @property
    def record_type(self) -> str:
        return self.name.lower()


KIND_MAX = 29

# fork_event.flags
FORK_UNTRACKED = 1 << 0

# exec_event.flags
EXEC_ARGV_TRUNCATED = 1 << 0
EXEC_ENV_MARKER = 1 << 1
EXEC_KILLED = 1 << 2
EXEC_GATED = 1 << 3
EXEC_KILL_WOULD = 1 << 4
EXEC_NO_ARGV = 1 << 5  # no syscall-entry record: argv comes from /proc/<pid>/cmdline
EXEC_GPU_RIGHT = 1 << 6  # held the GPU right before this exec

# episode identity: generation << SLOT_BITS | slot index (episode_tracer/bpf/events.h)
SLOT_BITS = 13
SLOT_INDEX_MASK = (1 << SLOT_BITS) - 1
IDENT_MASK = (1 << 24) - 1
EPISODES_MAX = 8190  # concurrent episodes the kernel maps can name
# identity of the self-test (canary) cgroup: an index no episode ever gets
SLOT_CANARY = IDENT_MASK

# tracked map value
TRACK_ENV = 1
TRACK_LINEAGE = 2
TRACK_CGROUP = 3
TRACK_ESCAPED = 4

# escape_event.flags
ESC_OUTSIDE = 1 << 0
ESC_BY_OTHER = 1 << 1
ESC_UNTRACKED = 1 << 2

# gpu_right map value; open_event.verdict and .call
GPU_RIGHT = 1
OPEN_KILLED = 1 << 0
OPEN_RIGHT = 1 << 1
OPEN_CALLS = {0: "openat", 1: "open", 2: "openat2"}


class Counter(enum.IntEnum):
    GATED = 0
    GATE_RACE = 1
    EXEC_KILLED = 2
    DENIED = 3
    WIRE_HELD = 4
    WIRE_DENIED = 5
    WIRE_FULL = 6
    WIRE_UNREPORTED = 7
    WIRE_MIDSTREAM = 8
    ESCAPES = 10
    EXEC_NO_ARGV = 11
    GPU_OPEN_KILLED = 12
    RATE_DROPPED = 14  # records dropped by the per-episode rate limit
    UNIX_DENIED = 16  # unix connects refused by a unix deny rule
    UNIX_UNVERIFIED = 17  # unix connects refused: path not judgeable (no args, no verdict entry)
    EGRESS_DENIED = 18
    DNS_REDIRECTED = 19
    DATAGRAMS = 20
    UNIX_GATED = 21  # unix connects held for user space's judgement of their target
    MAP_FULL = 22
    SLOT_STALE = 23


COUNTER_MAX = 24


class Config(enum.IntEnum):
    GEN = 0
    GATE_ALL = 1
    RACE_ARMED = 2
    DENY_GLOBAL0 = 3
    DENY_GLOBAL1 = 4
    ANYPORT0 = 5
    ANYPORT1 = 6
    TCP0 = 7
    TCP1 = 8
    UDP0 = 9
    UDP1 = 10
    EXC_ANYPORT0 = 11
    EXC_ANYPORT1 = 12
    EPISODE_ROOT = 13
    GATE_ALL_GLOBAL = 14
    WIRE_HOLD = 15
    MONITOR = 16
    GPU_OPEN_KILL = 21
    EPISODE_RATE = 25  # per-episode record rate: records/s | burst << 32; 0 off
    UNIX_DENY = 26  # bit g: unix deny rules loaded in generation g
    EGRESS = 27
    DNS_STUB_PORT = 28
    UDP_INSPECT = 29
    DNS_DROP_LABEL = 30


CONFIG_MAX = 31

# deny_event.user_type, and the canary's deny rule bit (episode_tracer/bpf/events.h)
DENY_SENDMSG = 1 << 0
DENY_WOULD = 1 << 1
RULE_CANARY = 63

# egress_event.flags, the DNS stub's network, datagram capture (episode_tracer/bpf/events.h)
EGRESS_SENDMSG = 1 << 0
EGRESS_WOULD = 1 << 1
EGRESS_DNS = 1 << 2
EGRESS_LOCAL = 1 << 3
EGRESS_PROTO = 1 << 4
EGRESS_PACKET = 1 << 5
DNS_STUB_NET = 0x7F350000
DGRAM_CAP = 320
DGRAM_FIRST = 4
DGRAM_DROPPED = 1 << 0

# sizes from episode_tracer/bpf/events.h (checked by tests/test_layout.py)
COMM_LEN = 16
FILENAME_LEN = 256
ARGV_BUF = 1024
ARG_LEN = 256
EPISODE_LEN = 64
SOCKADDR_LEN = 112
MEMFD_NAME_LEN = 64
OPEN_PATH_LEN = 64
GPU_PREFIX_MAX = 8
WIRE_CAP = 4096
WIRE_HEAD = 96  # offsetof(struct wire_event, data)
CGROUP_PATH_LEN = 256
UNIX_PATH_LEN = 108
UNIX_KEY_LEN = 112

# unix_deny_event.flags (episode_tracer/bpf/events.h)
UNIX_WOULD = 1 << 0
UNIX_NO_ARGS = 1 << 1
UNIX_RELATIVE = 1 << 2
UNIX_ABSTRACT = 1 << 3
UNIX_GATE = 1 << 4  # a gate record: the thread is stopped until user space writes its unix_verdict
# unix_verdict.state (episode_tracer/bpf/events.h)
UNIX_V_PENDING = 0
UNIX_V_ALLOW = 1
UNIX_V_DENY = 2

# wire_event.flags, flow_verdict.flags
WIRE_HELD = 1 << 0
WIRE_SYN_DATA = 1 << 1
WIRE_FULL = 1 << 2
WIRE_V6 = 1 << 3
VERDICT_DENY = 1 << 0
VERDICT_DONE = 1 << 1


@dataclass(frozen=True)
class Layout:
    """A C struct as an ordered list of (field, struct format) pairs."""

    c_name: str
    fields: tuple[tuple[str, str], ...]

    @property
    def fmt(self) -> str:
        return "<" + "".join(f for _, f in self.fields)

    @property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    def offsets(self) -> dict[str, int]:
        out, off = {}, 0
        for name, f in self.fields:
            out[name] = off
            off += struct.calcsize("<" + f)
        return out


HDR_FIELDS = (
    ("h.ktime", "Q"),
    ("h.cgroup_id", "Q"),
    ("h.kind", "I"),
    ("h.pid", "I"),
    ("h.tid", "I"),
    ("h.uid", "I"),
    ("h.comm", f"{COMM_LEN}s"),
)

LAYOUTS: dict[Kind, Layout] = {
    Kind.FORK: Layout("fork_event", HDR_FIELDS + (("child_pid", "I"), ("flags", "I"))),
    Kind.EXEC: Layout(
        "exec_event",
        HDR_FIELDS
        + (
            ("flags", "I"),
            ("argc", "I"),
            ("args_len", "I"),
            ("old_pid", "I"),
            ("filename", f"{FILENAME_LEN}s"),
            ("episode", f"{EPISODE_LEN}s"),
            ("args", f"{ARGV_BUF + ARG_LEN}s"),
        ),
    ),
    Kind.EXIT: Layout("exit_event", HDR_FIELDS + (("code", "i"), ("signal", "i"))),
    Kind.CONNECT: Layout(
        "sock_event",
        HDR_FIELDS + (("fd", "i"), ("result", "i"), ("addrlen", "I"), ("_pad", "I"), ("addr", f"{SOCKADDR_LEN}s")),
    ),
    Kind.SOCKET: Layout(
        "socket_event", HDR_FIELDS + (("family", "i"), ("type", "i"), ("protocol", "i"), ("result", "i"))
    ),
    Kind.LISTEN: Layout(
        "listen_event",
        HDR_FIELDS
        + (("fd", "i"), ("backlog", "i"), ("result", "i"), ("addrlen", "I"), ("addr", f"{SOCKADDR_LEN}s")),
    ),
    Kind.MEMFD: Layout("memfd_event", HDR_FIELDS + (("flags", "I"), ("result", "i"), ("name", f"{MEMFD_NAME_LEN}s"))),
    Kind.GPU_OPEN: Layout("open_event", HDR_FIELDS + (("flags", "i"), ("result", "i"), ("path", f"{OPEN_PATH_LEN}s"),
                                                      ("verdict", "I"), ("call", "I"))),
    Kind.DENY: Layout(
        "deny_event",
        HDR_FIELDS
        + (
            ("rules", "Q"),
            ("family", "I"),
            ("protocol", "I"),
            ("port", "I"),
            ("user_type", "I"),
            ("addr", "16s"),
        ),
    ),
    Kind.GATE_RACE: Layout("gate_race_event", HDR_FIELDS + (("target", "I"), ("sig", "I"))),
    Kind.PROTOCOL: Layout(  # the fixed head; data[0:captured] follows (variable length)
        "wire_event",
        HDR_FIELDS
        + (
            ("cookie", "Q"),
            ("captured", "I"),
            ("flags", "I"),
            ("upto", "I"),
            ("family", "H"),
            ("port", "H"),
            ("sport", "H"),
            ("_pad", "H"),
            ("_pad2", "I"),
            ("addr", "16s"),
        ),
    ),
    Kind.CGROUP_MKDIR: Layout(
        "cgroup_event", HDR_FIELDS + (("id", "Q"), ("level", "i"), ("_pad", "I"), ("path", f"{CGROUP_PATH_LEN}s"))
    ),
    Kind.ESCAPE: Layout(
        "escape_event",
        HDR_FIELDS + (("dst_id", "Q"), ("target", "I"), ("slot", "I"), ("flags", "I"), ("dst_level", "i"),
                      ("dst_path", f"{CGROUP_PATH_LEN}s")),
    ),
    Kind.UNIX_DENY: Layout(
        "unix_deny_event",
        HDR_FIELDS + (("rules", "Q"), ("flags", "I"), ("pathlen", "I"), ("hash", "I"), ("_pad", "I"),
                      ("path", f"{UNIX_KEY_LEN}s")),
    ),
    Kind.EGRESS: Layout(
        "egress_event",
        HDR_FIELDS + (("family", "I"), ("protocol", "I"), ("port", "I"), ("flags", "I"), ("slot", "I"),
                      ("_pad", "I"), ("addr", "16s")),
    ),
    Kind.DATAGRAM: Layout(
        "datagram_event",
        HDR_FIELDS + (("cookie", "Q"), ("slot", "I"), ("len", "I"), ("family", "H"), ("dport", "H"),
                      ("sport", "H"), ("captured", "H"), ("flags", "I"), ("_pad", "I"), ("addr", "16s"),
                      ("data", f"{DGRAM_CAP}s")),
    ),
}
LAYOUTS[Kind.BIND] = LAYOUTS[Kind.CONNECT]
LAYOUTS[Kind.CGROUP_RMDIR] = LAYOUTS[Kind.CGROUP_MKDIR]

# layouts of map keys and values written by user space
MAP_LAYOUTS: dict[str, Layout] = {
    "comm_key": Layout("comm_key", (("gen", "I"), ("comm", f"{COMM_LEN}s"))),
    "lpm4_key": Layout("lpm4_key", (("prefixlen", "I"), ("gen", "I"), ("addr", "4s"))),
    "lpm6_key": Layout("lpm6_key", (("prefixlen", "I"), ("gen", "I"), ("addr", "16s"))),
    "flow_verdict": Layout("flow_verdict", (("upto", "I"), ("flags", "I"))),
    "unix_path_key": Layout("unix_path_key", (("prefixlen", "I"), ("gen", "I"), ("path", f"{UNIX_KEY_LEN}s"))),
    "unix_verdict": Layout("unix_verdict", (("state", "I"), ("hash", "I"), ("rules", "Q"))),
    "egress_dyn_key": Layout("egress_dyn_key", (("slot", "I"), ("_pad", "I"), ("addr", "16s"))),
    "gpu_prefix": Layout(
        "gpu_prefix", (("word", f"{OPEN_PATH_LEN // 8}Q"), ("mask", f"{OPEN_PATH_LEN // 8}Q"))
    ),
}

_STRUCTS = {k: struct.Struct(v.fmt) for k, v in LAYOUTS.items()}
_KIND_AT = struct.Struct("<I")
_KIND_OFFSET = 16

FAMILY_NAMES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}
SOCK_TYPE_NAMES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket", 6: "dccp", 10: "packet"}


def cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


_COMMS: dict[bytes, str] = {}


def _comm(raw: bytes) -> str:
    """cstr of a header's comm, cached: a node runs few distinct comms."""
    c = _COMMS.get(raw)
    if c is None:
        if len(_COMMS) >= 4096:
            _COMMS.clear()
        c = _COMMS[raw] = cstr(raw)
    return c


_AF_INET, _AF_INET6, _AF_UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
_ntop = socket.inet_ntop


def parse_sockaddr(raw: bytes, addrlen: int) -> dict[str, Any]:
    """Decode a uapi struct sockaddr (as the process passed it)."""
    if addrlen < 2:
        return {"family": None, "addr": None, "port": None, "path": None}
    fam = raw[0] | (raw[1] << 8)
    if fam == _AF_INET and addrlen >= 8:
        return {"family": "inet", "addr": _ntop(_AF_INET, raw[4:8]), "port": (raw[2] << 8) | raw[3], "path": None}
    if fam == _AF_INET6 and addrlen >= 24:
        return {
            "family": "inet6",
            "addr": str(ipaddress.IPv6Address(raw[8:24])),
            "port": (raw[2] << 8) | raw[3],
            "path": None,
        }
    if fam == _AF_UNIX:
        body = raw[2 : max(2, min(addrlen, len(raw)))]
        if body[:1] == b"\0":  # abstract socket
            path = "@" + body[1:].split(b"\0", 1)[0].decode("utf-8", "replace")
        else:
            path = cstr(body)
        return {"family": "unix", "addr": None, "port": None, "path": path}
    return {"family": FAMILY_NAMES.get(fam, str(fam)), "addr": None, "port": None, "path": None}


# Each decoder builds the final record dict in one literal from the tuple of
# one unpack_from: header fields v[0..6] (v[2] is the kind), then the kind's
# own fields in LAYOUTS order. The type strings are constants (no
# Kind.record_type per record).


def _fork(v: tuple) -> dict[str, Any]:
    r = {"type": "fork", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
         "comm": _comm(v[6]), "child_pid": v[7]}
    if v[8] & FORK_UNTRACKED:
        r["untracked"] = True  # the kernel's `tracked` map was full (episode_tracer/runtime.py fails closed)
    return r


def _exec(v: tuple) -> dict[str, Any]:
    r = {"type": "exec", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5], "comm": _comm(v[6])}
    flags, argc, args_len = v[7], v[8], v[9]
    raw = v[13][:args_len]
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:argc]]
    if flags & EXEC_NO_ARGV:
        r["argv_from_proc"] = True  # the tracker reads /proc/<pid>/cmdline
    if flags & EXEC_GPU_RIGHT:
        r["gpu_right_before"] = True  # episode_tracer.gpu_allow re-grants it for a named executable
    r["old_pid"] = v[10]
    r["filename"] = cstr(v[11])
    r["argv"] = argv
    r["argv_truncated"] = bool(flags & EXEC_ARGV_TRUNCATED)
    r["env_episode"] = cstr(v[12]) if flags & EXEC_ENV_MARKER else None
    r["killed_in_kernel"] = bool(flags & EXEC_KILLED)
    r["gated"] = bool(flags & EXEC_GATED)
    return r


def _exit(v: tuple) -> dict[str, Any]:
    return {"type": "exit", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "code": v[7] if v[7] >= 0 else None, "signal": v[8] or None}


def _sock(kind: Kind) -> Callable[[tuple], dict[str, Any]]:
    type_name = kind.record_type

    def dec(v: tuple) -> dict[str, Any]:
        r = {"type": type_name, "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
             "comm": _comm(v[6]), "fd": v[7], "result": v[8]}
        r.update(parse_sockaddr(v[11], v[9]))
        return r

    return dec


_family_name = FAMILY_NAMES.get
_sock_type_name = SOCK_TYPE_NAMES.get


def _socket(v: tuple) -> dict[str, Any]:
    t = v[8] & 0xF  # drop SOCK_NONBLOCK / SOCK_CLOEXEC
    return {"type": "socket", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "family": _family_name(v[7]) or str(v[7]),
            "sock_type": _sock_type_name(t) or str(t), "protocol": v[9], "result": v[10]}


def _listen(v: tuple) -> dict[str, Any]:
    r = {"type": "listen", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
         "comm": _comm(v[6]), "fd": v[7], "backlog": v[8], "result": v[9]}
    r.update(parse_sockaddr(v[11], v[10]))
    return r


def _memfd(v: tuple) -> dict[str, Any]:
    return {"type": "memfd", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "flags": v[7], "result": v[8], "name": cstr(v[9])}


def _open(v: tuple) -> dict[str, Any]:
    return {"type": "gpu_open", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "flags": v[7], "result": v[8], "path": cstr(v[9]),
            "killed_in_kernel": bool(v[10] & OPEN_KILLED), "gpu_right": bool(v[10] & OPEN_RIGHT),
            "call": OPEN_CALLS.get(v[11], str(v[11]))}


def _deny(v: tuple) -> dict[str, Any]:
    fam = v[8]
    raw = v[12]
    return {"type": "deny", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "rules_mask": v[7], "family": FAMILY_NAMES.get(fam, str(fam)),
            "addr": _ntop(_AF_INET, raw[:4]) if fam == _AF_INET else str(ipaddress.IPv6Address(raw)),
            "protocol": "tcp" if v[9] == socket.IPPROTO_TCP else "udp" if v[9] == socket.IPPROTO_UDP else str(v[9]),
            "port": v[10], "call": "sendmsg" if v[11] & DENY_SENDMSG else "connect",
            "would": bool(v[11] & DENY_WOULD)}


def _gate_race(v: tuple) -> dict[str, Any]:
    return {"type": "gate_race", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "target": v[7], "sig": v[8]}


_WIRE_HEAD_STRUCT = struct.Struct(LAYOUTS[Kind.PROTOCOL].fmt)


def _wire_unpack(buf) -> tuple:
    """A flow report is variable length: the head, then data[0:captured]."""
    v = _WIRE_HEAD_STRUCT.unpack_from(buf)
    return v + (bytes(buf[WIRE_HEAD:WIRE_HEAD + v[8]]),)


def _protocol(v: tuple) -> dict[str, Any]:
    """A flow report (episode_tracer/bpf/wire.h): the first bytes of a TCP flow so far.
    Internal: episode_tracer.flows judges it into `protocol` records per message."""
    cookie, captured, flags, upto, fam, port, sport, _p, _p2, raw, data = v[7:18]
    return {"type": "wire_report", "ktime": v[0], "cgroup": v[1], "pid": v[3], "uid": v[5],
            "comm": _comm(v[6]), "cookie": cookie, "captured": captured, "flags": flags, "upto": upto,
            "family": FAMILY_NAMES.get(fam, str(fam)),
            "addr": _ntop(_AF_INET, raw[:4]) if fam == _AF_INET else str(ipaddress.IPv6Address(raw)),
            "port": port, "sport": sport, "data": data}


def _cgroup_mkdir(v: tuple) -> dict[str, Any]:
    return {"type": "cgroup_mkdir", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "cgroup_id": v[7], "level": v[8], "path": cstr(v[10])}


def _cgroup_rmdir(v: tuple) -> dict[str, Any]:
    r = _cgroup_mkdir(v)
    r["type"] = "cgroup_rmdir"
    return r
def _escape(v: tuple) -> dict[str, Any]:
    # the record's process is the mover; `pid` is the moved process (the
    # member), `by_pid` the one that wrote cgroup.procs
    f = v[10]
    return {"type": "escape", "ktime": v[0], "cgroup": None, "pid": v[8], "tid": v[8], "uid": v[5],
            "comm": None, "by_pid": v[3], "by_comm": _comm(v[6]), "by_cgroup": v[1], "dst_cgroup": v[7],
            "slot": v[9], "dst_level": v[11], "dst_path": cstr(v[12]), "outside": bool(f & ESC_OUTSIDE),
            "by_other": bool(f & ESC_BY_OTHER), "untracked": bool(f & ESC_UNTRACKED)}


def unix_path_text(raw: bytes, abstract: bool) -> str:
    """A sun_path as the policy writes it: abstract names as '@name'."""
    if abstract:
        return "@" + raw[1:].rstrip(b"\0").decode("utf-8", "replace")
    return cstr(raw)


def _unix_deny(v: tuple) -> dict[str, Any]:
    flags, used, h = v[8], v[9], v[10]
    raw = v[12][:used]
    if flags & UNIX_GATE:
        # held for a verdict on the socket the path leads to (episode_tracer/nodesvc.py)
        return {"type": "unix_gate", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
                "comm": _comm(v[6]), "family": "unix", "call": "connect", "path": cstr(raw), "hash": h,
                "relative": bool(flags & UNIX_RELATIVE)}
    reason = ("arguments not seen" if flags & UNIX_NO_ARGS else
              "relative path or '..'" if flags & UNIX_RELATIVE else None)
    return {"type": "unix_deny", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "rules_mask": v[7], "family": "unix", "call": "connect",
            "path": unix_path_text(raw, bool(flags & UNIX_ABSTRACT)) if not flags & UNIX_NO_ARGS else None,
            "unverified": reason, "would": bool(flags & UNIX_WOULD)}


def _addr16(raw: bytes) -> tuple[str, str]:
    """(family, address) of a 16-byte address, IPv4 as ::ffff:a.b.c.d."""
    a = ipaddress.IPv6Address(raw)
    if a.ipv4_mapped is not None:
        return "inet", str(a.ipv4_mapped)
    return "inet6", str(a)


def _egress(v: tuple) -> dict[str, Any]:
    fam, proto, port, flags, slot, _pad, raw = v[7:14]
    family, addr = _addr16(raw)
    if fam == 10 and flags & EGRESS_PACKET:
        family = "inet6"
    reason = ("dns" if flags & EGRESS_DNS else "local" if flags & EGRESS_LOCAL
              else "protocol" if flags & EGRESS_PROTO else "not-allowed")
    return {"type": "egress", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
            "comm": _comm(v[6]), "family": family, "addr": addr,
            "protocol": "tcp" if proto == socket.IPPROTO_TCP else "udp" if proto == socket.IPPROTO_UDP else str(proto),
            "port": port,
            "call": "packet" if flags & EGRESS_PACKET else "sendmsg" if flags & EGRESS_SENDMSG else "connect",
            "would": bool(flags & EGRESS_WOULD), "reason": reason, "slot": slot}


def _datagram(v: tuple) -> dict[str, Any]:
    from .datagram import describe

    cookie, slot, length, fam, dport, sport, captured, flags, _pad, raw, data = v[7:18]
    family, addr = _addr16(raw)
    r = {"type": "datagram", "ktime": v[0], "cgroup": v[1], "pid": v[3], "tid": v[4], "uid": v[5],
         "comm": _comm(v[6]), "cookie": cookie, "slot": slot, "len": length, "family": family, "addr": addr,
         "port": dport, "sport": sport, "captured": captured, "dropped": bool(flags & DGRAM_DROPPED)}
    r.update(describe(data[:captured], dport))
    return r


_DECODERS: dict[int, tuple[struct.Struct, Callable[[tuple], dict[str, Any]]]] = {
    Kind.FORK: (_STRUCTS[Kind.FORK], _fork),
    Kind.EXEC: (_STRUCTS[Kind.EXEC], _exec),
    Kind.EXIT: (_STRUCTS[Kind.EXIT], _exit),
    Kind.CONNECT: (_STRUCTS[Kind.CONNECT], _sock(Kind.CONNECT)),
    Kind.BIND: (_STRUCTS[Kind.BIND], _sock(Kind.BIND)),
    Kind.SOCKET: (_STRUCTS[Kind.SOCKET], _socket),
    Kind.LISTEN: (_STRUCTS[Kind.LISTEN], _listen),
    Kind.MEMFD: (_STRUCTS[Kind.MEMFD], _memfd),
    Kind.GPU_OPEN: (_STRUCTS[Kind.GPU_OPEN], _open),
    Kind.DENY: (_STRUCTS[Kind.DENY], _deny),
    Kind.GATE_RACE: (_STRUCTS[Kind.GATE_RACE], _gate_race),
    Kind.PROTOCOL: (_STRUCTS[Kind.PROTOCOL], _protocol),
    Kind.CGROUP_MKDIR: (_STRUCTS[Kind.CGROUP_MKDIR], _cgroup_mkdir),
    Kind.CGROUP_RMDIR: (_STRUCTS[Kind.CGROUP_MKDIR], _cgroup_rmdir),
    Kind.ESCAPE: (_STRUCTS[Kind.ESCAPE], _escape),
    Kind.UNIX_DENY: (_STRUCTS[Kind.UNIX_DENY], _unix_deny),
    Kind.EGRESS: (_STRUCTS[Kind.EGRESS], _egress),
    Kind.DATAGRAM: (_STRUCTS[Kind.DATAGRAM], _datagram),
}
# by plain int as well: the kind read from a record is an int, and an int key
# hashes the same but compares faster than through IntEnum
_BY_KIND: dict[int, tuple[Callable[..., tuple], Callable[[tuple], dict[str, Any]], int]] = {
    int(k): (st.unpack_from, fn, st.size) for k, (st, fn) in _DECODERS.items()
}
_BY_KIND[int(Kind.PROTOCOL)] = (_wire_unpack, _protocol, WIRE_HEAD)
_kind_at = _KIND_AT.unpack_from
_struct_error = struct.error


class DecodeError(ValueError):
    pass


def decode(buf: bytes | memoryview) -> dict[str, Any]:
    """Decode one ring-buffer record into a record dict (no episode yet)."""
    try:
        unpack, fn, _size = _BY_KIND[_kind_at(buf, _KIND_OFFSET)[0]]
        v = unpack(buf)
    except (KeyError, _struct_error):
        pass
    else:
        return fn(v)
    # the slow path says what is wrong
    if len(buf) < _KIND_OFFSET + 4:
        raise DecodeError(f"record of {len(buf)} bytes is shorter than its header")
    (kind,) = _KIND_AT.unpack_from(buf, _KIND_OFFSET)
    got = _BY_KIND.get(kind)
    if got is None:
        raise DecodeError(f"unknown event kind {kind}") from None
    raise DecodeError(f"{Kind(kind).record_type} record of {len(buf)} bytes, expected {got[2]}")


def pack_gpu_prefix(prefix: str) -> bytes:
    """Map value for gpu_prefixes: the prefix as words plus its byte mask."""
    b = prefix.encode()
    if not 0 < len(b) <= OPEN_PATH_LEN - 1:
        raise ValueError(f"GPU path prefix must be 1..{OPEN_PATH_LEN - 1} bytes: {prefix!r}")
    word = b.ljust(OPEN_PATH_LEN, b"\0")
    mask = (b"\xff" * len(b)).ljust(OPEN_PATH_LEN, b"\0")
    return word + mask
