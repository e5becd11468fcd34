"""Shared fixtures. Root tests load the real BPF programs into the real
kernel; every fixture cleans up what it creates, also when a test fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from at_testlib import LiveTracer, _has_gpu, run_in_episode, wait_for  # noqa: F401

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    skip_root = pytest.mark.skip(reason="needs root: loads BPF programs and creates cgroups/netns")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip_root)
        if "gpu" in item.keywords and not _has_gpu():
            item.add_marker(pytest.mark.skip(reason="no NVIDIA GPU/driver on this machine (runs on the GPU node)"))


@pytest.fixture(scope="session", autouse=True)
def no_leftover_pins():
    """Session cleanup: no test may leave pinned tracer state (episode_tracer/pins.py)
    behind. Leftovers are removed (their programs detach) and reported as an
    error of the session."""
    yield
    if not IS_ROOT:
        return
    import fcntl

    from at_testlib import LIVE_LOCK
    from episode_tracer.pins import PIN_BASE

    if not PIN_BASE.exists():
        return  # nothing to check: no wait for the live lock
    with open(LIVE_LOCK, "w") as lock:  # not while another session's live test runs
        fcntl.flock(lock, fcntl.LOCK_EX)
        left = sorted(str(p.relative_to(PIN_BASE)) for p in PIN_BASE.rglob("*")) if PIN_BASE.exists() else []
        owners = {int(p.name.rsplit("@", 1)[1]) for p in PIN_BASE.glob("*/links/*@*")} if left else set()
        if any(Path(f"/proc/{pid}").exists() for pid in owners):
            return  # a tracer that is running on this node owns them (not a test's)
        if PIN_BASE.exists():
            shutil.rmtree(PIN_BASE, ignore_errors=True)
    assert not left, f"tests left pinned state in {PIN_BASE} (removed now): {left[:20]}"


@pytest.fixture
def live_tracer():
    made: list[LiveTracer] = []

    def make(**opts) -> LiveTracer:
        t = LiveTracer(**opts)
        made.append(t)
        return t

    yield make
    for t in made:
        try:
            t.stop()
        except Exception:
            pass


@pytest.fixture(scope="module")
def packs_tracer():
    """A tracer enforcing the default packs (episode_tracer/policies/), shared by a module's tests."""
    from at_testlib import LiveTracer
    from episode_tracer.paths import POLICY_DIR

    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], monitor=False).start()
    try:
        yield t
    finally:
        t.stop()


def _unique_episode():
    """A unique episode id; its cgroup is removed after the test."""
    ep = f"t-{uuid.uuid4().hex[:10]}"
    yield ep
    from episode_tracer import cgroups

    try:
        cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep)
    except Exception:
        pass


episode_id = pytest.fixture(_unique_episode, name="episode_id")
second_episode_id = pytest.fixture(_unique_episode, name="second_episode_id")  # a test with two episodes


@pytest.fixture
def netns():
    """An "external" host: a network namespace joined by a veth pair.
    Host side 10.213.<n>.1/24 (+ fd00:213:<n>::1/64), namespace side .2."""
    n = os.getpid() % 200 + 1
    name = f"at-test-{uuid.uuid4().hex[:6]}"
    host_if, ns_if = f"ath{name[-6:]}", f"atn{name[-6:]}"
    v4h, v4n = f"10.213.{n}.1", f"10.213.{n}.2"
    v6h, v6n = f"fd00:213:{n}::1", f"fd00:213:{n}::2"

    def sh(*cmd):
        subprocess.run(list(cmd), check=True, capture_output=True)

    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", name)
        sh("ip", "addr", "add", f"{v4h}/24", "dev", host_if)
        sh("ip", "-6", "addr", "add", f"{v6h}/64", "dev", host_if, "nodad")
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", name, "ip", "addr", "add", f"{v4n}/24", "dev", ns_if)
        sh("ip", "netns", "exec", name, "ip", "-6", "addr", "add", f"{v6n}/64", "dev", ns_if, "nodad")
        sh("ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield {"name": name, "host": v4h, "addr": v4n, "host6": v6h, "addr6": v6n,
               "exec": ["ip", "netns", "exec", name]}
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "pids", name], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


