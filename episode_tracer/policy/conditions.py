"""Fields, compiled conditions, and the compiler from TOML values to them.

A condition is one `field = value` entry of a `match` or `except` table. The
value is either a shorthand (a scalar or an array, meaning `in`) or an
operator table (`{ glob = [...] }`); see docs/policies.md for the language.
"""
from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Protocol, Sequence

from .argv import OptSpec, flag_matches, parse_getopt
from .context import Subject
from .model import NO_MATCH, Kind, Op, OptionsEnd, enum_values
from .sshconfig import ssh_option_directives

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FType(Enum):
    STR = "string"
    STRS = "strings"  # a list of strings on the event; any element may match
    NUM = "number"
    PORT = "port"
    CIDR = "cidr"
    CIDRS = "cidrs"  # a list of addresses on the event; any element may match
    ENUM = "enum"
    BOOL = "bool"
    SHA256 = "sha256"
    FLAG = "flag"
    OPTION = "option"


@dataclass(frozen=True)
class EnumDef:
    names: tuple[str, ...]
    int_names: Mapping[int, str]
    allow_ints: bool

    def normalize(self, value: Any) -> Any:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return self.int_names.get(value, value)
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class FieldDef:
    name: str
    ftype: FType
    get: Callable[[Subject], Any]
    cost: int = 0  # evaluation order: cheap event fields first, hashing last
    enum: EnumDef | None = None


# --------------------------------------------------------------------------
# compiled conditions


@dataclass(frozen=True, kw_only=True)
class Cond:
    """One compiled condition. `test` returns the matched value or NO_MATCH."""

    field: str
    get: Callable[[Subject], Any] = field(compare=False, repr=False)
    cost: int = field(default=0, compare=False)
    path: str = field(default="", compare=False)  # key path in the rule, e.g. match.port
    via: str | None = field(default=None, compare=False)  # macro it came from

    def test(self, s: Subject) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _glob_regex(globs: Sequence[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(fnmatch.translate(g) for g in globs))


_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+")


def hosts_in(text: str) -> list[str]:
    """Host names written in a string: the whole string, or inside a URL,
    `user@host`, `host:port` or `--key=host` (lower case; dotted names only)."""
    return _HOST.findall(text.lower())


def domain_matches(text: str, domains: frozenset[str]) -> bool:
    """Some host name in `text` is one of `domains` or a subdomain of one
    (`pool.supportxmr.com` is in `supportxmr.com`; `examine.bz2` is not in
    `mine.bz`)."""
    for host in hosts_in(text):
        labels = host.split(".")
        for i in range(len(labels) - 1):
            if ".".join(labels[i:]) in domains:
                return True
    return False


@dataclass(frozen=True, kw_only=True)
class StrCond(Cond):
    exact: frozenset[str] | None = None
    globs: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    domains: frozenset[str] | None = None
    many: bool = False  # the field is a list (arg, ancestor_exe): any element
    never: bool = False  # an operator was given an empty list (e.g. an empty "$list"): nothing matches
    _glob: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)
    _res: tuple[re.Pattern[str], ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_glob", _glob_regex(self.globs))
        object.__setattr__(self, "_res", tuple(re.compile(r) for r in self.regexes))

    def ok(self, x: Any) -> bool:
        if not isinstance(x, str) or self.never:
            return False
        if self.exact is not None and x not in self.exact:
            return False
        if self._glob is not None and not self._glob.match(x):
            return False
        if self._res and not any(r.search(x) for r in self._res):
            return False
        if self.domains is not None and not domain_matches(x, self.domains):
            return False
        return True

    def test(self, s: Subject) -> Any:
        v = self.get(s)
        if v is None:
            return NO_MATCH
        if self.many:
            for x in v:
                if self.ok(x):
                    return x
            return NO_MATCH
        return v if self.ok(v) else NO_MATCH


@dataclass(frozen=True, kw_only=True)
class NumCond(Cond):
    values: frozenset[int] | None = None
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    def test(self, s: Subject) -> Any:
        v = self.get(s)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return NO_MATCH
        if self.values is not None and v not in self.values:
            return NO_MATCH
        if self.gt is not None and not v > self.gt:
            return NO_MATCH
        if self.gte is not None and not v >= self.gte:
            return NO_MATCH
        if self.lt is not None and not v < self.lt:
            return NO_MATCH
        if self.lte is not None and not v <= self.lte:
            return NO_MATCH
        return v


@dataclass(frozen=True, kw_only=True)
class PortCond(Cond):
    ranges: tuple[tuple[int, int], ...]

    def test(self, s: Subject) -> Any:
        v = self.get(s)
        if isinstance(v, bool) or not isinstance(v, int):
            return NO_MATCH
        for lo, hi in self.ranges:
            if lo <= v <= hi:
                return v
        return NO_MATCH


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The address and, for an IPv4-mapped IPv6 address, its IPv4 form too."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return ()
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return (addr, addr.ipv4_mapped)
    return (addr,)


@dataclass(frozen=True, kw_only=True)
class CidrCond(Cond):
    """Destination in any of `nets`. An IPv4-mapped IPv6 address
    (`::ffff:10.0.0.1`) also matches the IPv4 networks."""

    nets: tuple[IPNetwork, ...]
    many: bool = False  # the field is a list of addresses (stdio_remote): any element

    def ok(self, v: Any) -> bool:
        if not isinstance(v, str):
            return False
        for addr in _ip(v):
            for net in self.nets:
                if addr.version == net.version and addr in net:
                    return True
        return False

    def test(self, s: Subject) -> Any:
        v = self.get(s)
        if self.many:
            for x in v or ():
                if self.ok(x):
                    return x
            return NO_MATCH
        return v if self.ok(v) else NO_MATCH


@dataclass(frozen=True, kw_only=True)
class EnumCond(Cond):
    values: frozenset[Any]

    def test(self, s: Subject) -> Any:
        v = self.get(s)
        return v if v is not None and v in self.values else NO_MATCH


@dataclass(frozen=True, kw_only=True)
class BoolCond(Cond):
    value: bool

    def test(self, s: Subject) -> Any:
        v = self.get(s)
        return v if isinstance(v, bool) and v is self.value else NO_MATCH


@dataclass(frozen=True, kw_only=True)
class Sha256Cond(Cond):
    values: frozenset[str]

    def test(self, s: Subject) -> Any:
        v = self.get(s)
        return v if v in self.values else NO_MATCH


@dataclass(frozen=True, kw_only=True)
class FlagCond(Cond):
    flags: tuple[str, ...]
    spec: OptSpec

    def test(self, s: Subject) -> Any:
        if s.args() is None:
            return NO_MATCH
        for opt in s.scan(self.spec):
            for flag in self.flags:
                if flag_matches(opt, flag):
                    return flag
        return NO_MATCH


_KV = re.compile(r"\s*([^\s=]+)\s*(?:=\s*|\s+|$)(.*)", re.S)


def split_key_value(text: str) -> tuple[str, str] | None:
    """`Key=Value`, `Key Value`, `Key = Value` -> (Key, Value)."""
    m = _KV.match(text)
    return (m.group(1), m.group(2)) if m else None


@dataclass(frozen=True, kw_only=True)
class OptionCond(Cond):
    flag: str
    keys: frozenset[str]  # lowercase
    value_globs: tuple[str, ...] = ()
    spec: OptSpec
    _glob: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_glob", _glob_regex(self.value_globs))

    def test(self, s: Subject) -> Any:
        if s.args() is None:
            return NO_MATCH
        for opt in s.scan(self.spec):
            if opt.value is None or not flag_matches(opt, self.flag):
                continue
            kv = split_key_value(opt.value)
            if kv is None or kv[0].lower() not in self.keys:
                continue
            if self._glob is None or self._glob.match(kv[1]):
                return opt.value
        return NO_MATCH


# --------------------------------------------------------------------------
# fields


def _ev(name: str) -> Callable[[Subject], Any]:
    return lambda s: s.event.get(name)


def _basename(s: Subject) -> list[str]:
    """Basenames a process goes by: of `exe` (the resolved image) and, for an
    exec, of `filename` (the path as called). `/bin/sh` resolves to `dash` on
    Debian and the kernel names the task `sh`: `basename = "sh"` must match
    it, and so must `basename = "dash"`. An unresolved exe still has the
    called name, so the rule fails closed."""
    out: list[str] = []
    for key in ("exe", "filename"):
        path = s.event.get(key)
        if isinstance(path, str) and path:
            name = path.rsplit("/", 1)[-1]
            if name and name not in out:
                out.append(name)
        if s.event.get("type") != "exec":
            break
    # executed through a descriptor (fexecve, execveat(fd, "", AT_EMPTY_PATH),
    # /proc/self/fd/N): the path says nothing; the kernel names the task
    # after the file (kill lists match that comm in the kernel too)
    fn = s.event.get("filename")
    comm = s.event.get("comm")
    if s.event.get("type") == "exec" and isinstance(fn, str) and isinstance(comm, str) and comm \
            and _FD_EXEC.match(fn) and comm not in out:
        out.append(comm)
    return out


_FD_EXEC = re.compile(r"^/(dev/fd|proc/(self|thread-self|\d+)(/task/\d+)?/fd)/\d+$")


def _gpu_allowed(s: Subject) -> Any:
    """From the record (the GPU watcher sets it on `gpu` samples), else asked
    of the context (live: the episode's registered GPU processes)."""
    v = s.event.get("gpu_allowed")
    return v if v is not None else s.gpu_allowed()


def _parent_exe(s: Subject) -> str | None:
    anc = s.ancestors()
    return anc[0] if anc else None


def _cmdline(s: Subject) -> str | None:
    argv = s.event.get("argv")
    return " ".join(a for a in argv if isinstance(a, str)) if isinstance(argv, list) else None


FAMILY = EnumDef(
    names=("inet", "inet6", "unix", "netlink", "packet"),
    int_names={2: "inet", 10: "inet6", 1: "unix", 16: "netlink", 17: "packet"},
    allow_ints=True,
)
SOCK_TYPE = EnumDef(
    names=("stream", "dgram", "raw", "rdm", "seqpacket", "packet"),
    int_names={1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket", 10: "packet"},
    allow_ints=True,
)
L4_PROTOCOL = EnumDef(names=("tcp", "udp"), int_names={6: "tcp", 17: "udp"}, allow_ints=False)


def _family(s: Subject) -> Any:
    return FAMILY.normalize(s.event.get("family"))


def _sock_type(s: Subject) -> Any:
    v = s.event.get("sock_type")
    if isinstance(v, int) and not isinstance(v, bool):
        v &= 0xF  # drop SOCK_NONBLOCK / SOCK_CLOEXEC
    return SOCK_TYPE.normalize(v)


def _l4_protocol(s: Subject) -> Any:
    """tcp/udp of a connect or bind: from `protocol`, else from `sock_type`."""
    v = L4_PROTOCOL.normalize(s.event.get("protocol"))
    if v in ("tcp", "udp"):
        return v
    return {"stream": "tcp", "dgram": "udp"}.get(_sock_type(s))


def _defs(*defs: FieldDef) -> dict[str, FieldDef]:
    return {d.name: d for d in defs}


_COMMON = _defs(
    FieldDef("exe", FType.STR, _ev("exe")),
    FieldDef("basename", FType.STRS, _basename),
    FieldDef("comm", FType.STR, _ev("comm")),
    FieldDef("uid", FType.NUM, _ev("uid")),
    FieldDef("episode", FType.STR, _ev("episode")),
    FieldDef("parent_exe", FType.STR, _parent_exe, cost=2),
    FieldDef("ancestor_exe", FType.STRS, lambda s: s.ancestors(), cost=2),
)
_FAMILY = FieldDef("family", FType.ENUM, _family, enum=FAMILY)
_SOCK_TYPE = FieldDef("sock_type", FType.ENUM, _sock_type, enum=SOCK_TYPE)
_ADDR = FieldDef("addr", FType.CIDR, _ev("addr"))
_PORT = FieldDef("port", FType.PORT, _ev("port"))
_RESULT = FieldDef("result", FType.NUM, _ev("result"))
_GPU_ALLOWED = FieldDef("gpu_allowed", FType.BOOL, _gpu_allowed, cost=2)
_CONNECT = _defs(
    _FAMILY,
    _ADDR,
    _PORT,
    FieldDef("path", FType.STR, _ev("path")),
    FieldDef("protocol", FType.ENUM, _l4_protocol, enum=L4_PROTOCOL),
    _SOCK_TYPE,
    _RESULT,
)

FIELDS: dict[Kind, dict[str, FieldDef]] = {
    Kind.EXEC: {
        **_COMMON,
        **_defs(
            FieldDef("filename", FType.STR, _ev("filename")),
            FieldDef("cwd", FType.STR, _ev("cwd")),
            FieldDef("arg", FType.STRS, lambda s: s.args(), cost=1),
            FieldDef("cmdline", FType.STR, _cmdline, cost=1),
            FieldDef("argv_flag", FType.FLAG, lambda s: s.args(), cost=1),
            FieldDef("argv_option", FType.OPTION, lambda s: s.args(), cost=1),
            FieldDef("fileless", FType.BOOL, _ev("fileless")),
            FieldDef("sha256", FType.SHA256, lambda s: s.sha256(), cost=3),
            FieldDef("ssh_config", FType.STRS, lambda s: s.ssh_config(), cost=2),
            FieldDef("ssh_option", FType.STRS, lambda s: ssh_option_directives(s.event), cost=1),
            FieldDef("stdio_remote", FType.CIDRS, lambda s: s.stdio_remote(), cost=2),
        ),
    },
    Kind.CONNECT: {**_COMMON, **_CONNECT},
    Kind.BIND: {**_COMMON, **_CONNECT},
    Kind.LISTEN: {
        **_COMMON,
        **_defs(_FAMILY, _ADDR, _PORT, FieldDef("backlog", FType.NUM, _ev("backlog")), _RESULT),
    },
    Kind.SOCKET: {
        **_COMMON,
        **_defs(_FAMILY, _SOCK_TYPE, FieldDef("protocol", FType.NUM, _ev("protocol"))),
    },
    Kind.MEMFD: {
        **_COMMON,
        **_defs(FieldDef("name", FType.STR, _ev("name")), FieldDef("flags", FType.NUM, _ev("flags")), _RESULT),
    },
    Kind.GPU_OPEN: {
        **_COMMON,
        **_defs(
            FieldDef("path", FType.STR, _ev("path")),
            FieldDef("flags", FType.NUM, _ev("flags")),
            _RESULT,
            _GPU_ALLOWED,
        ),
    },
    Kind.GPU: {
        **_COMMON,
        **_defs(
            _GPU_ALLOWED,
            FieldDef("gpu_index", FType.NUM, _ev("gpu_index")),
            FieldDef("gpu_uuid", FType.STR, _ev("gpu_uuid")),
            FieldDef("used_mib", FType.NUM, _ev("used_mib")),
            FieldDef("sm_util", FType.NUM, _ev("sm_util")),
            FieldDef("mem_util", FType.NUM, _ev("mem_util")),
        ),
    },
    Kind.PROTOCOL: {
        **_COMMON,
        **_defs(
            FieldDef("protocol", FType.STR, _ev("protocol")),
            FieldDef("sni", FType.STR, _ev("sni")),
            FieldDef("alpn", FType.STRS, lambda s: s.event.get("alpn") or []),
            FieldDef("method", FType.STR, _ev("method")),  # JSON-RPC method, HTTP method
            FieldDef("proxy_host", FType.STR, _ev("proxy_host")),  # HTTP CONNECT / absolute-URI target
            FieldDef("proxy_port", FType.PORT, _ev("proxy_port")),
            FieldDef("held", FType.BOOL, _ev("held")),
            FieldDef("truncated", FType.BOOL, _ev("truncated")),
            _FAMILY,
            _ADDR,
            _PORT,
        ),
    },
    Kind.RELAY: {  # episode_tracer/relay.py: addr/port the outbound leg, local_port the local listener
        **_COMMON,
        **_defs(
            _FAMILY,
            _ADDR,
            _PORT,
            FieldDef("local_addr", FType.CIDR, _ev("local_addr")),
            FieldDef("local_port", FType.PORT, _ev("local_port")),
            FieldDef("listener_exe", FType.STR, _ev("listener_exe")),
            FieldDef("same_process", FType.BOOL, _ev("same_process")),
            FieldDef("age_s", FType.NUM, _ev("age_s")),
        ),
    },
    Kind.GPU_BUDGET: {  # episode_tracer/gpu_watch.py: sums over the last 60 / 600 s, processes without the GPU right
        **_COMMON,
        **_defs(
            FieldDef("sm_s_60", FType.NUM, _ev("sm_s_60")),
            FieldDef("mib_s_60", FType.NUM, _ev("mib_s_60")),
            FieldDef("sm_s_600", FType.NUM, _ev("sm_s_600")),
            FieldDef("mib_s_600", FType.NUM, _ev("mib_s_600")),
        ),
    },
    Kind.ESCAPE: {  # episode_tracer/membership.py: the moved process stays a member
        **_COMMON,
        **_defs(
            FieldDef("dst_path", FType.STR, _ev("dst_path")),
            FieldDef("dst_episode", FType.STR, _ev("dst_episode")),
            FieldDef("outside", FType.BOOL, _ev("outside")),
            FieldDef("by_other", FType.BOOL, _ev("by_other")),
            FieldDef("via", FType.STR, _ev("via")),
        ),
    },
    Kind.DATAGRAM: {  # episode_tracer/datagram.py: what the first bytes are, and per-episode DNS rates
        **_COMMON,
        **_defs(
            _FAMILY,
            _ADDR,
            _PORT,
            FieldDef("app", FType.STR, _ev("app")),
            FieldDef("len", FType.NUM, _ev("len")),
            FieldDef("quic_version", FType.STR, _ev("quic_version")),
            FieldDef("dns_qname", FType.STR, _ev("dns_qname")),
            FieldDef("dns_qtype", FType.STR, _ev("dns_qtype")),
            FieldDef("dns_label_max", FType.NUM, _ev("dns_label_max")),
            FieldDef("dns_sub_len", FType.NUM, _ev("dns_sub_len")),
            FieldDef("dns_entropy", FType.NUM, _ev("dns_entropy")),
            FieldDef("dns_resolver", FType.STR, _ev("dns_resolver")),
            FieldDef("dns_type_rate", FType.NUM, _ev("dns_type_rate")),
            FieldDef("dns_unique_sub", FType.NUM, _ev("dns_unique_sub")),
        ),
    },
}

ALL_FIELDS: frozenset[str] = frozenset(name for defs in FIELDS.values() for name in defs)


def kinds_with(name: str) -> list[Kind]:
    return [k for k, defs in FIELDS.items() if name in defs]


# --------------------------------------------------------------------------
# compiler


class Env(Protocol):
    """What the compiler needs from the loader."""

    def error(self, key: str, message: str) -> None: ...

    def expand(self, name: str, key: str) -> list[tuple[Any, str]] | None:
        """Entries of list `name` with the list each came from; reports an
        unknown list at `key` and returns None."""
        ...


def tname(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "table"
    return type(v).__name__


@dataclass(frozen=True)
class Item:
    value: Any
    key: str
    origin: str | None  # list the value came from

    def msg(self, message: str) -> str:
        return f"{message} (from list '{self.origin}')" if self.origin else message


def list_ref(value: Any) -> str | None:
    """The list name of a `"$name"` reference (`"$$x"` is the literal `$x`)."""
    if isinstance(value, str) and value.startswith("$") and not value.startswith("$$"):
        return value[1:]
    return None


def unescape(value: Any) -> Any:
    return value[1:] if isinstance(value, str) and value.startswith("$$") else value


def items(raw: Any, key: str, env: Env) -> list[Item] | None:
    """A scalar or array value as items, `"$list"` references expanded."""
    values = raw if isinstance(raw, list) else [raw]
    out: list[Item] = []
    ok = True
    for i, v in enumerate(values):
        k = f"{key}[{i}]" if isinstance(raw, list) else key
        if isinstance(v, (list, dict)):
            env.error(k, f"expected a scalar, got {tname(v)}")
            ok = False
            continue
        name = list_ref(v)
        if name is None:
            out.append(Item(unescape(v), k, None))
            continue
        entries = env.expand(name, k)
        if entries is None:
            ok = False
            continue
        out.extend(Item(unescape(e), k, origin) for e, origin in entries)
    return out if ok else None


_ALLOWED_OPS: dict[FType, tuple[Op, ...]] = {
    FType.STR: (Op.IN, Op.GLOB, Op.REGEX, Op.DOMAIN),
    FType.STRS: (Op.IN, Op.GLOB, Op.REGEX, Op.DOMAIN),
    FType.NUM: (Op.IN, Op.GT, Op.GTE, Op.LT, Op.LTE),
    FType.PORT: (Op.IN,),
    FType.CIDR: (Op.IN,),
    FType.CIDRS: (Op.IN,),
    FType.ENUM: (Op.IN,),
    FType.SHA256: (Op.IN,),
}

_SHORTHAND: dict[FType, str] = {
    FType.STR: "a string, an array of strings",
    FType.STRS: "a string, an array of strings",
    FType.NUM: "an integer, an array of integers",
    FType.PORT: "a port, a port range, an array of them",
    FType.CIDR: "an address or CIDR, an array of them",
    FType.CIDRS: "an address or CIDR, an array of them",
    FType.ENUM: "a name, an array of names",
    FType.SHA256: "a sha256 hex digest, an array of them",
}


def compile_field(fd: FieldDef, raw: Any, key: str, env: Env) -> Cond | None:
    """Compile `key = raw` for field `fd`; errors go to env, None on error."""
    base: dict[str, Any] = {"field": fd.name, "get": fd.get, "cost": fd.cost, "path": key}
    if fd.ftype is FType.BOOL:
        if not isinstance(raw, bool):
            env.error(key, f"expected a boolean, got {tname(raw)}")
            return None
        return BoolCond(value=raw, **base)
    if fd.ftype is FType.FLAG:
        return _compile_flag(raw, key, env, base)
    if fd.ftype is FType.OPTION:
        return _compile_option(raw, key, env, base)
    ops = _op_table(fd.ftype, raw, key, env)
    if ops is None:
        return None
    compile_op = {
        FType.STR: _compile_str,
        FType.STRS: _compile_str,
        FType.NUM: _compile_num,
        FType.PORT: _compile_port,
        FType.CIDR: _compile_cidr,
        FType.CIDRS: _compile_cidr,
        FType.ENUM: _compile_enum,
        FType.SHA256: _compile_sha256,
    }[fd.ftype]
    return compile_op(fd, ops, env, base)


def _op_table(ftype: FType, raw: Any, key: str, env: Env) -> dict[Op, tuple[Any, str]] | None:
    """{op: (raw value, key path)}; a shorthand value is `in`."""
    allowed = _ALLOWED_OPS[ftype]
    if not isinstance(raw, dict):
        if isinstance(raw, (str, int, float, list)) and not isinstance(raw, bool):
            return {Op.IN: (raw, key)}
        names = ", ".join(o.value for o in allowed)
        env.error(key, f"expected {_SHORTHAND[ftype]} or an operator table ({names}), got {tname(raw)}")
        return None
    if not raw:
        env.error(key, "empty operator table")
        return None
    ops: dict[Op, tuple[Any, str]] = {}
    ok = True
    for name, value in raw.items():
        op = next((o for o in allowed if o.value == name), None)
        if op is None:
            names = ", ".join(o.value for o in allowed)
            env.error(f"{key}.{name}", f"unknown operator (expected one of: {names})")
            ok = False
            continue
        ops[op] = (value, f"{key}.{name}")
    return ops if ok else None


def _strings(raw: Any, key: str, env: Env) -> list[Item] | None:
    if not isinstance(raw, (str, list)):
        env.error(key, f"expected a string or an array of strings, got {tname(raw)}")
        return None
    its = items(raw, key, env)
    if its is None:
        return None
    ok = True
    for it in its:
        if not isinstance(it.value, str):
            env.error(it.key, it.msg(f"expected a string, got {tname(it.value)}"))
            ok = False
    return its if ok else None


def _compile_str(fd: FieldDef, ops: dict[Op, tuple[Any, str]], env: Env, base: dict[str, Any]) -> Cond | None:
    got: dict[Op, list[str]] = {}
    ok = True
    for op, (raw, key) in ops.items():
        its = _strings(raw, key, env)
        if its is None:
            ok = False
            continue
        if op is Op.REGEX:
            for it in its:
                try:
                    re.compile(it.value)
                except re.error as e:
                    env.error(it.key, it.msg(f"bad regex {it.value!r}: {e}"))
                    ok = False
        if op is Op.DOMAIN:
            for it in its:
                if hosts_in(it.value) != [it.value.lower()]:
                    env.error(it.key, it.msg(f"{it.value!r} is not a domain name (dotted labels: letters, digits, -)"))
                    ok = False
        got[op] = [it.value for it in its]
    if not ok:
        return None
    return StrCond(
        exact=frozenset(got[Op.IN]) if Op.IN in got else None,
        globs=tuple(got.get(Op.GLOB, ())),
        regexes=tuple(got.get(Op.REGEX, ())),
        domains=frozenset(v.lower() for v in got[Op.DOMAIN]) if Op.DOMAIN in got else None,
        many=fd.ftype is FType.STRS,
        never=any(not v for v in got.values()),
        **base,
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _compile_num(fd: FieldDef, ops: dict[Op, tuple[Any, str]], env: Env, base: dict[str, Any]) -> Cond | None:
    kw: dict[str, Any] = {}
    ok = True
    for op, (raw, key) in ops.items():
        if op is Op.IN:
            if not isinstance(raw, (int, list, str)) or isinstance(raw, bool):
                env.error(key, f"expected an integer or an array of integers, got {tname(raw)}")
                ok = False
                continue
            its = items(raw, key, env)
            if its is None:
                ok = False
                continue
            bad = [it for it in its if isinstance(it.value, bool) or not isinstance(it.value, int)]
            for it in bad:
                env.error(it.key, it.msg(f"expected an integer, got {tname(it.value)}"))
            ok = ok and not bad
            kw["values"] = frozenset(it.value for it in its)
        elif not _is_number(raw):
            env.error(key, f"expected a number, got {tname(raw)}")
            ok = False
        else:
            kw[op.value] = raw
    return NumCond(**kw, **base) if ok else None


_PORT_RE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")


def parse_port(v: Any) -> tuple[int, int] | str:
    """(lo, hi) or an error message."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v) if 0 <= v <= 65535 else f"{v} is not a port (0-65535)"
    if isinstance(v, str):
        m = _PORT_RE.fullmatch(v.strip())
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if lo <= hi <= 65535:
                return (lo, hi)
        return f"bad port range {v!r} (expected a port or lo-hi, 0-65535, lo <= hi)"
    return f"expected a port (integer) or a port range (string), got {tname(v)}"


def _parse_each(ops: dict[Op, tuple[Any, str]], env: Env, parse: Callable[[Any], Any]) -> list[Any] | None:
    """Each item of the `in` operand through `parse` (a value, or an error
    message str reported at the item's key); None when any item is bad."""
    raw, key = ops[Op.IN]
    its = items(raw, key, env)
    if its is None:
        return None
    out: list[Any] = []
    ok = True
    for it in its:
        r = parse(it.value)
        if isinstance(r, str):
            env.error(it.key, it.msg(r))
            ok = False
        else:
            out.append(r)
    return out if ok else None


def _compile_port(fd: FieldDef, ops: dict[Op, tuple[Any, str]], env: Env, base: dict[str, Any]) -> Cond | None:
    ranges = _parse_each(ops, env, parse_port)
    return None if ranges is None else PortCond(ranges=tuple(sorted(set(ranges))), **base)


def parse_cidr(v: Any) -> IPNetwork | str:
    """A network (a plain address is a /32 or /128) or an error message."""
    if not isinstance(v, str):
        return f"expected an address or CIDR string, got {tname(v)}"
    try:
        return ipaddress.ip_network(v.strip(), strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            fixed = ipaddress.ip_network(v.strip(), strict=False)
            return f"bad CIDR {v!r}: host bits set (did you mean {fixed}?)"
        return f"bad CIDR {v!r}: not an IPv4 or IPv6 address or network"


def _compile_cidr(fd: FieldDef, ops: dict[Op, tuple[Any, str]], env: Env, base: dict[str, Any]) -> Cond | None:
    nets = _parse_each(ops, env, parse_cidr)
    return None if nets is None else CidrCond(nets=tuple(dict.fromkeys(nets)), many=fd.ftype is FType.CIDRS, **base)


def _compile_enum(fd: FieldDef, ops: dict[Op, tuple[Any, str]], env: Env, base: dict[str, Any]) -> Cond | None:
    assert fd.enum is not None
    raw, key = ops[Op.IN]
    its = items(raw, key, env)
    if its is None:
        return None
    values: set[Any] = set()
    ok = True
    names = ", ".join(fd.enum.names)
    for it in its:
        v = it.value
        if isinstance(v, int) and not isinstance(v, bool) and fd.enum.allow_ints:
            values.add(fd.enum.normalize(v))
        elif isinstance(v, str) and v in fd.enum.names:
            values.add(v)
        elif isinstance(v, str):
            env.error(it.key, it.msg(f"{v!r} is not one of: {names}"))
            ok = False
        else:
            want = "a name or a number" if fd.enum.allow_ints else "a name"
            env.error(it.key, it.msg(f"expected {want}, got {tname(v)}"))
            ok = False
    return EnumCond(values=frozenset(values), **base) if ok else None


_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


def _compile_sha256(fd: FieldDef, ops: dict[Op, tuple[Any, str]], env: Env, base: dict[str, Any]) -> Cond | None:
    raw, key = ops[Op.IN]
    its = _strings(raw, key, env)
    if its is None:
        return None
    ok = True
    for it in its:
        if not _SHA256_RE.fullmatch(it.value):
            env.error(it.key, it.msg(f"{it.value!r} is not a sha256 hex digest (64 hex digits)"))
            ok = False
    return Sha256Cond(values=frozenset(it.value.lower() for it in its), **base) if ok else None


_SHORT = re.compile(r"-[^-\s=]")
_LONG = re.compile(r"--[^\s=]+")
_SINGLE_DASH_LONG = re.compile(r"-[^-\s=][^\s=]+")


def _table_keys(table: dict[str, Any], key: str, allowed: tuple[str, ...], env: Env) -> bool:
    ok = True
    for k in table:
        if k not in allowed:
            env.error(f"{key}.{k}", f"unknown key (expected one of: {', '.join(allowed)})")
            ok = False
    return ok


def _opt_spec(table: dict[str, Any], key: str, env: Env, value_flag: str | None = None) -> OptSpec | None:
    letters: frozenset[str] = frozenset()
    clusters = False
    ok = True
    getopt = table.get("getopt")
    if getopt is not None:
        if not isinstance(getopt, str):
            env.error(f"{key}.getopt", f"expected a string, got {tname(getopt)}")
            ok = False
        else:
            try:
                _, letters = parse_getopt(getopt)
                clusters = True
            except ValueError as e:
                env.error(f"{key}.getopt", f"bad getopt string {getopt!r}: {e}")
                ok = False
    end = OptionsEnd.DOUBLE_DASH
    raw_end = table.get("options_end")
    if raw_end is not None:
        if not isinstance(raw_end, str):
            env.error(f"{key}.options_end", f"expected a string, got {tname(raw_end)}")
            ok = False
        elif raw_end not in {e.value for e in OptionsEnd}:
            env.error(f"{key}.options_end", f"{raw_end!r} is not one of: {enum_values(OptionsEnd)}")
            ok = False
        else:
            end = OptionsEnd(raw_end)
            if end in (OptionsEnd.FIRST_POSITIONAL, OptionsEnd.SECOND_POSITIONAL) and getopt is None:
                env.error(
                    f"{key}.options_end",
                    f"{raw_end!r} needs getopt (which short options take a value), "
                    "or a value like `-p 22` would end the options early",
                )
                ok = False
    if not ok:
        return None
    longs: frozenset[str] = frozenset()
    if value_flag is not None:
        if value_flag.startswith("--"):
            longs = frozenset({value_flag})
        else:
            letters = letters | {value_flag[1]}
    return OptSpec(value_letters=letters, value_longs=longs, clusters=clusters, end=end)


def _compile_flag(raw: Any, key: str, env: Env, base: dict[str, Any]) -> Cond | None:
    if isinstance(raw, dict):
        if not _table_keys(raw, key, ("in", "getopt", "options_end"), env):
            return None
        if "in" not in raw:
            env.error(f"{key}.in", "missing required key")
            return None
        flags_raw, flags_key = raw["in"], f"{key}.in"
        spec = _opt_spec(raw, key, env)
    elif isinstance(raw, (str, list)):
        flags_raw, flags_key = raw, key
        spec = OptSpec()
    else:
        env.error(key, f"expected a flag, an array of flags or a table (in, getopt, options_end), got {tname(raw)}")
        return None
    its = _strings(flags_raw, flags_key, env)
    if its is None or spec is None:
        return None
    ok = True
    for it in its:
        if not (_SHORT.fullmatch(it.value) or _LONG.fullmatch(it.value) or _SINGLE_DASH_LONG.fullmatch(it.value)):
            env.error(it.key, it.msg(f"{it.value!r} is not an option (expected -x, --name or -name)"))
            ok = False
    return FlagCond(flags=tuple(dict.fromkeys(it.value for it in its)), spec=spec, **base) if ok else None


def _compile_option(raw: Any, key: str, env: Env, base: dict[str, Any]) -> Cond | None:
    allowed = ("flag", "key", "value_glob", "getopt", "options_end")
    if not isinstance(raw, dict):
        env.error(key, f"expected a table ({', '.join(allowed)}), got {tname(raw)}")
        return None
    if not _table_keys(raw, key, allowed, env):
        return None
    ok = True
    for required in ("flag", "key"):
        if required not in raw:
            env.error(f"{key}.{required}", "missing required key")
            ok = False
    if not ok:
        return None
    flag = raw["flag"]
    if not isinstance(flag, str):
        env.error(f"{key}.flag", f"expected a string, got {tname(flag)}")
        return None
    if not (_SHORT.fullmatch(flag) or _LONG.fullmatch(flag)):
        env.error(f"{key}.flag", f"{flag!r} is not an option (expected -x or --name)")
        return None
    keys = _strings(raw["key"], f"{key}.key", env)
    globs: list[Item] | None = []
    if "value_glob" in raw:
        globs = _strings(raw["value_glob"], f"{key}.value_glob", env)
    spec = _opt_spec(raw, key, env, value_flag=flag)
    if keys is None or globs is None or spec is None:
        return None
    return OptionCond(
        flag=flag,
        keys=frozenset(it.value.lower() for it in keys),
        value_globs=tuple(it.value for it in globs),
        spec=spec,
        **base,
    )
