"""`agent-tracer policy check`."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from episode_tracer import paths
from episode_tracer.policy.cli import policy

from .helpers import DATA, write

GOOD = """
[[rule]]
name = "miner"
severity = "critical"
on = "exec"
action = "kill"
match = { basename = "xmrig" }

[[rule]]
name = "pools"
severity = "high"
on = "connect"
action = "deny"
match = { port = 3333 }
"""


def run(*args: str):
    return CliRunner().invoke(policy, ["check", *args])


def test_check_ok(tmp_path: Path) -> None:
    write(tmp_path, "p.toml", GOOD)
    res = run(str(tmp_path))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[-1] == "2 rules in 1 files, 0 errors, 0 warnings"
    assert lines[-2].startswith("policy version: sha256:")


def test_check_errors_first_then_warnings(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", GOOD + '\n[lists]\nspare = ["x"]\n')
    write(tmp_path, "b.toml", '[[rule]]\nname = "miner"\nseverity = "low"\non = "exec"\naction = "log"\n')
    res = run(str(tmp_path))
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"error: {tmp_path / 'b.toml'}: rule 'miner': name: duplicate rule name (first defined in {tmp_path / 'a.toml'})",
        f"warning: {tmp_path / 'a.toml'}: list 'spare': unused (no rule refers to it)",
        "3 rules in 2 files, 1 errors, 1 warnings",
    ]


def test_check_strict_fails_on_warnings(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", GOOD + '\n[lists]\nspare = ["x"]\n')
    assert run(str(tmp_path)).exit_code == 0
    assert run("--strict", str(tmp_path)).exit_code == 1


def test_check_plan(tmp_path: Path) -> None:
    write(tmp_path, "p.toml", GOOD)
    res = run("--plan", str(tmp_path / "p.toml"))
    assert res.exit_code == 0
    assert "  kill at exec (episodes): xmrig" in res.output
    assert "    [0] pools: tcp/udp to any address port 3333 (episodes *)" in res.output


def test_check_default_dir(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path, "p.toml", GOOD)
    monkeypatch.setattr(paths, "POLICY_DIR", tmp_path)
    res = run()
    assert res.exit_code == 0
    assert res.output.splitlines()[-1] == "2 rules in 1 files, 0 errors, 0 warnings"


def test_check_data_error_case() -> None:
    res = run(str(DATA / "errors" / "bad_regex.toml"))
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == "1 rules in 1 files, 2 errors, 0 warnings"


def test_help_has_examples() -> None:
    res = CliRunner().invoke(policy, ["check", "--help"])
    assert res.exit_code == 0
    assert "agent-tracer policy check /etc/agent-tracer/policies/" in res.output


def test_packaged_policies_are_valid() -> None:
    """Whatever ships in episode_tracer/policies/ must pass `policy check` (warnings allowed)."""
    res = run(str(paths.POLICY_DIR))
    assert res.exit_code == 0, res.output
