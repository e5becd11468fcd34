"""The screens of `agent-tracer top` besides the main list: an episode's detail,
one alert whole, the help; and the footer of every screen. Pure functions of
(snapshot, view, detail, width, height) like episode_tracer/dashboard.py's render():
each returns exactly `height` lines or fewer, none wider than `width`.
"""
from __future__ import annotations

import textwrap
from typing import Any

from rich.console import RenderableType
from rich.text import Text

from .dashboard import (
    SEVERITY_LABELS,
    SEVERITY_STYLES,
    STATE_STYLES,
    _action_text,
    _alert_detail,
    _fit,
    _header,
    _line,
    _lines,
    fmt_clock,
    fmt_count,
    fmt_duration,
    fmt_mib,
)
from .episode_detail import record_summary
from .topview import HELP, View

__all__ = ["render_screen", "render_detail", "render_alert", "render_help", "footer_lines"]

_PROC_LETTERS = {"R": "run", "S": "sleep", "D": "disk", "T": "stopped", "t": "traced", "Z": "zombie",
                 "I": "idle", "X": "dead"}


def render_screen(snap: dict[str, Any], view: View, detail: dict[str, Any] | None,
                  width: int, height: int) -> RenderableType:
    footer = footer_lines(snap, view, detail, width)
    body_h = height - len(footer)
    if view.screen == "help":
        body = render_help(snap, width, body_h)
    elif view.screen == "alert":
        body = render_alert(snap, view.alert or {}, width, body_h)
    else:
        body = render_detail(snap, view, detail, width, body_h)
    body = body[:body_h]
    body += [Text("")] * (body_h - len(body))
    return _lines(body + footer)


# ---------------------------------------------------------------------- footer
def _keys_hint(view: View, width: int) -> Text:
    if view.screen == "detail":
        keys = [("↑↓", "scroll records"), ("Esc", "back"), ("f", "freeze"), ("t", "thaw"), ("K", "kill"),
                ("p", "pause"), ("?", "help"), ("q", "quit")]
    elif view.screen == "help":
        keys = [("Esc", "back"), ("q", "quit")]
    elif view.screen == "alert":
        keys = [("Esc", "back"), ("f", "freeze its episode"), ("t", "thaw"), ("K", "kill"), ("q", "quit")]
    elif view.focus == "alerts":
        keys = [("↑↓", "alert"), ("Enter", "show whole"), ("f", "freeze its episode"), ("t", "thaw"),
                ("K", "kill"), ("a/Esc", "episodes"), ("/", "filter"), ("?", "help"), ("q", "quit")]
    else:
        keys = [("↑↓", "select"), ("Enter", "detail"), ("f", "freeze"), ("t", "thaw"), ("K", "kill"),
                ("/", "filter"), ("s", "sort"), ("a", "alerts"), ("p", "pause"), ("?", "help"), ("q", "quit")]
    text = Text(no_wrap=True, overflow="ellipsis")
    compact = width < 110
    if compact:                                      # 80 columns: the keys that act first, p is in the help
        keys = [("⏎" if k == "Enter" else k, what.split()[0]) for k, what in keys if k != "p"]
    for i, (k, what) in enumerate(keys):
        if i:
            text.append(" " if compact else "  ")
        text.append(k, style="bold reverse")
        text.append(" " + what, style="dim")
    return text


def footer_lines(snap: dict[str, Any], view: View, detail: dict[str, Any] | None, width: int) -> list[Text]:
    """The last line of every screen: the kill prompt, the filter being typed,
    or the keys with the last action's result (and PAUSED)."""
    if view.confirm is not None:
        return [_line((_kill_prompt(snap, view.confirm, detail), "bold white on red"), width=width)]
    if view.editing:
        return [_line(("/", "bold reverse"), (" filter: ", "bold"), (view.filter, "bold yellow"), ("▏", "blink"),
                      ("   Enter keeps it, Esc clears it", "dim"), width=width)]
    parts: list[Any] = []
    if view.paused:
        parts += [(" PAUSED ", "bold black on yellow"), " "]
    if view.message:
        parts += [(view.message, "bold green" if view.message_ok else "bold red"), ("  │  ", "dim")]
    parts.append(_keys_hint(view, width))
    return [_line(*parts, width=width)]


def _kill_prompt(snap: dict[str, Any], ep: str, detail: dict[str, Any] | None) -> str:
    row = next((e for e in (snap.get("episodes") or []) if isinstance(e, dict) and str(e.get("id")) == ep), {})
    what = f"KILL {ep}? y kills"
    if detail is not None and detail.get("id") == ep:
        live = [p for p in detail.get("processes") or [] if p.get("state") != "exited"]
        names = ", ".join(f"{p['pid']} {_base(p.get('exe'))}" for p in live[:6]) + (" …" if len(live) > 6 else "")
        what += f" {len(live)} process{'es' if len(live) != 1 else ''}" + (f" ({names})" if names else "")
        if detail.get("cgroup_path"):
            what += f" and all else in cgroup {detail['cgroup_path']}"
    else:
        what += f" its {row.get('processes', '?')} processes" + (f" (cgroup {row['cgroup_path']})" if row.get("cgroup_path") else "")
    return what + "; any other key cancels"


def _base(exe: Any) -> str:
    return str(exe).rsplit("/", 1)[-1] if exe else "?"


# ---------------------------------------------------------------------- detail
def _title(text: str, width: int, extra: str = "") -> Text:
    t = Text(f" {text} ", style="bold reverse", no_wrap=True)
    if extra:
        t.append("  " + extra, style="dim")
    t.truncate(width, overflow="ellipsis")
    return t


def _proc_rows(detail: dict[str, Any], width: int) -> list[Text]:
    rows = [_line(("PID     STATE      CPU%  GPU          EXE / ARGV", "bold"), width=width)]
    for p in detail.get("processes") or []:
        state = str(p.get("state") or "?")
        if state == "exited":
            st = f"sig {p['signal']}" if p.get("signal") else f"exit {p.get('code') if p.get('code') is not None else '?'}"
            style = "dim"
        elif state == "held":
            st, style = "HELD", "bold yellow"
        else:
            st = _PROC_LETTERS.get(str(p.get("proc_state") or ""), "running")
            style = "bold cyan" if st == "stopped" else ""
        cpu = p.get("cpu_pct")
        cpu_s = f"{cpu:5.1f}" if isinstance(cpu, (int, float)) else "    -"
        gpus = p.get("gpu") or []
        gpu_s = " ".join(f"{g.get('gpu_index')}:{fmt_mib(g.get('used_mib'))}"
                         + (f"/{g['sm_util']:.0f}%" if isinstance(g.get("sm_util"), (int, float)) else "")
                         for g in gpus) or "-"
        argv = p.get("argv")
        cmd = " ".join(str(a) for a in argv) if isinstance(argv, list) and argv else ""
        exe = str(p.get("exe") or p.get("comm") or "?")
        indent = "  " * min(int(p.get("depth") or 0), 8) + ("└ " if p.get("depth") else "")
        rows.append(_line(
            (f"{p.get('pid', '?'):<7} ", "bold" if state != "exited" else "dim"),
            (_fit(st, 9) + " ", style),
            (cpu_s + "  ", "" if state != "exited" else "dim"),
            (_fit(gpu_s, 12) + " ", "magenta" if gpus else "dim"),
            (indent, "dim"),
            (exe, "bold" if state != "exited" else "dim"),
            (("  " + cmd) if cmd else "", "dim"),
            width=width,
        ))
    if detail.get("procs_dropped"):
        rows.append(_line((f"({detail['procs_dropped']} older processes not kept)", "dim"), width=width))
    return rows


def _net_rows(detail: dict[str, Any], width: int) -> list[Text]:
    rows: list[Text] = []
    for ln in detail.get("listeners") or []:
        where = f"{ln.get('addr') or '*'}:{ln.get('port') if ln.get('port') is not None else '?'}"
        rows.append(_line(("LISTEN  ", "bold yellow"), (_fit(where, 24) + " ", "bold"),
                          (f"pid {ln.get('pid')} {_base(ln.get('exe'))}", "dim"),
                          ("  preexisting" if ln.get("preexisting") else "", "dim"), width=width))
    for c in detail.get("connections") or []:
        if c.get("path"):
            dest = str(c["path"])
        else:
            dest = f"{c.get('addr')}:{c.get('port')}" if c.get("port") is not None else str(c.get("addr") or "?")
        flags = []
        if c.get("protocol"):
            flags.append(str(c["protocol"]) + (f" sni {c['sni']}" if c.get("sni") else ""))
        res = c.get("result")
        if isinstance(res, int) and res not in (0, -115):
            flags.append(f"result {res}")
        if c.get("preexisting"):
            flags.append("preexisting")
        style = ""
        if c.get("denied"):
            flags.append("DENIED")
            style = "bold red"
        if c.get("held"):
            flags.append("held")
        rows.append(_line((f"{fmt_clock(c.get('ts'))} → ", "dim"), (_fit(dest, 24) + " ", style or "bold"),
                          (f"pid {c.get('pid')} {_base(c.get('exe'))}  ", "dim"), ("  ".join(flags), style or "cyan"),
                          width=width))
    return rows


def _alert_rows(alerts: list[dict[str, Any]], mode: str, width: int) -> list[Text]:
    rows = []
    for a in alerts:
        sev = str(a.get("severity") or "info")
        line = Text(no_wrap=True, overflow="ellipsis", style=SEVERITY_STYLES.get(sev, ""))
        line.append(fmt_clock(a.get("ts")) + " ")
        line.append(SEVERITY_LABELS.get(sev, sev.upper()[:4]).ljust(4) + " ", style="bold")
        line.append(str(a.get("rule") or "?") + " ")
        line.append_text(_action_text(a, mode))
        matched = a.get("matched")
        if isinstance(matched, dict) and matched:        # what matched first: it is why the alert is here
            line.append("  " + " ".join(f"{k}={v}" for k, v in matched.items()), style="bold")
        elif matched:
            line.append(f"  {matched}", style="bold")
        d = _alert_detail(dict(a, matched=None))
        if d:
            line.append("  " + d, style="dim" if sev != "critical" else "")
        line.truncate(width, overflow="ellipsis")
        rows.append(line)
    return rows


def _tail_rows(detail: dict[str, Any], width: int) -> list[Text]:
    rows = []
    for r in detail.get("tail") or []:
        t = str(r.get("type") or "?")
        rows.append(_line((fmt_clock(r.get("ts")) + " ", "dim"), (_fit(t, 9) + " ", "bold" if t == "alert" else ""),
                          (f"{r.get('pid') if r.get('pid') is not None else '-':<7} ", "dim"),
                          record_summary(r), width=width))
    return rows


def _allocate(wants: list[int], caps: list[float], avail: int, tail_min: int, tail_want: int) -> tuple[list[int], int]:
    alloc = [min(w, max(2, int(avail * c))) for w, c in zip(wants, caps)]
    tail = avail - sum(alloc)
    while tail < tail_min and max(alloc) > 2:
        i = alloc.index(max(alloc))
        alloc[i] -= 1
        tail += 1
    changed = True
    while tail > tail_want and changed:             # room left: give it back to what was capped
        changed = False
        for i, w in enumerate(wants):
            if alloc[i] < w and tail > tail_want:
                alloc[i] += 1
                tail -= 1
                changed = True
    return alloc, max(0, tail)


def render_detail(snap: dict[str, Any], view: View, detail: dict[str, Any] | None,
                  width: int, height: int) -> list[Text]:
    ep = view.selected or "?"
    top = [_header(snap, width)[0]]
    if detail is None or detail.get("id") != ep:
        top.append(_line((f" Episode {ep} ", "bold reverse"), ("  loading its detail from the tracer …", "dim"),
                         width=width))
        return top
    now = detail.get("now") or snap.get("now")
    state = str(detail.get("state") or "?")
    row = next((e for e in (snap.get("episodes") or []) if isinstance(e, dict) and str(e.get("id")) == ep), {})
    started = detail.get("started")
    age = (now - started) if isinstance(now, (int, float)) and isinstance(started, (int, float)) else None
    cpu = row.get("cpu_pct")
    labels = detail.get("labels") or {}
    info = _line(
        (f" Episode {ep} ", "bold reverse"), " ", (state, STATE_STYLES.get(state, "bold")),
        ("  source ", "dim"), str(detail.get("source") or "?"),
        ("  root pid ", "dim"), str(detail.get("root_pid") or "-"),
        ("  age ", "dim"), fmt_duration(age),
        ("  CPU ", "dim"), f"{cpu:.0f}%" if isinstance(cpu, (int, float)) else "-",
        ("  events ", "dim"), fmt_count(detail.get("events") or 0),
        ("  alerts ", "dim"), (fmt_count(detail.get("alerts_total") or 0), "bold red" if detail.get("alerts_total") else ""),
        width=width,
    )
    top.append(info)
    extra: list[Any] = []
    if detail.get("cgroup_path"):
        extra += [("cgroup ", "dim"), str(detail["cgroup_path"]), "  "]
    if labels:
        extra += [("labels ", "dim"), " ".join(f"{k}={v}" for k, v in labels.items())]
    else:
        extra += [("labels ", "dim"), ("none", "dim")]
    if detail.get("end_reason"):
        extra += [("   ended: ", "dim"), f"{detail['end_reason']} (exit {detail.get('exit_code')})"]
    gt = detail.get("gpu_total")
    if gt:
        extra += [("   GPU total ", "dim"), f"peak {fmt_mib(gt.get('peak_mib'))}, {fmt_count(gt.get('sm_s') or 0)} SM-s"]
    top.append(_line(*extra, width=width))
    for h in detail.get("held") or []:
        top.append(_line(("HELD NOW ", "bold black on yellow"), f" pid {h.get('pid')} ", (str(h.get("what")), "bold yellow"),
                         (f"  for {h.get('for_s', 0):.1f}s, awaiting its verdict", "dim"), width=width))
    procs = _proc_rows(detail, width)
    net = _net_rows(detail, width)
    alerts = _alert_rows(detail.get("alerts") or [], str(detail.get("mode") or snap.get("mode") or ""), width)
    tail = _tail_rows(detail, width)
    avail = height - len(top) - 4                    # four section titles
    if avail < 4:
        return top[:height]
    n_live = sum(1 for p in detail.get("processes") or [] if p.get("state") != "exited")
    alloc, tail_h = _allocate([len(procs), max(1, len(net)), max(1, len(alerts))], [0.34, 0.22, 0.18],
                              avail, min(3, avail // 4), len(tail))
    out = list(top)
    out.append(_title("Processes", width, f"{n_live} live, {len(detail.get('processes') or []) - n_live} exited kept"))
    out += procs[: alloc[0]]
    n_l, n_c = len(detail.get("listeners") or []), len(detail.get("connections") or [])
    out.append(_title("Connections and listeners", width, f"{n_l} listening, {n_c} connections (newest first)"))
    out += (net or [_line(("none seen", "dim"), width=width)])[: alloc[1]]
    out.append(_title("Alerts", width, f"{len(alerts)} (newest first)"))
    out += (alerts or [_line(("none", "dim"), width=width)])[: alloc[2]]
    scroll = min(view.scroll, max(0, len(tail) - tail_h))
    out.append(_title("Recent records", width, f"newest first, {len(tail)} kept"
                      + (f", scrolled {scroll} back (↓ to return)" if scroll else ", ↑ scrolls back")))
    out += tail[scroll: scroll + tail_h]
    return out[:height]


# ---------------------------------------------------------------------- alert whole
def _kv(key: str, value: Any, width: int, style: str = "") -> list[Text]:
    key_w = 15
    text = "" if value is None else str(value)
    room = max(10, width - key_w)
    chunks = textwrap.wrap(text, room, break_long_words=True, replace_whitespace=False, drop_whitespace=False) or [""]
    out = []
    for i, chunk in enumerate(chunks):
        out.append(_line((key.ljust(key_w) if i == 0 else " " * key_w, "bold dim"), (chunk, style), width=width))
    return out


def render_alert(snap: dict[str, Any], a: dict[str, Any], width: int, height: int) -> list[Text]:
    sev = str(a.get("severity") or "info")
    mode = str(snap.get("mode") or "")
    title = Text(" Alert ", style="bold reverse", no_wrap=True)
    title.append(" ")
    title.append(f" {SEVERITY_LABELS.get(sev, sev.upper())} ", style=SEVERITY_STYLES.get(sev, "") or "bold")
    title.append(f" {a.get('rule')}", style="bold")
    title.append("   Esc: back", style="dim")
    title.truncate(width, overflow="ellipsis")
    out = [_header(snap, width)[0], title]
    now = snap.get("now")
    ts = a.get("ts")
    ago = f" ({fmt_duration(now - ts)} ago)" if isinstance(now, (int, float)) and isinstance(ts, (int, float)) else ""
    out += _kv("rule", a.get("rule"), width, "bold")
    out += _kv("description", a.get("description") or "-", width)
    out += _kv("severity", sev, width, SEVERITY_STYLES.get(sev, ""))
    out += _kv("time", fmt_clock(ts) + ago, width)
    out += _kv("episode", a.get("episode") or "- (outside every episode)", width, "bold")
    action = str(a.get("action") or "alert")
    if a.get("enforced"):
        done, st = "enforced", "bold green"
    elif a.get("would") or mode == "monitor":
        done, st = f"not enforced (monitor mode: would {a.get('would') if isinstance(a.get('would'), str) else action})", "italic"
    else:
        done, st = "nothing enforced", "dim"
    out.append(_line(("action".ljust(15), "bold dim"), (action, "bold"), "  ", (done, st),
                     ("  " + str(a["detail"]) if a.get("detail") else "", "dim"), width=width))
    out += _kv("event", a.get("event") or "-", width)
    out += _kv("pid", a.get("pid"), width)
    out += _kv("exe", a.get("exe") or "-", width)
    argv = a.get("argv")
    out += _kv("argv", " ".join(str(x) for x in argv) if isinstance(argv, list) else (argv or "-"), width)
    matched = a.get("matched")
    if isinstance(matched, dict) and matched:
        for i, (k, v) in enumerate(matched.items()):
            out += _kv("matched" if i == 0 else "", f"{k} = {v}", width, "bold yellow")
    else:
        out += _kv("matched", matched if matched else "-", width, "bold yellow")
    if a.get("matched_bytes") is not None:
        out += _kv("matched bytes", f"{a['matched_bytes']}  (offset {a.get('matched_offset')})", width, "bold yellow")
    for k in ("addr", "port", "family", "protocol", "sni", "call", "path", "local_addr", "local_port", "listener_exe"):
        if a.get(k) is not None:
            out += _kv(k, a[k], width)
    out += _kv("policy", a.get("policy_version") or "-", width)
    if len(out) > height:
        out = out[: height - 1] + [_line(("… (more than the terminal shows)", "dim"), width=width)]
    return out


# ---------------------------------------------------------------------- help
def render_help(snap: dict[str, Any], width: int, height: int) -> list[Text]:
    out = [_header(snap, width)[0], _title("Keys", width, "any key closes this help")]
    for k, what in HELP:
        out.append(_line((f"  {k:<20}", "bold"), what, width=width))
    out.append(Text(""))
    for line in ("Every action goes through the tracer's control socket, like `agent-tracer episode ...`;",
                 "its result (or error) is shown on the last line.",
                 "The kernel line: programs attached, exec-gate and wire holds per second, what is held",
                 "right now awaiting a verdict, and the last policy reload."):
        out.append(_line(("  " + line, "dim"), width=width))
    return out[:height]
