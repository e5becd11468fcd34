"""GPU rules an optimiser games (no root, no GPU): the GPU right passes to
fork workers and named executables only, not to every process running the
same program; per-episode budgets over a window catch pulsing under the
per-process hold and cycling pids (the real sampler and watcher through the
fake NVML, the default gpu.toml through the real evaluator); a gpu_open
deny compiles to the kernel's kill at the device open."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpu_fake import FakeNvml
from episode_tracer import gpu
from episode_tracer.engine import build_kernel_maps
from episode_tracer.episodes import Tracker
from episode_tracer.gpu_allow import GpuAllow, parse_registration, register
from episode_tracer.gpu_watch import GpuWatcher
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import Holds, load_policy
from episode_tracer.proctable import Proc

PY, SH = "/usr/bin/python3.11", "/usr/bin/dash"


def _tracker(*procs: Proc) -> Tracker:
    tr = Tracker(live=False)
    for p in procs:
        tr.table.procs[p.pid] = p
    return tr


def _p(pid, ppid, exe, execs=1, forked=True, episode="ep"):
    return Proc(pid=pid, ppid=ppid, exe=exe, execs=execs, forked=forked, episode=episode, membership="cgroup",
                start=float(pid))


def test_right_passes_to_fork_workers_not_to_the_same_program(tmp_path):
    procs = [
        _p(100, 1, PY, forked=False),       # the registered trainer (registered before its exec)
        _p(101, 100, PY, execs=0),          # DataLoader fork worker: no exec
        _p(102, 101, PY, execs=0),          # its fork
        _p(103, 100, PY),                   # `python -c ...` the agent made the trainer start (exec'd)
        _p(110, 100, SH),                   # sh -c ...
        _p(111, 110, PY),                   # python started by that shell
        _p(112, 110, SH, execs=0),          # the shell's fork
    ]
    tr = _tracker(*procs)
    reg = tmp_path / "reg"
    allow = GpuAllow(tr, directory=reg)
    register("ep", 100, directory=reg)
    got = {p.pid: allow.allowed(p.pid) for p in procs}
    assert got == {100: True, 101: True, 102: True, 103: False, 110: False, 111: False, 112: False}


def test_named_executables_keep_the_right_through_exec(tmp_path):
    procs = [_p(100, 1, PY, forked=False), _p(103, 100, PY), _p(110, 100, SH), _p(111, 110, PY)]
    tr = _tracker(*procs)
    reg = tmp_path / "reg"
    allow = GpuAllow(tr, directory=reg)
    register("ep", 100, directory=reg, exes=["/usr/bin/python3*"])
    assert parse_registration((reg / "ep").read_text()).exes == ("/usr/bin/python3*",)
    # spawn/torchrun workers of the trainer's Python: named, parent holds it
    assert allow.allowed(103) is True
    # a python started by a shell the trainer ran: the shell has no right to pass on
    assert allow.allowed(111) is False and allow.allowed(110) is False


def test_right_lost_at_an_unnamed_exec_does_not_come_back(tmp_path):
    """fork worker -> exec sh (right dropped) -> exec python (named): still no right."""
    w = _p(105, 100, PY, execs=0)
    tr = _tracker(_p(100, 1, PY, forked=False), w)
    reg = tmp_path / "reg"
    allow = GpuAllow(tr, directory=reg)
    register("ep", 100, directory=reg, exes=["/usr/bin/python3*"])
    assert allow.allowed(105) is True
    w.exe, w.execs = SH, 1
    assert allow.on_exec(w) is False
    w.exe, w.execs = PY, 2
    assert allow.on_exec(w) is False
    assert allow.allowed(105) is False
    # the registered process itself keeps it through its own execs
    tr.table.procs[100].exe = SH
    assert allow.on_exec(tr.table.procs[100]) is True


def test_registered_exec_and_fork_on_records(tmp_path):
    """Through the tracker: a forked child that did not exec holds the right;
    after an exec of the same (unnamed) program it does not."""
    tr = Tracker(live=False)
    reg = tmp_path / "reg"
    allow = GpuAllow.for_tracker(tr, directory=reg)
    assert GpuAllow.for_tracker(tr, directory=reg) is allow  # one per tracker: engine and watcher share it
    register("ep", 100, directory=reg)
    tr.observe({"type": "exec", "ts": 1.0, "pid": 100, "episode": "ep", "membership": "cgroup", "argv": ["python3"],
                "exe": PY, "filename": PY})
    tr.observe({"type": "fork", "ts": 2.0, "pid": 100, "child_pid": 101, "episode": "ep", "membership": "cgroup"})
    assert allow.allowed(101) is True
    tr.observe({"type": "exec", "ts": 3.0, "pid": 101, "episode": "ep", "membership": "lineage",
                "argv": ["python3", "-c", "mine()"], "exe": PY, "filename": PY})
    assert allow.on_exec(tr.table.get(101)) is False
    assert allow.allowed(101) is False


# ----------------------------------------------------------------- budgets
@pytest.fixture
def packs():
    res = load_policy([POLICY_DIR])
    assert res.ok, res.errors
    return res.policy


def _recording(steps):
    return {"gpus": [{"uuid": "GPU-b", "name": "NVIDIA H100", "mem_total_mib": 81559}], "steps": steps}


def _drive(tmp_path, tr, fake, n, policy):
    gpu.use_backend(fake)
    try:
        clock = {"t": 1000.0}
        w = GpuWatcher(tr, interval=1.0, sampler=gpu.Sampler(clock=lambda: clock["t"]),
                       allow=GpuAllow(tr, directory=tmp_path / "reg"))
        holds = Holds()
        fired: list[tuple[int, str]] = []
        for i in range(n):
            fake.step(i)
            clock["t"] = 1000.0 + i
            for rec in w.records_for(w.sampler.sample()):
                for v in policy.evaluate(rec, None, holds):
                    fired.append((i, v.rule))
        return fired
    finally:
        gpu.use_backend(None)


def test_pulsing_under_the_hold_is_caught_by_the_budget(tmp_path, packs):
    """95 % SM for 8 s, idle 2 s, over and over: the per-process 10 s hold
    never completes; the episode's 60 s SM budget (20 SM-s) does."""
    on = {"procs": [{"pid": 100, "used_mib": 512, "sm": 95}], "repeat": 8}
    off = {"procs": [], "repeat": 2}
    fake = FakeNvml(_recording([on, off] * 6))
    tr = _tracker(_p(100, 1, "/tmp/worker"))
    fired = _drive(tmp_path, tr, fake, 60, packs)
    rules = {r for _, r in fired}
    assert "gpu-compute-hog-in-episode" not in rules
    assert "gpu-compute-budget-in-episode" in rules
    first = min(i for i, r in fired if r == "gpu-compute-budget-in-episode")
    assert first < 40, fired


def test_cycling_pids_is_caught_by_the_budget(tmp_path, packs):
    """A new pid every 5 s, each holding 2 GiB: no process is over the hold
    for long enough, the episode's memory budget (30720 MiB-s in 60 s) is."""
    steps = [{"procs": [{"pid": 200 + k, "used_mib": 2048, "sm": 0}], "repeat": 5} for k in range(8)]
    fake = FakeNvml(_recording(steps))
    tr = _tracker(*[_p(200 + k, 1, "/tmp/w") for k in range(8)])
    fired = _drive(tmp_path, tr, fake, 40, packs)
    rules = {r for _, r in fired}
    assert "gpu-memory-hog-in-episode" not in rules
    assert "gpu-memory-budget-in-episode" in rules
    # 2048 MiB a second crosses 30720 MiB-s after 15 samples
    assert min(i for i, r in fired if r == "gpu-memory-budget-in-episode") <= 16


def test_registered_use_does_not_count_against_the_budget(tmp_path, packs):
    on = {"procs": [{"pid": 100, "used_mib": 8192, "sm": 99}], "repeat": 30}
    fake = FakeNvml(_recording([on]))
    tr = _tracker(_p(100, 1, PY, forked=False))
    register("ep", 100, directory=tmp_path / "reg")
    assert _drive(tmp_path, tr, fake, 30, packs) == []


# ------------------------------------------------------ kernel kill at open
def _load(tmp_path: Path, body: str):
    d = tmp_path / "pol"
    d.mkdir(exist_ok=True)
    (d / "x.toml").write_text(body)
    return load_policy([d])


RULE = """
[[rule]]
name = "g"
severity = "high"
on = "gpu_open"
action = "deny"
{extra}
"""


def test_gpu_open_deny_compiles_to_the_kernel_kill(tmp_path):
    res = _load(tmp_path, RULE.format(extra='except = [ { gpu_allowed = true } ]'))
    assert res.ok, res.errors
    plan = res.policy.kernel_plan()
    assert plan.gpu_open_kill is True
    km = build_kernel_maps(plan, {})
    assert km.gpu_open_kill is True and km.gate_all is True  # execs gated: the right is re-granted in the gate
    assert build_kernel_maps(plan, {}, monitor=True).gpu_open_kill is False


@pytest.mark.parametrize("extra,msg", [
    ('match = { path = { glob = "/dev/nvidia*" } }\nexcept = [ { gpu_allowed = true } ]', "takes no match conditions"),
    ("", "needs exactly except = [ { gpu_allowed = true } ]"),
    ('except = [ { exe = "/x" } ]', "needs exactly except"),
    ('scope = "all"\nexcept = [ { gpu_allowed = true } ]', "episode processes only"),
])
def test_gpu_open_deny_says_what_the_kernel_cannot(tmp_path, extra, msg):
    res = _load(tmp_path, RULE.format(extra=extra))
    assert not res.ok
    assert any(msg in str(e) for e in res.errors), [str(e) for e in res.errors]


def test_default_pack_has_the_option_off(packs):
    r = packs.rule("gpu-open-kill-without-right")
    assert r is not None and r.enabled is False
    assert packs.kernel_plan().gpu_open_kill is False
