"""A TRL-style reward function whose rollouts run as traced episodes.

TRL's GRPOTrainer (and most reward-function APIs like it) calls
``reward_fn(prompts, completions, **kwargs) -> list[float]``. Here each
completion is a shell command the agent proposed; it runs as its own episode
and the tracer's verdict becomes a reward adjustment (episode_tracer/penalty.py).

    trainer = GRPOTrainer(model=..., reward_funcs=[make_reward_fn(run_id="exp7")], ...)

`run` is injectable so a test (tests/test_penalty.py) drives it with a
stand-in trainer loop.
"""
from __future__ import annotations

from typing import Any, Callable

from episode_tracer.api import run_episode
from episode_tracer.penalty import Penalty, penalty as default_penalty


def make_reward_fn(run_id: str = "run", run: Callable[..., Any] = run_episode,
                   hook: Penalty = default_penalty, **run_kw: Any) -> Callable[..., list[float]]:
    step = {"n": 0}

    def tracer_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        step["n"] += 1
        rewards = []
        for i, completion in enumerate(completions):
            res = run(f"{run_id}-s{step['n']}-r{i}", ["/bin/sh", "-c", completion], **run_kw)
            adj, terminated = hook(res.summary())
            task = 0.0 if terminated else (1.0 if res.exit_code == 0 else 0.0)
            rewards.append(task + adj)
        return rewards

    tracer_reward.__name__ = "tracer_reward"  # TRL logs reward functions by name
    return tracer_reward
