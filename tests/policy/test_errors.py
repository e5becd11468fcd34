"""Every validation error, with its exact text.

data/errors/<case>.toml lists what loading it must report in its leading
`# error: ...` and `# warning: ...` lines ({file} is the file's path);
data/errors/<case>/ is a multi-file case with expect.txt ({dir}).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from episode_tracer.policy import Level, load_policy

from .helpers import DATA, load_text, messages, write

ERRORS = DATA / "errors"


def _expected_file(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        for level in ("error", "warning"):
            if line.startswith(f"# {level}: "):
                out.append(f"{level}: " + line[len(f"# {level}: ") :].replace("{file}", str(path)))
    return out


def _cases() -> list:
    out = [pytest.param(p, _expected_file(p), id=p.name) for p in sorted(ERRORS.glob("*.toml"))]
    for d in sorted(p for p in ERRORS.iterdir() if p.is_dir()):
        lines = (d / "expect.txt").read_text().splitlines()
        out.append(pytest.param(d, [ln.replace("{dir}", str(d)) for ln in lines if ln], id=d.name))
    return out


@pytest.mark.parametrize("path,expected", _cases())
def test_error_case(path: Path, expected: list[str]) -> None:
    assert expected, "a case must expect something"
    res = load_policy([path])
    assert messages(res) == expected
    assert (res.policy is None) == bool(res.errors)


def test_diagnostic_fields_and_str() -> None:
    res = load_policy([ERRORS / "unknown_rule_key.toml"])
    (d,) = res.errors
    assert d.file == str(ERRORS / "unknown_rule_key.toml")
    assert d.where == "rule 'r'"
    assert d.key == "colour"
    assert d.level is Level.ERROR
    assert str(d) == f"{d.file}: rule 'r': colour: {d.message}"


def test_warnings_alone_still_give_a_policy(tmp_path: Path) -> None:
    res = load_text(
        tmp_path,
        """
        [lists]
        spare = ["x"]

        [[rule]]
        name = "r"
        severity = "low"
        on = "exec"
        action = "log"
        """,
    )
    assert res.errors == []
    assert messages(res) == [f"warning: {tmp_path / 'p.toml'}: list 'spare': unused (no rule refers to it)"]
    assert res.policy is not None


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = load_policy([tmp_path / "nope.toml", tmp_path / "empty"])
    assert messages(res) == [
        f"error: {tmp_path / 'nope.toml'}: no such file or directory",
        f"warning: {tmp_path / 'empty'}: no *.toml files in this directory",
    ]


def test_too_many_deny_rules(tmp_path: Path) -> None:
    rules = "".join(
        f"""
[[rule]]
name = "d{i}"
severity = "high"
on = "connect"
action = "deny"
enabled = {'false' if i == 0 else 'true'}
match = {{ port = {1000 + i} }}
"""
        for i in range(65)
    )
    path = write(tmp_path, "p.toml", rules)
    res = load_policy([path])
    assert messages(res) == [
        f"error: {path}: rule 'd64': action: more than 63 enabled connect deny rules; the kernel holds 63"
    ]
    # 63 enabled (d0 disabled, d64 removed) is fine
    path.write_text(rules.rsplit("[[rule]]", 1)[0])
    res = load_policy([path])
    assert res.errors == []
    assert len(res.policy.kernel_plan().deny) == 63


def test_list_file_in_another_dir_and_override_of_unknown_list_in_other_file(tmp_path: Path) -> None:
    write(tmp_path, "lists/names.txt", "a\n  b  # comment\n\n# only a comment\nc#d\n")
    write(
        tmp_path,
        "a.toml",
        """
        [lists.names]
        file = "lists/names.txt"
        items = ["z"]

        [[rule]]
        name = "r"
        severity = "low"
        on = "exec"
        action = "log"
        match = { basename = "$names" }
        """,
    )
    write(tmp_path, "b.toml", '[[override]]\nlist = "other"\nappend = ["q"]\n')
    res = load_policy([tmp_path])
    assert messages(res) == [f"error: {tmp_path / 'b.toml'}: override #1: list: unknown list 'other'"]
    (tmp_path / "b.toml").unlink()
    res = load_policy([tmp_path])
    (rule,) = res.policy.rules
    assert rule.match[0].exact == frozenset({"z", "a", "b", "c"})
