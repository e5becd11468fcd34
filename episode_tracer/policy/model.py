"""Value types of the policy language: enums, diagnostics, verdicts, rules.

Everything here is immutable. The compiled conditions live in
:mod:`episode_tracer.policy.conditions`; a :class:`Rule` holds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .conditions import Cond


class Severity(str, Enum):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 (info) .. 4 (critical), for sorting and thresholds."""
        return list(Severity).index(self)


class Action(str, Enum):
    LOG = "log"
    ALERT = "alert"
    DENY = "deny"
    KILL = "kill"
    KILL_EPISODE = "kill-episode"
    FREEZE_EPISODE = "freeze-episode"

    @property
    def enforces(self) -> bool:
        """True for actions that stop something (everything but log/alert)."""
        return self not in (Action.LOG, Action.ALERT)


class Kind(str, Enum):
    """Event kinds a rule can be written for (`on = ...`)."""

    EXEC = "exec"
    CONNECT = "connect"
    SOCKET = "socket"
    BIND = "bind"
    LISTEN = "listen"
    MEMFD = "memfd"
    GPU = "gpu"
    GPU_OPEN = "gpu_open"
    PROTOCOL = "protocol"
    RELAY = "relay"  # the reverse-tunnel shape (episode_tracer/relay.py)
    GPU_BUDGET = "gpu_budget"  # windowed GPU use of an episode's processes without the GPU right
    ESCAPE = "escape"  # an episode member moved to a cgroup outside its episode (episode_tracer/membership.py)
    DATAGRAM = "datagram"  # an episode's UDP datagram to an outside host (episode_tracer/bpf/udp.h, episode_tracer/datagram.py)


class Scope(str, Enum):
    EPISODES = "episodes"
    ALL = "all"


class Level(str, Enum):
    ERROR = "error"
    WARNING = "warning"


class Op(str, Enum):
    """Operators of an operator table (`{ glob = [...] }`)."""

    IN = "in"
    GLOB = "glob"
    REGEX = "regex"
    DOMAIN = "domain"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"


class OptionsEnd(str, Enum):
    """Where option scanning of argv stops (argv_flag / argv_option)."""

    NONE = "none"  # scan every argument, `--` included
    DOUBLE_DASH = "double_dash"  # stop at `--` (GNU getopt, the default)
    FIRST_POSITIONAL = "first_positional"  # POSIX getopt: stop at the first operand
    SECOND_POSITIONAL = "second_positional"  # OpenSSH: `ssh [opts] dest [opts] cmd...`


def enum_values(enum: type[Enum]) -> str:
    return ", ".join(str(m.value) for m in enum)


@dataclass(frozen=True)
class Diagnostic:
    """One validation problem, printed as `{file}: {where}: {key}: {message}`.

    `where` is `rule 'name'` (or `rule #N` when the rule has no usable name),
    `list 'x'`, `macro 'y'`, `override #N`, or empty for file-level problems;
    `key` is the dotted key path inside that place (may be empty).
    """

    file: str
    where: str
    key: str
    message: str
    level: Level = Level.ERROR

    def __str__(self) -> str:
        head = ": ".join(p for p in (self.file, self.where, self.key) if p)
        return f"{head}: {self.message}"


@dataclass(frozen=True)
class Verdict:
    """A rule that matched an event."""

    rule: str
    severity: Severity
    action: Action
    matched: dict[str, Any]
    description: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """A compiled rule. `match` conditions are ANDed; the rule does not fire
    when every condition of any one `excepts` entry holds."""

    name: str
    description: str
    severity: Severity
    on: Kind
    action: Action
    scope: Scope
    enabled: bool
    tags: tuple[str, ...]
    match: tuple["Cond", ...]
    excepts: tuple[tuple["Cond", ...], ...]
    file: str = field(default="", compare=False)
    for_s: float | None = None  # gpu rules: the conditions must hold this long (episode_tracer.policy.hold)

    def evaluate(self, subject: Any) -> dict[str, Any] | None:
        """The matched fields when the rule fires for `subject`, else None.

        Ignores `enabled` and `scope`; :meth:`Policy.evaluate` handles those.
        """
        matched: dict[str, Any] = {}
        for cond in self.match:
            value = cond.test(subject)
            if value is NO_MATCH:
                return None
            matched.setdefault(cond.field, value)
        for group in self.excepts:
            if all(cond.test(subject) is not NO_MATCH for cond in group):
                return None
        return matched


class _NoMatch:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_MATCH"


NO_MATCH: Any = _NoMatch()
"""Returned by a condition's test when it does not hold (a matched value may
itself be falsy: port 0, uid 0)."""
