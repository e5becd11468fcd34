"""Per-episode GPU totals where the dashboard (State) and the verdict
summaries (verdict files, EpisodeResult) read them. No root."""
from __future__ import annotations

from episode_tracer.api import EpisodeResult, read_gpu_total, read_verdicts
from episode_tracer.sinks import VerdictSink
from episode_tracer.state import State


def _total(ep, ts, peak, final=False):
    return {"type": "gpu_total", "ts": ts, "episode": ep, "peak_mib": peak, "mib_s": 10.0 * peak, "sm_s": 1.5,
            "pids": [7, 8], "samples": 3, "final": final}


def test_state_keeps_totals_after_the_episode_ends():
    st = State(node="n", mode="enforce", policy_version="v", started=100.0, scope="episodes")
    st.observe({"type": "episode_start", "ts": 100.0, "episode": "ep", "source": "cgroup", "root_pid": 7})
    st.observe({"type": "gpu", "ts": 101.0, "episode": "ep", "pid": 7, "gpu_index": 0, "used_mib": 2048.0,
                "sm_util": 90.0})
    st.observe(_total("ep", 101.0, 2048.0))
    (e,) = st.snapshot(now=101.5)["episodes"]
    assert (e["gpu_mem_mib"], e["gpu_util"]) == (2048.0, 90.0)
    assert e["gpu_total"] == {"peak_mib": 2048.0, "sm_s": 1.5, "mib_s": 20480.0, "pids": 2}
    st.observe({"type": "episode_end", "ts": 102.0, "episode": "ep", "reason": "removed"})
    st.observe(_total("ep", 102.5, 4096.0, final=True))
    (e,) = st.snapshot(now=103.0)["episodes"]
    assert e["state"] == "ended" and e["gpu_mem_mib"] is None  # nothing running now
    assert e["gpu_total"]["peak_mib"] == 4096.0  # the totals stay
    assert st.snapshot(now=103.0)["events_total"] == 0  # GPU records are not traced events


def test_verdict_file_carries_totals_and_summary_reads_them(tmp_path):
    sink = VerdictSink(tmp_path)
    alert = {"type": "alert", "episode": "ep", "rule": "r", "action": "kill", "enforced": True, "pid": 7}
    for rec in (_total("ep", 1.0, 100.0), alert, _total("ep", 2.0, 300.0), _total(None, 2.0, 5.0),
                {"type": "gpu", "episode": "ep", "pid": 7}):
        sink.write(rec)
    assert read_verdicts("ep", tmp_path) == [alert]  # alerts only, as before
    assert read_gpu_total("ep", tmp_path)["peak_mib"] == 300.0
    assert read_gpu_total("other", tmp_path) is None
    res = EpisodeResult("ep", 0, None, False, [alert], 1.0, read_gpu_total("ep", tmp_path))
    assert res.summary()["gpu"] == {"peak_mib": 300.0, "mib_s": 3000.0, "sm_s": 1.5, "pids": [7, 8], "samples": 3}
    assert EpisodeResult("ep", 0, None, False).summary()["gpu"] is None
