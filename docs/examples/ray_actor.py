"""A Ray actor that runs rollouts as traced episodes.

In a Ray job (verl's agent loop, OpenRLHF, SkyRL style), one actor per node
runs rollouts; run_episode needs no preexec_fn, so it is safe in the actor's
threads, and without root it goes through the tracer's control socket
(docs/episodes.md "Trainer API"):

    import ray
    Rollouts = ray.remote(num_cpus=1)(RolloutActor)
    actor = Rollouts.remote()
    out = ray.get(actor.rollout.remote("exp7-s3-r0", ["python", "agent.py"]))
    reward = task_reward + out["reward_adj"]; done = out["terminated"]

The class itself is plain Python, so tests (tests/test_penalty.py) run it
with a stand-in trainer loop, without Ray installed.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from episode_tracer.api import run_episode
from episode_tracer.penalty import Penalty, penalty as default_penalty


class RolloutActor:
    def __init__(self, run: Callable[..., Any] = run_episode, hook: Penalty = default_penalty, **run_kw: Any):
        self.run, self.hook, self.run_kw = run, hook, run_kw

    def rollout(self, episode_id: str, argv: Sequence[str]) -> dict[str, Any]:
        res = self.run(episode_id, list(argv), **self.run_kw)
        summary = res.summary()
        adj, terminated = self.hook(summary)
        return {"episode": episode_id, "exit_code": res.exit_code, "reward_adj": adj,
                "terminated": terminated, "alerts": summary["counts"]["alerts"]}
