"""The compiled policy and its evaluator."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .context import EvalContext, Subject, record_context
from .hold import Holds
from .kernel import KernelPlan, compile_plan
from .model import Diagnostic, Kind, Rule, Scope, Verdict


@dataclass(frozen=True)
class Policy:
    """All rules of the loaded files, after overrides, in load order.

    `version` identifies the policy in alerts: the git commit of the policy
    files when they are committed and clean, `<commit>-dirty+<hash>` when
    modified, else `sha256:<hash>` of their content (12 hex digits).
    """

    rules: tuple[Rule, ...]
    version: str
    files: tuple[str, ...] = ()
    egress: tuple[Any, ...] = ()  # EgressProfile (episode_tracer/policy/egress.py), file order
    _enabled: Mapping[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)
    _plan: KernelPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_kind: dict[str, list[Rule]] = {k.value: [] for k in Kind}
        for rule in self.rules:
            if rule.enabled:
                by_kind[rule.on.value].append(rule)
        object.__setattr__(self, "_enabled", {k: tuple(v) for k, v in by_kind.items()})
        object.__setattr__(self, "_plan", compile_plan(self.rules))

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def rules_for(self, kind: Kind | str, *, include_disabled: bool = False) -> tuple[Rule, ...]:
        """Rules for events of `kind` (enabled ones unless asked otherwise)."""
        key = kind.value if isinstance(kind, Kind) else kind
        if include_disabled:
            return tuple(r for r in self.rules if r.on.value == key)
        return self._enabled.get(key, ())

    def evaluate(
        self, event: Mapping[str, Any], ctx: EvalContext | None = None, holds: Holds | None = None
    ) -> list[Verdict]:
        """Verdicts of the enabled rules for event['type'] that match.

        Rules with scope "episodes" only see events whose `episode` is not
        None. Pure: `ctx` (default: facts carried by the record, see
        :func:`record_context`) is only asked for what a rule needs, once.

        Rules with a duration (`for_s`) need the stream, not one record:
        they are evaluated only when `holds` (the caller's state, see
        episode_tracer.policy.hold) is given, and fire once their conditions have
        held for `for_s` seconds of samples; `matched` then carries
        `held_s`.
        """
        rules = self._enabled.get(event.get("type"), ())  # type: ignore[arg-type]
        if not rules:
            return []
        subject = Subject(event, ctx if ctx is not None else record_context(event))
        in_episode = event.get("episode") is not None
        out: list[Verdict] = []
        for rule in rules:
            if rule.for_s is not None and holds is None:
                continue
            if rule.scope is Scope.EPISODES and not in_episode:
                matched = None
            else:
                matched = rule.evaluate(subject)
            if rule.for_s is not None:
                held = holds.update(rule.name, rule.for_s, event, matched is not None)  # type: ignore[union-attr]
                if held is None:
                    continue
                matched = {**matched, "held_s": round(held, 3)}  # type: ignore[dict-item]
            if matched is not None:
                out.append(Verdict(rule.name, rule.severity, rule.action, matched, rule.description, rule.tags))
        return out

    def rule_verdict(self, name: str, matched: Mapping[str, Any]) -> Verdict:
        """The verdict rule `name` gives when something else (the kernel)
        decided it matched, e.g. a connect refused by deny rule bit N.
        KeyError for an unknown rule."""
        rule = self.rule(name)
        if rule is None:
            raise KeyError(name)
        return Verdict(rule.name, rule.severity, rule.action, dict(matched), rule.description, rule.tags)

    def kernel_plan(self) -> KernelPlan:
        return self._plan


@dataclass(frozen=True)
class LoadResult:
    """policy is None iff there are errors."""

    policy: Policy | None
    errors: list[Diagnostic]
    warnings: list[Diagnostic]
    files: tuple[str, ...] = ()
    rule_count: int = 0
    # list name -> the rules that read it (directly, through macros or other lists)
    list_readers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors
