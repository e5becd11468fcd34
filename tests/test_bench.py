"""The benchmark's own logic, without root: statistics, ramp search, target
checks, log scanning and the reports (episode_tracer/bench.py)."""
from __future__ import annotations

import json

import pytest

from episode_tracer import bench
from episode_tracer.bench import RampStep


# ------------------------------------------------------------- statistics
def test_percentile_interpolates_between_ranks():
    xs = [10, 20, 30, 40, 50]
    assert bench.percentile(xs, 0) == 10
    assert bench.percentile(xs, 50) == 30
    assert bench.percentile(xs, 100) == 50
    assert bench.percentile(xs, 25) == 20
    assert bench.percentile(xs, 90) == pytest.approx(46.0)
    assert bench.percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)  # unsorted input
    assert bench.percentile([7], 99) == 7


def test_percentile_p99_of_100_values():
    xs = list(range(1, 101))
    assert bench.percentile(xs, 99) == pytest.approx(99.01)


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="percentile of no values"):
        bench.percentile([], 50)
    with pytest.raises(ValueError, match="percentile 101 outside 0..100"):
        bench.percentile([1], 101)


def test_summarize_median_and_spread():
    s = bench.summarize([2.0, 1.0, 3.0])
    assert s == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0, "spread_pct": 100.0}
    assert bench.summarize([]) == {"n": 0}


def test_ratio_summary_pairs_each_repetition_with_its_baseline():
    # rep 1 is slow for everyone (noise): pairing cancels it
    base = [1.0, 2.0, 1.0]
    traced = [1.05, 2.1, 1.02]
    r = bench.ratio_summary(traced, base)
    assert r["n"] == 3
    assert r["ratios"] == pytest.approx([1.05, 1.05, 1.02])
    assert r["ratio"] == pytest.approx(1.05)
    assert r["ratio_min"] == pytest.approx(1.02)
    assert r["ratio_max"] == pytest.approx(1.05)
    assert r["overhead_pct"] == pytest.approx(5.0)


def test_ratio_summary_rejects_unpaired_runs():
    with pytest.raises(ValueError, match="2 traced runs against 3 baseline runs"):
        bench.ratio_summary([1, 2], [1, 2, 3])


def test_latency_summary_in_ms():
    s = bench.latency_summary([0.001] * 99 + [0.1])
    assert s["n"] == 100
    assert s["p50_ms"] == pytest.approx(1.0)
    assert s["max_ms"] == pytest.approx(100.0)
    assert 1.0 < s["p99_ms"] < 100.0
    assert bench.latency_summary([]) == {"n": 0}


def test_rotate_changes_the_first_configuration_each_repetition():
    cfgs = ["baseline", "tracer", "all"]
    assert bench.rotate(cfgs, 0) == cfgs
    assert bench.rotate(cfgs, 1) == ["tracer", "all", "baseline"]
    assert bench.rotate(cfgs, 3) == cfgs
    assert {tuple(bench.rotate(cfgs, r))[0] for r in range(3)} == set(cfgs)
    assert bench.rotate([], 2) == []


# ------------------------------------------------------------------- ramp
class FakeTracer:
    """A tracer that drains `capacity` events/s; a producer that reaches at
    most `producer_max` events/s. Loss = what exceeds the capacity."""

    def __init__(self, capacity, producer_max=10e6):
        self.capacity, self.producer_max = capacity, producer_max
        self.asked = []

    def __call__(self, rate):
        self.asked.append(rate)
        made = min(rate, self.producer_max)
        lost = max(0, int(made - self.capacity))
        return RampStep(target=rate, produced=int(made), seconds=1.0, drained=int(made) - lost, lost=lost)


def test_ramp_finds_the_highest_zero_loss_rate_and_measures_above_it():
    f = FakeTracer(capacity=100_000)
    res = bench.ramp(f, start=10_000, factor=2, refine=3, over=2)
    # geometric: 10k 20k 40k 80k (ok) 160k (loss), then bisect 80k..160k
    assert f.asked[:5] == [10_000, 20_000, 40_000, 80_000, 160_000]
    assert len(f.asked) == 5 + 3 + 2
    assert 80_000 < res.max_ok_rate <= 100_000
    assert res.first_loss_rate > res.max_ok_rate
    assert f.asked[-2:] == [320_000, 640_000]  # the loss curve above the first loss
    assert not res.producer_limited
    d = res.to_dict()
    assert [s["target"] for s in d["steps"]] == sorted(f.asked)
    lossy = [s for s in d["steps"] if not s["ok"]]
    assert lossy and all(s["loss_fraction"] > 0 for s in lossy)


def test_ramp_stops_when_the_producer_is_the_limit():
    f = FakeTracer(capacity=10e6, producer_max=50_000)
    res = bench.ramp(f, start=20_000, factor=2)
    assert f.asked == [20_000, 40_000, 80_000]
    assert res.producer_limited
    assert res.max_ok_rate == 50_000
    assert res.first_loss_rate is None


def test_ramp_loss_at_the_first_step_has_no_zero_loss_rate():
    f = FakeTracer(capacity=1_000)
    res = bench.ramp(f, start=5_000, factor=2, refine=2, over=0)
    assert f.asked == [5_000]  # nothing clean to bisect from
    assert res.max_ok_rate is None
    assert res.first_loss_rate == 5_000


def test_ramp_respects_max_rate_and_max_steps():
    f = FakeTracer(capacity=10e6)
    bench.ramp(f, start=1_000, factor=10, max_rate=100_000)
    assert f.asked == [1_000, 10_000, 100_000]
    g = FakeTracer(capacity=10e6)
    bench.ramp(g, start=1_000, factor=2, max_steps=2)
    assert g.asked == [1_000, 2_000]


def test_ramp_step_not_drained_is_not_ok():
    s = RampStep(target=1000, produced=1000, seconds=1.0, drained=990, lost=0)
    assert not s.ok
    assert RampStep(target=1000, produced=1000, seconds=0.5, drained=1000, lost=0).rate == 2000


def test_ramp_rejects_bad_parameters():
    with pytest.raises(ValueError, match="ramp needs start > 0 and factor > 1"):
        bench.ramp(FakeTracer(1), start=0)
    with pytest.raises(ValueError, match="ramp needs start > 0 and factor > 1"):
        bench.ramp(FakeTracer(1), start=10, factor=1.0)


# ---------------------------------------------------------- log scanning
def test_scan_log_chunk_keeps_only_what_the_bench_reads():
    lines = [
        {"type": "exec", "pid": 1, "comm": "true", "ktime": 5},
        {"type": "stats", "events": 3, "events_by_kind": {"socket": 2}, "lost_total": 0},
        {"type": "socket", "pid": 2, "comm": "loadgen"},
        {"type": "alert", "rule": "listener-in-episode", "port": 20001},
        {"type": "exec", "pid": 9, "comm": "atb-stamp", "ktime": 77},
        {"type": "lost", "kind": "socket", "count": 4, "total": 4},
        {"type": "ready", "startup_s": 1.0},
    ]
    data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in lines)
    got = bench.scan_log_chunk(data)
    assert sorted(r["type"] for r in got) == ["alert", "exec", "lost", "ready", "stats"]
    assert [r["pid"] for r in got if r["type"] == "exec"] == [9]
    # the live tracer's records start with the node name (episode_tracer/sinks.py)
    noded = b"".join(json.dumps({"node": "gpu-7", **r}, separators=(",", ":")).encode() + b"\n" for r in lines)
    got = bench.scan_log_chunk(noded)
    assert sorted(r["type"] for r in got) == ["alert", "exec", "lost", "ready", "stats"]
    assert [r["pid"] for r in got if r["type"] == "exec"] == [9]


# ---------------------------------------------------------------- targets
def _results(outside=1.01, episode=1.05, all_=1.2, bpf=1.5, audit=1.3, thr=250_000.0, alert99=3.0,
             gate99=1.0, startup=1.5, rss=120.0):
    def cfg(r):
        return {"ratio": bench.ratio_summary([r], [1.0]), "time_s": bench.summarize([r])}

    return {
        "overhead": {"workloads": {"forkexec": {"description": "d", "configs": {
            "baseline": {"time_s": bench.summarize([1.0])}, "outside": cfg(outside), "episode": cfg(episode),
            "all": cfg(all_), "bpftrace": cfg(bpf), "auditd": cfg(audit)}}}, "missing": {}},
        "throughput": {"steps": [], "max_zero_loss_rate": thr},
        "latency": {"alert": {"10000": {"p99_ms": alert99}}, "gate_hold": {"p99_ms": gate99}},
        "resources": {"startup": {"spawn_to_ready_s": bench.summarize([startup])}, "peak_rss_mb": rss},
    }


def test_check_targets_all_met():
    t = bench.check_targets(_results())
    assert [x["met"] for x in t] == [True] * len(t)
    names = [x["name"] for x in t]
    assert names == [
        "overhead forkexec: outside", "overhead forkexec: episode",
        "overhead forkexec: --all below bpftrace and auditd", "zero-loss drain rate (one core)",
        "alert p99 at 10,000 events/s", "exec gate hold p99", "startup to ready (spawn -> ready, median)",
        "peak RSS",
    ]


def test_check_targets_reports_each_miss_with_the_number():
    t = {x["name"]: x for x in bench.check_targets(_results(
        outside=1.03, episode=1.2, all_=1.4, bpf=1.3, thr=150_000.0, alert99=12.0, gate99=2.5,
        startup=2.5, rss=180.0))}
    assert all(x["met"] is False for x in t.values())
    assert t["overhead forkexec: outside"]["measured"] == pytest.approx(3.0)
    assert t["overhead forkexec: --all below bpftrace and auditd"]["measured"] == (
        "all x1.400 vs bpftrace x1.300 vs auditd x1.300")
    assert t["zero-loss drain rate (one core)"]["measured"] == 150_000.0


def test_check_targets_missing_tool_and_unmeasured():
    r = _results()
    cfgs = r["overhead"]["workloads"]["forkexec"]["configs"]
    del cfgs["bpftrace"], cfgs["auditd"]
    r["throughput"]["max_zero_loss_rate"] = None
    t = {x["name"]: x for x in bench.check_targets(r)}
    assert t["overhead forkexec: --all below bpftrace and auditd"]["met"] is None
    assert t["zero-loss drain rate (one core)"]["met"] is None
    assert bench.check_targets({}) == []


# ---------------------------------------------------------------- reports
def test_text_and_markdown_tables():
    assert bench.text_table(["a", "bb"], [[1, 2.5], ["xyz", None]]) == (
        "a    bb\n---  ----\n1    2.50\nxyz  -")
    assert bench.md_table(["a", "b"], [[1234567, "x|y"]]) == "| a | b |\n| --- | --- |\n| 1,234,567 | x\\|y |"


def test_render_text_has_every_section():
    r = _results()
    r["targets"] = bench.check_targets(r)
    r["meta"] = {"notes": ["bpftrace: missing"]}
    out = bench.render_text(r)
    for title in ("== Overhead: forkexec", "== Throughput ramp", "== Latency", "== Startup and resources",
                  "== Targets", "note: bpftrace: missing"):
        assert title in out
    assert "MISSED" not in out


def test_markdown_keeps_hand_written_notes_across_reruns(tmp_path):
    r = _results()
    r["targets"] = bench.check_targets(r)
    r["meta"] = {"machine": {"kernel": "6.18"}, "reps": 5, "notes": []}
    path = tmp_path / "benchmarks.md"
    bench.write_markdown(r, path, plot="img/loss.png")
    first = path.read_text()
    assert "_No analysis written yet._" in first
    assert "| kernel | 6.18 |" in first
    assert "![loss vs offered rate](img/loss.png)" in first
    assert "## How to reproduce" in first
    edited = first.replace("_No analysis written yet._", "The drain loop costs 4 us per event.\n\nMore.")
    path.write_text(edited)
    r["throughput"]["max_zero_loss_rate"] = 1.0
    bench.write_markdown(r, path)
    second = path.read_text()
    assert "The drain loop costs 4 us per event.\n\nMore." in second
    assert second.count(bench.NOTES_BEGIN) == 1


def test_extract_notes_without_markers():
    assert bench.extract_notes(None) == "_No analysis written yet._"
    assert bench.extract_notes("# old file without markers") == "_No analysis written yet._"


def test_write_json_round_trips(tmp_path):
    r = _results()
    p = tmp_path / "out" / "bench.json"
    bench.write_json(r, p)
    assert json.loads(p.read_text())["throughput"]["max_zero_loss_rate"] == 250_000.0


def test_plot_loss_writes_a_png_or_says_why_not(tmp_path):
    steps = [RampStep(target=r, produced=r, seconds=1.0, drained=r - l, lost=l, cpu_pct=50.0).to_dict()
             for r, l in ((1000, 0), (2000, 0), (4000, 400))]
    why = bench.plot_loss({"steps": steps, "max_zero_loss_rate": 2000}, tmp_path / "loss.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert why == "matplotlib is not installed (.venv/bin/pip install matplotlib): no PNG plot"
        assert not (tmp_path / "loss.png").exists()
    else:
        assert why is None
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cleanup_runs_in_reverse_and_survives_errors():
    done = []
    c = bench.Cleanup()
    c.push("a", lambda: done.append("a"))

    def boom():
        raise OSError("busy")

    c.push("b", boom)
    early = c.push("c", lambda: done.append("c"))
    c.push("d", lambda: done.append("d"))
    early()  # undone now, not again at close
    c.close()
    assert done == ["c", "d", "a"]
    assert c.errors == ["cleanup b: busy"]


def test_cli_help_lists_examples_and_choices():
    from click.testing import CliRunner

    from episode_tracer.cli import main

    res = CliRunner().invoke(main, ["bench", "--help"])
    assert res.exit_code == 0
    assert "agent-tracer bench --quick" in res.output
    assert "[overhead|throughput|latency|resources|scale|wire]" in res.output
    bad = CliRunner().invoke(main, ["bench", "--only", "nope"])
    assert bad.exit_code == 2
    assert "'nope' is not one of 'overhead', 'throughput', 'latency', 'resources', 'scale', 'wire'" in bad.output


def test_per_event_functions_drop_one_off_setup():
    prof = {"events": 1000, "functions": [
        {"function": "time.sleep", "calls": 3, "tottime_s": 9.0, "us_per_event": 9000},
        {"function": "__init__.py:1708(ring_buffer_poll)", "calls": 20, "tottime_s": 2.0, "us_per_event": 2000},
        {"function": "episodes.py:207(observe)", "calls": 1000, "tottime_s": 3.0, "us_per_event": 3000},
        {"function": "events.py:217(cstr)", "calls": 600, "tottime_s": 0.5, "us_per_event": 500},
        {"function": "events.py:1(rare)", "calls": 10, "tottime_s": 0.1, "us_per_event": 100},
    ]}
    assert [f["function"] for f in bench.per_event_functions(prof)] == [
        "episodes.py:207(observe)", "__init__.py:1708(ring_buffer_poll)", "events.py:217(cstr)"]
