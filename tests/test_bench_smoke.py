"""The whole benchmark at tiny sizes (`agent-tracer bench --quick`), as CI
runs it, and its cleanup when interrupted. Real tracers, real load."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from at_testlib import have

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _leftovers(before_dirs: set[str]) -> list[str]:
    from episode_tracer import cgroups

    out = []
    root = cgroups.cgroup2_mount() / "agent-tracer"
    out += [str(p) for p in root.glob("atbench-*")]
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out += [line.split()[0] for line in ns.splitlines() if line.startswith("atbench-")]
    if have("auditctl"):
        rules = subprocess.run(["auditctl", "-l"], capture_output=True, text=True).stdout
        out += [line for line in rules.splitlines() if "agent-tracer-bench" in line]
    work = set(glob.glob(os.path.join(tempfile.gettempdir(), "agent-tracer-bench-*")))
    out += sorted(work - before_dirs)
    return out


def _procs_with(needle: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    pids.append(int(d))
        except OSError:
            pass
    return pids


@pytest.mark.timeout(420)
def test_quick_bench_runs_every_section_and_cleans_up(tmp_path):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "agent-tracer-bench-*")))
    out_json, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "img" / "loss.png"
    r = subprocess.run([sys.executable, "-m", "episode_tracer.cli", "bench", "--quick", "--json", str(out_json),
                        "--markdown", str(md), "--plot", str(png)], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out_json.read_text())

    # overhead: every workload under every configuration, paired ratios
    wls = res["overhead"]["workloads"]
    assert set(wls) == {"forkexec", "connect", "build"}
    want = {"baseline", "outside", "episode", "all"}
    for tool in ("bpftrace", "auditd"):
        if tool in res["overhead"]["missing"]:
            assert "not installed" in res["overhead"]["missing"][tool] or "audit" in res["overhead"]["missing"][tool]
        else:
            want.add(tool)
    for w in wls.values():
        assert set(w["configs"]) == want
        for name, c in w["configs"].items():
            assert c["time_s"]["n"] == 1 and c["time_s"]["median"] > 0
            if name != "baseline":
                assert c["ratio"]["n"] == 1 and c["ratio"]["ratio"] > 0

    # throughput: the tiny ramp drains everything it offered
    steps = res["throughput"]["steps"]
    assert [s["target"] for s in steps] == [5000, 20000]
    assert steps[0]["ok"] and steps[0]["lost"] == 0 and steps[0]["drained"] == steps[0]["produced"]
    assert res["throughput"]["max_zero_loss_rate"] >= 4000

    # latency: every probe matched its record; the denied connect is EPERM in
    # the episode and refused by the far end untraced
    lat = res["latency"]
    for bg in ("1000", "10000"):
        assert lat["alert"][bg]["matched"] == lat["alert"][bg]["sent"] == 10
        assert 0 < lat["alert"][bg]["p50_ms"] <= lat["alert"][bg]["p99_ms"] <= lat["alert"][bg]["max_ms"]
    assert lat["gate_hold"]["matched"] == 10 and lat["gate_hold"]["gated"] == 10
    assert lat["deny"]["traced"]["errno"] == [1]
    assert lat["deny"]["untraced"]["errno"] == [111]
    assert lat["deny"]["traced"]["n"] == lat["deny"]["untraced"]["n"] == 10

    # wire: first messages and a bulk upload in an episode, with and without the tracer
    w = res["wire"]
    for kind in ("http", "json"):
        for g in ("baseline", "packet"):
            assert w["first_message"][kind][g]["n"] == 10 and w["first_message"][kind][g]["p50_ms"] > 0
    assert w["bulk_mb_s"]["packet"]["median"] > 0 and w["bulk_mb_s"]["packet"]["ratio"] > 0

    rs = res["resources"]
    assert rs["startup"]["spawn_to_ready_s"]["n"] >= 4
    assert rs["idle"]["rss_mb"] > 10 and rs["peak_rss_mb"] >= rs["idle"]["rss_mb"]
    names = [t["name"] for t in res["targets"]]
    assert "zero-loss drain rate (one core)" in names and "exec gate hold p99" in names

    text = md.read_text()
    for title in ("## Machine", "## Overhead: forkexec", "## Throughput ramp", "## Latency",
                  "## Startup and resources", "## Targets", "## How to reproduce", "## Wire: first message"):
        assert title in text
    assert "== Targets" in r.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert _leftovers(before) == []


@pytest.mark.timeout(300)
def test_interrupted_bench_stops_everything_it_started(tmp_path):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "agent-tracer-bench-*")))
    # full sizes: after its first step the ramp has at least two more 5 s
    # steps to run (ramp_over), so the SIGINT always lands mid-run (with
    # --quick the bench could finish first and exit 0)
    p = subprocess.Popen([sys.executable, "-m", "episode_tracer.cli", "bench", "--only", "throughput", "--no-profile",
                          "--json", str(tmp_path / "b.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        seen = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "offered 25,000/s" in line:  # a tracer and an episode exist now
                break
        assert any("offered 25,000/s" in s for s in seen), "".join(seen)
        work = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), "agent-tracer-bench-*")) if d not in before]
        assert len(work) == 1
        assert _procs_with(work[0]), "the bench's tracer should be running"
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err[-2000:]
    assert "interrupted; everything it started was stopped" in err
    assert not (tmp_path / "b.json").exists()
    assert _procs_with(work[0]) == []
    assert _leftovers(before) == []
