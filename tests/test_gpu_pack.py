"""episode_tracer/policies/gpu.toml over recorded NVML sequences: the real watcher (fake
NVML at the helper), the default packs, durations counted by Holds. No
root, no GPU."""
from __future__ import annotations

import pytest

from gpu_fake import FakeNvml
from episode_tracer import gpu
from episode_tracer.episodes import Tracker
from episode_tracer.gpu_allow import GpuAllow, register
from episode_tracer.gpu_watch import GpuWatcher
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import Holds, load_policy, record_context
from episode_tracer.proctable import Proc


@pytest.fixture(scope="module")
def policy():
    res = load_policy([POLICY_DIR])
    assert not res.errors and not res.warnings, [str(d) for d in res.errors + res.warnings]
    return res.policy


@pytest.fixture
def node(tmp_path):
    tr = Tracker(live=False)
    py = "/usr/bin/python3.11"
    for p in (Proc(pid=100, ppid=1, exe=py, episode="ep-a", membership="cgroup"),   # hog: not allowed
              Proc(pid=200, ppid=1, exe=py, episode="ep-b", membership="cgroup"),   # trainer: registered
              Proc(pid=300, ppid=1, exe="/opt/side/bin/job", episode=None),          # outside, not allowlisted
              Proc(pid=400, ppid=1, exe="/usr/bin/nvidia-smi", episode=None)):       # outside, allowlisted
        tr.table.procs[p.pid] = p
    register("ep-b", 200, directory=tmp_path)
    fake = FakeNvml("node.json", pids={"hog": 100, "trainer": 200, "outside": 300, "smi": 400})
    gpu.use_backend(fake)
    t = [0.0]
    w = GpuWatcher(tr, interval=1.0, sampler=gpu.Sampler(clock=lambda: t[0]), allow=GpuAllow(tr, directory=tmp_path))
    yield w, fake, t
    gpu.use_backend(None)


def _fired(policy, node, n, overrides=None):
    """(second, rule, pid, held_s) of every verdict over n one-second samples."""
    w, fake, t = node
    holds = Holds()
    out = []
    for i in range(n):
        fake.step(i)
        t[0] = 5000.0 + i
        for r in w.records_for(w.sampler.sample()):
            if r["type"] == "gpu":
                for v in policy.evaluate(r, record_context(r), holds):
                    out.append((i, v.rule, r["pid"], v.matched["held_s"], v.action.value))
    return out


def test_default_gpu_rules_over_forty_seconds(policy, node):
    got = _fired(policy, node, 40)
    assert got == [
        (10, "gpu-memory-hog-in-episode", 100, 10.0, "kill"),
        (10, "gpu-compute-hog-in-episode", 100, 10.0, "kill"),
        (30, "gpu-use-outside-episodes", 300, 30.0, "alert"),
    ]
    # the registered trainer (same load) and the allowlisted node tool: never


def test_site_overrides_thresholds_and_durations(tmp_path, node):
    (tmp_path / "90-site.toml").write_text(
        '[[override]]\nmacro = "gpu_memory_hog"\nreplace = { used_mib = { gt = 8192 } }\n'
        '[[override]]\nrule = "gpu-compute-hog-in-episode"\nfor_s = 3\naction = "kill-episode"\n'
        '[[override]]\nlist = "gpu_node_allowed_exes"\nappend = ["/opt/side/bin/*"]\n')
    res = load_policy([POLICY_DIR, tmp_path / "90-site.toml"])
    assert not res.errors and not res.warnings, [str(d) for d in res.errors + res.warnings]
    got = _fired(res.policy, node, 40)
    assert got == [(3, "gpu-compute-hog-in-episode", 100, 3.0, "kill-episode")]


def test_gpu_open_rule_for_episode_processes(policy):
    ev = {"type": "gpu_open", "episode": "ep-a", "pid": 100, "exe": "/tmp/x", "path": "/dev/nvidia3", "result": 4}
    (v,) = policy.evaluate(ev, record_context(ev))
    assert (v.rule, v.action.value, v.matched) == ("gpu-open-not-allowed", "alert", {"path": "/dev/nvidia3"})
