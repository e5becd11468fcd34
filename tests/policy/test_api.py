"""Public API shape: frozen values, enums, rules_for, rule_verdict."""
from __future__ import annotations

import dataclasses

import pytest

from episode_tracer.policy import Action, Kind, Policy, Rule, Scope, Severity, Verdict

from .helpers import DATA, load_ok


def test_rules_are_frozen_and_typed() -> None:
    policy = load_ok(DATA / "eval" / "except_scope.toml")
    rule = policy.rules[0]
    assert isinstance(rule, Rule)
    assert (rule.name, rule.on, rule.action, rule.severity, rule.scope) == (
        "nc-in-episodes",
        Kind.EXEC,
        Action.KILL,
        Severity.MEDIUM,
        Scope.EPISODES,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.enabled = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.version = "x"  # type: ignore[misc]


def test_rules_for() -> None:
    policy = load_ok(DATA / "eval" / "except_scope.toml")
    assert [r.name for r in policy.rules_for(Kind.EXEC)] == ["nc-in-episodes", "nc-everywhere"]
    assert [r.name for r in policy.rules_for("exec", include_disabled=True)] == [
        "nc-in-episodes",
        "nc-everywhere",
        "disabled",
    ]
    assert policy.rules_for("connect") == ()
    assert policy.rules_for("nonsense") == ()


def test_rule_verdict() -> None:
    policy = load_ok(DATA / "eval" / "net.toml")
    v = policy.rule_verdict("mining-port", {"addr": "1.2.3.4", "port": 3333})
    assert v == Verdict("mining-port", Severity.HIGH, Action.DENY, {"addr": "1.2.3.4", "port": 3333}, "", ())
    with pytest.raises(KeyError):
        policy.rule_verdict("nope", {})


def test_evaluate_ignores_unknown_types_and_garbage() -> None:
    policy = load_ok(DATA / "eval" / "argv.toml")
    assert policy.evaluate({"type": "fork"}) == []
    assert policy.evaluate({}) == []
    garbage = {"type": "exec", "episode": "e", "exe": 5, "argv": "ssh -R x", "uid": "0"}
    assert policy.evaluate(garbage) == []


def test_severity_rank_and_action_enforces() -> None:
    assert [s.rank for s in Severity] == [0, 1, 2, 3, 4]
    assert {a for a in Action if a.enforces} == {
        Action.DENY,
        Action.KILL,
        Action.KILL_EPISODE,
        Action.FREEZE_EPISODE,
    }


def test_load_result_counts() -> None:
    from episode_tracer.policy import load_policy

    res = load_policy([DATA / "eval" / "overrides"])
    assert res.ok and isinstance(res.policy, Policy)
    assert res.rule_count == 5
    assert [p.rsplit("/", 1)[-1] for p in res.files] == ["10-pack.toml", "20-site.toml"]
