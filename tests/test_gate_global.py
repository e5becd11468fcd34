"""Global exec gate (issue 3): an enforcing exec rule with scope = "all" and
no exact name to gate by stops every exec on the node for a user-space
verdict, also of processes outside every episode, but never the tracer's own
process tree (it waits on its children synchronously).

Safety: the only kill rule here matches a random token that only the
throwaway process of this test carries; gate timeouts default to allow."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import pytest

from episode_tracer.engine import build_kernel_maps
from episode_tracer.events import Config
from episode_tracer.policy import load_policy

pytestmark = pytest.mark.root
PY = sys.executable

# spawns argv lines from stdin, prints "pid returncode"; started before the
# tracer, so neither it nor its children are in the tracer's process tree
LAUNCHER = (
    "import subprocess,sys,json\n"
    "print('up',flush=True)\n"
    "for line in sys.stdin:\n"
    " p=subprocess.Popen(json.loads(line))\n"
    " print(p.pid,p.wait(),flush=True)\n"
)


def rule(token: str) -> str:
    return f"""
[[rule]]
name = "global-token"
description = "test: a process anywhere on the node whose cmdline carries the test token"
severity = "high"
on = "exec"
action = "kill"
scope = "all"
match = {{ cmdline = {{ glob = "*{token}*" }} }}
"""


def test_plan_compiles_global_gate(tmp_path):
    (tmp_path / "r.toml").write_text(rule("abc"))
    res = load_policy([tmp_path])
    assert not res.errors, [str(e) for e in res.errors]
    km = build_kernel_maps(res.policy.kernel_plan(), {})
    assert km.gate_all_global and km.gate_all


def test_global_gate_kills_outside_episodes(live_tracer, tmp_path):
    token = f"ATGLOBAL{uuid.uuid4().hex[:12]}"
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "r.toml").write_text(rule(token))
    launcher = subprocess.Popen([PY, "-S", "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "up"
        t = live_tracer(policy=True, policy_dirs=[pol], monitor=False, gate_timeout=5.0,
                        gate_default="allow").start()
        # the self-test canaries (the tracer's own children) are not gated
        assert t.ready["selftest"]["connect_deny"] == "ok", t.ready["selftest"]
        assert t.ready["selftest"]["exec_kill"] == "ok" and t.ready["selftest"]["exec_gate"] == "ok"
        probes = t.rt.probes
        assert probes.get_cfg(Config.GATE_ALL_GLOBAL) == 1 << probes.active_gen()

        def launch(argv):
            launcher.stdin.write(json.dumps(argv) + "\n")
            launcher.stdin.flush()
            pid, rc = launcher.stdout.readline().split()
            return int(pid), int(rc)

        bad = tmp_path / "BADMARK"
        pid, rc = launch(["/bin/sh", "-c", f"echo ran > {bad}", token])
        assert rc == -signal.SIGKILL, "the token process must be killed"
        assert not bad.exists(), "killed before the new image ran a single instruction"
        a = t.wait(type="alert", rule="global-token")
        assert a and a[0]["enforced"] is True and a[0]["episode"] is None and a[0]["pid"] == pid
        assert token in a[0]["argv"]  # argv read from /proc of the stopped process
        ex = t.find(type="exec", pid=pid)
        assert ex and ex[0]["gated"] is True and ex[0]["episode"] is None

        # an unrelated process outside every episode is gated, judged, continued
        good = tmp_path / "GOOD"
        pid2, rc2 = launch(["/bin/sh", "-c", f"echo ran > {good}"])
        assert rc2 == 0 and good.read_text() == "ran\n"
        ex2 = t.wait(type="exec", pid=pid2)
        assert ex2 and ex2[0]["gated"] is True
        assert not t.find(type="alert", pid=pid2)

        # the tracer's own children are never gated outside episodes
        own = subprocess.Popen(["/bin/sh", "-c", "exit 7"])
        assert own.wait(timeout=10) == 7
        t.rt.drain()
        assert not t.find(type="exec", pid=own.pid)
        assert not t.find(type="gate_timeout")
    finally:
        launcher.stdin.close()
        launcher.wait(timeout=10)
