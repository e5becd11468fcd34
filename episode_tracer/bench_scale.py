"""The `scale` section of `agent-tracer bench` (docs/scale.md).

  start       `agent-tracer episode run --id X -- /bin/true` against a bare
              `python3 -c pass` and the venv's `python -c pass`, interleaved
              (the order rotates per repetition), a tracer running (so the
              start handshake is included); the API's run_episode against a
              plain subprocess of /bin/true, interleaved the same way.
  concurrent  1, 64 and 512 episodes at once, each running a socket() load
              generator (the same total rate split between them), while a
              gate probe runs in one more episode: gate hold p99 and the
              drain rate (socket events the tracer drained per second, lost).
  long run    many short episodes through the API, one after another, on a
              tracer whose identities start near the top of their
              generations (--slot-start-gen) with few identities
              (--max-episodes 16), so every identity wraps and is swept:
              episodes per second, every one started and ended exactly once,
              and tracer RSS against the number of ended episodes (least
              squares slope per 1,000).

Pure helpers (slope, tables) are unit-tested in tests/test_scale.py; the
live part runs the real tracer as a subprocess through bench.Bench.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Any, Sequence

SIZES = {
    "quick": {"cli_reps": 5, "api_reps": 10, "concurrent": (1, 16), "conc_rate": 2000, "conc_s": 1.5,
              "gate_probes": 10, "long_n": 300, "long_checkpoints": 3},
    "full": {"cli_reps": 31, "api_reps": 101, "concurrent": (1, 64, 512), "conc_rate": 20000, "conc_s": 5.0,
             "gate_probes": 100, "long_n": 100_000, "long_checkpoints": 10},
}
LONG_MAX_EPISODES = 16
LONG_START_GEN = 2040  # of 2048 generations per identity: wraps after 8 uses


def slope_per_1000(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x, per 1,000 of x (None with < 2 points
    or no spread in x)."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 1000


def _median(v: Sequence[float]) -> float | None:
    if not v:
        return None
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
    return dt


def _cli() -> list[str]:
    from .paths import ROOT

    script = ROOT / ".venv" / "bin" / "agent-tracer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "episode_tracer.cli"]


def measure_start(bench, t, size: dict[str, Any]) -> dict[str, Any]:
    from .api import run_episode

    env = {**os.environ, "AGENT_TRACER_SOCKET": str(t.control_socket)}
    cli = _cli()
    configs = {
        "python3 -c pass": lambda i: _timed(["/usr/bin/python3", "-c", "pass"]),
        "venv python -c pass": lambda i: _timed([sys.executable, "-c", "pass"]),
        "agent-tracer episode run -- /bin/true": lambda i: _timed(
            cli + ["episode", "run", "--id", f"atbench-scale-cli-{uuid.uuid4().hex[:8]}", "--", "/bin/true"], env),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    for r in range(size["cli_reps"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(configs[name](r))
    out: dict[str, Any] = {"cli": {k: {"median_ms": _median(v) * 1000, "n": len(v)} for k, v in times.items()}}
    cli_med = _median(times["agent-tracer episode run -- /bin/true"])
    out["cli"]["ratio_to_python3"] = cli_med / _median(times["python3 -c pass"])
    out["cli"]["episodes_per_s"] = 1 / cli_med
    # the API: run_episode vs a plain subprocess of the same command
    api, plain = [], []
    for r in range(size["api_reps"]):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                t0 = time.perf_counter()
                res = run_episode(f"atbench-scale-api-{uuid.uuid4().hex[:8]}", ["/bin/true"],
                                  control_socket=t.control_socket)
                api.append(time.perf_counter() - t0)
                if res.exit_code != 0:
                    raise RuntimeError(f"API episode exited {res.exit_code}")
            else:
                t0 = time.perf_counter()
                subprocess.run(["/bin/true"], check=True)
                plain.append(time.perf_counter() - t0)
    out["api"] = {"run_episode_median_ms": _median(api) * 1000, "subprocess_median_ms": _median(plain) * 1000,
                  "overhead_ms": (_median(api) - _median(plain)) * 1000, "episodes_per_s": 1 / _median(api),
                  "n": len(api)}
    return out


def measure_concurrent(bench, t, k: int, size: dict[str, Any]) -> dict[str, Any]:
    from .bench import EpisodeCgroup, latency_summary

    rate_each = max(1, size["conc_rate"] // k)
    secs = size["conc_s"]
    eps = [EpisodeCgroup(bench.cleanup, f"scale{k}") for _ in range(k)]
    probe_ep = EpisodeCgroup(bench.cleanup, f"scale{k}-gate")
    try:
        r0 = t.reader
        assert r0 is not None
        r0.wait_stats()
        before = r0.kind_count("socket")
        lost0 = r0.lost_total
        t0 = time.monotonic()
        loads = [bench.start_bg([bench.tools["loadgen"], str(rate_each), f"{secs:.1f}"], ep) for ep in eps]
        _dt, txt = bench.run_cmd([bench.tools["gateprobe"], str(size["gate_probes"]), bench.tools["atb-stamp"]],
                                 probe_ep)
        produced = 0
        for p in loads:
            out, _ = p.communicate(timeout=secs + 120)
            try:
                produced += int(out.split()[0])
            except (ValueError, IndexError):
                pass
        # drained: the tracer's own count, once it has caught up (or 30 s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r0.wait_stats()
            if r0.kind_count("socket") - before >= produced:
                break
        elapsed = time.monotonic() - t0
        drained = r0.kind_count("socket") - before
        gate = bench._gate_summary(t, txt)["gate_hold"]
        return {"episodes": k, "produced": produced, "drained": drained, "lost": r0.lost_total - lost0,
                "drain_per_s": drained / elapsed, "offered_per_s": rate_each * k, "gate_hold": gate}
    finally:
        for ep in eps + [probe_ep]:
            ep.remove()


def measure_long(bench, size: dict[str, Any]) -> dict[str, Any]:
    from .api import run_episode

    n = size["long_n"]
    t = bench.tracer(extra_args=["--max-episodes", str(LONG_MAX_EPISODES), "--slot-start-gen", str(LONG_START_GEN),
                                 "--gpu-interval", "0"])
    try:
        r = t.reader
        r.wait_stats()
        k0 = dict((r.stats or {}).get("events_by_kind") or {})
        every = max(1, n // size["long_checkpoints"])
        rss: list[tuple[int, float]] = [(0, t.rss_mb() or 0.0)]
        tag = uuid.uuid4().hex[:6]
        failed = 0
        t0 = time.monotonic()
        for i in range(n):
            res = run_episode(f"atbench-scale-long-{tag}-{i}", ["/bin/true"], control_socket=t.control_socket)
            failed += res.exit_code != 0
            if (i + 1) % every == 0:
                rss.append((i + 1, t.rss_mb() or 0.0))
                bench.say(f"scale: {i + 1:,} of {n:,} episodes, tracer RSS {rss[-1][1]:.1f} MB")
        elapsed = time.monotonic() - t0
        # every episode started and ended once, in the tracer's own counts
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r.wait_stats()
            k1 = (r.stats or {}).get("events_by_kind") or {}
            if k1.get("episode_end", 0) - k0.get("episode_end", 0) >= n:
                break
        k1 = dict((r.stats or {}).get("events_by_kind") or {})
        slots = (r.stats or {}).get("slots") or {}
        return {"episodes": n, "failed": failed, "seconds": elapsed, "episodes_per_s": n / elapsed,
                "starts": k1.get("episode_start", 0) - k0.get("episode_start", 0),
                "ends": k1.get("episode_end", 0) - k0.get("episode_end", 0),
                "refused": k1.get("episode_refused", 0) - k0.get("episode_refused", 0),
                "identity_wraps": slots.get("wraps"), "max_episodes": LONG_MAX_EPISODES,
                "start_gen": LONG_START_GEN, "lost": r.lost_total,
                "rss_mb": rss, "rss_slope_mb_per_1000": slope_per_1000(rss[1:] if len(rss) > 2 else rss)}
    finally:
        bench.stop_tracer(t)


def run_scale(bench) -> dict[str, Any]:
    from .bench import Size

    size = SIZES["quick" if bench.cfg.size == Size.quick else "full"]
    out: dict[str, Any] = {}
    with bench.live.lock():
        t = bench.tracer()
        try:
            bench.say("scale: episode start (CLI and API)")
            out["start"] = measure_start(bench, t, size)
            out["concurrent"] = []
            for k in size["concurrent"]:
                bench.say(f"scale: {k} concurrent episodes")
                out["concurrent"].append(measure_concurrent(bench, t, k, size))
        finally:
            bench.stop_tracer(t)
        bench.say(f"scale: {size['long_n']:,} short episodes through the API")
        out["long"] = measure_long(bench, size)
    return out


def scale_tables(sc: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    out = []
    st = sc.get("start") or {}
    cli = st.get("cli") or {}
    if cli:
        rows = [[k, v.get("median_ms"), v.get("n")] for k, v in cli.items() if isinstance(v, dict)]
        rows.append(["episode run / python3 -c pass (ratio, target <= 3)", cli.get("ratio_to_python3"), None])
        rows.append(["CLI episodes started per second (sequential)", cli.get("episodes_per_s"), None])
        api = st.get("api") or {}
        if api:
            rows.append(["API run_episode(['/bin/true']) ms", api.get("run_episode_median_ms"), api.get("n")])
            rows.append(["subprocess /bin/true ms", api.get("subprocess_median_ms"), api.get("n")])
            rows.append(["API overhead ms (target <= 10)", api.get("overhead_ms"), None])
            rows.append(["API episodes started per second (sequential)", api.get("episodes_per_s"), None])
        out.append(("Scale: episode start (tracer running, start handshake included)",
                    ["what", "median ms / value", "n"], rows))
    conc = sc.get("concurrent") or []
    if conc:
        out.append(("Scale: concurrent episodes (socket() load split between them, gate probe in one more)",
                    ["episodes", "offered/s", "produced", "drained", "lost", "drained/s", "gate hold p50 ms",
                     "gate hold p99 ms", "gated"],
                    [[c["episodes"], c["offered_per_s"], c["produced"], c["drained"], c["lost"], c["drain_per_s"],
                      c["gate_hold"].get("p50_ms"), c["gate_hold"].get("p99_ms"), c["gate_hold"].get("gated")]
                     for c in conc]))
    lg = sc.get("long") or {}
    if lg:
        rows = [["episodes (sequential, API)", lg.get("episodes")], ["failed", lg.get("failed")],
                ["episode_start / episode_end records", f"{lg.get('starts')} / {lg.get('ends')}"],
                ["refused", lg.get("refused")], ["episodes per second", lg.get("episodes_per_s")],
                [f"identities (--max-episodes {lg.get('max_episodes')}, first generation {lg.get('start_gen')}): "
                 "wraps swept", lg.get("identity_wraps")],
                ["lost", lg.get("lost")],
                ["tracer RSS MB at 0 / end", f"{lg['rss_mb'][0][1]:.1f} / {lg['rss_mb'][-1][1]:.1f}"
                 if lg.get("rss_mb") else None],
                ["RSS slope, MB per 1,000 ended episodes", lg.get("rss_slope_mb_per_1000")]]
        out.append(("Scale: long run of short episodes", ["what", "value"], rows))
    return out
