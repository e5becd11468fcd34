"""render(): what the operator sees, at 80x24 and 200x60, for snapshots made by
State from recorded JSONL (tests/dashboard/data/)."""
from __future__ import annotations

import copy
import re
import time
from typing import Any

import orjson
import pytest
from rich.segment import Segment
from rich.style import Style

from dash_helpers import T0, console, load_records, state_from, to_text
from episode_tracer import dashboard
from episode_tracer.dashboard import SEVERITY_STYLES, fmt_clock, measure_render, render, render_waiting, sparkline
from episode_tracer.state import State

SIZES = [(80, 24), (200, 60)]


def lines_with_styles(renderable: Any, width: int, height: int) -> list[tuple[str, list[Segment]]]:
    """Rendered lines as (plain text, segments), with colours."""
    con = console(width, height, color=True)
    segments = list(con.render(renderable, con.options))
    return [("".join(s.text for s in line), line) for line in Segment.split_lines(segments)]


def styles_of(lines: list[tuple[str, list[Segment]]], needle: str) -> list[Style]:
    """Styles of the segments on the line that contains `needle`."""
    for text, segs in lines:
        if needle in text:
            return [s.style for s in segs if s.style is not None and s.text.strip()]
    raise AssertionError(f"{needle!r} not rendered")


def episode_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"^(rollout|coder|ep)-", line.strip())]


# ---------------------------------------------------------------------- empty
@pytest.mark.parametrize("width,height", SIZES)
def test_empty_snapshot(width: int, height: int) -> None:
    snap = State(node="n1", mode="enforce", policy_version="v0", started=T0, scope="episodes").snapshot(now=T0 + 65)
    text = to_text(render(snap, width, height), width, height)
    assert "node n1" in text
    assert "ENFORCE" in text
    assert "up 1m05s" in text
    assert "policy v0" in text
    assert "no episodes yet" in text
    assert "no alerts" in text
    assert "lost 0" in text
    assert "self-test: pending" in text
    assert "GPU: off: waiting for the GPU watcher" in text
    assert "events 0/s" in text


def test_render_survives_a_minimal_or_odd_snapshot() -> None:
    for snap in ({}, {"episodes": [{}], "alerts": [{}], "gpus": [{}]}, {"mode": "weird", "lost_total": 3}):
        for w, h in SIZES + [(40, 8), (20, 3)]:
            to_text(render(snap, w, h), max(w, 40), max(h, 8))


# ---------------------------------------------------------------------- one recorded session
@pytest.mark.parametrize("width,height", SIZES)
def test_basic_session(basic_snapshot: dict[str, Any], width: int, height: int) -> None:
    text = to_text(render(basic_snapshot, width, height), width, height)
    assert "node gpu-node-07" in text
    assert "policy a1b2c3d" in text
    assert "self-test: all 4 ok" in text
    assert "(14 total)" in text
    assert "Episodes  2  1 running  1 killed" in text
    rows = episode_rows(text)
    assert [r.split()[0] for r in rows] == ["rollout-7f3a-0001", "coder-sbx-0002"]
    # id state procs execs conns alerts gpu-mem gpu% age
    assert rows[0].split()[:9] == ["rollout-7f3a-0001", "running", "2", "2", "1", "1", "32.0G", "50", "9s"]
    assert rows[1].split()[:9] == ["coder-sbx-0002", "killed", "0", "2", "1", "1", "-", "-", "6s"]
    for header in ("EPISODE", "STATE", "PROCS", "EXECS", "CONNS", "ALERTS", "GPU MEM", "GPU%", "AGE"):
        assert header in text
    # the feed: newest first, time / severity / rule / episode / action+enforced
    feed = [line for line in text.splitlines() if re.search(r"\d\d:\d\d:\d\d (CRIT|MED|INFO)", line)]
    assert len(feed) == 3
    assert "INFO outside-episode-miner" in feed[0] and " - " in feed[0]
    assert "MED  gpu-unexpected-process rollout-7f3a-0001 alert" in feed[1]
    assert "CRIT reverse-tunnel" in feed[2] and "coder-sbx-0002" in feed[2]
    assert "kill-episode enforced" in feed[2]
    assert f"{fmt_clock(T0 + 4.31)} CRIT reverse-tunnel" in feed[2]


def test_basic_session_gpu_panel(basic_snapshot: dict[str, Any]) -> None:
    wide = to_text(render(basic_snapshot, 200, 60), 200, 60)
    assert "GPU0 NVIDIA H100 80GB HBM3 util  85%" in wide
    assert "30.8/79.6 GiB" in wide
    assert "power 512 W" in wide
    assert "GPU1" in wide
    assert "GPU: off" not in wide
    narrow = to_text(render(basic_snapshot, 80, 24), 80, 24)
    assert "GPU0 util  85%" in narrow          # names dropped at 80 columns
    assert "GPU1 util  15%" in narrow


def test_no_gpu_shows_one_status_line(monitor_snapshot: dict[str, Any]) -> None:
    for w, h in SIZES:
        text = to_text(render(monitor_snapshot, w, h), w, h)
        gpu_lines = [line for line in text.splitlines() if "GPU" in line and "GPU MEM" not in line]
        assert gpu_lines == ["GPU: off: NVML unavailable: libnvidia-ml.so.1 not found"]
        # without any GPU data the GPU columns are left out
        assert "GPU MEM" not in text and "GPU%" not in text


def test_many_gpus_compact_at_small_heights() -> None:
    st = state_from("basic.jsonl")
    st.observe({"type": "gpu_node", "ts": T0 + 8, "episode": None, "gpus": [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "util": 10 * i, "mem_used_mib": 1024 * i,
         "mem_total_mib": 81559, "power_w": 100} for i in range(8)]})
    snap = st.snapshot(now=T0 + 10)
    text = to_text(render(snap, 80, 24), 80, 24)
    assert "GPU0 0% 0/80G" in text and "GPU7 70% 7/80G" in text
    tall = to_text(render(snap, 120, 60), 120, 60)
    assert sum(1 for line in tall.splitlines() if line.startswith("GPU") and "util" in line) == 8


# ---------------------------------------------------------------------- monitor mode, lost, self-test
@pytest.mark.parametrize("width,height", SIZES)
def test_monitor_mode_shows_would(monitor_snapshot: dict[str, Any], width: int, height: int) -> None:
    text = to_text(render(monitor_snapshot, width, height), width, height)
    assert "MONITOR" in text and "ENFORCE" not in text
    assert "would: kill-episode" in text
    assert "would: kill " in text or text.rstrip().endswith("would: kill")
    assert "enforced" not in text.replace("ENFORCE", "")


def test_monitor_mode_without_would_field() -> None:
    st = state_from("monitor.jsonl")
    st.observe({"type": "alert", "ts": T0 + 2, "episode": "rollout-mon-0003", "rule": "no-would-field",
                "severity": "high", "action": "kill", "enforced": False})
    text = to_text(render(st.snapshot(now=T0 + 10), 200, 60), 200, 60)
    assert re.search(r"no-would-field\s+rollout-mon-0003\s+would: kill", text)


def test_lost_events_red_when_nonzero(monitor_snapshot: dict[str, Any], basic_snapshot: dict[str, Any]) -> None:
    wide = to_text(render(monitor_snapshot, 200, 60), 200, 60)
    assert "LOST 10 (exec 8, connect 2)" in wide
    narrow = to_text(render(monitor_snapshot, 80, 24), 80, 24)
    assert "LOST 10" in narrow
    lost_styles = [
        s for text, segs in lines_with_styles(render(monitor_snapshot, 200, 60), 200, 60)
        for s in (seg.style for seg in segs if "LOST" in seg.text) if s is not None
    ]
    assert lost_styles and all(s.color is not None and s.color.name == "red" and s.bold for s in lost_styles)
    ok_styles = [
        s for text, segs in lines_with_styles(render(basic_snapshot, 200, 60), 200, 60)
        for s in (seg.style for seg in segs if "lost 0" in seg.text) if s is not None
    ]
    assert ok_styles and all(s.color is None or s.color.name != "red" for s in ok_styles)


def test_selftest_failures_are_named(monitor_snapshot: dict[str, Any]) -> None:
    wide = to_text(render(monitor_snapshot, 200, 60), 200, 60)
    assert "exec-gate FAILED: bpf_send_signal EPERM" in wide
    assert "sendmsg4 skipped: no IPv4 sendmsg hook" in wide
    assert "1 ok" in wide
    narrow = to_text(render(monitor_snapshot, 80, 24), 80, 24)
    assert "FAILED exec-gate" in narrow


def test_mode_badges_are_coloured(monitor_snapshot: dict[str, Any], basic_snapshot: dict[str, Any]) -> None:
    mon = [s for t, segs in lines_with_styles(render(monitor_snapshot, 80, 24), 80, 24)
           for s in (g.style for g in segs if "MONITOR" in g.text) if s]
    assert mon and mon[0].bgcolor is not None and mon[0].bgcolor.name == "yellow"
    enf = [s for t, segs in lines_with_styles(render(basic_snapshot, 80, 24), 80, 24)
           for s in (g.style for g in segs if "ENFORCE" in g.text) if s]
    assert enf and enf[0].bgcolor is not None and enf[0].bgcolor.name == "green"


# ---------------------------------------------------------------------- alert storm
def _storm_state(n: int = 250) -> State:
    st = state_from("basic.jsonl")
    template = next(r for r in load_records("basic.jsonl") if r["type"] == "alert" and r["severity"] == "critical")
    sevs = ["info", "low", "medium", "high", "critical"]
    for i in range(n):
        rec = dict(template, ts=T0 + 20 + i * 0.01, rule=f"storm-{sevs[i % 5]}-{i:03d}", severity=sevs[i % 5],
                   action="kill", enforced=True, episode="rollout-7f3a-0001")
        st.observe(rec)
    return st


@pytest.mark.parametrize("width,height", SIZES)
def test_alert_storm_of_200(width: int, height: int) -> None:
    snap = _storm_state(250).snapshot(now=T0 + 30)
    assert len(snap["alerts"]) == 200 and snap["alerts_total"] == 253
    text = to_text(render(snap, width, height), width, height)
    feed = [line for line in text.splitlines() if "storm-" in line]
    assert len(feed) >= 5
    # newest first, consecutive
    nums = [int(re.search(r"storm-\w+-(\d{3})", line).group(1)) for line in feed]
    assert nums == list(range(249, 249 - len(nums), -1))
    assert "Alerts  253" in text
    assert "40 critical  40 high  40 medium  40 low  40 info" in text
    rows = episode_rows(text)
    assert rows[0].split()[0] == "rollout-7f3a-0001" and rows[0].split()[5] == "251"
    # the feed uses the room it gets: at 200x60 (side by side) nearly the full height
    if width >= 160:
        assert len(feed) >= height - 8


def test_severity_colours() -> None:
    snap = _storm_state(10).snapshot(now=T0 + 30)
    lines = lines_with_styles(render(snap, 120, 40), 120, 40)     # stacked: an alert line is alone

    def main_style(rule: str) -> Style:
        styles = styles_of(lines, rule)
        return styles[0]

    assert SEVERITY_STYLES["critical"] == "bold white on red"
    crit = main_style("storm-critical-009")
    assert crit.bold and crit.bgcolor is not None and crit.bgcolor.name == "red" and crit.color.name == "white"
    high = main_style("storm-high-008")
    assert high.color is not None and high.color.name == "red" and high.bgcolor is None
    med = main_style("storm-medium-007")
    assert med.color is not None and med.color.name == "yellow"
    low = main_style("storm-low-006")
    assert low.color is None and low.bgcolor is None and not low.dim
    info = main_style("storm-info-005")
    assert info.dim
    # every segment of a critical line has the red background (the whole line stands out)
    assert all(s.bgcolor is not None and s.bgcolor.name == "red" for s in styles_of(lines, "storm-critical-009"))
    # side by side, the rule's own segment carries the severity style too
    wide = lines_with_styles(render(snap, 200, 60), 200, 60)
    for rule, check in (("storm-critical-009", lambda s: s.bgcolor is not None and s.bgcolor.name == "red"),
                        ("storm-high-008", lambda s: s.color is not None and s.color.name == "red"),
                        ("storm-medium-007", lambda s: s.color is not None and s.color.name == "yellow"),
                        ("storm-info-005", lambda s: bool(s.dim))):
        segs = [g for text, line in wide if rule in text for g in line if rule in g.text]
        assert segs and segs[0].style is not None and check(segs[0].style), (rule, segs)


# ---------------------------------------------------------------------- 1,000 episodes
def _thousand_state() -> State:
    """1,000 episodes, each a copy of the recorded rollout episode with its own id and pids."""
    base = [r for r in load_records("basic.jsonl") if r.get("episode") == "rollout-7f3a-0001"]
    st = state_from("basic.jsonl")
    for i in range(1000):
        ep = f"ep-{i:04d}"
        dt = i * 0.01
        for rec in base:
            if rec["type"] == "alert" and i % 7:
                continue                               # 1 in 7 has an alert
            r = dict(rec, episode=ep, ts=rec["ts"] + dt)
            for key in ("pid", "tid", "child_pid", "root_pid"):
                if isinstance(r.get(key), int):
                    r[key] = r[key] + 100_000 + 10 * i
            st.observe(r)
        if i % 10 == 9:
            st.observe({"type": "episode_end", "ts": T0 + 15 + dt, "episode": ep, "exit_code": 0, "reason": "exited"})
    return st


@pytest.mark.parametrize("width,height", SIZES)
def test_thousand_episodes(width: int, height: int) -> None:
    snap = _thousand_state().snapshot(now=T0 + 30)
    assert len(snap["episodes"]) == 1002
    t = time.perf_counter()
    text = to_text(render(snap, width, height), width, height)
    elapsed = (time.perf_counter() - t) * 1000
    print(f"\nrender+print 1,002 episodes at {width}x{height}: {elapsed:.1f} ms")
    rows = episode_rows(text)
    m = re.search(r"… and (\d+) more episodes \((\d+) with alerts\)", text)
    assert m, text
    hidden = int(m.group(1))
    assert len(rows) + hidden == 1002
    hidden_eps = snap["episodes"][len(rows):]
    assert int(m.group(2)) == sum(1 for e in hidden_eps if e["alerts"])
    # the rows shown are the snapshot's first ones, in its order (most recent alert first)
    assert [r.split()[0] for r in rows] == [e["id"] for e in snap["episodes"][: len(rows)]]
    assert rows[0].split()[0] == "ep-0994"          # newest alert: 994 is the last multiple of 7
    assert "Episodes  1002  901 running  1 killed  100 ended" in text


def test_render_time_1000_episodes_200_alerts() -> None:
    stats = measure_render(1000, 200, 5)
    print(f"\nmeasure_render(1000, 200): {stats}")
    for key in ("n_episodes", "n_alerts", "repeats", "min_ms", "median_ms", "mean_ms", "p95_ms", "max_ms",
                "snapshot_ms", "width", "height"):
        assert key in stats
    assert stats["n_episodes"] == 1000 and stats["repeats"] == 5
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    small = measure_render(1000, 200, 3, width=80, height=24)
    print(f"measure_render(1000, 200) at 80x24: {small}")


# ---------------------------------------------------------------------- adapting to the width
def test_narrow_terminal_drops_less_important_columns() -> None:
    st = state_from("basic.jsonl")
    long_id = "rollout-2024-11-05-policy-v7-0001"
    st.observe({"type": "episode_start", "ts": T0 + 7, "episode": long_id, "source": "cgroup", "root_pid": 7000})
    st.observe({"type": "gpu", "ts": T0 + 7, "episode": long_id, "pid": 7000, "gpu_index": 0, "used_mib": 100, "sm_util": 3})
    snap = st.snapshot(now=T0 + 10)
    wide = to_text(render(snap, 200, 60), 200, 60)
    for header in ("EPISODE", "STATE", "PROCS", "EXECS", "CONNS", "ALERTS", "GPU MEM", "GPU%", "AGE"):
        assert header in wide
    assert long_id in wide
    narrow = to_text(render(snap, 80, 24), 80, 24)
    header_line = next(line for line in narrow.splitlines() if line.startswith("EPISODE"))
    assert "STATE" in header_line and "ALERTS" in header_line and "AGE" in header_line
    assert "GPU%" not in header_line and "EXECS" not in header_line     # dropped first
    assert long_id in narrow


def test_side_by_side_only_when_wide(basic_snapshot: dict[str, Any]) -> None:
    wide = to_text(render(basic_snapshot, 200, 60), 200, 60)
    assert any("Episodes" in line and "Alerts" in line for line in wide.splitlines())
    narrow = to_text(render(basic_snapshot, 120, 40), 120, 40)
    assert not any("Episodes" in line and "Alerts" in line for line in narrow.splitlines())


@pytest.mark.parametrize("width,height", [(80, 24), (100, 30), (132, 43), (200, 60), (300, 80), (60, 15)])
def test_never_taller_or_wider_than_the_terminal(width: int, height: int) -> None:
    snap = _storm_state(250).snapshot(now=T0 + 30)
    to_text(render(snap, width, height), width, height)
    big = _thousand_state().snapshot(now=T0 + 30)
    text = to_text(render(big, width, height), width, height)
    assert "more episodes" in text


# ---------------------------------------------------------------------- purity, sparkline, waiting screen
def test_render_is_pure(basic_snapshot: dict[str, Any]) -> None:
    before = copy.deepcopy(basic_snapshot)
    a = to_text(render(basic_snapshot, 80, 24), 80, 24)
    b = to_text(render(basic_snapshot, 80, 24), 80, 24)
    assert a == b
    assert basic_snapshot == before
    # a snapshot that went through the control socket (JSON) renders the same
    assert to_text(render(orjson.loads(orjson.dumps(basic_snapshot)), 80, 24), 80, 24) == a


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 4, 8], 5).plain == "▁▂▃▅█"
    assert sparkline([5] * 100, 10).plain == "█" * 10
    assert sparkline([], 10).plain == ""
    assert sparkline([0, 0], 2).plain == "▁▁"
    snap = state_from("basic.jsonl").snapshot(now=T0 + 10)
    # kernel events of the fixture per second T0+0 .. T0+9 (ready, alerts, gpu samples are not events)
    assert len(snap["rate_history"]) == 60
    assert snap["rate_history"][-10:] == [0, 5, 0, 3, 6, 0, 0, 0, 0, 0]
    assert sum(snap["rate_history"]) == snap["events_total"] == 14
    text = to_text(render(snap, 200, 60), 200, 60)
    assert "events/s " in text and "peak" in text


def test_waiting_screen() -> None:
    text = to_text(render_waiting("/run/agent-tracer/control.sock", "no such file", 2.4, 80, 24), 80, 24)
    assert "tracer not running at /run/agent-tracer/control.sock" in text
    assert "retrying in 3s" in text
    assert "no such file" in text
    assert "Ctrl-C" in text


def test_fmt_helpers() -> None:
    assert dashboard.fmt_duration(42) == "42s"
    assert dashboard.fmt_duration(725) == "12m05s"
    assert dashboard.fmt_duration(11220) == "3h07m"
    assert dashboard.fmt_duration(187200) == "2d04h"
    assert dashboard.fmt_count(12345) == "12.3k"
    assert dashboard.fmt_count(1_234_567) == "1.2M"
    assert dashboard.fmt_count(999) == "999"
    assert dashboard.fmt_count(3933.3) == "3,933"
    assert dashboard.fmt_count(2.5) == "2.5"
    assert dashboard.fmt_mib(512) == "512M"
    assert dashboard.fmt_mib(30720) == "30.0G"
