"""On a GPU node (marker `gpu`, root): a real CUDA process in an episode.

An episode that is not allowed the GPU runs PyTorch: it allocates ~2 GiB and
multiplies matrices. The tracer must see its GPU device opens in the kernel,
attribute its NVML samples to the episode, and kill it within the configured
duration. The same load in an episode whose command is registered
(`gpu=True`) is not touched. How to run it: docs/gpu.md.
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from at_testlib import run_in_episode, wait_for
from episode_tracer.paths import POLICY_DIR

pytestmark = [pytest.mark.root, pytest.mark.gpu, pytest.mark.slow]
PY = sys.executable
FOR_S = 5.0
INTERVAL = 0.5

LOAD = """
import sys, time, torch
x = torch.randn(16384, 16384, device="cuda")   # 1 GiB, 2 with the product
end = time.time() + float(sys.argv[1])
while time.time() < end:
    y = x @ x
    torch.cuda.synchronize()
print("done")
"""


def _torch_or_skip() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("PyTorch is not installed in this venv (pip install torch; see docs/gpu.md)")


def test_cuda_process_in_episode_is_attributed_and_killed(live_tracer, tmp_path):
    _torch_or_skip()
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "gpu.toml").write_text((POLICY_DIR / "gpu.toml").read_text())
    (pol / "90-test.toml").write_text(
        f'[[override]]\nrule = "gpu-memory-hog-in-episode"\nfor_s = {FOR_S}\n'
        f'[[override]]\nrule = "gpu-compute-hog-in-episode"\nfor_s = {FOR_S}\n')
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    ep_bad, ep_ok = f"t-cuda-{uuid.uuid4().hex[:6]}", f"t-train-{uuid.uuid4().hex[:6]}"
    t = live_tracer(gpu_interval=INTERVAL, policy=True, policy_dirs=[pol]).start()
    out: dict = {}
    threads = [
        threading.Thread(target=lambda: out.__setitem__("bad", run_in_episode(ep_bad, [PY, str(script), "120"])),
                         daemon=True),
        threading.Thread(target=lambda: out.__setitem__("ok", run_in_episode(ep_ok, [PY, str(script), "40"],
                                                                              gpu=True)), daemon=True),
    ]
    try:
        for th in threads:
            th.start()
        status = t.wait(timeout=30, type="gpu_status")
        assert status and status[0]["status"] == "ok", status
        alerts = t.wait(timeout=150, type="alert", episode=ep_bad, action="kill")
        assert alerts, [r for r in t.records if r["type"] in ("alert", "gpu_status")]
        kill = alerts[0]
        bad_pid = kill["pid"]
        opens = t.find(type="gpu_open", episode=ep_bad, pid=bad_pid)
        samples = t.find(type="gpu", episode=ep_bad, pid=bad_pid)
        assert opens and any(o["path"].startswith("/dev/nvidia") for o in opens)
        assert samples and all(s["gpu_allowed"] is False for s in samples)
        assert kill["rule"] in ("gpu-memory-hog-in-episode", "gpu-compute-hog-in-episode") and kill["enforced"]
        first_hot = next(s for s in samples if (s["used_mib"] or 0) > 1024 or (s["sm_util"] or 0) > 50)
        detect = kill["ts"] - first_hot["ts"]
        print(f"\nCUDA episode {ep_bad}: first device open -> first NVML sample {samples[0]['ts'] - opens[0]['ts']:.2f}s,"
              f" first over-threshold sample -> kill {detect:.2f}s (for_s={FOR_S}, interval={INTERVAL}s),"
              f" exec -> kill {kill['ts'] - t.find(type='exec', episode=ep_bad)[0]['ts']:.2f}s")
        assert FOR_S <= detect <= FOR_S + 3 * INTERVAL + 1.0
        threads[0].join(timeout=30)
        assert out["bad"].signal == 9
        # the registered trainer with the same load: attributed, never touched, finishes
        threads[1].join(timeout=120)
        res = out["ok"]
        assert res.exit_code == 0 and res.signal is None, res
        ok_samples = t.find(type="gpu", episode=ep_ok)
        assert ok_samples and all(s["gpu_allowed"] for s in ok_samples)
        assert max(s["used_mib"] or 0 for s in ok_samples) > 1024
        assert t.find(type="alert", episode=ep_ok) == []
        tot = wait_for(lambda: [r for r in t.find(type="gpu_total", episode=ep_ok) if r["final"]], timeout=10)
        assert tot and tot[-1]["peak_mib"] > 1024 and tot[-1]["sm_s"] > 1
    finally:
        from episode_tracer import cgroups

        for ep in (ep_bad, ep_ok):
            try:
                cgroups.kill(cgroups.cgroup2_mount() / "agent-tracer" / ep)
            except Exception:
                pass
        for th in threads:
            th.join(timeout=30)
