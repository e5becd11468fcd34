"""episode_tracer/policies/egress.toml live (root): the per-episode allowlist mode, turned
on the documented way (a site file with overrides), refuses every other
destination in the kernel while allowlisted ones get through; by default it
is off and external destinations are only logged."""
from __future__ import annotations

import errno
import os
import sys
import time

import pytest

from at_testlib import LiveTracer, run_in_episode
from nethost import NetHost
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups/netns")
    with NetHost(tmp_path_factory.mktemp("egress")) as h:
        h.start_pool(ports=(8080,))  # any TCP server that logs connections and the address it was reached at
        yield h


def connect_argv(addr, port):
    fam = "socket.AF_INET6" if ":" in addr else "socket.AF_INET"
    code = (f"import socket,sys\ns=socket.socket({fam});s.settimeout(3)\n"
            f"try:\n s.connect(('{addr}',{port}))\nexcept OSError as e:\n sys.exit(e.errno or 99)\n")
    return [PY, "-S", "-c", code]


def reached(ext, addr):
    return [e for e in ext.pool_events() if e.get("event") == "connect" and e.get("local") == addr]


SITE = """
[[override]]
rule = "egress-allowlist"
enabled = true

[[override]]
list = "egress_allowlist"
append = ["{a}/32", "{a6}/128"]
"""


def test_allowlist_mode_denies_in_kernel(ext, tmp_path, episode_id):
    site = tmp_path / "90-site.toml"
    site.write_text(SITE.format(a=ext.addr, a6=ext.addr6))
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False).start()
    try:
        for good, bad in ((ext.addr, ext.addr_b), (ext.addr6, ext.addr6_b)):
            res = run_in_episode(episode_id, connect_argv(good, 8080), timeout=20)
            assert res.exit_code == 0
            res = run_in_episode(episode_id, connect_argv(bad, 8080), timeout=20)
            assert res.exit_code == errno.EPERM
            a = t.wait(type="alert", episode=episode_id, rule="egress-allowlist", addr=bad)
            assert a and a[0]["action"] == "deny" and a[0]["enforced"] is True and a[0]["port"] == 8080
            time.sleep(0.2)
            assert len(reached(ext, good)) >= 1
            assert reached(ext, bad) == [], "a denied connect reached the host"
        # allowlisted destinations raise nothing
        assert [a["rule"] for a in t.find(type="alert", episode=episode_id)
                if a.get("addr") in (ext.addr, ext.addr6)] == []
    finally:
        t.stop()


def test_default_off_logs_external_destination(ext, episode_id):
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], monitor=False).start()
    try:
        n = len(reached(ext, ext.addr_b))
        res = run_in_episode(episode_id, connect_argv(ext.addr_b, 8080), timeout=20)
        assert res.exit_code == 0
        a = t.wait(type="alert", episode=episode_id, rule="external-destination")
        assert a and a[0]["action"] == "log" and a[0]["addr"] == ext.addr_b
        assert t.find(type="alert", episode=episode_id, rule="egress-allowlist") == []
        time.sleep(0.2)
        assert len(reached(ext, ext.addr_b)) == n + 1
    finally:
        t.stop()
