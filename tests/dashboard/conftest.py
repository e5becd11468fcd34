"""Fixtures of the dashboard tests (helpers live in dash_helpers.py)."""
from __future__ import annotations

from typing import Any

import pytest

from dash_helpers import T0, state_from


@pytest.fixture
def basic_snapshot() -> dict[str, Any]:
    return state_from("basic.jsonl").snapshot(now=T0 + 10)


@pytest.fixture
def monitor_snapshot() -> dict[str, Any]:
    return state_from("monitor.jsonl").snapshot(now=T0 + 10)
