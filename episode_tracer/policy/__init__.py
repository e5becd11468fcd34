"""The policy language: loading, validation, evaluation, kernel plan.

    result = load_policy(["episode_tracer/policies/"])
    for d in result.errors + result.warnings:
        print(d)
    policy = result.policy            # None iff result.errors
    verdicts = policy.evaluate(event, ctx)
    plan = policy.kernel_plan()

The language is documented in docs/policies.md.
"""
from __future__ import annotations

from .context import EvalContext, record_context
from .hold import Holds
from .kernel import DenyRule, KernelPlan
from .loader import load_policy
from .model import (
    Action,
    Diagnostic,
    Kind,
    Level,
    Op,
    OptionsEnd,
    Rule,
    Scope,
    Severity,
    Verdict,
)
from .policy import LoadResult, Policy

__all__ = [
    "Action",
    "DenyRule",
    "Diagnostic",
    "EvalContext",
    "Holds",
    "KernelPlan",
    "Kind",
    "Level",
    "LoadResult",
    "Op",
    "OptionsEnd",
    "Policy",
    "Rule",
    "Scope",
    "Severity",
    "Verdict",
    "load_policy",
    "record_context",
]
