"""`agent-tracer replay`: a recorded stream through today's policies."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import click

from .engine import load_policy_or_raise
from .episodes import Tracker
from .sinks import dumps, read_jsonl


def replay_records(records: Iterable[dict[str, Any]], policy) -> Iterator[dict[str, Any]]:
    """Alerts the policy raises on a recorded stream (pure: nothing is
    enforced; each alert says what would have been done)."""
    from .policy.replay import replay

    tracker = Tracker(live=False)

    def enriched() -> Iterator[dict[str, Any]]:
        for rec in records:
            if rec.get("type") == "alert":
                continue  # the old alerts are what we are re-deciding
            yield from tracker.observe(rec)

    yield from replay(enriched(), policy)


def replay_file(path: str, policy_dirs: list[Path], as_json: bool = False) -> int:
    try:
        policy = load_policy_or_raise(policy_dirs)
    except Exception as e:
        raise click.ClickException(str(e)) from None
    n = 0
    rows = []
    try:
        for a in replay_records(read_jsonl(path), policy):
            n += 1
            if as_json:
                click.echo(dumps(a).decode(), nl=False)
            else:
                rows.append(a)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if not as_json:
        from rich.console import Console
        from rich.table import Table

        t = Table("time", "rule", "severity", "action", "episode", "pid", "exe", title=f"{n} alerts ({policy.version})")
        import time as _t

        for a in rows:
            t.add_row(_t.strftime("%H:%M:%S", _t.localtime(a.get("ts") or 0)), a["rule"], str(a["severity"]),
                      str(a.get("would") or a["action"]), a.get("episode") or "-", str(a.get("pid") or ""),
                      a.get("exe") or "")
        Console().print(t)
    return n
