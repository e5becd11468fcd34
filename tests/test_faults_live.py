"""Pinned state across a tracer crash (issue 17, docs/faults.md), live.

A tracer (`agent-tracer run`, a real process) enforcing the default packs
is killed with SIGKILL while an episode runs. During the outage the kernel
side keeps enforcing from its pins: a denied connect gets EPERM, an exec
that needs a user-space verdict is held (stopped). The next start adopts
the pins: exactly one set of programs is attached, the held exec is judged
(killed: a miner argv) and never ran. A clean stop removes the pins.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from at_testlib import LIVE_LOCK, wait_for
from episode_tracer import cgroups
from episode_tracer.paths import POLICY_DIR
from episode_tracer.pins import PIN_BASE

pytestmark = pytest.mark.root

PY = sys.executable
AGENT = str(Path(PY).with_name("agent-tracer"))
PORT = 8265  # node-control-port (policies/services.toml): denied in the kernel for episodes

EPISODE = r"""
import errno, os, socket, subprocess, sys, time
d = sys.argv[1]
while not os.path.exists(d + "/go"):
    time.sleep(0.05)
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", int(sys.argv[2])))
    r = "ok"
except OSError as e:
    r = errno.errorcode.get(e.errno, str(e.errno))
open(d + "/conn", "w").write(r)
p = subprocess.Popen([d + "/worker", "x", "--donate-level", "1"])
open(d + "/worker.pid", "w").write(str(p.pid))
open(d + "/rc", "w").write(str(p.wait()))
"""


def _programs() -> dict[str, int]:
    """at_* program name -> how many are attached in the cgroup2 tree."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "tree", str(cgroups.cgroup2_mount())],
                         capture_output=True, text=True, check=True).stdout
    n: dict[str, int] = {}
    for cg in json.loads(out or "[]"):
        for p in cg.get("programs", []):
            if p.get("name", "").startswith("at_"):
                n[p["name"]] = n.get(p["name"], 0) + 1
    return n


def _records(log: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _start(log: Path, keep: bool = False) -> subprocess.Popen:
    conf = log.with_suffix(".toml")
    conf.write_text("")  # not the node's /etc/agent-tracer: only these flags
    argv = [AGENT, "run", "--no-dashboard", "--config", str(conf), "--log", str(log),
            "--control-socket", "", "--verdict-dir", "", "--site-policy-dir", "", "--policy-dir", str(POLICY_DIR),
            "--enforce", "--gpu-interval", "0"]
    if keep:
        argv.append("--keep-enforcing")
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(str(log) + ".err", "w"))
    ready = wait_for(lambda: next((r for r in _records(log) if r["type"] == "ready"), None) or p.poll() is not None,
                     120, 0.2)
    assert ready and p.poll() is None, Path(str(log) + ".err").read_text()[-2000:]
    return p


@pytest.fixture
def lock():
    with open(LIVE_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture
def listener():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", PORT))
    except OSError as e:
        pytest.skip(f"loopback port {PORT} is in use here: {e}")
    s.listen(16)
    yield s
    s.close()


def test_crash_restart_keeps_enforcing_and_adopts(lock, listener, tmp_path):
    if PIN_BASE.exists() and any(PIN_BASE.iterdir()):
        pytest.skip(f"{PIN_BASE} holds another tracer's pins")
    ep = f"t-{uuid.uuid4().hex[:10]}"
    cg = cgroups.cgroup2_mount() / "agent-tracer" / ep
    (tmp_path / "worker").write_text(f"#!/bin/sh\ntouch {tmp_path}/mined\n")
    (tmp_path / "worker").chmod(0o755)
    (tmp_path / "ep.py").write_text(EPISODE)
    tracers: list[subprocess.Popen] = []
    child = None
    try:
        log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        a = _start(log_a)
        tracers.append(a)
        cg.mkdir(parents=True)
        child = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {cg}/cgroup.procs; exec {PY} -S {tmp_path}/ep.py "
                                  f"{tmp_path} {PORT}"])
        assert wait_for(lambda: any(r["type"] == "episode_start" and r["episode"] == ep for r in _records(log_a)),
                        30, 0.1), "tracer A never saw the episode"
        one_set = _programs()
        assert one_set and all(n == 1 for n in one_set.values()), one_set
        assert "at_connect4" in one_set

        # --- crash: the kernel side stays, pinned
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        left = _programs()
        assert left.get("at_connect4") == 1, left  # the sock_addr links live on in their pins
        assert "at_wire_egress" not in left  # the wire links die with the process (docs/faults.md)
        assert any(PIN_BASE.glob("*/maps/gated"))
        from episode_tracer.doctor import pins_check

        c = pins_check()  # doctor says the kernel enforces alone
        assert c.status == "warn" and "no tracer running" in c.detail, c

        # --- during the outage: the denied connect is refused, the exec held
        (tmp_path / "go").touch()
        assert wait_for(lambda: (tmp_path / "conn").exists(), 30), "no connect result"
        assert (tmp_path / "conn").read_text() == "EPERM"
        wpid = wait_for(lambda: int((tmp_path / "worker.pid").read_text()) if (tmp_path / "worker.pid").exists()
                        and (tmp_path / "worker.pid").read_text() else None, 30)
        assert wpid

        def state(pid):
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return None

        assert wait_for(lambda: state(wpid) == "T", 30), state(wpid)  # held by the gate's stop
        assert not (tmp_path / "mined").exists()

        # --- restart: adopted, one set, the held exec judged
        b = _start(log_b)
        tracers.append(b)
        ready = next(r for r in _records(log_b) if r["type"] == "ready")
        assert ready["pinned"]["adopted"] is True, ready["pinned"]
        after = _programs()
        assert after == {**one_set}, (one_set, after)
        assert wait_for(lambda: (tmp_path / "rc").exists(), 60), "the held exec was never judged"
        assert not (tmp_path / "mined").exists()
        assert wait_for(lambda: [r for r in _records(log_b) if r["type"] == "alert" and r.get("episode") == ep
                                 and r.get("rule") == "miner-by-argv" and r.get("enforced")], 30), \
            [r for r in _records(log_b) if r["type"] == "alert"]

        # --- a clean stop removes everything
        b.send_signal(signal.SIGTERM)
        assert b.wait(60) == 0
        assert not _programs()
        assert not PIN_BASE.exists() or not any(PIN_BASE.iterdir())
    finally:
        for p in tracers:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if child is not None and child.poll() is None:
            child.kill()
        try:
            cgroups.remove(cg)
        except Exception:
            pass
        if PIN_BASE.exists():
            subprocess.run(["rm", "-rf", str(PIN_BASE)], check=False)
        wait_for(lambda: not _programs(), 10)


RUNNER = r"""
import sys
from episode_tracer.api import run_episode
run_episode(sys.argv[1], ["/bin/sh", "-c", "echo $$ > " + sys.argv[2] + "; exec sleep 600"], control_socket=None,
            verdict_dir=__import__("pathlib").Path(sys.argv[3]))
"""


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st != "Z"


@pytest.mark.parametrize("policy", ["kill", "keep"])
def test_runner_death_ends_its_episode(live_tracer, tmp_path, episode_id, policy):
    """SIGKILL of the runner: with orphan_episode = kill the episode ends
    (reason runner-died) within the grace and nothing of it is left; with
    keep it runs on. A cgroup episode without a runner is never touched."""
    from episode_tracer.runners import RUNNER_DIR

    t = live_tracer(orphan_episode=policy, orphan_grace=1.0).start()
    plain = cgroups.cgroup2_mount() / "agent-tracer" / f"{episode_id}-plain"
    plain.mkdir()
    bystander = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {plain}/cgroup.procs; exec sleep 600"])
    (tmp_path / "runner.py").write_text(RUNNER)
    runner = subprocess.Popen([PY, str(tmp_path / "runner.py"), episode_id, str(tmp_path / "cmd.pid"), str(tmp_path)],
                              cwd=str(Path(__file__).resolve().parents[1]))
    cg = cgroups.cgroup2_mount() / "agent-tracer" / episode_id
    try:
        assert wait_for(lambda: (tmp_path / "cmd.pid").exists() and (tmp_path / "cmd.pid").read_text().strip(), 30)
        cmd_pid = int((tmp_path / "cmd.pid").read_text())
        assert t.wait(type="episode_start", episode=episode_id, timeout=20)
        assert (RUNNER_DIR / episode_id).exists()
        runner.kill()
        runner.wait(10)
        if policy == "kill":
            end = t.wait(type="episode_end", episode=episode_id, timeout=30)
            assert end and end[0]["reason"] == "runner-died", end
            assert t.find(type="episode_command", episode=episode_id, by="runner-died")
            assert wait_for(lambda: not _alive(cmd_pid), 10)
            assert wait_for(lambda: not cg.exists(), 10)
            assert not (RUNNER_DIR / episode_id).exists()
        else:
            cmdrec = t.wait(type="episode_command", episode=episode_id, timeout=30)
            assert cmdrec and cmdrec[0]["cmd"] == "keep" and cmdrec[0]["by"] == "runner-died", cmdrec
            assert _alive(cmd_pid) and cg.exists()
            assert not t.find(type="episode_end", episode=episode_id)
        # the episode without a runner runs on
        assert _alive(bystander.pid)
        assert not t.find(type="episode_command", episode=f"{episode_id}-plain")
    finally:
        if runner.poll() is None:
            runner.kill()
        bystander.kill()
        bystander.wait(10)
        for c in (cg, plain):
            try:
                cgroups.remove(c)
            except Exception:
                pass
        (RUNNER_DIR / episode_id).unlink(missing_ok=True)
