"""What the kernel enforces: the compiled :class:`KernelPlan` of a policy.

Only enabled rules whose action enforces (deny, kill, kill-episode,
freeze-episode) contribute. User space still evaluates every rule on every
event; the plan is the part that happens before user space sees anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .conditions import CidrCond, Cond, EnumCond, IPNetwork, PortCond, StrCond
from .model import Action, Kind, Rule, Scope

COMM_LEN = 15  # TASK_COMM_LEN - 1: the kernel keeps the first 15 bytes of the basename
MAX_DENY_RULES = 63

# Fields of a connect deny rule the cgroup sock_addr program can evaluate
# (episode is resolved to cgroups by user space when it fills the maps).
KERNEL_CONNECT_FIELDS = ("addr", "port", "family", "protocol", "sock_type", "episode")
DENY_KINDS = (Kind.EXEC, Kind.CONNECT, Kind.GPU_OPEN, Kind.PROTOCOL)  # protocol: the flow dropped in the packet path
_SOCK_TYPE_PROTOCOL = {"stream": "tcp", "dgram": "udp"}


@dataclass(frozen=True)
class DenyRule:
    """One connect/sendmsg deny rule for the cgroup sock_addr programs.

    A connect (or an unconnected UDP sendmsg) is denied when the socket
    family is in `families`, the destination is in `cidrs` (empty: any), the
    port in `ports` (empty: any), the protocol in `protocols` (empty: tcp and
    udp), and the destination is in none of `except_cidrs` and its port in
    none of `except_ports`. IPv4 networks also apply to IPv4-mapped IPv6
    destinations (`::ffff:a.b.c.d`) on inet6 sockets: the connect6 and
    sendmsg6 programs must test the mapped address against them, or an
    AF_INET6 socket walks around an IPv4 deny. `episode_glob` (None: every
    episode) selects the episode cgroups the rule applies to; with scope
    `all` the rule applies to every process on the node.
    """

    name: str
    index: int  # 0..62: bit index in the per-cgroup rule mask
    families: frozenset[str]
    cidrs: tuple[IPNetwork, ...]
    ports: tuple[tuple[int, int], ...]
    protocols: frozenset[str]
    except_cidrs: tuple[IPNetwork, ...]
    except_ports: tuple[tuple[int, int], ...]
    episode_glob: str | None
    scope: Scope


@dataclass(frozen=True)
class UnixDenyRule:
    """One unix-socket connect deny rule for the cgroup unix-connect program
    (episode_tracer/bpf/nodesvc.h): an episode's connect() to a unix socket whose path is
    one of `paths` (exact; `@name` is an abstract socket) or starts with one
    of `prefixes` (written `prefix*` in the policy) is refused with EPERM,
    unless the episode bound that path itself (a tmux server it started).
    Applies to every episode; up to 63 rules (bit = index)."""

    name: str
    index: int
    paths: tuple[str, ...]
    prefixes: tuple[str, ...]


@dataclass(frozen=True)
class KernelPlan:
    """In-kernel enforcement compiled from the policy.

    kill_comms: exec rules with action deny or kill whose only condition is an
        exact basename (or comm) of at most 15 bytes: the exec tracepoint
        kills these by task comm, no user-space round trip. Applies to
        episode processes; names also in `kill_comms_all` apply to every
        process (scope = "all").
    gate_comms: comms (basenames truncated to 15 bytes) of exec rules with an
        enforcing action that need user-space judgement (argv, ancestry,
        hash, except, kill-episode ...): the exec tracepoint stops these with
        SIGSTOP until user space rules. `gate_comms_all`: the same for every
        process.
    gate_all: some enforcing exec rule has no exact name to gate by (glob,
        regex, fileless, hash only ...): every exec of an episode process is
        gated. `gate_all_global`: such a rule has scope = "all": every exec
        on the node is gated.
    deny: connect/sendmsg deny rules, at most 63, index = position.
    gpu_open_kill: an enabled `gpu_open` rule with action deny: an episode
        process without the GPU right (episode_tracer.gpu_allow) that opens a GPU
        device (any path under the GPU prefixes) is killed in the kernel at
        the open; every exec of an episode process is gated then, so that
        an exec that keeps the right gets it back before the image runs.
    unix_deny: unix-socket connect deny rules (`family = "unix"` with a
        `path`), at most 63, their own index space.

    How the exec tracepoint uses it:
        episode process: SIGKILL if comm in kill_comms; else SIGSTOP (gate)
            if comm in gate_comms or gate_all.
        other process: SIGKILL if comm in kill_comms_all; else SIGSTOP if
            comm in gate_comms_all or gate_all_global.

    Names are str; a name cut inside a multi-byte character keeps the cut
    bytes as surrogate escapes: `name.encode("utf-8", "surrogateescape")`
    gives the exact bytes to compare with the task comm.
    """

    kill_comms: frozenset[str] = frozenset()
    kill_comms_all: frozenset[str] = frozenset()
    gate_comms: frozenset[str] = frozenset()
    gate_comms_all: frozenset[str] = frozenset()
    gate_all: bool = False
    gate_all_global: bool = False
    deny: tuple[DenyRule, ...] = ()
    gpu_open_kill: bool = False
    unix_deny: tuple[UnixDenyRule, ...] = ()


def comm_of(name: str) -> tuple[str, bool]:
    """(the task comm the kernel would show for basename `name`, truncated?)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= COMM_LEN:
        return name, False
    return raw[:COMM_LEN].decode("utf-8", "surrogateescape"), True


def _exact_names(cond: Cond) -> frozenset[str] | None:
    if isinstance(cond, StrCond) and cond.field in ("basename", "comm") and cond.exact is not None:
        return cond.exact
    return None


def _pure_exact(cond: Cond) -> bool:
    return isinstance(cond, StrCond) and _exact_names(cond) is not None and not cond.globs and not cond.regexes


def _gate_names(rule: Rule) -> frozenset[str] | None:
    """Names that every exec the rule can match has, preferring comm."""
    for wanted in ("comm", "basename"):
        for cond in rule.match:
            if cond.field == wanted:
                names = _exact_names(cond)
                if names is not None:
                    return names
    return None


def compile_plan(rules: Iterable[Rule]) -> KernelPlan:
    kill: set[str] = set()
    kill_all: set[str] = set()
    gate: set[str] = set()
    gate_all_names: set[str] = set()
    gate_all = False
    gate_global = False
    deny: list[DenyRule] = []
    gpu_open_kill = False
    unix: list[UnixDenyRule] = []
    for rule in rules:
        if not rule.enabled or not rule.action.enforces:
            continue
        everywhere = rule.scope is Scope.ALL
        if rule.on is Kind.CONNECT and rule.action is Action.DENY:
            if is_unix_deny(rule.match):
                unix.append(unix_deny_rule(rule, len(unix)))
            else:
                deny.append(deny_rule(rule, len(deny)))
            continue
        if rule.on is Kind.GPU_OPEN and rule.action is Action.DENY:
            gpu_open_kill = True
            continue
        if rule.on is not Kind.EXEC:
            continue
        kills = rule.action in (Action.DENY, Action.KILL)
        only_name = kills and not rule.excepts and len(rule.match) == 1 and _pure_exact(rule.match[0])
        names = _gate_names(rule)
        if names is None:
            gate_all = True
            gate_global = gate_global or everywhere
            continue
        for name in names:
            comm, truncated = comm_of(name)
            # A truncated name would kill every longer name sharing the first
            # 15 bytes: gate those and let user space compare the full name.
            if only_name and not truncated:
                kill.add(comm)
                if everywhere:
                    kill_all.add(comm)
            else:
                gate.add(comm)
                if everywhere:
                    gate_all_names.add(comm)
    if len(deny) > MAX_DENY_RULES:
        raise ValueError(f"{len(deny)} connect deny rules; the kernel holds {MAX_DENY_RULES}")
    if len(unix) > MAX_DENY_RULES:
        raise ValueError(f"{len(unix)} unix connect deny rules; the kernel holds {MAX_DENY_RULES}")
    return KernelPlan(
        kill_comms=frozenset(kill),
        kill_comms_all=frozenset(kill_all),
        gate_comms=frozenset(gate - kill),
        gate_comms_all=frozenset(gate_all_names - kill_all),
        gate_all=gate_all,
        gate_all_global=gate_global,
        deny=tuple(deny),
        gpu_open_kill=gpu_open_kill,
        unix_deny=tuple(unix),
    )


# ---------------------------------------------------------------- unix deny


def is_unix_deny(match: Sequence[Cond]) -> bool:
    """A connect deny rule for unix sockets: its family condition is unix only."""
    for cond in match:
        if isinstance(cond, EnumCond) and cond.field == "family":
            return set(cond.values) == {"unix"}
    return False


def _path_pattern(glob: str) -> tuple[str, bool] | None:
    """(text, is_prefix) of a path glob the kernel can match: no wildcard
    (exact) or a single trailing '*' (prefix); None otherwise."""
    body = glob[:-1] if glob.endswith("*") else glob
    if any(c in body for c in "*?["):
        return None
    return body, glob.endswith("*")


def unix_deny_rule(rule: Rule, index: int) -> UnixDenyRule:
    paths: list[str] = []
    prefixes: list[str] = []
    for cond in rule.match:
        if isinstance(cond, StrCond) and cond.field == "path":
            paths.extend(sorted(cond.exact or ()))
            for g in cond.globs:
                got = _path_pattern(g)
                if got is not None:
                    (prefixes if got[1] else paths).append(got[0])
    return UnixDenyRule(rule.name, index, tuple(dict.fromkeys(paths)), tuple(dict.fromkeys(prefixes)))


def _unix_problems(match: Sequence[Cond], excepts: Sequence[Sequence[Cond]], scope: Scope) -> list["DenyProblem"]:
    out: list[DenyProblem] = []
    if scope is Scope.ALL:
        out.append(DenyProblem(None, None, 'a unix deny applies to episodes only; use scope = "episodes"'))
    path = None
    for cond in match:
        if cond.field == "family":
            continue
        if cond.field != "path" or not isinstance(cond, StrCond):
            out.append(DenyProblem(None, cond, f"a unix deny rule is enforced by the cgroup unix-connect program, "
                                               f"which can test only 'path'; cannot evaluate '{cond.field}'"))
            continue
        path = cond
        if cond.regexes:
            out.append(DenyProblem(None, cond, "the kernel matches unix paths exactly or by prefix ('prefix*'); no regex"))
        if cond.exact is not None and cond.globs:
            out.append(DenyProblem(None, cond, "give the paths either as exact values or as globs, not both"))
        for g in cond.globs:
            if _path_pattern(g) is None:
                out.append(DenyProblem(None, cond, f"path glob '{g}': the kernel matches unix paths exactly or by "
                                                   f"prefix; only a single trailing '*' is allowed"))
        for v in list(cond.exact or ()) + list(cond.globs):
            if len(v.rstrip("*").encode()) > 107:
                out.append(DenyProblem(None, cond, f"path '{v}' is longer than a unix socket path (107 bytes)"))
    if path is None:
        out.append(DenyProblem(None, None, "a unix deny rule needs a 'path' condition (exact paths or 'prefix*')"))
    for i, _group in enumerate(excepts):
        out.append(DenyProblem(i, None, "a unix deny rule takes no except: shrink its path list with an override"))
    return out


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _episode_glob(cond: StrCond) -> str | None:
    if cond.exact is not None:
        return _glob_escape(next(iter(cond.exact)))
    return cond.globs[0] if cond.globs else None


def _protocols(conds: Sequence[Cond]) -> frozenset[str] | None:
    """tcp/udp allowed by the protocol and sock_type conditions (None: any)."""
    allowed: frozenset[str] | None = None
    for cond in conds:
        if not isinstance(cond, EnumCond):
            continue
        if cond.field == "protocol":
            values = frozenset(cond.values)
        elif cond.field == "sock_type":
            values = frozenset(_SOCK_TYPE_PROTOCOL[v] for v in cond.values if v in _SOCK_TYPE_PROTOCOL)
        else:
            continue
        allowed = values if allowed is None else allowed & values
    return allowed


def deny_rule(rule: Rule, index: int) -> DenyRule:
    cidrs: tuple[IPNetwork, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    families = frozenset({"inet", "inet6"})
    episode: str | None = None
    for cond in rule.match:
        if isinstance(cond, CidrCond):
            cidrs = cond.nets
        elif isinstance(cond, PortCond):
            ports = cond.ranges
        elif isinstance(cond, EnumCond) and cond.field == "family":
            families = frozenset(cond.values)
        elif isinstance(cond, StrCond) and cond.field == "episode":
            episode = _episode_glob(cond)
    except_cidrs: list[IPNetwork] = []
    except_ports: list[tuple[int, int]] = []
    for group in rule.excepts:
        for cond in group:
            if isinstance(cond, CidrCond):
                except_cidrs.extend(cond.nets)
            elif isinstance(cond, PortCond):
                except_ports.extend(cond.ranges)
    return DenyRule(
        name=rule.name,
        index=index,
        families=families,
        cidrs=cidrs,
        ports=ports,
        protocols=_protocols(rule.match) or frozenset(),
        except_cidrs=tuple(dict.fromkeys(except_cidrs)),
        except_ports=tuple(sorted(set(except_ports))),
        episode_glob=episode,
        scope=rule.scope,
    )


# --------------------------------------------------------------------------
# validation of deny rules (used by the loader, which knows where things are)


@dataclass(frozen=True)
class DenyProblem:
    group: int | None  # None: the match table; N: except entry N
    cond: Cond | None  # None: the whole group / the action
    message: str


def deny_problems(
    on: Kind, match: Sequence[Cond], excepts: Sequence[Sequence[Cond]], scope: Scope = Scope.EPISODES
) -> list[DenyProblem]:
    """Why a rule with action deny cannot be enforced in the kernel."""
    if on not in DENY_KINDS:
        return [
            DenyProblem(
                None,
                None,
                f"deny is enforced in the kernel, which can deny only exec, connect, gpu_open and protocol (a flow); "
                f"use action = \"kill\" for '{on.value}' events",
            )
        ]
    if on is Kind.EXEC or on is Kind.PROTOCOL:
        return []
    if on is Kind.GPU_OPEN:
        return _gpu_deny_problems(match, excepts, scope)
    if is_unix_deny(match):
        return _unix_problems(match, excepts, scope)
    out: list[DenyProblem] = []
    seen: set[str] = set()
    for cond in match:
        problem = _kernel_cond_problem(cond)
        if problem is None and cond.field in seen:
            problem = f"a deny rule can constrain '{cond.field}' only once"
        if problem is None and cond.field == "episode" and scope is Scope.ALL:
            problem = 'scope = "all" applies the deny to every process; with an episode condition use scope = "episodes"'
        seen.add(cond.field)
        if problem:
            out.append(DenyProblem(None, cond, problem))
    if _protocols(match) == frozenset() and not any(p.cond and p.cond.field in ("protocol", "sock_type") for p in out):
        cond = next(c for c in match if c.field in ("protocol", "sock_type"))
        out.append(DenyProblem(None, cond, "protocol and sock_type never agree: the rule can never match"))
    for i, group in enumerate(excepts):
        bad = [c for c in group if c.field not in ("addr", "port")]
        for cond in bad:
            out.append(DenyProblem(i, cond, _non_kernel(cond.field)))
        if not bad and len(group) != 1:
            out.append(
                DenyProblem(
                    i,
                    None,
                    "each except entry of a deny rule holds exactly one of addr or port "
                    "(the kernel tests except addresses and except ports separately)",
                )
            )
    return out


def _gpu_deny_problems(match: Sequence[Cond], excepts: Sequence[Sequence[Cond]], scope: Scope) -> list[DenyProblem]:
    """A gpu_open deny is the kernel's kill of an episode process without the
    GPU right at any open under the GPU device prefixes: nothing else can be
    said in the kernel."""
    out: list[DenyProblem] = []
    for cond in match:
        out.append(DenyProblem(None, cond, (
            f"action \"deny\" on 'gpu_open' events kills, in the kernel, every episode process without the GPU "
            f"right that opens a device under the GPU prefixes; it takes no match conditions ('{cond.field}'); "
            f"use action = \"kill\" for a narrower rule")))
    if scope is Scope.ALL:
        out.append(DenyProblem(None, None, 'a gpu_open deny applies to episode processes only; use scope = "episodes"'))
    ok = len(excepts) == 1 and len(excepts[0]) == 1 and excepts[0][0].field == "gpu_allowed" \
        and getattr(excepts[0][0], "value", None) is True
    if not ok:
        out.append(DenyProblem(None, None, (
            "a gpu_open deny needs exactly except = [ { gpu_allowed = true } ]: the kernel spares "
            "the processes holding the GPU right and nothing else")))
    return out


def _non_kernel(field: str) -> str:
    return (
        f"action \"deny\" on 'connect' events is enforced in the kernel, which cannot evaluate '{field}'; "
        f"use action = \"kill\""
    )


def _kernel_cond_problem(cond: Cond) -> str | None:
    if cond.field not in KERNEL_CONNECT_FIELDS:
        return _non_kernel(cond.field)
    if cond.field == "family" and isinstance(cond, EnumCond):
        bad = sorted(str(v) for v in cond.values if v not in ("inet", "inet6"))
        if bad:
            return f"deny covers inet and inet6 sockets only (cgroup connect4/connect6); cannot deny {', '.join(bad)}"
    if cond.field == "sock_type" and isinstance(cond, EnumCond):
        bad = sorted(str(v) for v in cond.values if v not in _SOCK_TYPE_PROTOCOL)
        if bad:
            return f"deny can match sock_type stream or dgram only; cannot deny {', '.join(bad)}"
    if cond.field == "episode" and isinstance(cond, StrCond):
        n = len(cond.exact or ()) + len(cond.globs)
        if cond.regexes or n != 1 or (cond.exact and cond.globs):
            return "a deny rule takes one episode id or one glob (no regex, no lists)"
    return None

