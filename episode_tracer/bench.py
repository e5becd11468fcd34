"""`agent-tracer bench`: what the tracer costs, measured side by side in one run.

Sections (each can be run alone with --only):

  overhead    fork+exec loop, loopback connect loop and a make -j2 build,
              each timed untraced (baseline) and under: agent-tracer with the
              workload outside any episode, inside an episode (default packs),
              agent-tracer --all, bpftrace printing every event, auditd with
              execve+connect rules. Configurations are interleaved per
              repetition (the order rotates), the ratio to the same
              repetition's baseline is reported as median and min..max.
  throughput  a rate-limited C load generator (socket() calls in an episode,
              one event each) ramps its rate until the tracer loses events;
              highest zero-loss rate, loss fraction above it, tracer CPU/RSS
              per step, and a cProfile of the tracer at the highest rate.
  latency     syscall -> alert record on the tracer's log (p50/p99/max) at a
              background load of 1,000 and 10,000 events/s; exec gate hold
              (kernel exec event -> first instruction of the new image);
              denied connect -> EPERM, against the same connect untraced.
  resources   startup time to `ready`, resident memory and CPU at idle (and
              under load, from the throughput steps).
  scale       episodes started per second (CLI and API), the CLI start
              against a bare python3, tracer RSS against the number of ended
              episodes, gate hold p99 and drain rate with 1, 64 and 512
              concurrent episodes, a long run of short API episodes across
              the identity wrap (episode_tracer/bench_scale.py).
  wire        first-message latency and bulk TCP throughput of a benign
              episode flow with the packet-path inspection (episode_tracer/bench_wire.py)

The measurement logic (statistics, ramp search, target checks, report
writing) is pure and unit-tested (tests/test_bench.py); everything live runs
the real `agent-tracer run` as a subprocess, real C programs compiled with gcc
from scripts/bench/ at bench time, real bpftrace and auditd. Everything the
benchmark starts (tracers, bpftrace, auditd and its rules, cgroups, the
network namespace, load generators) is torn down when it ends, also on error
and Ctrl-C.
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click

from .paths import POLICY_DIR, ROOT

BENCH_SRC = ROOT / "scripts" / "bench"
LIVE_LOCK = "/run/agent-tracer-live-test.lock"  # shared with tests/at_testlib.py
AUDIT_KEY = "agent-tracer-bench"
RINGBUF_EVENT_BYTES = 72  # socket_event (64) + ring-buffer record header (8)
EPERM, ECONNREFUSED = 1, 111


class BenchError(RuntimeError):
    pass


# =========================================================================
# pure: statistics
# =========================================================================
def percentile(values: Sequence[float], p: float) -> float:
    """p-th percentile (0..100) with linear interpolation between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    if lo == hi:
        return float(xs[lo])
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median, min, max and spread ((max-min)/median, in percent)."""
    if not values:
        return {"n": 0}
    med = percentile(values, 50)
    lo, hi = min(values), max(values)
    return {"n": len(values), "median": med, "min": lo, "max": hi,
            "spread_pct": (hi - lo) / med * 100 if med else 0.0}


def ratio_summary(traced: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """Per-repetition ratios traced[i] / baseline[i] (the baseline of the same
    repetition, measured interleaved), summarised; overhead_pct from the
    median ratio."""
    if len(traced) != len(baseline):
        raise ValueError(f"{len(traced)} traced runs against {len(baseline)} baseline runs")
    ratios = [t / b for t, b in zip(traced, baseline) if b > 0]
    if not ratios:
        return {"n": 0}
    s = summarize(ratios)
    return {"n": s["n"], "ratio": s["median"], "ratio_min": s["min"], "ratio_max": s["max"],
            "overhead_pct": (s["median"] - 1) * 100, "ratios": ratios}


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds."""
    if not seconds:
        return {"n": 0}
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def rotate(items: Sequence[Any], r: int) -> list[Any]:
    """The order of configurations in repetition r (rotates by one each time
    so no configuration always runs first or right after another)."""
    if not items:
        return []
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


# =========================================================================
# pure: ramp search (loss vs rate)
# =========================================================================
@dataclass
class RampStep:
    target: float              # requested events/s
    produced: int              # events the generator made
    seconds: float             # how long it took
    drained: int               # events the tracer handled in the step
    lost: int                  # events the kernel could not put in the ring buffer
    catchup_s: float | None = None   # producer end -> tracer caught up
    cpu_pct: float | None = None     # tracer CPU during the step
    rss_mb: float | None = None

    @property
    def rate(self) -> float:
        return self.produced / self.seconds if self.seconds > 0 else 0.0

    @property
    def loss_fraction(self) -> float:
        return self.lost / self.produced if self.produced else 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.drained >= self.produced

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(rate=self.rate, loss_fraction=self.loss_fraction, ok=self.ok)
        return d


@dataclass
class RampResult:
    steps: list[RampStep] = field(default_factory=list)
    producer_limited: bool = False

    @property
    def max_ok_rate(self) -> float | None:
        ok = [s.rate for s in self.steps if s.ok]
        return max(ok) if ok else None

    @property
    def first_loss_rate(self) -> float | None:
        best = self.max_ok_rate or 0.0
        bad = [s.rate for s in self.steps if not s.ok and s.rate > best]
        return min(bad) if bad else None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in sorted(self.steps, key=lambda s: s.target)],
                "max_zero_loss_rate": self.max_ok_rate, "first_loss_rate": self.first_loss_rate,
                "producer_limited": self.producer_limited}


def ramp(measure: Callable[[float], RampStep], start: float, factor: float = 1.5,
         max_rate: float = 2e6, refine: int = 2, over: int = 2, max_steps: int = 40) -> RampResult:
    """Ramp the offered rate geometrically until a step loses events (as
    Falco's event-generator bench does), then bisect (geometric mean)
    `refine` times between the last clean and the first lossy rate, then
    measure `over` rates above the first loss for the loss curve. Stops
    early when the producer cannot reach the requested rate (it, not the
    tracer, is the limit then) or at max_rate."""
    if start <= 0 or factor <= 1:
        raise ValueError("ramp needs start > 0 and factor > 1")
    res = RampResult()
    n = 0

    def run(rate: float) -> RampStep:
        nonlocal n
        n += 1
        s = measure(rate)
        res.steps.append(s)
        return s

    good: float | None = None
    bad: float | None = None
    rate = start
    while n < max_steps:
        s = run(rate)
        if not s.ok:
            bad = rate
            break
        good = rate
        if s.rate < 0.9 * rate:
            res.producer_limited = True
            return res
        if rate * factor > max_rate:
            return res
        rate *= factor
    if bad is None:
        return res
    lo = good
    hi = bad
    for _ in range(refine):
        if lo is None or n >= max_steps or hi / lo < 1.05:
            break
        mid = math.sqrt(lo * hi)
        if run(mid).ok:
            lo = mid
        else:
            hi = mid
    rate = bad
    for _ in range(over):
        rate *= factor
        if rate > max_rate or n >= max_steps:
            break
        s = run(rate)
        if s.rate < 0.9 * rate:
            res.producer_limited = True
            break
    return res


# =========================================================================
# pure: targets and reports
# =========================================================================
TARGETS = {
    "outside_pct": 2.0,
    "episode_pct": 10.0,
    "throughput": 200_000,
    "alert_p99_ms": 10.0,
    "gate_p99_ms": 2.0,
    "startup_s": 2.0,
    "rss_mb": 150.0,
}


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with the measured number and whether it was
    met (None: not measured in this run)."""
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, measured: Any, met: bool | None, unit: str = "") -> None:
        out.append({"name": name, "target": target, "measured": measured, "unit": unit, "met": met})

    wls = _get(results, "overhead", "workloads") or {}
    for wl, w in wls.items():
        cfgs = w.get("configs", {})
        for cfg, limit in (("outside", TARGETS["outside_pct"]), ("episode", TARGETS["episode_pct"])):
            pct = _get(cfgs, cfg, "ratio", "overhead_pct")
            add(f"overhead {wl}: {cfg}", f"<= {limit:g}%", pct, None if pct is None else pct <= limit, "%")
        ra = _get(cfgs, "all", "ratio", "ratio")
        others = {k: _get(cfgs, k, "ratio", "ratio") for k in ("bpftrace", "auditd")}
        measured = {k: v for k, v in others.items() if v is not None}
        met = None if ra is None or not measured else all(ra < v for v in measured.values())
        txt = None if ra is None else " vs ".join(
            [f"all x{ra:.3f}"] + [f"{k} x{v:.3f}" for k, v in measured.items()])
        add(f"overhead {wl}: --all below bpftrace and auditd", "lower ratio", txt, met)
    thr = _get(results, "throughput", "max_zero_loss_rate")
    if _get(results, "throughput") is not None:
        add("zero-loss drain rate (one core)", f">= {TARGETS['throughput']:,} events/s", thr,
            None if thr is None else thr >= TARGETS["throughput"], "events/s")
    p99 = _get(results, "latency", "alert", "10000", "p99_ms")
    if _get(results, "latency") is not None:
        add("alert p99 at 10,000 events/s", f"<= {TARGETS['alert_p99_ms']:g} ms", p99,
            None if p99 is None else p99 <= TARGETS["alert_p99_ms"], "ms")
        g = _get(results, "latency", "gate_hold", "p99_ms")
        add("exec gate hold p99", f"<= {TARGETS['gate_p99_ms']:g} ms", g,
            None if g is None else g <= TARGETS["gate_p99_ms"], "ms")
    st = _get(results, "resources", "startup", "spawn_to_ready_s", "median")
    if st is not None:
        add("startup to ready (spawn -> ready, median)", f"<= {TARGETS['startup_s']:g} s", st,
            st <= TARGETS["startup_s"], "s")
    rss = _get(results, "resources", "peak_rss_mb")
    if rss is not None:
        add("peak RSS", f"<= {TARGETS['rss_mb']:g} MB", rss, rss <= TARGETS["rss_mb"], "MB")
    fp = _get(results, "precision", "corpus", "enforcing_false_positives")
    if _get(results, "precision") is not None:
        add("enforcing false positives on the benign corpus", "0", fp, None if fp is None else fp == 0)
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 10000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[list[str]]:
    return [list(headers)] + [[_fmt(c) for c in r] for r in rows]


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = _table(headers, rows)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = _table(headers, rows)
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells[1:]]
    return "\n".join(out)


CONFIG_LABELS = {
    "baseline": "untraced baseline",
    "outside": "agent-tracer, workload outside episodes",
    "episode": "agent-tracer, workload in an episode (default packs)",
    "all": "agent-tracer --all",
    "bpftrace": "bpftrace (same tracepoints, printf each)",
    "auditd": "auditd (execve + connect rules)",
}


def _sections(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, headers, rows) of every table, shared by the terminal and the
    markdown report."""
    out = []
    ov = results.get("overhead")
    if ov:
        for wl, w in ov.get("workloads", {}).items():
            rows = []
            for cfg, c in w.get("configs", {}).items():
                t = c.get("time_s", {})
                r = c.get("ratio") or {}
                cpu = c.get("tracer_cpu_s")
                rows.append([CONFIG_LABELS.get(cfg, cfg), t.get("median"), t.get("spread_pct"),
                             r.get("ratio") if cfg != "baseline" else 1.0,
                             (f"{r['ratio_min']:.3f}..{r['ratio_max']:.3f}" if r.get("n") else "-"),
                             r.get("overhead_pct") if cfg != "baseline" else None,
                             summarize(cpu).get("median") if cpu else None])
            out.append((f"Overhead: {wl} ({w.get('description', '')})",
                        ["configuration", "median s", "spread %", "ratio", "ratio min..max", "overhead %",
                         "tool CPU s"], rows))
        missing = ov.get("missing") or {}
        if missing:
            out.append(("Overhead: comparisons not measured", ["tool", "why"],
                        [[k, v] for k, v in missing.items()]))
    th = results.get("throughput")
    if th:
        rows = [[s["target"], s["rate"], s["produced"], s["drained"], s["lost"], s["loss_fraction"] * 100,
                 s.get("catchup_s"), s.get("cpu_pct"), s.get("rss_mb"), s["ok"]] for s in th.get("steps", [])]
        out.append(("Throughput ramp (tracer pinned to one core, producer on the other)",
                    ["offered/s", "produced/s", "produced", "drained", "lost", "loss %", "catch-up s",
                     "tracer CPU %", "RSS MB", "zero loss"], rows))
        prof = th.get("profile") or {}
        if prof.get("functions"):
            rows = [[f["function"], f["calls"], f["tottime_s"], f["us_per_event"]]
                    for f in per_event_functions(prof)]
            out.append((f"Where the tracer's time goes at {_fmt(prof.get('rate'))} events/s "
                        f"(cProfile, {_fmt(prof.get('events'))} events, "
                        f"{_fmt(prof.get('us_per_event_total'))} us/event in the drain path)",
                        ["function", "calls", "own time s", "us/event"], rows))
    la = results.get("latency")
    if la:
        rows = []
        for bg, s in (la.get("alert") or {}).items():
            rows.append([f"syscall -> alert record, background {int(bg):,} events/s", s.get("n"),
                         s.get("p50_ms"), s.get("p99_ms"), s.get("max_ms")])
        g = la.get("gate_hold") or {}
        if g:
            rows.append(["exec gate hold (exec event -> first instruction)", g.get("n"), g.get("p50_ms"),
                         g.get("p99_ms"), g.get("max_ms")])
        for k, label in (("fork_to_main_traced", "fork+exec -> main, in episode, traced (gated)"),
                         ("fork_to_main_untraced", "fork+exec -> main, untraced")):
            s = la.get(k) or {}
            if s:
                rows.append([label, s.get("n"), s.get("p50_ms"), s.get("p99_ms"), s.get("max_ms")])
        d = la.get("deny") or {}
        for k, label in (("traced", "denied connect -> EPERM (traced, episode)"),
                         ("untraced", "same connect untraced")):
            s = d.get(k) or {}
            if s:
                rows.append([f"{label} [{s.get('errno_name', '?')}]", s.get("n"), s.get("p50_ms"),
                             s.get("p99_ms"), s.get("max_ms")])
        out.append(("Latency", ["what", "n", "p50 ms", "p99 ms", "max ms"], rows))
    rs = results.get("resources")
    if rs:
        st = rs.get("startup") or {}
        rows = []
        for k, label in (("spawn_to_ready_s", "spawn -> ready record (s)"),
                         ("ready_startup_s", "ready.startup_s (s)"), ("compile_s", "BPF compile (s)")):
            s = st.get(k) or {}
            if s.get("n"):
                rows.append([label, s["median"], s["min"], s["max"], s["n"]])
        for k, label in (("idle", "idle"), ("load", "under load")):
            s = rs.get(k) or {}
            if s:
                rows.append([f"CPU % {label}" + (f" ({_fmt(s.get('rate'))} events/s)" if s.get("rate") else ""),
                             s.get("cpu_pct"), None, None, None])
                rows.append([f"RSS MB {label}", s.get("rss_mb"), None, None, None])
        if rs.get("peak_rss_mb") is not None:
            rows.append(["peak RSS MB (VmHWM)", rs["peak_rss_mb"], None, None, None])
        out.append(("Startup and resources", ["what", "median / value", "min", "max", "n"], rows))
    if results.get("scale"):
        from .bench_scale import scale_tables

        out.extend(scale_tables(results["scale"]))
    if results.get("precision"):
        from .precision import precision_rows

        out.append(("Precision (benign corpus replayed) next to detection (attack cases)",
                    ["what", "value", "how"], precision_rows(results["precision"])))
    from .bench_wire import wire_tables

    out.extend(wire_tables(results.get("wire")))
    tg = results.get("targets")
    if tg:
        out.append(("Targets", ["target", "goal", "measured", "met"],
                    [[t["name"], t["target"],
                      (_fmt(t["measured"]) + (f" {t['unit']}" if t["unit"] and t["measured"] is not None
                                              and not isinstance(t["measured"], str) else "")),
                      "n/a" if t["met"] is None else ("yes" if t["met"] else "MISSED")] for t in tg]))
    return out


def per_event_functions(profile: dict[str, Any], limit: int = 16) -> list[dict[str, Any]]:
    """The profile rows of the per-event path: functions called at least
    once every two events, and the ring-buffer poll (whose own time is the
    C side of the drain: epoll, ring reads, the ctypes callback trampoline)
    - not the one-off setup (compile, attach, self-test sleeps)."""
    events = profile.get("events") or 0
    rows = [f for f in profile.get("functions", [])
            if f["calls"] * 2 >= events or "ring_buffer_poll" in f["function"]]
    return sorted(rows, key=lambda f: -f["tottime_s"])[:limit]


def render_text(results: dict[str, Any]) -> str:
    parts = []
    for title, headers, rows in _sections(results):
        parts.append(f"== {title}\n{text_table(headers, rows)}")
    for note in results.get("meta", {}).get("notes", []):
        parts.append(f"note: {note}")
    return "\n\n".join(parts) + "\n"


NOTES_BEGIN = "<!-- notes: kept when the benchmark rewrites this file -->"
NOTES_END = "<!-- /notes -->"


def extract_notes(existing: str | None) -> str:
    """The hand-written analysis between the notes markers of an existing
    docs/benchmarks.md (kept across re-runs), or a placeholder."""
    if existing and NOTES_BEGIN in existing and NOTES_END in existing:
        return existing.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    return "_No analysis written yet._"


def render_markdown(results: dict[str, Any], existing: str | None = None, plot: str | None = None) -> str:
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    lines = [
        "# Benchmarks",
        "",
        "Generated by `agent-tracer bench` (`make bench`); the numbers below are from one run, every",
        "configuration measured side by side in it. Re-running rewrites this file except the notes.",
        "",
        "## Machine",
        "",
        md_table(["", ""], [[k, v] for k, v in m.items()]),
        "",
        f"Run: {meta.get('started', '?')} for {_fmt(meta.get('duration_s'))} s, "
        f"{'quick sizes' if meta.get('quick') else 'full sizes'}, {meta.get('reps', '?')} repetitions; "
        f"load average before/after: {meta.get('loadavg_before', '?')} / {meta.get('loadavg_after', '?')}.",
        "",
    ]
    for n in meta.get("notes", []):
        lines += [f"* {n}"]
    if meta.get("notes"):
        lines.append("")
    for title, headers, rows in _sections(results):
        lines += [f"## {title}", "", md_table(headers, rows), ""]
        if title.startswith("Throughput") and plot:
            lines += [f"![loss vs offered rate]({plot})", ""]
    lines += [
        "## Notes and analysis",
        "",
        NOTES_BEGIN,
        extract_notes(existing),
        NOTES_END,
        "",
        "## How to reproduce",
        "",
        "```sh",
        "make bench                                   # full sizes: writes out/bench.json and this file",
        ".venv/bin/agent-tracer bench --quick         # tiny sizes, about half a minute",
        ".venv/bin/agent-tracer bench --only throughput --json /tmp/t.json",
        "```",
        "",
        "Needs root, gcc and make (the load generators in `scripts/bench/` are compiled at bench",
        "time), bpftrace and auditd for the comparisons (`scripts/install.sh` installs them; a",
        "missing one is reported, not fatal), and matplotlib for the PNG plot (optional:",
        "`.venv/bin/pip install matplotlib`). The benchmark takes the same lock as the live tests",
        "(`/run/agent-tracer-live-test.lock`) while a tracer of its own runs.",
        "",
    ]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def write_markdown(results: dict[str, Any], path: Path, plot: str | None = None) -> None:
    existing = path.read_text() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(results, existing, plot))


def plot_loss(throughput: dict[str, Any], path: Path) -> str | None:
    """PNG of drained and lost events/s against the offered rate. Returns
    None when written, else why not (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (.venv/bin/pip install matplotlib): no PNG plot"
    steps = sorted(throughput.get("steps", []), key=lambda s: s["rate"])
    if not steps:
        return "no throughput steps to plot"
    x = [s["rate"] / 1000 for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [s["loss_fraction"] * 100 for s in steps], "o-", color="tab:red", label="lost %")
    ax.set_xlabel("offered events/s (thousands)")
    ax.set_ylabel("events lost (%)")
    ax2 = ax.twinx()
    ax2.plot(x, [s["cpu_pct"] or 0 for s in steps], "s--", color="tab:blue", label="tracer CPU %")
    ax2.set_ylabel("tracer CPU (% of one core)")
    best = throughput.get("max_zero_loss_rate")
    if best:
        ax.axvline(best / 1000, color="tab:green", linestyle=":", label=f"max zero-loss {best / 1000:.0f}k/s")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left")
    ax.set_title("agent-tracer: loss vs offered event rate")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# =========================================================================
# live: log reader, processes, cleanup
# =========================================================================
# records start with {"node":...,"type":...} (sinks.py puts the node first)
_HEAD = rb'^\{(?:"node":"[^"\n]*",)?"type":'
_KEEP = re.compile(_HEAD + rb'"(?:stats|lost|ready|alert|gate_timeout)".*$', re.M)
_STAMP = re.compile(_HEAD + rb'"exec"[^\n]*"comm":"atb-stamp"[^\n]*$', re.M)


def scan_log_chunk(data: bytes) -> list[dict[str, Any]]:
    """The records the benchmark needs from a piece of the tracer's JSONL
    (stats, lost, ready, alerts, exec records of the gate probe); every
    other line is skipped without being parsed."""
    out = [json.loads(m.group(0)) for m in _KEEP.finditer(data)]
    if b"atb-stamp" in data:
        out += [json.loads(m.group(0)) for m in _STAMP.finditer(data)]
    return out


class LogReader:
    """Reads the tracer's log from a FIFO in a thread and keeps the records
    the benchmark needs, each with the CLOCK_MONOTONIC time it arrived."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path, 0o600)
        # O_RDWR: never blocks, never sees EOF between writers
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.fcntl(self.fd, 1031, 1 << 20)  # F_SETPIPE_SZ: 1 MiB
        except OSError:
            pass
        self.records: list[tuple[float, dict[str, Any]]] = []
        self.stats: dict[str, Any] | None = None
        self.stats_count = 0
        self.lost_total = 0
        self.ready: dict[str, Any] | None = None
        self.ready_at: float | None = None
        self.bytes = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="bench-log-reader", daemon=True)
        self._t.start()

    def _run(self) -> None:
        import select

        rest = b""
        while not self._stop.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            now = time.monotonic()
            self.bytes += len(data)
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            for rec in scan_log_chunk(data[:cut]):
                self._keep(now, rec)

    def _keep(self, now: float, rec: dict[str, Any]) -> None:
        t = rec.get("type")
        if t == "stats":
            self.stats = rec
            self.stats_count += 1
            self.lost_total = max(self.lost_total, rec.get("lost_total", 0))
        elif t == "ready":
            self.ready, self.ready_at = rec, now
        else:
            self.records.append((now, rec))

    def kind_count(self, kind: str) -> int:
        return int(((self.stats or {}).get("events_by_kind") or {}).get(kind, 0))

    def wait_stats(self, after: int | None = None, timeout: float = 5.0) -> bool:
        """Wait for a stats record newer than the count `after`."""
        after = self.stats_count if after is None else after
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats_count > after:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=2)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def _proc_mem_mb(pid: int, key: str = "VmRSS") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Cleanup:
    """Everything the benchmark starts registers its undo here; undone in
    reverse order at the end, also on error, Ctrl-C and SIGTERM."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self.errors: list[str] = []

    def push(self, what: str, fn: Callable[[], None]) -> Callable[[], None]:
        entry = (what, fn)
        self._undo.append(entry)

        def run_now() -> None:
            if entry in self._undo:
                self._undo.remove(entry)
                self._call(entry)

        return run_now

    def _call(self, entry: tuple[str, Callable[[], None]]) -> None:
        what, fn = entry
        try:
            fn()
        except Exception as e:  # cleanup goes on; the error is reported
            self.errors.append(f"cleanup {what}: {e}")

    def close(self) -> None:
        while self._undo:
            self._call(self._undo.pop())


def _kill_proc(p: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(sig)
    try:
        p.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait(timeout=5)


class Live:
    """Holds the live test lock (one tracer at a time on this machine)."""

    def __init__(self, cleanup: Cleanup):
        self.cleanup = cleanup
        self._f = None

    @contextlib.contextmanager
    def lock(self):
        f = open(LIVE_LOCK, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        finally:
            f.close()


class TracerProc:
    """`agent-tracer run` as a subprocess logging into a LogReader FIFO."""

    def __init__(self, work: Path, policy_dirs: Sequence[Path], scope_all: bool = False,
                 cpus: str | None = None, profile_out: Path | None = None, extra_args: Sequence[str] = (),
                 episode_rate: int | None = None):
        self.work, self.policy_dirs, self.scope_all = work, list(policy_dirs), scope_all
        self.extra_args = list(extra_args)
        self.cpus, self.profile_out = cpus, profile_out
        self.episode_rate = episode_rate  # None: the tracer's default per-episode rate limit
        self.proc: subprocess.Popen | None = None
        self.reader: LogReader | None = None
        self.spawn_to_ready: float | None = None
        self.peak_rss_mb: float | None = None

    def start(self, timeout: float = 90.0) -> dict[str, Any]:
        tag = uuid.uuid4().hex[:8]
        self.reader = LogReader(self.work / f"log-{tag}.fifo")
        self.stderr_path = self.work / f"tracer-{tag}.err"
        py = [sys.executable]
        if self.profile_out is not None:
            py += ["-m", "cProfile", "-o", str(self.profile_out)]
        self.control_socket = self.work / f"ctl-{tag}.sock"
        cmd = py + ["-m", "episode_tracer.cli", "run", "--no-dashboard", "--log", str(self.reader.path),
                    "--control-socket", str(self.control_socket)]
        for d in self.policy_dirs:
            cmd += ["--policy-dir", str(d)]
        if self.scope_all:
            cmd.append("--all")
        if self.episode_rate is not None:
            cmd += ["--episode-rate", str(self.episode_rate)]
        cmd += self.extra_args
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus] + cmd
        t0 = time.monotonic()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=str(ROOT), start_new_session=True)
        deadline = t0 + timeout
        while self.reader.ready is None:
            if self.proc.poll() is not None:
                err = self.stderr_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise BenchError(f"agent-tracer run exited {self.proc.returncode} before ready: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"agent-tracer run not ready after {timeout:.0f} s")
            time.sleep(0.005)
        self.spawn_to_ready = self.reader.ready_at - t0
        return self.reader.ready

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.pid)

    def rss_mb(self) -> float | None:
        return _proc_mem_mb(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                hwm = _proc_mem_mb(self.proc.pid, "VmHWM")
                if hwm is not None:
                    self.peak_rss_mb = max(self.peak_rss_mb or 0, hwm)
            _kill_proc(self.proc, signal.SIGTERM, wait=20)
        if self.reader is not None:
            self.reader.close()


class Tools:
    """The C load generators and probes, compiled from scripts/bench/."""

    PROGRAMS = ("forkexec", "connloop", "loadgen", "listenprobe", "gateprobe", "connprobe")

    def __init__(self, work: Path):
        self.dir = work / "bin"
        self.dir.mkdir()
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise BenchError("gcc is not installed (scripts/install.sh installs it): "
                             "the load generators are compiled at bench time")
        for name in self.PROGRAMS:
            self._cc([cc, "-O2", "-Wall", "-o", str(self.dir / name), str(BENCH_SRC / f"{name}.c")])
        stamp = self.dir / "atb-stamp"
        try:
            self._cc([cc, "-O2", "-static", "-o", str(stamp), str(BENCH_SRC / "stamp.c")])
        except BenchError:  # no static libc: dynamic is slower to start but still works
            self._cc([cc, "-O2", "-o", str(stamp), str(BENCH_SRC / "stamp.c")])

    @staticmethod
    def _cc(cmd: list[str]) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"compiling {cmd[-1]} failed: {r.stderr.strip()[-500:]}")

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


class EpisodeCgroup:
    """An episode cgroup <cgroup2>/agent-tracer/<id> the benchmark runs
    commands in (the same place `agent-tracer episode run` uses)."""

    def __init__(self, cleanup: Cleanup, name: str):
        from . import cgroups

        self.id = f"atbench-{name}-{uuid.uuid4().hex[:6]}"
        root = cgroups.cgroup2_mount() / "agent-tracer"
        root.mkdir(exist_ok=True)
        self.path = root / self.id
        self.path.mkdir()
        self.remove = cleanup.push(f"cgroup {self.path}", lambda: cgroups.remove(self.path))

    def preexec(self) -> Callable[[], None]:
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

        return enter


class Netns:
    """A network namespace joined by a veth pair: the "external" host of the
    denied-connect probe (host side 10.214.<n>.1, namespace side .2)."""

    def __init__(self, cleanup: Cleanup):
        n = os.getpid() % 200 + 1
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.ns_if = f"atbench-{tag}", f"atbh{tag}", f"atbn{tag}"
        self.host, self.addr = f"10.214.{n}.1", f"10.214.{n}.2"
        cleanup.push(f"netns {self.name}", self._remove)

        def sh(*cmd: str) -> None:
            r = subprocess.run(list(cmd), capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"{' '.join(cmd)}: {r.stderr.strip()}")

        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.addr}/24", "dev", self.ns_if)
        sh("ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
        sh("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def _remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for p in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(p), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class Bpftrace:
    """bpftrace running scripts/bench/bpftrace.bt, output to a file."""

    SCRIPT = BENCH_SRC / "bpftrace.bt"

    @staticmethod
    def missing() -> str | None:
        if shutil.which("bpftrace") is None:
            return "bpftrace is not installed (apt-get install bpftrace; scripts/install.sh does)"
        return None

    def __init__(self, work: Path):
        self.out = work / f"bpftrace-{uuid.uuid4().hex[:6]}.out"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.err = open(self.out.with_suffix(".err"), "wb")
        self.proc = subprocess.Popen(["bpftrace", "-o", str(self.out), str(self.SCRIPT)],
                                     stdout=subprocess.DEVNULL, stderr=self.err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.out.exists() and b"Attaching" in self.out.read_bytes()[:200]:
                time.sleep(0.2)  # the probes are attached right after the banner
                return
            if self.proc.poll() is not None:
                self.stop()
                raise BenchError(f"bpftrace exited {self.proc.returncode}: "
                                 f"{self.out.with_suffix('.err').read_text(errors='replace')[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError("bpftrace did not attach within 60 s")
            time.sleep(0.05)

    def cpu_s(self) -> float:
        assert self.proc is not None
        return _proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            _kill_proc(self.proc, signal.SIGINT, wait=20)
            self.proc = None
        self.err.close() if hasattr(self, "err") else None
        for p in (self.out, self.out.with_suffix(".err")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class Auditd:
    """auditd with execve + connect rules (key agent-tracer-bench). Starts
    the daemon only when none runs, and restores what it changed."""

    RULE = ["-a", "always,exit", "-F", "arch=b64", "-S", "execve", "-S", "connect", "-k", AUDIT_KEY]

    @staticmethod
    def missing() -> str | None:
        if shutil.which("auditctl") is None or shutil.which("auditd") is None:
            return "auditd is not installed (apt-get install auditd; scripts/install.sh does)"
        r = subprocess.run(["auditctl", "-s"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"the kernel's audit subsystem is not usable: {(r.stderr or r.stdout).strip()}"
        return None

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.prev_enabled: str | None = None
        self.rule_added = False

    @staticmethod
    def _status() -> dict[str, str]:
        r = subprocess.run(["auditctl", "-s"], capture_output=True, text=True)
        return dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line)

    def start(self) -> None:
        st = self._status()
        self.prev_enabled = st.get("enabled", "0")
        if st.get("pid", "0") == "0":
            self.proc = subprocess.Popen(["auditd", "-n"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            deadline = time.monotonic() + 10
            while self._status().get("pid", "0") == "0":
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError("auditd did not start")
                time.sleep(0.05)
        if self.prev_enabled != "1":
            subprocess.run(["auditctl", "-e", "1"], capture_output=True, check=True)
        r = subprocess.run(["auditctl", *self.RULE], capture_output=True, text=True)
        if r.returncode != 0:
            self.stop()
            raise BenchError(f"auditctl {' '.join(self.RULE)}: {r.stderr.strip()}")
        self.rule_added = True

    def cpu_s(self) -> float:
        st = self._status()
        pid = int(st.get("pid", "0"))
        return _proc_cpu_s(pid) if pid else 0.0

    def stop(self) -> None:
        if self.rule_added:
            subprocess.run(["auditctl", "-d", *self.RULE[1:]], capture_output=True)
            self.rule_added = False
        if self.proc is not None:
            _kill_proc(self.proc, signal.SIGTERM, wait=10)
            self.proc = None
        if self.prev_enabled is not None and self.prev_enabled != "1":
            subprocess.run(["auditctl", "-e", self.prev_enabled], capture_output=True)
            self.prev_enabled = None


# =========================================================================
# live: the sections
# =========================================================================
class Size(str, enum.Enum):
    quick = "quick"
    full = "full"


SIZES = {
    Size.full: {"forkexec": 2000, "connect": 20000, "build_units": 48, "reps": 5,
                "ramp_start": 25_000, "ramp_factor": 1.5, "ramp_step_s": 5.0, "ramp_refine": 2, "ramp_over": 2,
                "alert_probes": 100, "alert_interval_ms": 20, "gate_probes": 200, "deny_probes": 200,
                "idle_s": 5.0, "profile_s": 5.0, "ramp_max_steps": 40},
    Size.quick: {"forkexec": 50, "connect": 500, "build_units": 4, "reps": 1,
                 "ramp_start": 5_000, "ramp_factor": 4.0, "ramp_step_s": 0.6, "ramp_refine": 0, "ramp_over": 0,
                 "alert_probes": 10, "alert_interval_ms": 10, "gate_probes": 10, "deny_probes": 10,
                 "idle_s": 1.0, "profile_s": 0.0, "ramp_max_steps": 2},
}


class Section(str, enum.Enum):
    overhead = "overhead"
    throughput = "throughput"
    latency = "latency"
    resources = "resources"
    scale = "scale"
    wire = "wire"  # episode_tracer/bench_wire.py


class Compare(str, enum.Enum):
    bpftrace = "bpftrace"
    auditd = "auditd"


@dataclass
class BenchConfig:
    size: Size = Size.full
    sections: tuple[Section, ...] = tuple(Section)
    compare: tuple[Compare, ...] = tuple(Compare)
    reps: int | None = None
    policy_dirs: tuple[Path, ...] = (POLICY_DIR,)
    json_path: Path | None = None
    markdown_path: Path | None = None
    plot_path: Path | None = None
    max_steps: int | None = None
    profile: bool = True
    echo: Callable[[str], None] = print

    def p(self, key: str) -> Any:
        return SIZES[self.size][key]


class Bench:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.cleanup = Cleanup()
        self.live = Live(self.cleanup)
        self.work = Path(tempfile.mkdtemp(prefix="agent-tracer-bench-"))
        self.cleanup.push(f"work dir {self.work}", lambda: shutil.rmtree(self.work, ignore_errors=True))
        self.notes: list[str] = []
        self._note_keys: set[str] = set()
        self.t0 = time.monotonic()
        self.startups: list[dict[str, float]] = []
        self.peak_rss: float = 0.0
        self.tools: Tools | None = None

    def say(self, msg: str) -> None:
        self.cfg.echo(f"[bench {time.monotonic() - self.t0:6.1f}s] {msg}")

    def note(self, msg: str, key: str | None = None) -> None:
        """A note for the report, once per key."""
        key = key or msg
        if key not in self._note_keys:
            self._note_keys.add(key)
            self.notes.append(msg)

    # --------------------------------------------------------------- helpers
    def tracer(self, **kw) -> TracerProc:
        t = TracerProc(self.work, self.cfg.policy_dirs, **kw)
        stop = self.cleanup.push("tracer", t.stop)
        t.start()
        self.say(f"tracer ready in {t.spawn_to_ready:.2f} s ({'--all' if kw.get('scope_all') else 'episodes'})")
        ready = t.reader.ready or {}
        self.startups.append({"spawn_to_ready_s": t.spawn_to_ready, "ready_startup_s": ready.get("startup_s"),
                              "compile_s": ready.get("compile_s")})
        bad = {k: v for k, v in (ready.get("selftest") or {}).items() if v not in ("ok", "skipped")}
        if bad:
            self.note(f"tracer self-test not ok in this run (startup times include it): {bad}",
                      key="selftest " + " ".join(sorted(bad)))
        t.cleanup_stop = stop  # type: ignore[attr-defined]
        return t

    def stop_tracer(self, t: TracerProc) -> None:
        t0 = time.monotonic()
        t.cleanup_stop()  # type: ignore[attr-defined]
        self.say(f"tracer stopped in {time.monotonic() - t0:.2f} s")
        if t.peak_rss_mb:
            self.peak_rss = max(self.peak_rss, t.peak_rss_mb)

    def run_cmd(self, argv: list[str], episode: EpisodeCgroup | None = None, timeout: float = 600,
                cwd: str | None = None) -> tuple[float, str]:
        """Run argv to completion; returns (wall seconds, stdout)."""
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                             preexec_fn=episode.preexec() if episode else None, start_new_session=True)
        kill = self.cleanup.push(f"process {argv[0]}", lambda: _kill_proc(p, signal.SIGKILL))
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill()
            raise BenchError(f"{' '.join(argv)} took longer than {timeout:.0f} s") from None
        dt = time.perf_counter() - t0
        kill()
        if p.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {p.returncode}: {err.decode(errors='replace')[-500:]}")
        return dt, out.decode()

    def start_bg(self, argv: list[str], episode: EpisodeCgroup | None = None) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             preexec_fn=episode.preexec() if episode else None, start_new_session=True)
        self.cleanup.push(f"process {argv[0]}", lambda: _kill_proc(p, signal.SIGKILL))
        return p

    # -------------------------------------------------------------- overhead
    def workloads(self) -> dict[str, tuple[str, Callable[[], list[str]], Callable[[], None]]]:
        tools = self.tools
        assert tools is not None
        n_fe, n_conn, units = self.cfg.p("forkexec"), self.cfg.p("connect"), self.cfg.p("build_units")
        build_dir = self.work / "build"

        def clean_build() -> None:
            shutil.rmtree(build_dir, ignore_errors=True)

        return {
            "forkexec": (f"{n_fe:,} x fork + exec /bin/true",
                         lambda: [tools["forkexec"], str(n_fe), "/bin/true"], lambda: None),
            "connect": (f"{n_conn:,} x connect/accept/close on loopback",
                        lambda: [tools["connloop"], str(n_conn)], lambda: None),
            "build": (f"make -j2 of a C project, {units} units",
                      lambda: ["make", "-s", "-j2", "-f", str(BENCH_SRC / "project" / "Makefile"),
                               f"OUT={build_dir}", f"N={units}", "all"], clean_build),
        }

    def section_overhead(self) -> dict[str, Any]:
        reps = self.cfg.reps or self.cfg.p("reps")
        wls = self.workloads()
        missing: dict[str, str] = {}
        groups = ["baseline", "tracer", "all"]
        for which, tool in ((Compare.bpftrace, Bpftrace), (Compare.auditd, Auditd)):
            if which in self.cfg.compare:
                why = tool.missing()
                if why:
                    missing[which.value] = why
                else:
                    groups.append(which.value)
        for tool, why in missing.items():
            self.say(f"{tool}: not measured: {why}")
        times: dict[str, dict[str, list[float]]] = {w: {} for w in wls}
        cpu: dict[str, dict[str, list[float]]] = {w: {} for w in wls}

        def measure(cfg_name: str, episode: EpisodeCgroup | None, tool_cpu: Callable[[], float] | None) -> None:
            for wl, (_desc, argv, prep) in wls.items():
                prep()
                c0 = tool_cpu() if tool_cpu else None
                dt, _ = self.run_cmd(argv(), episode)
                times[wl].setdefault(cfg_name, []).append(dt)
                if c0 is not None:
                    cpu[wl].setdefault(cfg_name, []).append(tool_cpu() - c0)
                prep()

        # warm-up (page cache, compiler), not recorded
        for _wl, (_d, argv, prep) in wls.items():
            prep()
            self.run_cmd(argv())
            prep()
        for r in range(reps):
            order = rotate(groups, r)
            self.say(f"overhead repetition {r + 1}/{reps}: {', '.join(order)}")
            with self.live.lock():
                for g in order:
                    if g == "baseline":
                        measure("baseline", None, None)
                    elif g in ("tracer", "all"):
                        t = self.tracer(scope_all=(g == "all"))
                        try:
                            if g == "all":
                                measure("all", None, t.cpu_s)
                            else:
                                measure("outside", None, t.cpu_s)
                                ep = EpisodeCgroup(self.cleanup, "overhead")
                                try:
                                    measure("episode", ep, t.cpu_s)
                                finally:
                                    ep.remove()
                        finally:
                            self.stop_tracer(t)
                    elif g == "bpftrace":
                        b = Bpftrace(self.work)
                        stop = self.cleanup.push("bpftrace", b.stop)
                        b.start()
                        try:
                            measure("bpftrace", None, b.cpu_s)
                        finally:
                            stop()
                    elif g == "auditd":
                        a = Auditd()
                        stop = self.cleanup.push("auditd", a.stop)
                        a.start()
                        try:
                            measure("auditd", None, a.cpu_s)
                        finally:
                            stop()
        out: dict[str, Any] = {"reps": reps, "workloads": {}, "missing": missing}
        order = ["baseline", "outside", "episode", "all", "bpftrace", "auditd"]
        for wl, (desc, _a, _p) in wls.items():
            base = times[wl].get("baseline", [])
            cfgs = {}
            for c in order:
                if c not in times[wl]:
                    continue
                entry: dict[str, Any] = {"times": times[wl][c], "time_s": summarize(times[wl][c])}
                if c != "baseline":
                    entry["ratio"] = ratio_summary(times[wl][c], base)
                if cpu[wl].get(c):
                    entry["tracer_cpu_s"] = cpu[wl][c]
                cfgs[c] = entry
            out["workloads"][wl] = {"description": desc, "configs": cfgs}
        return out

    # ------------------------------------------------------------ throughput
    def ramp_step(self, t: TracerProc, ep: EpisodeCgroup, rate: float, seconds: float) -> RampStep:
        rd = t.reader
        assert rd is not None
        rd.wait_stats()
        c0, l0 = rd.kind_count("socket"), rd.lost_total
        cpu0, w0 = t.cpu_s(), time.monotonic()
        dt, out = self.run_cmd(["taskset", "-c", "1", self.tools["loadgen"], str(int(rate)), str(seconds)], ep)
        produced, secs = out.split()
        produced = int(produced)
        end = time.monotonic()
        # CPU over the time the producer ran (a lossy step's wait below
        # would dilute it)
        cpu1, w1 = t.cpu_s(), end
        caught = None
        deadline = end + max(10.0, seconds * 2)
        rss = t.rss_mb()
        last = -1
        while time.monotonic() < deadline:
            n = rd.stats_count
            got = rd.kind_count("socket") - c0
            if got >= produced:
                caught = time.monotonic() - end
                break
            if got == last and rd.lost_total > l0:
                break  # lost events never arrive: no catching up to wait for
            last = got
            rd.wait_stats(n, timeout=2.0)
        rd.wait_stats()  # lost counters are read at the tick: one more tick
        step = RampStep(target=rate, produced=produced, seconds=float(secs),
                        drained=rd.kind_count("socket") - c0, lost=rd.lost_total - l0,
                        catchup_s=caught, cpu_pct=(cpu1 - cpu0) / (w1 - w0) * 100, rss_mb=rss)
        self.say(f"  offered {rate:,.0f}/s: produced {step.rate:,.0f}/s, drained {step.drained:,}, "
                 f"lost {step.lost:,}, tracer CPU {step.cpu_pct:.0f}%")
        return step

    def section_throughput(self) -> dict[str, Any]:
        if (os.cpu_count() or 1) < 2:
            raise BenchError("the throughput ramp pins the tracer and the producer to different CPUs: needs 2")
        secs = self.cfg.p("ramp_step_s")
        with self.live.lock():
            # the drain's capacity, one episode producing: not the per-episode rate limit
            t = self.tracer(cpus="0", episode_rate=0)
            ep = EpisodeCgroup(self.cleanup, "ramp")
            try:
                res = ramp(lambda r: self.ramp_step(t, ep, r, secs), start=self.cfg.p("ramp_start"),
                           factor=self.cfg.p("ramp_factor"), refine=self.cfg.p("ramp_refine"),
                           over=self.cfg.p("ramp_over"), max_steps=self.cfg.max_steps or self.cfg.p("ramp_max_steps"))
            finally:
                ep.remove()
                self.stop_tracer(t)
            out = res.to_dict()
            pages = 2048
            out["ringbuf_capacity_events"] = pages * 4096 // RINGBUF_EVENT_BYTES
            out["step_s"] = secs
            out["event"] = "socket() failing with EAFNOSUPPORT in an episode (one syscall, one event)"
            loads = [s for s in res.steps if s.ok]
            if loads:
                top = max(loads, key=lambda s: s.rate)
                out["load"] = {"rate": top.rate, "cpu_pct": top.cpu_pct, "rss_mb": top.rss_mb}
            if self.cfg.profile and self.cfg.p("profile_s") > 0 and res.max_ok_rate:
                out["profile"] = self.profile_at(res.max_ok_rate)
        return out

    def profile_at(self, rate: float) -> dict[str, Any]:
        """cProfile of the tracer draining `rate` events/s: own time per
        function, per event."""
        import pstats

        prof = self.work / "tracer.prof"
        self.say(f"profiling the tracer at {rate:,.0f} events/s (cProfile)")
        t = self.tracer(cpus="0", profile_out=prof)
        ep = EpisodeCgroup(self.cleanup, "profile")
        try:
            step = self.ramp_step(t, ep, rate, self.cfg.p("profile_s"))
        finally:
            ep.remove()
            self.stop_tracer(t)
        if not prof.exists():
            return {"error": "the profiled tracer wrote no profile"}
        st = pstats.Stats(str(prof))
        events = max(step.drained, 1)
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "tottime_s": tt,
                         "cumtime_s": ct, "us_per_event": tt / events * 1e6})
        rows.sort(key=lambda r: -r["tottime_s"])
        drain = [r for r in rows if "feed_raw" in r["function"]]
        return {"rate": rate, "events": step.drained, "lost": step.lost,
                "us_per_event_total": (drain[0]["cumtime_s"] / events * 1e6) if drain else None,
                "functions": rows[:60], "note": "cProfile roughly doubles Python call costs; compare shares"}

    def section_scale(self) -> dict[str, Any]:
        from .bench_scale import run_scale

        return run_scale(self)

    # --------------------------------------------------------------- latency
    def section_latency(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tools = self.tools
        ns = Netns(self.cleanup)
        port = 3333  # mining-pool-port (episode_tracer/policies/miners.toml): denied in the kernel for episodes
        n_deny, n_gate = self.cfg.p("deny_probes"), self.cfg.p("gate_probes")
        with self.live.lock():
            # untraced references first
            _dt, txt = self.run_cmd([tools["connprobe"], ns.addr, str(port), str(n_deny)])
            out.setdefault("deny", {})["untraced"] = self._connprobe_summary(txt)
            _dt, txt = self.run_cmd([tools["gateprobe"], str(n_gate), tools["atb-stamp"]])
            out["fork_to_main_untraced"] = latency_summary([(int(b) - int(a)) / 1e9 for _p, a, b in
                                                             (l.split() for l in txt.splitlines())])
            t = self.tracer()
            try:
                idle_s = self.cfg.p("idle_s")
                c0, w0 = t.cpu_s(), time.monotonic()
                time.sleep(idle_s)
                out["_idle"] = {"cpu_pct": (t.cpu_s() - c0) / (time.monotonic() - w0) * 100, "rss_mb": t.rss_mb(),
                                "seconds": idle_s}
                ep = EpisodeCgroup(self.cleanup, "latency")
                try:
                    _dt, txt = self.run_cmd([tools["connprobe"], ns.addr, str(port), str(n_deny)], ep)
                    out["deny"]["traced"] = self._connprobe_summary(txt)
                    _dt, txt = self.run_cmd([tools["gateprobe"], str(n_gate), tools["atb-stamp"]], ep)
                    out.update(self._gate_summary(t, txt))
                    out["alert"] = {}
                    for bg in (1000, 10000):
                        out["alert"][str(bg)] = self._alert_latency(t, ep, bg)
                finally:
                    ep.remove()
            finally:
                self.stop_tracer(t)
        return out

    @staticmethod
    def _connprobe_summary(txt: str) -> dict[str, Any]:
        rows = [l.split() for l in txt.splitlines() if l.strip()]
        errs = sorted({int(e) for _d, e in rows})
        s = latency_summary([int(d) / 1e9 for d, _e in rows])
        names = {0: "connected", EPERM: "EPERM", ECONNREFUSED: "ECONNREFUSED"}
        s["errno"] = errs
        s["errno_name"] = "/".join(names.get(e, str(e)) for e in errs)
        return s

    def _gate_summary(self, t: TracerProc, txt: str) -> dict[str, Any]:
        runs = {int(p): (int(a), int(b)) for p, a, b in (l.split() for l in txt.splitlines() if l.strip())}
        deadline = time.monotonic() + 5
        execs: dict[int, int] = {}
        while time.monotonic() < deadline:
            execs = {r["pid"]: r["ktime"] for _ts, r in t.reader.records
                     if r.get("type") == "exec" and r.get("pid") in runs}
            if len(execs) >= len(runs):
                break
            time.sleep(0.05)
        holds = [(runs[p][1] - k) / 1e9 for p, k in execs.items()]
        gated = sum(1 for _ts, r in t.reader.records if r.get("type") == "exec" and r.get("pid") in runs
                    and r.get("gated"))
        res = {"gate_hold": latency_summary(holds),
               "fork_to_main_traced": latency_summary([(b - a) / 1e9 for a, b in runs.values()])}
        res["gate_hold"]["gated"] = gated
        res["gate_hold"]["matched"] = len(execs)
        if runs and not gated:
            self.note("the gate probe's execs were not gated (no gate_all in the loaded policy?): "
                              "gate hold is the plain exec-to-main time")
        return res

    def _alert_latency(self, t: TracerProc, ep: EpisodeCgroup, bg: int) -> dict[str, Any]:
        n, iv = self.cfg.p("alert_probes"), self.cfg.p("alert_interval_ms")
        dur = n * iv / 1000 + 2.0
        load = self.start_bg(["taskset", "-c", "1", self.tools["loadgen"], str(bg), f"{dur:.1f}"], ep)
        time.sleep(0.5)
        base = 20000 + (bg % 7) * 1000 + uuid.uuid4().int % 3000
        _dt, txt = self.run_cmd([self.tools["listenprobe"], str(n), str(iv), str(base)], ep)
        sent = {int(p): int(tn) / 1e9 for p, tn in (l.split() for l in txt.splitlines() if l.strip())}
        deadline = time.monotonic() + 5
        seen: dict[int, float] = {}
        while time.monotonic() < deadline:
            seen = {r["port"]: ts for ts, r in t.reader.records
                    if r.get("type") == "alert" and r.get("rule") == "listener-in-episode" and r.get("port") in sent}
            if len(seen) >= len(sent):
                break
            time.sleep(0.05)
        load.wait(timeout=dur + 10)
        res = latency_summary([seen[p] - sent[p] for p in seen])
        res["sent"], res["matched"] = len(sent), len(seen)
        if len(seen) < len(sent):
            self.note(f"alert latency at {bg}/s: {len(sent) - len(seen)} of {len(sent)} probes "
                              "produced no alert within 5 s")
        return res

    # -------------------------------------------------------------- the run
    def section_wire(self) -> dict[str, Any]:
        from .bench_wire import section_wire

        return section_wire(self)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.time()
        results: dict[str, Any] = {"meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t_start)),
            "quick": cfg.size == Size.quick, "reps": cfg.reps or cfg.p("reps"),
            "sizes": SIZES[cfg.size], "machine": machine_info(),
            "loadavg_before": _loadavg(), "notes": self.notes}}
        if os.geteuid() != 0:
            raise BenchError("agent-tracer bench needs root (it loads BPF programs and creates cgroups)")
        self.say(f"compiling the load generators from {BENCH_SRC}")
        self.tools = Tools(self.work)
        sections = [s for s in Section if s in cfg.sections]
        for s in sections:
            if s == Section.resources:
                continue
            self.say(f"section {s.value}")
            results[s.value] = getattr(self, f"section_{s.value}")()
        if Section.resources in sections:
            if not self.startups:  # nothing else started a tracer: measure startup alone
                with self.live.lock():
                    for _ in range(1 if cfg.size == Size.quick else 3):
                        t = self.tracer()
                        self.stop_tracer(t)
            res: dict[str, Any] = {"startup": {k: summarize([s[k] for s in self.startups if s.get(k) is not None])
                                               for k in ("spawn_to_ready_s", "ready_startup_s", "compile_s")}}
            idle = (results.get("latency") or {}).get("_idle")
            if idle:
                res["idle"] = idle
            load = (results.get("throughput") or {}).get("load")
            if load:
                res["load"] = load
            res["peak_rss_mb"] = self.peak_rss or None
            results["resources"] = res
        if "latency" in results:
            results["latency"].pop("_idle", None)
        from .precision import precision_summary  # replays recorded data: seconds, no tracer

        results["precision"] = precision_summary(POLICY_DIR)
        results["targets"] = check_targets(results)
        results["meta"]["duration_s"] = time.time() - t_start
        results["meta"]["loadavg_after"] = _loadavg()
        return results

    def close(self) -> None:
        self.cleanup.close()
        for e in self.cleanup.errors:
            self.say(e)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    virt = "?"
    with contextlib.suppress(Exception):
        virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True).stdout.strip() or "none"
    commit = "?"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"

    def ver(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception:
            return "not installed"

    bcc = "?"
    with contextlib.suppress(Exception):
        bcc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"], capture_output=True,
                             text=True).stdout.strip() or "?"
    return {"host": socket.gethostname(), "kernel": platform.release(), "cpu": cpu,
            "cpus": str(os.cpu_count()), "memory": mem, "virtualization": virt,
            "python": platform.python_version(), "bcc": bcc, "bpftrace": ver(["bpftrace", "--version"]),
            "auditd": ver(["dpkg-query", "-W", "-f=${Version}", "auditd"]), "commit": commit}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark, write the JSON / markdown / PNG, return the results.
    Everything started is cleaned up, also on error and on SIGTERM/Ctrl-C."""
    bench = Bench(cfg)
    prev = signal.getsignal(signal.SIGTERM)

    def on_term(_sig, _frm):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        results = bench.run()
    finally:
        bench.close()
        signal.signal(signal.SIGTERM, prev)
    plot_rel = None
    if cfg.plot_path is not None and results.get("throughput"):
        why = plot_loss(results["throughput"], cfg.plot_path)
        if why:
            bench.notes.append(why)
        elif cfg.markdown_path is not None:
            plot_rel = os.path.relpath(cfg.plot_path, cfg.markdown_path.parent)
    if cfg.json_path is not None:
        write_json(results, cfg.json_path)
    if cfg.markdown_path is not None:
        write_markdown(results, cfg.markdown_path, plot_rel)
    return results


# =========================================================================
# CLI
# =========================================================================
@click.command("bench", context_settings={"max_content_width": 100})
@click.option("--quick", is_flag=True, help="Tiny sizes, one repetition (the CI smoke run, well under a minute).")
@click.option("--only", "only", multiple=True, type=click.Choice([s.value for s in Section]),
              help="Run only this section (repeatable). Default: all.")
@click.option("--compare", "compare", multiple=True, type=click.Choice([c.value for c in Compare]),
              help="Comparison tools for the overhead section (repeatable). Default: bpftrace and auditd.")
@click.option("--no-compare", is_flag=True, help="Measure agent-tracer only (no bpftrace, no auditd).")
@click.option("--reps", type=click.IntRange(1, 100), default=None,
              help="Repetitions of each overhead measurement (default 5, --quick 1).")
@click.option("--policy-dir", "policy_dirs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help=f"Policies the tracer loads (repeatable). Default: {POLICY_DIR}")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("out/bench.json"),
              show_default=True, help="Write all results here as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Write the report as markdown here (make bench: docs/benchmarks.md; notes between the "
                   "notes markers are kept).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write the loss-vs-rate plot here as PNG (needs matplotlib).")
@click.option("--no-profile", is_flag=True, help="Skip the cProfile run of the tracer at the highest rate.")
def bench_command(quick, only, compare, no_compare, reps, policy_dirs, json_path, markdown_path, plot_path,
                  no_profile) -> None:
    """Measure what the tracer costs: overhead on workloads against an
    interleaved untraced baseline (and bpftrace, auditd), the highest event
    rate drained with zero loss, alert / exec-gate / deny latency, startup
    time, memory and CPU. Prints tables; writes JSON (and markdown, PNG).
    Needs root.

    \b
    Examples:
      agent-tracer bench --quick                         # smoke run, ~30 s
      agent-tracer bench --markdown docs/benchmarks.md --plot docs/img/loss-vs-rate.png
      agent-tracer bench --only throughput --no-profile
      agent-tracer bench --only overhead --compare bpftrace --reps 3
    """
    cfg = BenchConfig(
        size=Size.quick if quick else Size.full,
        sections=tuple(Section(s) for s in only) or tuple(Section),
        compare=() if no_compare else (tuple(Compare(c) for c in compare) or tuple(Compare)),
        reps=reps, policy_dirs=tuple(policy_dirs) or (POLICY_DIR,), json_path=json_path,
        markdown_path=markdown_path, plot_path=plot_path, profile=not no_profile,
        echo=lambda m: click.echo(m, err=True))
    try:
        results = run_bench(cfg)
    except BenchError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("agent-tracer bench: interrupted; everything it started was stopped", err=True)
        sys.exit(130)
    click.echo(render_text(results))
    if json_path is not None:
        click.echo(f"results: {json_path}", err=True)
    if markdown_path is not None:
        click.echo(f"report: {markdown_path}", err=True)
