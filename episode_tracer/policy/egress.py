"""Egress mode: the `[[egress]]` tables of the policy files.

    [[egress]]
    name          = "training"            # required: names alerts (rule = name)
    episodes      = "*"                   # required: episode id glob
    allow_names   = ["$egress_names"]     # DNS names: "pypi.org", "*.hf.co" (any depth below)
    allow_cidrs   = ["10.0.0.0/8"]        # any port
    allow_ports   = []                    # to any destination (use sparingly)
    allow_local_ports = ["$egress_local_listeners"]  # loopback listeners of processes outside the episode
    severity      = "high"
    enabled       = true

An episode whose id matches the glob of an enabled entry (the first one, in
file order) is in egress mode: the kernel refuses every connect and UDP send
of its processes (TCP and UDP, IPv4 and IPv6) except to allowed CIDRs, to
allowed ports, to addresses the DNS stub resolved for it from an allowed
name (until the answer's TTL runs out), and, on loopback, to listeners the
episode itself bound or ports in `allow_local_ports`. DNS goes to the
tracer's stub (episode_tracer/dns_stub.py); DNS to any other resolver is refused.

Pure: compiled by the loader (episode_tracer/policy/loader.py), which reports
problems with file, entry and key.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

from .conditions import IPNetwork, items, parse_cidr, parse_port
from .model import Severity

EGRESS_KEYS = ("name", "description", "episodes", "enabled", "severity", "allow_names", "allow_cidrs",
               "allow_ports", "allow_local_ports")
MAX_PROFILES = 63  # one bit each in the kernel's masks (bit 63: not registered yet)
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True)
class EgressProfile:
    name: str
    episodes: str  # glob over episode ids
    description: str = ""
    severity: Severity = Severity.HIGH
    enabled: bool = True
    allow_names: tuple[str, ...] = ()  # lower case, no trailing dot; "*.x.y": any name below x.y
    allow_cidrs: tuple[IPNetwork, ...] = ()
    allow_ports: tuple[tuple[int, int], ...] = ()
    allow_local_ports: tuple[tuple[int, int], ...] = ()
    file: str = ""

    def applies(self, episode: str) -> bool:
        return self.enabled and fnmatch.fnmatchcase(episode, self.episodes)

    def name_allowed(self, qname: str) -> bool:
        return name_allowed(self.allow_names, qname)


def normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def name_allowed(patterns: Iterable[str], qname: str) -> bool:
    """`qname` equals a pattern, or lies below the x.y of a `*.x.y` pattern."""
    q = normalize_name(qname)
    for p in patterns:
        if p.startswith("*."):
            if q.endswith(p[1:]):
                return True
        elif q == p:
            return True
    return False


def parse_name(v: Any) -> str | str:
    """The normalised name pattern, or an error message (starting with '!')."""
    if not isinstance(v, str):
        return f"!expected a DNS name (string), got {type(v).__name__}"
    n = normalize_name(v)
    body = n[2:] if n.startswith("*.") else n
    labels = body.split(".")
    if not body or len(body) > 253 or not all(_LABEL.fullmatch(x) for x in labels):
        return f"!bad DNS name {v!r} (labels of letters, digits, - and _; '*.' only as the first label)"
    return n


def profile_for(profiles: Iterable[EgressProfile], episode: str | None) -> EgressProfile | None:
    """The egress profile of `episode` (first enabled match), or None.
    `episode` None: an episode the tracer has not registered yet; only a
    profile for every episode (`episodes = "*"`) applies."""
    for p in profiles:
        if not p.enabled:
            continue
        if episode is None:
            if p.episodes == "*":
                return p
        elif p.applies(episode):
            return p
    return None


def covers(glob: str, episode_glob: str) -> bool:
    """Does a profile glob cover every episode an episode glob can name?"""
    if glob == "*" or glob == episode_glob:
        return True
    return fnmatch.fnmatchcase(episode_glob, glob)  # literal id, or a glob inside it (approximate)


def compile_profiles(loader: Any, raw_items: list[Any]) -> tuple[EgressProfile, ...]:
    """[[egress]] items (loader RawItems) -> profiles; errors go to the loader."""
    out: list[EgressProfile] = []
    names: set[str] = set()
    for item in raw_items:
        p = _compile_one(loader, item)
        if p is None:
            continue
        if p.name in names:
            loader.error(item.loc, "name", f"egress profile '{p.name}' is defined twice")
            continue
        names.add(p.name)
        out.append(p)
    if len(out) > MAX_PROFILES:
        loader.error(raw_items[MAX_PROFILES].loc, "", f"more than {MAX_PROFILES} egress profiles; the kernel holds {MAX_PROFILES}")
    return tuple(out)


def _compile_one(loader: Any, item: Any) -> EgressProfile | None:
    d, loc = item.data, item.loc
    env = loader.env(loc)
    ok = True
    for key in d:
        if key not in EGRESS_KEYS:
            loader.error(loc, key, f"unknown key (expected one of: {', '.join(EGRESS_KEYS)})")
            ok = False
    name = d.get("name")
    if not isinstance(name, str) or not name:
        loader.error(loc, "name", "an [[egress]] entry needs a name (string)")
        return None
    if not loader._name_ok(loc, name):
        return None
    from dataclasses import replace

    loc = replace(loc, where=f"egress '{name}'")
    env = loader.env(loc)
    episodes = d.get("episodes")
    if not isinstance(episodes, str) or not episodes:
        loader.error(loc, "episodes", "expected an episode id glob (string), e.g. \"*\" or \"train-*\"")
        ok = False
    enabled = d.get("enabled", True)
    if not isinstance(enabled, bool):
        loader.error(loc, "enabled", f"expected true or false, got {type(enabled).__name__}")
        ok = False
    desc = d.get("description", "")
    if not isinstance(desc, str):
        loader.error(loc, "description", "expected a string")
        ok = False
    sev = d.get("severity", "high")
    try:
        severity = Severity(sev)
    except ValueError:
        loader.error(loc, "severity", f"unknown severity {sev!r} (expected one of: {', '.join(s.value for s in Severity)})")
        ok = False
        severity = Severity.HIGH

    def each(key: str, parse) -> tuple[Any, ...]:
        nonlocal ok
        if key not in d:
            return ()
        its = items(d[key], key, env)
        if its is None:
            ok = False
            return ()
        got = []
        for it in its:
            r = parse(it.value)
            if isinstance(r, str) and (parse is not parse_name or r.startswith("!")):
                env.error(it.key, it.msg(r.lstrip("!")))
                ok = False
            else:
                got.append(r)
        return tuple(dict.fromkeys(got))

    names = each("allow_names", parse_name)
    cidrs = each("allow_cidrs", parse_cidr)
    ports = each("allow_ports", parse_port)
    local = each("allow_local_ports", parse_port)
    if 53 in {p for lo, hi in ports for p in (lo, hi)} or any(lo <= 53 <= hi for lo, hi in ports):
        loader.error(loc, "allow_ports", "port 53 cannot be allowed: episode DNS goes through the tracer's stub")
        ok = False
    if not ok:
        return None
    return EgressProfile(name=name, episodes=episodes, description=desc, severity=severity, enabled=enabled,
                         allow_names=names, allow_cidrs=cidrs, allow_ports=tuple(sorted(set(ports))),
                         allow_local_ports=tuple(sorted(set(local))), file=loc.file)


def posture_warnings(policy: Any) -> list[Any]:
    """`policy check` warnings: an episode glob named by a rule that no
    enabled [[egress]] entry covers, and, when profiles exist, the episodes
    none covers, have no egress posture (every destination allowed unless a
    deny rule says otherwise)."""
    from .conditions import StrCond
    from .model import Diagnostic, Level

    out: list[Diagnostic] = []
    enabled = [p for p in getattr(policy, "egress", ()) if p.enabled]
    for rule in policy.rules:
        if not rule.enabled:
            continue
        for cond in rule.match:
            if cond.field != "episode" or not isinstance(cond, StrCond):
                continue
            for g in sorted(cond.exact or ()) + list(cond.globs):
                if not any(covers(p.episodes, g) for p in enabled):
                    out.append(Diagnostic(rule.file, f"rule '{rule.name}'", cond.path,
                                          f"episode glob '{g}' has no egress posture (no [[egress]] entry covers "
                                          f"it: every destination is allowed unless a deny rule says otherwise)",
                                          Level.WARNING))
    if enabled and not any(p.episodes == "*" for p in enabled):
        globs = ", ".join(f"'{p.episodes}'" for p in enabled)
        out.append(Diagnostic(enabled[0].file, f"egress '{enabled[0].name}'", "episodes",
                              f"episodes matching none of {globs} have no egress posture; add an [[egress]] "
                              f"entry with episodes = \"*\" (after the others) to give them one", Level.WARNING))
    return out
