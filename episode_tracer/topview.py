"""The view state of `agent-tracer top` and its key handling: a small state machine.

:func:`handle_key` is pure: ``(view, key, snapshot) -> (view, action)``. It
never does I/O; what must go to the tracer comes back as an :class:`Action`
(``command`` freeze/thaw/kill, ``detail`` fetch, ``quit``) that the terminal
loop (episode_tracer/dashboard.py ``run_top``) carries out through the control socket,
reporting the result with :func:`with_message`. :func:`visible_episodes` and
:func:`visible_alerts` are the filtered, sorted lists the screens show.

Keys: up/down (j/k) select, PgUp/PgDn/Home/End; Enter opens the episode's
detail (or, with the alert list focused, the alert whole); Esc goes back;
``f`` freeze, ``t`` thaw, ``K`` kill (asks for ``y``); ``/`` filter (typed,
Enter keeps it, Esc clears it); ``s`` cycles the sort; ``a`` focuses the
alert list; ``p`` pauses; ``?`` help; ``q`` quits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["View", "Action", "handle_key", "visible_episodes", "visible_alerts", "with_message",
           "parse_keys", "SORTS", "SORT_LABELS", "HELP"]

SORTS = ("alerts", "age", "cpu", "events")
SORT_LABELS = {"alerts": "recent alerts", "age": "age (oldest first)", "cpu": "CPU/GPU", "events": "events"}

HELP: tuple[tuple[str, str], ...] = (
    ("↑/↓  j/k", "select an episode (an alert when the alert list is focused)"),
    ("PgUp/PgDn Home/End", "move a page, to the first, to the last"),
    ("Enter", "open the episode's detail view; on an alert: the whole alert"),
    ("Esc", "back to the list (closes help, cancels a prompt, clears a filter)"),
    ("f", "freeze the selected episode (cgroup.freeze); on an alert: its episode"),
    ("t", "thaw the selected episode (on an alert: its episode)"),
    ("K", "kill the selected episode (on an alert: its episode); asks: y to confirm"),
    ("/", "filter episodes and alerts by text (episode id, rule, exe); Enter keeps it"),
    ("s", "cycle the sort: recent alerts, age, CPU/GPU, events"),
    ("a", "focus the alert list (again: back to the episodes)"),
    ("p", "pause the screen (keys still work; p again resumes)"),
    ("?", "this help"),
    ("q", "quit"),
)


@dataclass(frozen=True)
class Action:
    kind: str                      # "command" | "detail" | "quit"
    cmd: str | None = None         # freeze | thaw | kill
    episode: str | None = None


@dataclass(frozen=True)
class View:
    screen: str = "main"           # main | detail | alert | help
    back: str = "main"             # where Esc / any key leaves the help screen
    focus: str = "episodes"        # episodes | alerts
    selected: str | None = None    # episode id
    index: int = 0                 # position of the selection in visible_episodes
    alert_index: int = 0           # position in visible_alerts (newest first)
    alert: dict | None = None      # the alert shown whole
    sort: str = "alerts"
    filter: str = ""
    editing: bool = False          # typing a filter
    paused: bool = False
    confirm: str | None = None     # episode id a kill waits on 'y' for
    message: str | None = None
    message_ok: bool = True
    scroll: int = 0                # detail view: lines scrolled back in the recent records
    page: int = 10                 # rows a PgUp/PgDn moves (set from the screen height)


def with_message(view: View, text: str, ok: bool = True) -> View:
    return dataclasses.replace(view, message=text, message_ok=ok)


# ---------------------------------------------------------------------- lists
def _alerts_of(snap: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in (snap.get("alerts") or []) if isinstance(a, dict)]


def _alert_text(a: dict[str, Any]) -> str:
    argv = a.get("argv")
    parts = [str(a.get("rule") or ""), str(a.get("episode") or ""), str(a.get("exe") or ""),
             " ".join(str(x) for x in argv) if isinstance(argv, list) else "", str(a.get("severity") or "")]
    return "\0".join(parts).lower()


def visible_alerts(snap: dict[str, Any], view: View) -> list[dict[str, Any]]:
    """The alerts shown: newest first, filtered by the view's text."""
    alerts = _alerts_of(snap)[::-1]
    f = view.filter.strip().lower()
    if f:
        alerts = [a for a in alerts if f in _alert_text(a)]
    return alerts


def _sort_key(sort: str, now: Any):
    def num(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("-inf")

    if sort == "age":                              # oldest first
        return lambda e: (-num(e.get("started")) if num(e.get("started")) != float("-inf") else float("-inf"),)
    if sort == "cpu":
        return lambda e: (num(e.get("cpu_pct")), num(e.get("gpu_util")), num(e.get("gpu_mem_mib")))
    if sort == "events":
        return lambda e: (num(e.get("events")),)
    return None


def visible_episodes(snap: dict[str, Any], view: View) -> list[dict[str, Any]]:
    """The episodes shown: filtered by the view's text (episode id, its exes, the
    rule/exe of its alerts), in the view's sort (stable: ties keep the snapshot's
    order, which is recent alerts first)."""
    eps = [e for e in (snap.get("episodes") or []) if isinstance(e, dict)]
    f = view.filter.strip().lower()
    if f:
        hit = {str(a.get("episode")) for a in _alerts_of(snap) if f in _alert_text(a)}
        eps = [e for e in eps if f in str(e.get("id") or "").lower() or str(e.get("id")) in hit
               or any(f in str(x).lower() for x in (e.get("exes") or []))]
    key = _sort_key(view.sort, snap.get("now"))
    if key is not None:
        eps = sorted(eps, key=key, reverse=True)
    return eps


def _resolve(view: View, eps: list[dict[str, Any]]) -> View:
    """Keep the selection on the same episode id when the list changes."""
    if not eps:
        return dataclasses.replace(view, index=0, selected=None) if view.selected or view.index else view
    ids = [str(e.get("id")) for e in eps]
    if view.selected in ids:
        i = ids.index(view.selected)
    else:
        i = min(max(view.index, 0), len(ids) - 1)
    if i == view.index and ids[i] == view.selected:
        return view
    return dataclasses.replace(view, index=i, selected=ids[i])


def sync(view: View, snap: dict[str, Any]) -> View:
    """The view against a new snapshot: the selection follows its episode."""
    view = _resolve(view, visible_episodes(snap, view))
    n = len(visible_alerts(snap, view))
    if view.alert_index >= n and n:
        view = dataclasses.replace(view, alert_index=n - 1)
    return view


def _move(view: View, snap: dict[str, Any], delta: int | None, to: int | None = None) -> View:
    if view.focus == "alerts" and view.screen == "main":
        n = len(visible_alerts(snap, view))
        if not n:
            return view
        i = to if to is not None else view.alert_index + (delta or 0)
        return dataclasses.replace(view, alert_index=min(max(i, 0), n - 1))
    eps = visible_episodes(snap, view)
    if not eps:
        return view
    view = _resolve(view, eps)
    i = to if to is not None else view.index + (delta or 0)
    i = min(max(i, 0), len(eps) - 1)
    return dataclasses.replace(view, index=i, selected=str(eps[i].get("id")))


# ---------------------------------------------------------------------- keys
def handle_key(view: View, key: str, snap: dict[str, Any]) -> tuple[View, Action | None]:
    """One key. `key` is a character or one of: up down left right enter esc
    backspace pgup pgdn home end tab. Returns the new view and what to do."""
    r = dataclasses.replace
    if view.confirm is not None:                    # "kill X? y/N"
        ep = view.confirm
        view = r(view, confirm=None)
        if key in ("y", "Y"):
            return with_message(view, f"killing {ep} ..."), Action("command", "kill", ep)
        return with_message(view, f"kill {ep}: cancelled"), None
    if view.editing:                                # typing a filter
        if key == "enter":
            return sync(r(view, editing=False), snap), None
        if key == "esc":
            return sync(r(view, editing=False, filter=""), snap), None
        if key == "backspace":
            return sync(r(view, filter=view.filter[:-1]), snap), None
        if len(key) == 1 and key.isprintable():
            return sync(r(view, filter=view.filter + key, alert_index=0), snap), None
        return view, None
    if view.screen == "help":
        return r(view, screen=view.back), None
    if key in ("q", "ctrl-c"):
        return view, Action("quit")
    if key == "?":
        return r(view, screen="help", back=view.screen), None
    if key == "p":
        return with_message(r(view, paused=not view.paused), "paused" if not view.paused else "resumed"), None
    if view.screen == "alert":
        if key in ("esc", "enter", "left", "backspace"):
            return r(view, screen="main", alert=None), None
        if key in ("f", "t", "K"):
            return _act(view, key, (view.alert or {}).get("episode"))
        return view, None
    if key == "esc":
        if view.screen == "detail":
            return r(view, screen="main", scroll=0), None
        if view.focus == "alerts":
            return r(view, focus="episodes"), None
        if view.filter:
            return sync(r(view, filter=""), snap), None
        return r(view, message=None), None
    if view.screen == "detail":
        if key in ("up", "k"):
            return r(view, scroll=view.scroll + 1), None
        if key in ("down", "j"):
            return r(view, scroll=max(0, view.scroll - 1)), None
        if key == "pgup":
            return r(view, scroll=view.scroll + view.page), None
        if key == "pgdn":
            return r(view, scroll=max(0, view.scroll - view.page)), None
        if key in ("end", "home"):
            return r(view, scroll=0), None
        if key in ("left", "backspace"):
            return r(view, screen="main", scroll=0), None
    if key in ("up", "k"):
        return _move(view, snap, -1), None
    if key in ("down", "j"):
        return _move(view, snap, +1), None
    if key == "pgup":
        return _move(view, snap, -view.page), None
    if key == "pgdn":
        return _move(view, snap, +view.page), None
    if key == "home":
        return _move(view, snap, None, 0), None
    if key == "end":
        return _move(view, snap, None, 10 ** 9), None
    if key == "/":
        return r(view, editing=True), None
    if key == "s" and view.screen == "main":
        nxt = SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)] if view.sort in SORTS else SORTS[0]
        view = sync(r(view, sort=nxt), snap)
        return with_message(view, f"sort: {SORT_LABELS[nxt]}"), None
    if key in ("a", "tab") and view.screen == "main":
        return r(view, focus="episodes" if view.focus == "alerts" else "alerts"), None
    if view.screen == "main" and view.focus == "alerts":
        alerts = visible_alerts(snap, view)
        current = alerts[min(view.alert_index, len(alerts) - 1)] if alerts else None
        if key == "enter":
            if current is not None:
                return r(view, screen="alert", alert=current), None
            return with_message(view, "no alert to show", ok=False), None
        if key in ("f", "t", "K"):                 # act on the selected alert's episode
            if current is None:
                return with_message(view, "no alert selected", ok=False), None
            return _act(view, key, current.get("episode"))
        return view, None
    # episode actions (main list or detail view)
    view = sync(view, snap) if view.screen == "main" else view
    ep = view.selected
    if key == "enter" and view.screen == "main":
        if ep is None:
            return with_message(view, "no episode selected", ok=False), None
        return r(view, screen="detail", scroll=0), Action("detail", episode=ep)
    if key in ("f", "t", "K"):
        return _act(view, key, ep)
    return view, None


def _act(view: View, key: str, ep: Any) -> tuple[View, Action | None]:
    """f / t / K on episode `ep`: K first asks (the prompt lists what it kills)."""
    if not ep:
        return with_message(view, "no episode selected" if view.focus == "episodes" and view.screen != "alert"
                            else "this alert belongs to no episode", ok=False), None
    ep = str(ep)
    if key == "K":
        return dataclasses.replace(view, confirm=ep), Action("detail", episode=ep)
    cmd = "freeze" if key == "f" else "thaw"
    return with_message(view, f"{cmd} {ep} ..."), Action("command", cmd, ep)


# ---------------------------------------------------------------------- terminal input
_SEQ = {
    "\x1b[A": "up", "\x1b[B": "down", "\x1b[C": "right", "\x1b[D": "left",
    "\x1bOA": "up", "\x1bOB": "down", "\x1bOC": "right", "\x1bOD": "left",
    "\x1b[5~": "pgup", "\x1b[6~": "pgdn", "\x1b[H": "home", "\x1b[F": "end",
    "\x1b[1~": "home", "\x1b[4~": "end", "\x1bOH": "home", "\x1bOF": "end", "\x1b[3~": "delete",
}


def parse_keys(data: str) -> tuple[list[str], str]:
    """Keys in `data` (what the terminal sent) and an unfinished escape sequence
    left over (read more, or pass it again alone: a lone ESC is the Esc key)."""
    keys: list[str] = []
    i = 0
    n = len(data)
    while i < n:
        c = data[i]
        if c == "\x1b":
            if i + 1 == n:
                return keys, data[i:]                       # maybe the start of a sequence
            nxt = data[i + 1]
            if nxt in "[O":
                j = i + 2
                while j < n and not (data[j].isalpha() or data[j] == "~"):
                    j += 1
                if j >= n:
                    return keys, data[i:]
                seq = data[i: j + 1]
                keys.append(_SEQ.get(seq, "unknown"))
                i = j + 1
                continue
            keys.append("esc")
            i += 1
            continue
        if c in "\r\n":
            keys.append("enter")
        elif c in "\x7f\x08":
            keys.append("backspace")
        elif c == "\t":
            keys.append("tab")
        elif c == "\x03":
            keys.append("ctrl-c")
        else:
            keys.append(c)
        i += 1
    return keys, ""


def finish_pending(pending: str) -> list[str]:
    """Keys of a leftover that no more bytes followed: a lone ESC is Esc."""
    if pending == "\x1b":
        return ["esc"]
    keys, rest = parse_keys(pending)
    return keys + (["esc"] if rest else [])
