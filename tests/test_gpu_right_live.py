"""Live (root): the GPU right in the kernel, with the option of gpu.toml that
kills an episode process without it at the GPU device open (open, openat,
openat2), driven with a stand-in device path the test creates (this machine
has no /dev/nvidia*): the registered process and the workers it forks keep
the right, a python it execs does not (unless the registration names it),
an unregistered episode dies at the open, a process outside episodes opens
freely."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from at_testlib import run_in_episode
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable

OPEN = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
path, how = sys.argv[1], sys.argv[2]
if how == "openat":
    fd = os.open(path, os.O_RDWR)
elif how == "open":                       # open(2), syscall 2 on x86-64
    fd = libc.syscall(2, path.encode(), os.O_RDWR, 0)
else:                                     # openat2(2), syscall 437: struct open_how {flags, mode, resolve}
    how_s = (ctypes.c_uint64 * 3)(os.O_RDWR, 0, 0)
    fd = libc.syscall(437, -100, path.encode(), ctypes.byref(how_s), 24)
print("opened", fd, flush=True)
"""

TRAINER = """
import os, subprocess, sys
dev, py = sys.argv[1], sys.argv[2]
fd = os.open(dev, os.O_RDWR)               # the registered process
pid = os.fork()
if pid == 0:                                # a fork worker: no exec
    os.open(dev, os.O_RDWR)
    os._exit(0)
_, st = os.waitpid(pid, 0)
print("fork", os.waitstatus_to_exitcode(st), flush=True)
# a python started by exec (same program, not named unless --gpu-exe)
r = subprocess.run([py, "-S", "-c", "import os,sys; os.open(sys.argv[1], os.O_RDWR)", dev])
print("exec", r.returncode, flush=True)
"""


@pytest.fixture(scope="module")
def standin():
    d = Path("/tmp") / f"at-gpur-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    (d / "nvidia0").write_text("")
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


@pytest.fixture(scope="module")
def tracer(standin, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups")
    from at_testlib import LiveTracer

    d = tmp_path_factory.mktemp("gpur") / "pol"
    d.mkdir()
    for f in POLICY_DIR.glob("*.toml"):
        (d / f.name).write_text(f.read_text())
    (d / "miner_sha256.txt").write_text((POLICY_DIR / "miner_sha256.txt").read_text())
    (d / "90-site.toml").write_text(
        '[[override]]\nrule = "gpu-open-kill-without-right"\nenabled = true\n'
        f'[[override]]\nlist = "gpu_device_paths"\nappend = ["{standin}/nvidia[0-9]*"]\n')
    t = LiveTracer(gpu_prefixes=(f"{standin}/nvidia",), gpu_interval=0, policy=True, policy_dirs=[d]).start()
    try:
        yield t
    finally:
        t.stop()


@pytest.mark.parametrize("how", ["openat", "open", "openat2"])
def test_unregistered_episode_process_dies_at_the_open(tracer, standin, episode_id, how):
    res = run_in_episode(episode_id, [PY, "-S", "-c", OPEN, str(standin / "nvidia0"), how], timeout=30)
    assert res.signal == signal.SIGKILL, res
    o = tracer.wait(type="gpu_open", episode=episode_id)
    assert o and o[0]["killed_in_kernel"] is True and o[0]["call"] == how and o[0]["gpu_right"] is False
    a = tracer.expect_alert(episode_id, "gpu-open-kill-without-right")
    assert a["enforced"] is True and a["action"] == "deny"
    assert tracer.rt.probes.counters()["gpu_open_killed"] >= 1


def test_outside_episodes_the_open_is_untouched(tracer, standin):
    out = subprocess.run([PY, "-S", "-c", OPEN, str(standin / "nvidia0"), "openat"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0 and "opened" in out.stdout


def test_registered_process_and_its_fork_worker_keep_the_right_an_exec_does_not(tracer, standin, episode_id):
    res = run_in_episode(episode_id, [PY, "-S", "-c", TRAINER, str(standin / "nvidia0"), PY], gpu=True, timeout=60)
    assert res.exit_code == 0, res
    opens = tracer.wait(type="gpu_open", episode=episode_id, n=3)
    by_kill = sorted((o["killed_in_kernel"], o["gpu_right"]) for o in opens)
    assert by_kill == [(False, True), (False, True), (True, False)], opens
    alerts = tracer.find(type="alert", episode=episode_id, rule="gpu-open-kill-without-right")
    killed = [o for o in opens if o["killed_in_kernel"]]
    assert [a["pid"] for a in alerts] == [killed[0]["pid"]]


def test_a_named_executable_keeps_the_right(tracer, standin, episode_id):
    exe = os.path.realpath(PY)
    res = run_in_episode(episode_id, [PY, "-S", "-c", TRAINER, str(standin / "nvidia0"), PY], gpu=True,
                         gpu_exes=[exe], timeout=60)
    assert res.exit_code == 0, res
    opens = tracer.wait(type="gpu_open", episode=episode_id, n=3)
    assert len(opens) == 3 and not any(o["killed_in_kernel"] for o in opens), opens
    assert tracer.find(type="alert", episode=episode_id, rule="gpu-open-kill-without-right") == []
