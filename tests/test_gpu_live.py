"""Live (root): the real BPF programs and real processes.

* gpu_open: the openat tracepoint path, filtered in the kernel to episode
  processes and GPU path prefixes, driven with a stand-in device path the
  test controls (this machine has no /dev/nvidia*), then judged by policy
  with `gpu_allowed` from the episode's registration.
* the GPU watcher in the running tracer, fake NVML at the helper only:
  a real process in an episode that "holds" GPU memory is attributed to its
  episode and killed within the configured duration; a registered process
  with the same load in another episode is not touched.
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from at_testlib import run_in_episode, wait_for
from gpu_fake import FakeNvml
from episode_tracer import gpu
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable


@pytest.fixture
def standin(tmp_path):
    """A directory standing in for /dev: <dir>/nvidia0 and <dir>/other."""
    d = Path("/tmp") / f"at-gpu-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    (d / "nvidia0").write_text("")
    (d / "nvidiactl").write_text("")
    (d / "other").write_text("")
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _opener(paths: list[Path], hold: float = 0.3) -> list[str]:
    code = ("import sys,time,os\nfor p in sys.argv[1:]:\n    fd = os.open(p, os.O_RDWR)\n"
            f"time.sleep({hold})\n")
    return [PY, "-S", "-c", code, *map(str, paths)]


def _policy(tmp_path: Path, standin: Path, extra: str = "") -> Path:
    d = tmp_path / "pol"
    d.mkdir()
    (d / "gpu.toml").write_text((POLICY_DIR / "gpu.toml").read_text())
    (d / "90-site.toml").write_text(
        f'[[override]]\nlist = "gpu_device_paths"\nappend = ["{standin}/nvidia[0-9]*"]\n' + extra)
    return d


def test_gpu_open_in_kernel_then_policy(live_tracer, episode_id, standin, tmp_path):
    t = live_tracer(gpu_prefixes=(f"{standin}/nvidia",), gpu_interval=0, policy=True,
                    policy_dirs=[_policy(tmp_path, standin)]).start()
    # outside every episode: the kernel emits nothing
    import subprocess

    subprocess.run(_opener([standin / "nvidia0"], 0), check=True)
    run_in_episode(episode_id, _opener([standin / "nvidia0", standin / "nvidiactl", standin / "other"]))
    opens = t.wait(type="gpu_open", episode=episode_id, n=2)
    assert sorted(o["path"] for o in opens) == [f"{standin}/nvidia0", f"{standin}/nvidiactl"]  # not "other"
    o = next(o for o in opens if o["path"].endswith("nvidia0"))
    assert o["result"] >= 0 and o["flags"] & 0o3 == 2 and o["membership"] == "cgroup" and o["exe"]
    alerts = t.wait(type="alert", rule="gpu-open-not-allowed", episode=episode_id)
    assert [(a["path"], a["action"], a["pid"]) for a in alerts] == [(f"{standin}/nvidia0", "alert", o["pid"])]
    assert t.find(type="gpu_open", episode=None) == []


def test_gpu_open_by_the_registered_process_is_allowed(live_tracer, episode_id, standin, tmp_path):
    t = live_tracer(gpu_prefixes=(f"{standin}/nvidia",), gpu_interval=0, policy=True,
                    policy_dirs=[_policy(tmp_path, standin)]).start()
    # the registered process opens the device, then a shell it starts opens it too
    code = ("import os,subprocess,sys,time\nfd=os.open(sys.argv[1], os.O_RDWR)\n"
            "subprocess.run(['/bin/sh','-c','exec 3<>' + sys.argv[1] + '; sleep 0.2'])\ntime.sleep(0.2)\n")
    run_in_episode(episode_id, [PY, "-S", "-c", code, str(standin / "nvidia0")], gpu=True)
    opens = t.wait(type="gpu_open", episode=episode_id, n=2)
    assert len(opens) == 2
    alerts = t.wait(type="alert", rule="gpu-open-not-allowed", episode=episode_id)
    py_pid = next(o["pid"] for o in opens if o["comm"].startswith("python"))
    sh_pid = next(o["pid"] for o in opens if o["pid"] != py_pid)
    assert [a["pid"] for a in alerts] == [sh_pid]  # the trainer may; what it starts via a shell may not
    assert not Path(f"/run/agent-tracer/gpu/{episode_id}").exists()  # unregistered at the end


def _in_episode_bg(ep: str, argv: list[str], **kw) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def go():
        box["res"] = run_in_episode(ep, argv, **kw)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th, box


def test_watcher_attributes_and_kills_within_the_duration(live_tracer, standin, tmp_path):
    ep_hog, ep_ok = f"t-hog-{uuid.uuid4().hex[:6]}", f"t-ok-{uuid.uuid4().hex[:6]}"
    fake = FakeNvml({"gpus": [{"uuid": "GPU-live", "name": "NVIDIA H100", "mem_total_mib": 81559}],
                     "steps": [{"procs": [{"pid_of": "hog", "used_mib": 6144, "sm": 97},
                                          {"pid_of": "ok", "used_mib": 6144, "sm": 97}]}]})
    gpu.use_backend(fake)
    threads = []
    try:
        extra = ('[[override]]\nrule = "gpu-memory-hog-in-episode"\nfor_s = 1.0\n'
                 '[[override]]\nrule = "gpu-compute-hog-in-episode"\nenabled = false\n')
        t = live_tracer(gpu_interval=0.2, policy=True, policy_dirs=[_policy(tmp_path, standin, extra)]).start()
        sleeper = [PY, "-S", "-c", "import time; time.sleep(20)"]
        threads.append(_in_episode_bg(ep_hog, sleeper))
        threads.append(_in_episode_bg(ep_ok, sleeper, gpu=True))
        hog = t.wait(type="exec", episode=ep_hog)[0]["pid"]
        ok = t.wait(type="exec", episode=ep_ok)[0]["pid"]
        fake.pids.update(hog=hog, ok=ok)
        first = t.wait(type="gpu", pid=hog)
        assert first and first[0]["episode"] == ep_hog and first[0]["gpu_allowed"] is False
        alerts = t.wait(timeout=10, type="alert", rule="gpu-memory-hog-in-episode")
        assert [(a["pid"], a["episode"], a["action"], a["enforced"]) for a in alerts] == [(hog, ep_hog, "kill", True)]
        detect = alerts[0]["ts"] - first[0]["ts"]
        print(f"\nGPU hog: first sample -> kill {detect:.2f}s (for_s=1.0, interval 0.2 s)")
        assert 1.0 <= detect < 1.0 + 3 * 0.2 + 0.5
        th, box = threads[0]
        th.join(timeout=10)
        assert box["res"].signal == 9
        # the registered process under the same load: sampled, attributed, untouched
        okrecs = t.find(type="gpu", pid=ok)
        assert okrecs and all(r["episode"] == ep_ok and r["gpu_allowed"] for r in okrecs)
        time.sleep(1.0)
        assert t.find(type="alert", pid=ok) == []
        assert threads[1][0].is_alive()
        tot = wait_for(lambda: [r for r in t.find(type="gpu_total", episode=ep_hog) if r["final"]], timeout=5)
        assert tot and tot[-1]["peak_mib"] == 6144.0 and tot[-1]["pids"] == [hog]
    finally:
        from episode_tracer import cgroups

        for ep in (ep_hog, ep_ok):
            try:
                cgroups.kill(cgroups.cgroup2_mount() / "agent-tracer" / ep)
            except Exception:
                pass
        for th, _ in threads:
            th.join(timeout=10)
        gpu.use_backend(None)


def test_real_nvml_status_and_the_tracer_runs_on(live_tracer, episode_id):
    """Whatever this node has: one gpu_status record says it (here: no NVML,
    so why GPU watching is off), and tracing goes on."""
    from at_testlib import _has_gpu

    gpu.use_backend(None)
    t = live_tracer().start()
    st = t.wait(timeout=10, type="gpu_status")
    assert len(st) == 1
    if _has_gpu():
        assert st[0]["status"] == "ok"
    else:
        assert st[0]["status"].startswith(("NVML unavailable (", "nvidia-ml-py is not installed", "no GPU")), st
        wait_for(lambda: not t.rt.gpu.running, timeout=5)
        assert not t.rt.gpu.running
    run_in_episode(episode_id, ["/bin/true"])
    assert t.wait(type="exec", episode=episode_id)
