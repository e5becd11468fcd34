"""The shipped training-node profile live (root), extended the documented
way by a site file, against the namespace "internet" of
test_egress_mode_live; the self-test proves the egress paths; monitor mode
reports what egress mode would refuse and refuses nothing."""
from __future__ import annotations

import errno
import sys

import pytest

from at_testlib import LiveTracer, run_in_episode
from test_egress_mode_live import CONNECT, HTTP_PORT, net  # noqa: F401 (the module-scoped fixture)
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable
PROFILE = POLICY_DIR / "profiles" / "training-node.toml"
SITE = """
[[override]]
list = "egress_names"
append = ["allowed.test"]
"""

PROBE = CONNECT + """
import socket, sys, time, errno
def resolve(name):
    try:
        return socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        return None
print([resolve('allowed.test'), resolve('denied.test'), connect('{b}', {port})])
sys.exit(0 if [resolve('allowed.test'), resolve('denied.test'), connect('{b}', {port})] == {want} else 21)
"""


@pytest.fixture
def site(tmp_path):
    f = tmp_path / "90-site.toml"
    f.write_text(SITE)
    return f


def test_training_profile_enforces(net, site, episode_id):
    h = net.h
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, PROFILE, site], monitor=False,
                   dns_upstreams=[h.addr]).start()
    try:
        st = t.ready["selftest"]
        assert st["egress_deny"] == "ok" and st["dns_redirect"] == "ok", st
        want = [h.addr, None, errno.EPERM]
        res = run_in_episode(episode_id, [PY, "-c", PROBE.format(b=h.addr_b, port=HTTP_PORT, want=want)], timeout=60)
        assert res.exit_code == 0, res
        a = t.wait(type="alert", episode=episode_id, rule="training-node", n=2)
        assert {x["event"] for x in a} == {"dns", "egress"} and all(x["enforced"] for x in a)
        assert net.queries("denied.test") == []
        assert net.requests(h.addr_b) == []
    finally:
        t.stop()


def test_monitor_mode_reports_and_allows(net, site, episode_id):
    h = net.h
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, PROFILE, site], monitor=True,
                   dns_upstreams=[h.addr]).start()
    try:
        assert t.ready["selftest"]["egress_deny"].startswith("skipped")
        want = [h.addr, h.addr, 0]
        res = run_in_episode(episode_id, [PY, "-c", PROBE.format(b=h.addr_b, port=HTTP_PORT, want=want)], timeout=60)
        assert res.exit_code == 0, res
        a = t.wait(type="alert", episode=episode_id, rule="training-node", event="egress")
        assert a and a[0]["would"] and not a[0]["enforced"] and a[0]["addr"] == h.addr_b
        d = t.wait(type="dns", episode=episode_id, qname="denied.test")
        assert d and d[0]["verdict"] == "refused" and d[0]["would"] is True
    finally:
        t.stop()
