"""The runner watch (episode_tracer/runners.py) and the pin layout version
(episode_tracer/pins.py), without root: real processes, a registry in tmp_path."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import pytest

from at_testlib import wait_for
from episode_tracer.pins import layout_version
from episode_tracer.runners import RunnerWatch, register, unregister


@dataclass
class _Ep:
    cgroup_path: str
    ended: bool = False


class _Tracker:
    def __init__(self, eps):
        self.episodes = eps


def test_layout_version_follows_program_text_and_settings():
    a = layout_version("prog", ["-DA=1", "-DB=2"])
    assert a == layout_version("prog", ["-DB=2", "-DA=1"])  # order of flags does not matter
    assert a != layout_version("prog2", ["-DA=1", "-DB=2"])
    assert a != layout_version("prog", ["-DA=1", "-DB=3"])
    assert a.startswith("v") and "." not in a  # bpffs names may not contain dots


def test_dead_runner_is_noticed_after_the_grace(tmp_path):
    runner = subprocess.Popen(["sleep", "600"])
    other = subprocess.Popen(["sleep", "600"])
    try:
        register("ep-dead", runner.pid, reg_dir=tmp_path)
        register("ep-fine", other.pid, reg_dir=tmp_path)
        tr = _Tracker({"ep-dead": _Ep("/nonexistent/a"), "ep-fine": _Ep("/nonexistent/b"),
                       "ep-container": _Ep("/nonexistent/c")})  # no runner file: never touched
        w = RunnerWatch("keep", grace=0.3, reg_dir=tmp_path)
        assert w.poll(tr, time.monotonic(), time.time()) == []
        runner.kill()
        runner.wait(10)
        t_dead = time.monotonic()
        out = wait_for(lambda: w.poll(tr, time.monotonic(), time.time()), 10)
        assert time.monotonic() - t_dead >= 0.3
        assert [(r["episode"], r["cmd"], r["by"], r["runner_pid"]) for r in out] == \
            [("ep-dead", "keep", "runner-died", runner.pid)]
        assert not (tmp_path / "ep-dead").exists() and (tmp_path / "ep-fine").exists()
        assert w.poll(tr, time.monotonic() + 100, time.time()) == []  # handled once
    finally:
        for p in (runner, other):
            p.kill()
            p.wait(10)


def test_runner_that_unregistered_is_not_an_orphan(tmp_path):
    runner = subprocess.Popen(["sleep", "600"])
    try:
        register("ep", runner.pid, reg_dir=tmp_path)
        tr = _Tracker({"ep": _Ep("/nonexistent/a")})
        w = RunnerWatch("kill", grace=0.0, reg_dir=tmp_path)
        w.poll(tr, time.monotonic(), time.time())
        unregister("ep", reg_dir=tmp_path)  # what run_episode does before it returns
        runner.kill()
        runner.wait(10)
        time.sleep(0.05)
        assert w.poll(tr, time.monotonic() + 1, time.time()) == []
    finally:
        runner.kill()
        runner.wait(10)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="orphan_episode"):
        RunnerWatch("maybe")
