"""`agent-tracer top`'s view state machine (episode_tracer/topview.py) without a terminal,
and the screens it selects rendered against a recording console at 80x24 and 200x60."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from rich.segment import Segment

from dash_helpers import T0, console, state_from, to_text
from episode_tracer.dashboard import render
from episode_tracer.state import State
from episode_tracer.topview import (
    SORTS,
    Action,
    View,
    finish_pending,
    handle_key,
    parse_keys,
    sync,
    visible_alerts,
    visible_episodes,
)

SIZES = [(80, 24), (200, 60)]


def rich_state() -> State:
    """basic.jsonl plus a third episode with a listener, a held flow and a gated exec."""
    st = state_from("basic.jsonl")
    ep = "agent-zeta-0003"
    st.observe({"type": "episode_start", "ts": T0 + 7, "episode": ep, "source": "cgroup",
                "cgroup_path": f"/sys/fs/cgroup/agent-tracer/{ep}", "root_pid": 5000, "labels": {"task": "t9"}})
    st.observe({"type": "exec", "ts": T0 + 7.1, "episode": ep, "pid": 5000, "tid": 5000, "ppid": 1,
                "exe": "/usr/bin/bash", "argv": ["bash", "run.sh"]})
    st.observe({"type": "fork", "ts": T0 + 7.2, "episode": ep, "pid": 5000, "tid": 5000, "child_pid": 5001})
    st.observe({"type": "exec", "ts": T0 + 7.3, "episode": ep, "pid": 5001, "tid": 5001, "ppid": 5000,
                "exe": "/usr/bin/socat", "argv": ["socat", "TCP-LISTEN:8022", "-"]})
    st.observe({"type": "listen", "ts": T0 + 7.4, "episode": ep, "pid": 5001, "fd": 5, "family": "inet",
                "addr": "0.0.0.0", "port": 8022, "exe": "/usr/bin/socat", "result": 0})
    st.observe({"type": "fork", "ts": T0 + 7.5, "episode": ep, "pid": 5000, "tid": 5000, "child_pid": 5002})
    st.observe({"type": "exec", "ts": T0 + 7.6, "episode": ep, "pid": 5002, "tid": 5002, "ppid": 5000,
                "exe": "/usr/bin/ssh", "argv": ["ssh", "-R", "9000:localhost:8022", "10.9.9.9"]})
    st.observe({"type": "connect", "ts": T0 + 7.7, "episode": ep, "pid": 5002, "fd": 3, "family": "inet",
                "addr": "10.9.9.9", "port": 22, "result": 0, "exe": "/usr/bin/ssh"})
    st.observe({"type": "protocol", "ts": T0 + 7.8, "episode": ep, "pid": 5002, "fd": 3, "family": "inet",
                "addr": "10.9.9.9", "port": 22, "protocol": "ssh", "held": True, "matched_bytes": "SSH-2.0-OpenSSH_9.2"})
    st.observe({"type": "alert", "ts": T0 + 7.9, "episode": ep, "rule": "ssh-reverse-forward", "severity": "high",
                "action": "kill-episode", "enforced": True, "pid": 5002, "exe": "/usr/bin/ssh",
                "argv": ["ssh", "-R", "9000:localhost:8022", "10.9.9.9"], "event": "protocol",
                "matched": {"protocol": "ssh", "argv": "-R"}, "matched_bytes": "SSH-2.0-OpenSSH_9.2",
                "matched_offset": 0, "description": "ssh with a remote forward", "policy_version": "a1b2c3d"})
    st.set_held({5002: T0 + 7.8})
    return st


@pytest.fixture
def snap() -> dict[str, Any]:
    return rich_state().snapshot(now=T0 + 10)


def keys(view: View, snap: dict[str, Any], *ks: str) -> tuple[View, list[Action]]:
    actions = []
    for k in ks:
        view, a = handle_key(view, k, snap)
        if a is not None:
            actions.append(a)
    return view, actions


# ---------------------------------------------------------------------- state machine
def test_selection_moves_clamps_and_follows_the_episode(snap: dict[str, Any]) -> None:
    ids = [e["id"] for e in visible_episodes(snap, View())]
    assert ids == ["agent-zeta-0003", "rollout-7f3a-0001", "coder-sbx-0002"]
    v = sync(View(), snap)
    assert v.selected == ids[0] and v.index == 0
    v, _ = keys(v, snap, "down")
    assert v.selected == ids[1]
    v, _ = keys(v, snap, "j", "j", "j", "down")
    assert v.selected == ids[2] and v.index == 2            # clamped at the end
    v, _ = keys(v, snap, "k", "up", "up")
    assert v.selected == ids[0] and v.index == 0            # clamped at the top
    v, _ = keys(v, snap, "end")
    assert v.selected == ids[2]
    v, _ = keys(v, snap, "home", "down")
    assert v.selected == ids[1]
    # a new snapshot in another order: the selection stays on its episode
    reordered = dict(snap, episodes=list(reversed(snap["episodes"])))
    v2 = sync(v, reordered)
    assert v2.selected == ids[1] and v2.index == 1
    gone = dict(snap, episodes=[e for e in snap["episodes"] if e["id"] != ids[1]])
    v3 = sync(v, gone)
    assert v3.selected in (ids[0], ids[2])                 # falls back to a neighbour, never None


def test_filter_by_id_rule_and_exe(snap: dict[str, Any]) -> None:
    v = sync(View(), snap)
    v, acts = keys(v, snap, "/", "c", "o", "d", "e", "r")
    assert v.editing and v.filter == "coder" and not acts
    assert [e["id"] for e in visible_episodes(snap, v)] == ["coder-sbx-0002"]
    assert v.selected == "coder-sbx-0002"
    v, _ = keys(v, snap, "enter")
    assert not v.editing and v.filter == "coder"
    # the keys act again once the filter is kept: 's' sorts, it is not typed
    v, _ = keys(v, snap, "s")
    assert v.filter == "coder" and v.sort == SORTS[1]
    v, _ = keys(v, snap, "esc")
    assert v.filter == "" and len(visible_episodes(snap, v)) == 3
    # by rule: the episode whose alert matches, and only that alert
    v, _ = keys(v, snap, "/", *"gpu-unexp", "enter")
    assert [e["id"] for e in visible_episodes(snap, v)] == ["rollout-7f3a-0001"]
    assert [a["rule"] for a in visible_alerts(snap, v)] == ["gpu-unexpected-process"]
    # by exe of a process of the episode
    v, _ = keys(v, snap, "/", "backspace", *"x" * 0)
    v = dataclasses.replace(v, filter="", editing=False)
    v, _ = keys(v, snap, "/", *"socat", "enter")
    assert [e["id"] for e in visible_episodes(snap, v)] == ["agent-zeta-0003"]
    # backspace edits, Esc while typing clears
    v, _ = keys(v, snap, "/", "backspace", "backspace")
    assert v.filter == "soc"
    v, _ = keys(v, snap, "esc")
    assert v.filter == "" and not v.editing


def test_sort_cycles_alerts_age_cpu_events(snap: dict[str, Any]) -> None:
    snap = dict(snap)
    eps = [dict(e) for e in snap["episodes"]]
    cpu = {"agent-zeta-0003": 5.0, "rollout-7f3a-0001": 90.0, "coder-sbx-0002": None}
    for e in eps:
        e["cpu_pct"] = cpu[e["id"]]
    snap["episodes"] = eps
    v = sync(View(), snap)
    order = {}
    for expect in SORTS[1:] + SORTS[:1]:
        v, _ = keys(v, snap, "s")
        assert v.sort == expect and v.message and "sort" in v.message
        order[expect] = [e["id"] for e in visible_episodes(snap, v)]
    assert order["alerts"] == ["agent-zeta-0003", "rollout-7f3a-0001", "coder-sbx-0002"]
    assert order["age"] == ["rollout-7f3a-0001", "coder-sbx-0002", "agent-zeta-0003"]     # oldest first
    assert order["cpu"][0] == "rollout-7f3a-0001" and order["cpu"][-1] == "coder-sbx-0002"
    # the CPU column appears once the tracer measured CPU (episode_tracer/cpu.py), at both sizes
    for w, h in SIZES:
        v2 = dataclasses.replace(v, sort="cpu")
        text = to_text(render(snap, w, h, v2), w, h)
        header = next(ln for ln in text.splitlines() if ln.startswith("EPISODE"))
        assert "CPU%" in header
        row = next(ln for ln in text.splitlines() if ln.startswith("rollout-7f3a-0001"))
        assert " 90 " in row
    ev = {e["id"]: e["events"] for e in eps}
    assert [ev[i] for i in order["events"]] == sorted(ev.values(), reverse=True)


def test_freeze_thaw_and_kill_confirm(snap: dict[str, Any]) -> None:
    v = sync(View(), snap)
    v, acts = keys(v, snap, "f")
    assert acts == [Action("command", "freeze", "agent-zeta-0003")]
    v, acts = keys(v, snap, "t")
    assert acts == [Action("command", "thaw", "agent-zeta-0003")]
    # K asks first (and fetches the detail to say what it kills); anything but y cancels
    v, acts = keys(v, snap, "K")
    assert v.confirm == "agent-zeta-0003" and acts == [Action("detail", episode="agent-zeta-0003")]
    v, acts = keys(v, snap, "n")
    assert v.confirm is None and acts == [] and "cancelled" in (v.message or "")
    v, acts = keys(v, snap, "K", "q")                        # q answers the prompt, it does not quit
    assert acts == [Action("detail", episode="agent-zeta-0003")] and v.confirm is None
    v, acts = keys(v, snap, "K", "y")
    assert acts[-1] == Action("command", "kill", "agent-zeta-0003")
    # nothing selected: an error on screen, no action
    empty = dict(snap, episodes=[])
    v, acts = keys(sync(View(), empty), empty, "f", "K")
    assert acts == [] and v.message == "no episode selected" and not v.message_ok


def test_detail_alert_help_pause_quit(snap: dict[str, Any]) -> None:
    v = sync(View(), snap)
    v, acts = keys(v, snap, "down", "enter")
    assert v.screen == "detail" and acts == [Action("detail", episode="rollout-7f3a-0001")]
    v, acts = keys(v, snap, "up", "up", "down")
    assert v.scroll == 1 and v.selected == "rollout-7f3a-0001"   # arrows scroll the records here
    v, acts = keys(v, snap, "f")
    assert acts == [Action("command", "freeze", "rollout-7f3a-0001")]
    v, _ = keys(v, snap, "esc")
    assert v.screen == "main" and v.scroll == 0
    # alert list: focus, move, Enter shows the alert whole, Esc back
    v, _ = keys(v, snap, "a")
    assert v.focus == "alerts"
    v, _ = keys(v, snap, "down", "down", "enter")
    assert v.screen == "alert" and v.alert["rule"] == visible_alerts(snap, v)[2]["rule"] == "gpu-unexpected-process"
    v, acts = keys(v, snap, "f")                              # acts on the alert's episode
    assert acts == [Action("command", "freeze", v.alert["episode"])]
    v, _ = keys(v, snap, "esc")
    assert v.screen == "main" and v.focus == "alerts"
    v, acts = keys(v, snap, "home", "K")
    assert v.confirm == "agent-zeta-0003" and acts == [Action("detail", episode="agent-zeta-0003")]
    v, _ = keys(v, snap, "n", "down", "t")                     # the outside-episode alert: no episode
    assert v.message == "this alert belongs to no episode" and not v.message_ok
    v, _ = keys(v, snap, "esc")
    assert v.focus == "episodes"
    v, _ = keys(v, snap, "?")
    assert v.screen == "help"
    v, _ = keys(v, snap, "x")
    assert v.screen == "main"
    v, _ = keys(v, snap, "p")
    assert v.paused and v.message == "paused"
    v, acts = keys(v, snap, "p", "q")
    assert not v.paused and acts == [Action("quit")]


def test_parse_keys() -> None:
    assert parse_keys("jk\x1b[A\x1b[B\r/") == (["j", "k", "up", "down", "enter", "/"], "")
    assert parse_keys("\x1b[5~\x1b[6~\x7f\t") == (["pgup", "pgdn", "backspace", "tab"], "")
    assert parse_keys("f\x1b") == (["f"], "\x1b")               # maybe the start of a sequence
    assert finish_pending("\x1b") == ["esc"]
    assert parse_keys("\x1bq") == (["esc", "q"], "")
    assert parse_keys("\x1b[") == ([], "\x1b[")
    assert finish_pending("\x1b[") == ["esc"] or finish_pending("\x1b[")[0] == "esc"


# ---------------------------------------------------------------------- screens
def styled_lines(renderable: Any, width: int, height: int) -> list[tuple[str, list[Segment]]]:
    con = console(width, height, color=True)
    segs = list(con.render(renderable, con.options))
    return [("".join(s.text for s in line), line) for line in Segment.split_lines(segs)]


@pytest.mark.parametrize("width,height", SIZES)
def test_main_screen_with_view(snap: dict[str, Any], width: int, height: int) -> None:
    v, _ = keys(sync(View(), snap), snap, "down")
    text = to_text(render(snap, width, height, v), width, height)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == height                              # the whole terminal, footer on the last line
    assert "f freeze" in lines[-1] and "q quit" in lines[-1] and "K kill" in lines[-1]
    assert "sort: recent alerts" in text
    assert ("kernel 5 programs" in text or "kernel 5 progs" in text) and "HELD NOW 1" in text
    assert "HELD" in next(ln for ln in text.splitlines() if ln.startswith("agent-zeta-0003"))   # in its row too
    # the selected row is highlighted (reverse), the others not
    rows = [(t, segs) for t, segs in styled_lines(render(snap, width, height, v), width, height)
            if "rollout-7f3a-0001" in t and "running" in t]
    assert rows and any(s.style is not None and s.style.reverse for s in rows[0][1] if s.text.strip())
    other = [(t, segs) for t, segs in styled_lines(render(snap, width, height, v), width, height)
             if t.startswith("agent-zeta-0003") or " agent-zeta-0003 " in t[:40]]
    assert other and not any(s.style is not None and s.style.reverse for s in other[0][1] if "agent-zeta" in s.text)
    # filtered: the title says so, only the match is listed
    vf, _ = keys(v, snap, "/", *"zeta", "enter")
    ftext = to_text(render(snap, width, height, vf), width, height)
    assert 'filter "zeta": 1 of 3' in ftext and "coder-sbx-0002" not in ftext


def test_many_episodes_window_follows_selection() -> None:
    from episode_tracer.dashboard import synthetic_snapshot

    snap = synthetic_snapshot(300, 20)
    v = sync(View(), snap)
    v, _ = keys(v, snap, *["pgdn"] * 5, "down")
    text = to_text(render(snap, 80, 24, v), 80, 24)
    assert v.selected in text and v.index > 20
    assert "more episodes" in text


@pytest.mark.parametrize("width,height", SIZES)
def test_detail_screen(width: int, height: int) -> None:
    st = rich_state()
    snap = st.snapshot(now=T0 + 10)
    v = sync(View(), snap)
    v, acts = keys(v, snap, "enter")
    detail = st.detail(v.selected, now=T0 + 10)
    text = to_text(render(snap, width, height, v, detail), width, height)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == height and "Esc back" in lines[-1]
    assert "Episode agent-zeta-0003" in text and "source cgroup" in text
    assert "/sys/fs/cgroup/agent-tracer/agent-zeta-0003" in text
    assert "labels task=t9" in text
    assert "HELD NOW" in text and "held flow to 10.9.9.9:22 (ssh)" in text
    # the process tree: bash, its children indented under it
    proc_lines = [ln for ln in lines if ln[:4] in ("5000", "5001", "5002")]
    assert [ln[:4] for ln in proc_lines] == ["5000", "5001", "5002"]
    assert "/usr/bin/bash" in proc_lines[0] and "└ /usr/bin/socat" in proc_lines[1]
    assert "HELD" in proc_lines[2]
    assert "LISTEN  0.0.0.0:8022" in text
    assert "→ 10.9.9.9:22" in text and "ssh" in text
    assert "ssh-reverse-forward" in text and "protocol=ssh" in text
    assert "Recent records" in text and "listen" in text
    if width >= 200:
        assert "ssh -R 9000:localhost:8022 10.9.9.9" in text


def test_detail_screen_loading_and_kill_prompt(snap: dict[str, Any]) -> None:
    st = rich_state()
    v = sync(View(), snap)
    v, _ = keys(v, snap, "enter")
    text = to_text(render(snap, 80, 24, v, None), 80, 24)
    assert "loading its detail" in text
    v, _ = keys(v, snap, "K")
    prompt = to_text(render(snap, 200, 60, v, st.detail("agent-zeta-0003", now=T0 + 10)), 200, 60).rstrip().split("\n")[-1]
    assert prompt.startswith("KILL agent-zeta-0003? y kills 3 processes (5000 bash, 5001 socat, 5002 ssh)")
    assert "cgroup /sys/fs/cgroup/agent-tracer/agent-zeta-0003" in prompt and "any other key cancels" in prompt
    narrow = to_text(render(snap, 80, 24, v, None), 80, 24).rstrip().split("\n")[-1]
    assert narrow.startswith("KILL agent-zeta-0003? y kills")


@pytest.mark.parametrize("width,height", SIZES)
def test_alert_screen_shows_it_whole(snap: dict[str, Any], width: int, height: int) -> None:
    v = sync(View(), snap)
    v, _ = keys(v, snap, "a", "enter")
    assert v.alert["rule"] == "ssh-reverse-forward"
    text = to_text(render(snap, width, height, v), width, height)
    for needle in ("ssh-reverse-forward", "ssh with a remote forward", "agent-zeta-0003", "kill-episode",
                   "enforced", "protocol = ssh", "argv = -R", "SSH-2.0-OpenSSH_9.2", "(offset 0)",
                   "a1b2c3d", "/usr/bin/ssh", "5002"):
        assert needle in text, needle
    assert "ssh -R 9000:localhost:8022" in text


@pytest.mark.parametrize("width,height", SIZES)
def test_help_screen(snap: dict[str, Any], width: int, height: int) -> None:
    v, _ = keys(sync(View(), snap), snap, "?")
    text = to_text(render(snap, width, height, v), width, height)
    for k in ("Enter", "Esc", "freeze", "thaw", "kill", "filter", "sort", "alert list", "pause", "quit"):
        assert k in text


@pytest.mark.parametrize("width,height", [(80, 24), (200, 60), (60, 15), (300, 80)])
def test_every_screen_fits(snap: dict[str, Any], width: int, height: int) -> None:
    st = rich_state()
    detail = st.detail("agent-zeta-0003", now=T0 + 10)
    base = sync(View(), snap)
    for ks in ((), ("enter",), ("a", "enter"), ("?",), ("K",), ("/", "z"), ("p",)):
        v, _ = keys(base, snap, *ks)
        to_text(render(snap, width, height, v, detail), width, height)


@pytest.mark.parametrize("width,height", SIZES)
def test_kernel_strip(width: int, height: int) -> None:
    st = rich_state()
    st.observe({"type": "stats", "ts": T0 + 8, "episode": None, "counters": {"gated": 4, "wire_held": 0}})
    st.observe({"type": "stats", "ts": T0 + 9, "episode": None, "counters": {"gated": 9, "wire_held": 2}})
    st.observe({"type": "policy_error", "ts": T0 + 9.5, "episode": None, "kept_version": "a1b2c3d",
                "errors": ["x.toml: rule 'r': unknown key 'matchh'"]})
    snap = st.snapshot(now=T0 + 10)
    line = next(ln for ln in to_text(render(snap, width, height), width, height).splitlines()
                if ln.startswith("kernel "))
    assert "5 prog" in line and "5/s" in line and "2/s" in line and "HELD NOW 1" in line
    assert "REFUSED" in line
    if width >= 160:
        assert "4 tracepoints, 1 cgroup" in line and "kept a1b2c3d: x.toml: rule 'r'" in line
        assert "paths connect4 ✓" in line
