"""episode_tracer.policy.replay: recorded events in, alert dicts out."""
from __future__ import annotations

from episode_tracer.policy.replay import replay

from .helpers import DATA, load_ok


def test_replay_alerts() -> None:
    policy = load_ok(DATA / "eval" / "argv.toml")
    records = [
        {"type": "ready", "ts": 1.0, "episode": None},
        {"type": "exec", "ts": 2.0, "episode": "rl-1", "pid": 42, "exe": "/usr/bin/ssh",
         "argv": ["ssh", "-NR", "8080:localhost:22", "host"]},
        {"type": "exec", "ts": 3.0, "episode": "rl-1", "pid": 43, "exe": "/usr/bin/ssh", "argv": ["ssh", "host"]},
        {"type": "alert", "ts": 4.0, "episode": "rl-1", "rule": "old"},
        {"type": "exec", "ts": 5.0, "episode": None, "pid": 44, "exe": "/usr/bin/ssh",
         "argv": ["ssh", "-R", "1:x:2", "host"]},  # outside episodes: scope episodes ignores it
    ]
    alerts = list(replay(records, policy))
    assert alerts == [
        {
            "type": "alert",
            "ts": 2.0,
            "rule": "ssh-reverse-tunnel",
            "severity": "high",
            "action": "kill",
            "enforced": False,
            "would": "kill",
            "episode": "rl-1",
            "pid": 42,
            "exe": "/usr/bin/ssh",
            "argv": ["ssh", "-NR", "8080:localhost:22", "host"],
            "matched": {"basename": "ssh", "argv_flag": "-R"},
            "policy_version": policy.version,
            "description": "",
        }
    ]


def test_replay_uses_record_context() -> None:
    policy = load_ok(DATA / "eval" / "ancestry_hash.toml")
    rec = {"type": "exec", "ts": 1.0, "episode": "e", "pid": 1, "exe": "/bin/sh", "argv": ["sh"],
           "ancestors": ["/usr/bin/python3"]}
    assert [a["rule"] for a in replay([rec], policy)] == ["shell-from-python"]
