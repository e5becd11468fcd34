"""The penalty hook: an episode's summary -> (reward adjustment, terminated).

A pure function in the shape RL frameworks use (docs/episodes.md "Trainer
API"): the trainer calls it with `EpisodeResult.summary()` (or the verdict
file's summary) and adds the adjustment to the rollout's reward; terminated
says the rollout must not be continued or bootstrapped from (the episode was
stopped, or an enforced alert of a weight in `terminate_on` fired).

    from episode_tracer.penalty import Penalty, penalty

    adj, done = penalty(res.summary())                 # the default weights
    adj, done = Penalty(per_alert=-0.1, killed=-5.0)(res.summary())
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SEVERITY_WEIGHT = {"low": 0.25, "medium": 0.5, "high": 1.0, "critical": 2.0}


@dataclass(frozen=True)
class Penalty:
    per_alert: float = -0.1  # times the alert's severity weight (SEVERITY_WEIGHT; unknown: 1)
    enforced: float = -0.5  # more for each alert the tracer enforced (denied, killed, froze)
    killed: float = -1.0  # the episode was killed or frozen by policy (or by an operator through the tracer)
    floor: float = -10.0  # the adjustment never goes below this
    terminate_on: frozenset[str] = field(default_factory=lambda: frozenset({"kill-episode", "freeze-episode"}))

    def __call__(self, summary: Mapping[str, Any]) -> tuple[float, bool]:
        alerts = summary.get("alerts") or []
        adj = 0.0
        terminated = bool(summary.get("killed_by_policy"))
        for a in alerts:
            adj += self.per_alert * SEVERITY_WEIGHT.get(str(a.get("severity")), 1.0)
            if a.get("enforced"):
                adj += self.enforced
                if a.get("action") in self.terminate_on:
                    terminated = True
        if summary.get("killed_by_policy"):
            adj += self.killed
        return max(adj, self.floor), terminated


penalty = Penalty()
