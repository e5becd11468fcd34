"""Policy.version: git commit, dirty marker, or content hash."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from episode_tracer.policy.version import content_hash

from .helpers import load_ok, write

RULE = """
[[rule]]
name = "r"
severity = "low"
on = "exec"
action = "log"
match = { basename = "$names" }

[lists.names]
file = "names.txt"
"""


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_outside_git_is_a_content_hash(tmp_path: Path) -> None:
    write(tmp_path, "p.toml", RULE)
    write(tmp_path, "names.txt", "a\n")
    version = load_ok(tmp_path).version
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", version)
    assert load_ok(tmp_path).version == version  # stable
    (tmp_path / "names.txt").write_text("b\n")  # list files count too
    assert load_ok(tmp_path).version != version


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit_and_dirty(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    write(tmp_path, "policies/p.toml", RULE)
    write(tmp_path, "policies/names.txt", "a\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "policies")
    head = _git(tmp_path, "rev-parse", "HEAD")
    pdir = tmp_path / "policies"
    assert load_ok(pdir).version == head

    (pdir / "names.txt").write_text("a\nb\n")
    digest = content_hash([pdir / "p.toml", pdir / "names.txt"])
    assert load_ok(pdir).version == f"{head}-dirty+{digest}"

    _git(tmp_path, "checkout", "-q", "--", "policies/names.txt")
    assert load_ok(pdir).version == head
    write(tmp_path, "policies/zz.toml", "")  # untracked policy file
    assert load_ok(pdir).version.startswith(f"{head}-dirty+")
    # files outside the policy set do not matter
    (tmp_path / "policies/zz.toml").unlink()
    write(tmp_path, "README", "x")
    assert load_ok(pdir).version == head
