"""The GPU watcher through a fake NVML (tests/gpu_fake.py, behind the one
helper episode_tracer.gpu.nvml): samples, attribution, allowlist, NVML errors, no
NVML at all, the thread, totals. No root, no GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gpu_fake import FakeNvml
from episode_tracer import gpu
from episode_tracer.episodes import Tracker
from episode_tracer.gpu_allow import GpuAllow, register, unregister
from episode_tracer.gpu_watch import GpuWatcher
from episode_tracer.proctable import Proc


@pytest.fixture
def backend():
    made = []

    def use(fake):
        gpu.use_backend(fake)
        made.append(fake)
        return fake

    yield use
    gpu.use_backend(None)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _tracker(*procs: Proc) -> Tracker:
    tr = Tracker(live=False)
    for p in procs:
        tr.table.procs[p.pid] = p
    return tr


def _watcher(tr, tmp_path, interval=1.0):
    clock = Clock()
    w = GpuWatcher(tr, interval=interval, sampler=gpu.Sampler(clock=clock),
                   allow=GpuAllow(tr, directory=tmp_path / "reg"))
    return w, clock


def _run(w, clock, fake, n, start=0):
    """n samples, one per interval; the records of each."""
    out = []
    for i in range(start, start + n):
        fake.step(i)
        clock.t = 1000.0 + i * w.interval
        out.append(w.records_for(w.sampler.sample()))
    return out


def _of(recs, kind):
    return [r for r in recs if r["type"] == kind]


def test_samples_become_attributed_records(backend, tmp_path):
    tr = _tracker(Proc(pid=100, ppid=1, exe="/usr/bin/python3", argv=["python3", "mine.py"], comm="python3",
                       uid=1000, episode="ep-1", membership="cgroup"),
                  Proc(pid=200, ppid=1, exe="/usr/bin/python3", episode="ep-2", membership="env"))
    fake = backend(FakeNvml("hog.json", pids={"hog": 100, "small": 200}))
    w, clock = _watcher(tr, tmp_path)
    first, second = _run(w, clock, fake, 2)
    # nothing registered: both episodes' use counts against their budgets (gpu_budget)
    assert [r["type"] for r in first] == ["gpu_status", "gpu_node", "gpu", "gpu", "gpu_total", "gpu_total",
                                          "gpu_budget", "gpu_budget"]
    assert first[0]["status"] == "ok"
    assert [r["type"] for r in second] == ["gpu_node", "gpu", "gpu", "gpu_total", "gpu_total",
                                           "gpu_budget", "gpu_budget"]  # status once
    node = _of(second, "gpu_node")[0]["gpus"]
    assert node[0] == {"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3", "util": 97, "mem_util": 0,
                       "mem_used_mib": 6500.0, "mem_total_mib": 81559.0, "power_w": 520.0}
    hog = _of(second, "gpu")[0]
    assert {k: hog[k] for k in ("episode", "membership", "pid", "exe", "argv", "uid", "gpu_index", "gpu_uuid",
                                "used_mib", "sm_util", "gpu_allowed", "interval_s", "ts")} == {
        "episode": "ep-1", "membership": "cgroup", "pid": 100, "exe": "/usr/bin/python3",
        "argv": ["python3", "mine.py"], "uid": 1000, "gpu_index": 0, "gpu_uuid": "GPU-aaaa",
        "used_mib": 6144.0, "sm_util": 95.0, "gpu_allowed": False, "interval_s": 1.0, "ts": 1001.0}
    # no utilisation sample yet (first sample): unknown, not 0
    assert _of(first, "gpu")[0]["sm_util"] is None
    assert _of(second, "gpu")[1]["episode"] == "ep-2"


def test_episode_totals_and_final_record(backend, tmp_path):
    tr = _tracker(Proc(pid=100, ppid=1, exe="/x", episode="ep-1", membership="cgroup"),
                  Proc(pid=200, ppid=1, exe="/y", episode="ep-1", membership="lineage"))
    fake = backend(FakeNvml("hog.json", pids={"hog": 100, "small": 200}))
    w, clock = _watcher(tr, tmp_path)
    recs = _run(w, clock, fake, 5)
    tot = _of(recs[-1], "gpu_total")
    assert len(tot) == 1  # both processes (on two GPUs) in one episode
    t = tot[0]
    # peak: 6144 + 300 on two GPUs in one sample; MiB-s and SM-s summed over 5 one-second samples
    assert (t["peak_mib"], t["pids"], t["samples"], t["final"]) == (6444.0, [100, 200], 5, False)
    assert t["mib_s"] == 780 + 4 * 6444
    assert t["sm_s"] == pytest.approx((0 + 3 + 95 + 2 + 96 + 4 + 97 + 1 + 99 + 2) / 100)
    w.episode_ended("ep-1", 2000.0)
    (final,) = w.poll()
    assert final["type"] == "gpu_total" and final["final"] and final["ts"] == 2000.0 and final["samples"] == 5
    assert "ep-1" not in w.totals
    w.episode_ended("ep-1", 2001.0)
    assert w.poll() == []  # once


def test_attribution_of_processes_the_table_does_not_hold(backend, tmp_path):
    """Real processes read from /proc: by cgroup registry, by the parent's
    episode (lineage), or outside every episode."""
    kids = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        tr = _tracker(Proc(pid=os.getpid(), ppid=1, exe=sys.executable, episode="ep-par", membership="cgroup"))
        from episode_tracer.proctable import read_proc

        own_cg = read_proc(kids[0].pid).cgroup
        rec = {"gpus": [{"uuid": "GPU-z", "name": "x", "mem_total_mib": 1000}],
               "steps": [{"procs": [{"pid": kids[0].pid, "used_mib": 10}, {"pid": 4194303, "used_mib": 10}]}]}
        fake = backend(FakeNvml(rec))
        w, clock = _watcher(tr, tmp_path)
        g = _of(_run(w, clock, fake, 1)[0], "gpu")
        assert (g[0]["episode"], g[0]["membership"], g[0]["exe"]) == ("ep-par", "lineage", "/usr/bin/sleep")
        assert (g[1]["episode"], g[1]["exe"], g[1]["gpu_allowed"]) == (None, None, False)  # no such process
        # the cgroup registry wins over lineage
        tr.cgroups.by_cgroup[own_cg] = "ep-cg"
        g = _of(_run(w, clock, fake, 1)[0], "gpu")
        assert (g[0]["episode"], g[0]["membership"]) == ("ep-cg", "cgroup")
        # outside every episode
        tr.cgroups.by_cgroup.clear()
        tr.table.procs.clear()
        g = _of(_run(w, clock, fake, 1)[0], "gpu")
        assert (g[0]["episode"], g[0]["membership"], g[0]["pid"]) == (None, None, kids[0].pid)
        assert kids[0].pid not in tr.table.procs  # read, not kept: no exit record would ever reap it
    finally:
        for k in kids:
            k.kill()
            k.wait()


def test_allowed_is_the_registered_process_and_its_same_program_descendants(tmp_path):
    py, sh = "/usr/bin/python3.11", "/usr/bin/dash"
    procs = [
        Proc(pid=100, ppid=1, exe=py, episode="ep", membership="cgroup"),  # registered trainer
        Proc(pid=101, ppid=100, exe=py, episode="ep", membership="cgroup"),  # fork/spawn worker
        Proc(pid=102, ppid=101, exe=py, episode="ep", membership="cgroup"),  # worker of a worker
        Proc(pid=110, ppid=100, exe=sh, episode="ep", membership="cgroup"),  # sh -c ... from the trainer
        Proc(pid=111, ppid=110, exe=py, episode="ep", membership="cgroup"),  # python started by that shell
        Proc(pid=120, ppid=100, exe="/tmp/xmrig", episode="ep", membership="cgroup"),
        Proc(pid=200, ppid=1, exe=py, episode="ep-other", membership="cgroup"),
        Proc(pid=201, ppid=100, exe=py, episode=None),  # left the episode? not allowed by its registration
    ]
    tr = _tracker(*procs)
    reg = tmp_path / "reg"
    allow = GpuAllow(tr, directory=reg)
    assert [allow.allowed(p.pid) for p in procs] == [False] * len(procs)  # nothing registered
    register("ep", 100, directory=reg)
    got = {p.pid: allow.allowed(p.pid) for p in procs}
    assert got == {100: True, 101: True, 102: True, 110: False, 111: False, 120: False, 200: False, 201: False}
    assert allow.allowed(4194303) is None  # unknown process
    register("ep", 110, directory=reg)  # a second registration (the shell itself)
    assert allow.allowed(110) and not allow.allowed(111)
    unregister("ep", directory=reg)
    assert not allow.allowed(100)


def test_nvml_errors_mid_run_are_unknown_not_crashes(backend, tmp_path):
    tr = _tracker(Proc(pid=100, ppid=1, exe="/x", episode="ep", membership="cgroup"))
    fake = backend(FakeNvml("errors.json", pids={"hog": 100}))
    w, clock = _watcher(tr, tmp_path)
    ok, partial, lost, back = _run(w, clock, fake, 4)
    assert _of(ok, "gpu")[0]["sm_util"] == 80.0
    g = _of(partial, "gpu")[0]
    assert (g["used_mib"], g["sm_util"]) == (2048.0, None)  # utilisation failed: unknown
    assert _of(partial, "gpu_node")[0]["gpus"][0]["power_w"] is None
    assert lost == [{"type": "gpu_status", "ts": 1002.0, "episode": None, "status": "NVML error: cannot count GPUs"}]
    assert [r["type"] for r in back][:3] == ["gpu_status", "gpu_node", "gpu"]
    assert back[0]["status"] == "ok" and _of(back, "gpu")[0]["sm_util"] == 81.0


def test_no_nvml_says_why_and_the_thread_stops(backend, tmp_path):
    fake = backend(FakeNvml("hog.json", init_error="NVML Shared Library Not Found"))
    assert gpu.nvml_status() == (False, "NVML unavailable (NVML Shared Library Not Found): GPU watching off")
    w = GpuWatcher(_tracker(), interval=0.01, allow=GpuAllow(None, directory=tmp_path))
    w.start()
    w._thread.join(timeout=5)
    assert not w.running  # said once, then stopped: nothing to watch
    recs = w.poll()
    assert [(r["type"], r["status"]) for r in recs] == [
        ("gpu_status", "NVML unavailable (NVML Shared Library Not Found)")]
    assert fake.calls.count("nvmlInit") == 1


def test_no_pynvml_module(backend, tmp_path, monkeypatch):
    gpu.use_backend(None)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert gpu.nvml_status() == (False, "nvidia-ml-py is not installed: GPU watching off")
    assert gpu.nvml("nvmlDeviceGetCount") is None
    assert gpu.Sampler().sample().status == "nvidia-ml-py is not installed"


def test_no_gpu(backend):
    backend(FakeNvml({"gpus": [], "steps": [{}]}))
    assert gpu.nvml_status() == (False, "NVML reports no GPU: GPU watching off")
    assert gpu.Sampler().sample().status == "no GPU"


def test_doctor_says_why_gpu_watching_is_off(backend):
    from episode_tracer.doctor import _gpu_check

    backend(FakeNvml("hog.json", init_error="Driver Not Loaded"))
    c = _gpu_check()
    assert (c.name, c.status, c.required) == ("gpu", "warn", False)
    assert c.detail == "NVML unavailable (Driver Not Loaded): GPU watching off"
    backend(FakeNvml("hog.json"))
    c = _gpu_check()
    assert (c.status, c.detail) == ("ok", "2 GPU(s), driver 580.00-fake")


def test_the_thread_samples_every_interval(backend, tmp_path):
    tr = _tracker(Proc(pid=100, ppid=1, exe="/x", episode="ep", membership="cgroup"))
    backend(FakeNvml("hog.json", pids={"hog": 100, "small": 100}))
    w = GpuWatcher(tr, interval=0.05, allow=GpuAllow(tr, directory=tmp_path))
    w.start()
    try:
        time.sleep(0.5)
    finally:
        w.stop()
    recs = w.poll()
    nodes = _of(recs, "gpu_node")
    assert 4 <= len(nodes) <= 12, len(nodes)  # ~10 samples in 0.5 s (2 shared cores: some slack)
    ts = [r["ts"] for r in nodes]
    assert all(0.02 < b - a < 0.25 for a, b in zip(ts, ts[1:])), ts
    assert all(r["episode"] == "ep" for r in _of(recs, "gpu"))


def test_a_hung_nvml_call_does_not_block_the_loop(backend, tmp_path):
    class Slow(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, h):
            time.sleep(1.0)
            return super().nvmlDeviceGetMemoryInfo(h)

    backend(Slow("hog.json", pids={"hog": 1, "small": 1}))
    w = GpuWatcher(_tracker(), interval=0.05, allow=GpuAllow(None, directory=tmp_path))
    w.start()
    try:
        t0 = time.monotonic()
        for _ in range(20):
            w.poll()
        assert time.monotonic() - t0 < 0.1
    finally:
        w._stop.set()
