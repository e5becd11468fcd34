"""Replay recorded events through a policy (pure; no enforcement)."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

from .context import record_context
from .hold import Holds
from .model import Kind
from .policy import Policy

_KINDS = frozenset(k.value for k in Kind)


def alert_record(record: Mapping[str, Any], verdict: Any, policy_version: str) -> dict[str, Any]:
    """The JSONL `alert` record for `verdict` on `record`, as monitor mode
    writes it: enforced is False and `would` names the action."""
    return {
        "type": "alert",
        "ts": record.get("ts"),
        "rule": verdict.rule,
        "severity": verdict.severity.value,
        "action": verdict.action.value,
        "enforced": False,
        "would": verdict.action.value,
        "episode": record.get("episode"),
        "pid": record.get("pid"),
        "exe": record.get("exe"),
        "argv": record.get("argv"),
        "matched": dict(verdict.matched),
        "policy_version": policy_version,
        "description": verdict.description,
    }


def replay(records: Iterable[Mapping[str, Any]], policy: Policy) -> Iterator[dict[str, Any]]:
    """Alert dicts for the records, in order. Context (ancestors, sha256)
    comes from the records themselves (see record_context); durations
    (`for_s`) are counted over the records' own timestamps."""
    holds = Holds()
    for record in records:
        if record.get("type") not in _KINDS:
            continue
        for verdict in policy.evaluate(record, record_context(record), holds):
            yield alert_record(record, verdict, policy.version)
