"""Shared helpers for the policy tests."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from episode_tracer.policy import LoadResult, Policy, load_policy

DATA = Path(__file__).parent / "data"


def load_ok(*paths: Path | str) -> Policy:
    res = load_policy(list(paths))
    assert not res.errors, "\n".join(map(str, res.errors))
    assert res.policy is not None
    return res.policy


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp: Path, text: str, name: str = "p.toml") -> LoadResult:
    return load_policy([write(tmp, name, text)])


def messages(res: LoadResult) -> list[str]:
    return [f"error: {d}" for d in res.errors] + [f"warning: {d}" for d in res.warnings]


def read_cases(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
