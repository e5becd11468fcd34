"""Helpers for the dashboard tests: snapshots from recorded JSONL, rendering to text."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, RenderableType

from episode_tracer.state import State

DATA = Path(__file__).parent / "data"
T0 = 1760000000.0          # ts of the `ready` record of every fixture


def load_records(name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (DATA / name).read_bytes().splitlines() if line.strip()]


def state_from(*names: str, mode: str = "enforce") -> State:
    st = State(node="gpu-node-07", mode=mode, policy_version="unset", started=T0, scope="episodes")
    for name in names:
        for rec in load_records(name):
            st.observe(rec)
    return st


def console(width: int, height: int, color: bool = False) -> Console:
    return Console(
        record=True, width=width, height=height, file=io.StringIO(),
        color_system="truecolor" if color else None, legacy_windows=False,
    )


def to_text(renderable: RenderableType, width: int, height: int) -> str:
    con = console(width, height)
    con.print(renderable)
    text = con.export_text()
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= height, f"{len(lines)} lines rendered for a {height}-line terminal"
    for line in lines:
        assert len(line) <= width, f"line wider than {width}: {line!r}"
    return text
