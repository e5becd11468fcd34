"""Data-driven evaluation: data/eval/<case>.toml (or a directory of files)
and <case>.jsonl, one {"note", "event", "expect"} object a line.

`expect` lists the verdicts, in rule order; each gives `rule` and `matched`
(compared exactly) and optionally `action` and `severity`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from episode_tracer.policy import EvalContext, record_context

from .helpers import DATA, load_ok, read_cases, write

EVAL = DATA / "eval"


def _cases() -> list[tuple[str, Path, int, dict]]:
    out = []
    for cases_file in sorted(EVAL.glob("*.jsonl")):
        name = cases_file.stem
        policy_path = EVAL / name if (EVAL / name).is_dir() else EVAL / f"{name}.toml"
        for i, case in enumerate(read_cases(cases_file)):
            out.append(pytest.param(policy_path, case, id=f"{name}:{i + 1}:{case.get('note', '')}"))
    return out


def _verdict_view(v, expected: dict) -> dict:
    got = {"rule": v.rule, "matched": v.matched}
    if "action" in expected:
        got["action"] = v.action.value
    if "severity" in expected:
        got["severity"] = v.severity.value
    return got


@pytest.mark.parametrize("policy_path,case", _cases())
def test_eval(policy_path: Path, case: dict) -> None:
    policy = load_ok(policy_path)
    verdicts = policy.evaluate(case["event"])
    assert [_verdict_view(v, e) for v, e in zip(verdicts, case["expect"])] == case["expect"]
    assert len(verdicts) == len(case["expect"]), [v.rule for v in verdicts]


def test_every_case_file_has_a_policy() -> None:
    for cases_file in EVAL.glob("*.jsonl"):
        name = cases_file.stem
        assert (EVAL / name).is_dir() or (EVAL / f"{name}.toml").is_file(), name


def test_context_is_lazy_and_asked_once(tmp_path: Path) -> None:
    """sha256 and ancestors are asked only when a rule needs them, once per
    event, and the hash only after the cheaper conditions held."""
    policy = load_ok(
        write(
            tmp_path,
            "p.toml",
            """
            [[rule]]
            name = "python-hash"
            severity = "high"
            on = "exec"
            action = "kill"
            match = { basename = "python3", sha256 = "%s" }

            [[rule]]
            name = "shell-from-sshd"
            severity = "low"
            on = "exec"
            action = "log"
            match = { parent_exe = "/usr/sbin/sshd" }

            [[rule]]
            name = "under-sshd"
            severity = "low"
            on = "exec"
            action = "log"
            match = { ancestor_exe = "/usr/sbin/sshd" }
            """
            % ("0" * 64),
        )
    )
    asked: list[str] = []

    def ancestors(pid: int) -> list[str]:
        asked.append(f"anc:{pid}")
        return ["/usr/sbin/sshd"]

    def sha(path: str, pid: int) -> str | None:
        asked.append(f"sha:{path}:{pid}")
        return "0" * 64

    ctx = EvalContext(ancestors_exe=ancestors, sha256=sha)
    assert policy.evaluate({"type": "connect", "episode": "e", "pid": 7, "exe": "/x"}, ctx) == []
    assert asked == []
    verdicts = policy.evaluate({"type": "exec", "episode": "e", "pid": 7, "exe": "/bin/true", "argv": ["true"]}, ctx)
    assert [v.rule for v in verdicts] == ["shell-from-sshd", "under-sshd"]
    assert asked == ["anc:7"]
    asked.clear()
    verdicts = policy.evaluate({"type": "exec", "episode": "e", "pid": 8, "exe": "/usr/bin/python3", "argv": ["python3"]}, ctx)
    assert [v.rule for v in verdicts] == ["python-hash", "shell-from-sshd", "under-sshd"]
    assert sorted(asked) == ["anc:8", "sha:/usr/bin/python3:8"]


def test_default_context_reads_the_record() -> None:
    policy = load_ok(EVAL / "ancestry_hash.toml")
    event = {"type": "exec", "episode": "e", "pid": 5, "exe": "/bin/bash", "argv": ["bash"],
             "ancestors": ["/usr/bin/python3"]}
    assert [v.rule for v in policy.evaluate(event)] == ["shell-from-python"]
    assert [v.rule for v in policy.evaluate(event, record_context(event))] == ["shell-from-python"]
    assert policy.evaluate(event, EvalContext()) == []  # the empty context knows no ancestors
