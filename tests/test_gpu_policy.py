"""Durations (`for_s`) and `gpu_allowed` in the policy language, from
recorded sample sequences (no root, no GPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from episode_tracer.policy import Holds, load_policy, record_context
from episode_tracer.policy.replay import replay

from policy.helpers import load_text, messages

DATA = Path(__file__).parent / "data" / "gpu"

RULES = """
[[rule]]
name = "mem-hog"
severity = "high"
on = "gpu"
action = "kill"
for_s = 3
match = { used_mib = { gt = 1024 } }
except = [ { gpu_allowed = true } ]
"""


def _sample(case: dict) -> dict:
    return {"type": "gpu", "ts": 1000.0 + case["t"], "episode": "ep-1", "pid": case["pid"],
            "exe": "/tmp/worker", "gpu_index": case.get("gpu_index", 0), "gpu_uuid": f"GPU-{case.get('gpu_index', 0)}",
            "used_mib": case["used_mib"], "sm_util": 0, "mem_util": 0,
            "gpu_allowed": case.get("gpu_allowed", False), "interval_s": case.get("interval_s", 1.0)}


def test_durations_over_a_recorded_sequence(tmp_path):
    res = load_text(tmp_path, RULES)
    assert res.errors == []
    policy, holds = res.policy, Holds()
    for line in (DATA / "durations.jsonl").read_text().splitlines():
        case = json.loads(line)
        ev = _sample(case)
        got = [[v.rule, v.matched["held_s"]] for v in policy.evaluate(ev, record_context(ev), holds)]
        assert got == case["expect"], case["note"]


def test_matched_fields_carry_the_hold(tmp_path):
    policy, holds = load_text(tmp_path, RULES).policy, Holds()
    out = []
    for t in range(5):
        ev = _sample({"t": t, "pid": 5, "used_mib": 2000})
        out += policy.evaluate(ev, None, holds)
    (v,) = out
    assert v.matched == {"used_mib": 2000, "held_s": 3.0}


def test_without_holds_a_duration_rule_never_fires(tmp_path):
    policy = load_text(tmp_path, RULES).policy
    for t in range(10):
        assert policy.evaluate(_sample({"t": t, "pid": 5, "used_mib": 99999})) == []


def test_no_time_no_duration(tmp_path):
    policy, holds = load_text(tmp_path, RULES).policy, Holds()
    for _ in range(10):
        ev = _sample({"t": 0, "pid": 5, "used_mib": 99999})
        del ev["ts"]
        assert policy.evaluate(ev, None, holds) == []
    assert len(holds) == 0


def test_out_of_scope_sample_ends_the_hold(tmp_path):
    """A scope=episodes duration rule: a sample of the same pid outside the
    episode (pid reused) does not continue the hold."""
    policy, holds = load_text(tmp_path, RULES).policy, Holds()
    seq = [("ep-1", 0), ("ep-1", 1), ("ep-1", 2), (None, 3), ("ep-1", 4), ("ep-1", 5), ("ep-1", 6), ("ep-1", 7)]
    fired = []
    for ep, t in seq:
        ev = _sample({"t": t, "pid": 5, "used_mib": 2000})
        ev["episode"] = ep
        fired += [t for _ in policy.evaluate(ev, None, holds)]
    assert fired == [7]


def test_holds_forget_processes_that_left():
    holds = Holds()
    for pid in range(2000):
        holds.update("r", 5.0, {"ts": float(pid), "pid": pid, "gpu_index": 0, "interval_s": 1.0}, True)
    assert len(holds) < 600  # swept every 512 updates: only recent ones stay


def test_replay_counts_durations_over_record_timestamps(tmp_path):
    policy = load_text(tmp_path, RULES).policy
    recs = [_sample({"t": t / 2, "pid": 7, "used_mib": 3000, "interval_s": 0.5}) for t in range(10)]
    alerts = list(replay(recs, policy))
    assert [(a["rule"], a["ts"], a["would"], a["matched"]["held_s"]) for a in alerts] == [
        ("mem-hog", 1003.0, "kill", 3.0)]


# ----------------------------------------------------------------- validation
def _rule(extra: str, on: str = "gpu") -> str:
    return f"""
[[rule]]
name = "r"
severity = "low"
on = "{on}"
action = "alert"
{extra}
"""


@pytest.mark.parametrize("extra,on,msg", [
    ("for_s = 30", "exec",
     "for_s: only 'gpu' rules take a duration (it counts over the GPU watcher's samples); 'exec' events happen once"),
    ("for_s = 5", "gpu_open",
     "for_s: only 'gpu' rules take a duration (it counts over the GPU watcher's samples); 'gpu_open' events happen once"),
    ('for_s = "30s"', "gpu", "for_s: expected a number of seconds, got string"),
    ("for_s = true", "gpu", "for_s: expected a number of seconds, got boolean"),
    ("for_s = 0", "gpu", "for_s: 0 is out of range (0 < for_s <= 86400 seconds)"),
    ("for_s = -1.5", "gpu", "for_s: -1.5 is out of range (0 < for_s <= 86400 seconds)"),
    ("for_s = 86401", "gpu", "for_s: 86401 is out of range (0 < for_s <= 86400 seconds)"),
    ("for_s = nan", "gpu", "for_s: nan is out of range (0 < for_s <= 86400 seconds)"),
    ("match = { gpu_allowed = 1 }", "gpu", "match.gpu_allowed: expected a boolean, got integer"),
    ("match = { gpu_allowed = true }", "exec",
     "match.gpu_allowed: field not available for 'exec' events (it is a field of: gpu_open, gpu)"),
])
def test_exact_errors(tmp_path, extra, on, msg):
    res = load_text(tmp_path, _rule(extra, on))
    assert messages(res) == [f"error: {tmp_path / 'p.toml'}: rule 'r': {msg}"]


def test_valid_durations(tmp_path):
    for v, want in (("30", 30.0), ("0.5", 0.5), ("86400", 86400.0)):
        res = load_text(tmp_path, _rule(f"for_s = {v}"))
        assert res.errors == [] and res.policy.rule("r").for_s == want


def test_override_sets_the_duration(tmp_path):
    (tmp_path / "a.toml").write_text(_rule("for_s = 30"))
    (tmp_path / "b.toml").write_text('[[override]]\nrule = "r"\nfor_s = 5\n')
    res = load_policy([tmp_path])
    assert res.errors == [] and res.policy.rule("r").for_s == 5.0


@pytest.mark.parametrize("value,on,msg", [
    ("0", "gpu", "for_s: 0 is out of range (0 < for_s <= 86400 seconds)"),
    ('"x"', "gpu", "for_s: expected a number of seconds, got string"),
    ("5", "connect",
     "for_s: only 'gpu' rules take a duration (it counts over the GPU watcher's samples); 'connect' events happen once"),
])
def test_override_errors(tmp_path, value, on, msg):
    (tmp_path / "a.toml").write_text(_rule("", on))
    (tmp_path / "b.toml").write_text(f'[[override]]\nrule = "r"\nfor_s = {value}\n')
    res = load_policy([tmp_path])
    assert messages(res) == [f"error: {tmp_path / 'b.toml'}: override #1: {msg}"]


def test_empty_list_in_glob_matches_nothing(tmp_path):
    """An empty allowlist must not allow everything: `glob = "$empty"` holds for no value."""
    res = load_text(tmp_path, """
[lists]
allowed = []

[[rule]]
name = "r"
severity = "low"
on = "gpu_open"
action = "alert"
except = [ { exe = { glob = "$allowed" } } ]
""")
    assert res.errors == [] and res.warnings == []
    ev = {"type": "gpu_open", "episode": "e", "pid": 1, "exe": "/usr/bin/python3", "path": "/dev/nvidia0"}
    assert [v.rule for v in res.policy.evaluate(ev)] == ["r"]


def test_gpu_allowed_from_record_then_context(tmp_path):
    from episode_tracer.policy import EvalContext

    res = load_text(tmp_path, _rule('match = { path = { glob = "/dev/nvidia*" } }\nexcept = [ { gpu_allowed = true } ]',
                                    "gpu_open"))
    policy = res.policy
    ev = {"type": "gpu_open", "episode": "e", "pid": 42, "exe": "/x", "path": "/dev/nvidia0"}
    asked = []

    def allowed(pid):
        asked.append(pid)
        return pid == 42

    assert policy.evaluate(ev, EvalContext(gpu_allowed=allowed)) == []
    assert asked == [42]
    assert [v.rule for v in policy.evaluate({**ev, "pid": 43}, EvalContext(gpu_allowed=allowed))] == ["r"]
    # the record's own value wins (recorded JSONL, the watcher's samples)
    assert [v.rule for v in policy.evaluate({**ev, "gpu_allowed": False}, EvalContext(gpu_allowed=allowed))] == ["r"]
    # unknown (no context, nothing on the record): not allowed, the rule fires
    assert [v.rule for v in policy.evaluate(ev)] == ["r"]
