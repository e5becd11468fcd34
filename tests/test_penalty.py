"""The penalty hook (episode_tracer/penalty.py) and its docs/examples (a TRL-style
reward function, a Ray actor), run with a stand-in trainer loop: pure
summaries everywhere; real episodes as root."""
from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import pytest

from episode_tracer.api import EpisodeResult
from episode_tracer.penalty import Penalty, penalty

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def alert(severity="high", action="alert", enforced=False, rule="r"):
    return {"type": "alert", "rule": rule, "severity": severity, "action": action, "enforced": enforced}


def test_clean_episode_costs_nothing():
    assert penalty(EpisodeResult("e", 0, None, False).summary()) == (0.0, False)


def test_alerts_enforcement_and_kill_add_up_and_terminate():
    s = EpisodeResult("e", None, 9, True, [alert("critical", "kill-episode", True), alert("low")]).summary()
    adj, done = penalty(s)
    assert done is True
    assert adj == pytest.approx(-0.1 * 2.0 - 0.5 - 0.1 * 0.25 - 1.0)
    # an enforced deny alone does not end the rollout; the floor bounds the sum
    adj, done = Penalty(per_alert=-1.0, floor=-3.0)(EpisodeResult("e", 1, None, False,
                                                                 [alert(action="deny", enforced=True)] * 9).summary())
    assert (adj, done) == (-3.0, False)


class Fake:
    """A stand-in for run_episode: results shaped as it returns them."""

    def __init__(self):
        self.calls = []

    def __call__(self, ep, argv, **kw):
        self.calls.append((ep, argv))
        if "miner" in argv[-1]:
            return EpisodeResult(ep, None, 9, True, [alert("critical", "kill-episode", True, "crypto-miner")])
        return EpisodeResult(ep, 0 if "exit 0" in argv[-1] else 1, None, False)


def test_trl_reward_fn_in_a_stand_in_trainer_loop():
    run = Fake()
    reward_fn = example("trl_reward").make_reward_fn(run_id="t", run=run)
    history = []
    for _step in range(3):  # the trainer: one batch of completions per step
        history.append(reward_fn(["p"] * 3, ["exit 0", "exit 1", "./miner"]))
    assert history[0] == [1.0, 0.0, pytest.approx(-0.2 - 0.5 - 1.0)]
    assert [ep for ep, _ in run.calls][:3] == ["t-s1-r0", "t-s1-r1", "t-s1-r2"]
    assert run.calls[-1][0] == "t-s3-r2"


def test_ray_actor_class_in_a_stand_in_loop():
    actor = example("ray_actor").RolloutActor(run=Fake())
    outs = [actor.rollout(f"a-{i}", ["/bin/sh", "-c", cmd]) for i, cmd in enumerate(["exit 0", "./miner"])]
    assert outs[0]["terminated"] is False and outs[0]["reward_adj"] == 0.0
    assert outs[1]["terminated"] is True and outs[1]["alerts"] == 1


@pytest.mark.root
def test_examples_run_real_episodes(tmp_path):
    tag = uuid.uuid4().hex[:6]
    reward_fn = example("trl_reward").make_reward_fn(run_id=f"pen-{tag}", control_socket=None, verdict_dir=tmp_path)
    assert reward_fn(["p", "p"], ["exit 0", "exit 3"]) == [1.0, 0.0]
    actor = example("ray_actor").RolloutActor(control_socket=None, verdict_dir=tmp_path)
    out = actor.rollout(f"pen-{tag}-ray", ["/bin/sh", "-c", "exit 0"])
    assert out == {"episode": f"pen-{tag}-ray", "exit_code": 0, "reward_adj": 0.0, "terminated": False, "alerts": 0}
