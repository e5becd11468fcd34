"""Real enforcement against the real kernel inside test episodes: connect
deny (v4/v6, TCP/UDP), the exec gate, gate races and timeouts, episode
actions, monitor mode and policy reload."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from at_testlib import run_in_episode, wait_for

pytestmark = pytest.mark.root
PY = sys.executable

DENY_V4 = """
[[rule]]
name = "deny-netns"
severity = "high"
on = "connect"
action = "deny"
match = { addr = "10.213.0.0/16" }
"""


def policy_dir(tmp_path, body, name="00-test.toml"):
    d = tmp_path / "pol"
    d.mkdir(exist_ok=True)
    (d / name).write_text(body)
    return d


def ep_cgroup(ep):
    from episode_tracer import cgroups

    return cgroups.cgroup2_mount() / "agent-tracer" / ep


def proc_state(pid):
    try:
        s = open(f"/proc/{pid}/stat").read()
        return s[s.rfind(")") + 2]
    except OSError:
        return None


def ep_pids(ep):
    try:
        return [int(x) for x in (ep_cgroup(ep) / "cgroup.procs").read_text().split()]
    except OSError:
        return []


class NsServer:
    """A TCP or UDP server inside the netns; counts what it receives until
    `wait_s` of silence, then prints the count."""

    def __init__(self, netns, addr, port, udp=False, wait_s=1.5):
        fam = "socket.AF_INET6" if ":" in addr else "socket.AF_INET"
        if udp:
            body = (f"s=socket.socket({fam},socket.SOCK_DGRAM);s.bind(('{addr}',{port}));s.settimeout({wait_s})\n"
                    "print('up',flush=True);n=0\n"
                    "while True:\n try: s.recvfrom(100); n+=1\n except socket.timeout: break\n")
        else:
            body = (f"s=socket.socket({fam});s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                    f"s.bind(('{addr}',{port}));s.listen(8);s.settimeout({wait_s})\n"
                    "print('up',flush=True);n=0\n"
                    "while True:\n try: c,_=s.accept(); c.close(); n+=1\n except socket.timeout: break\n")
        self.p = subprocess.Popen(netns["exec"] + [PY, "-S", "-c", "import socket\n" + body + "print(n,flush=True)\n"],
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "up"

    def count(self):
        out = self.p.stdout.readline().strip()
        self.p.wait(timeout=10)
        return int(out)

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def connect_code(addr, port, udp=False):
    fam = "socket.AF_INET6" if ":" in addr else "socket.AF_INET"
    if udp:
        op = f"s=socket.socket({fam},socket.SOCK_DGRAM);s.sendto(b'x',('{addr}',{port}))"
    else:
        op = f"s=socket.socket({fam});s.settimeout(3);s.connect(('{addr}',{port}))"
    return ["/bin/sh", "-c", f"exec {PY} -S -c \"import socket,sys\ntry:\n {op}\nexcept OSError as e:\n sys.exit(e.errno or 99)\n\""]


def test_connect_deny_v4_tcp(live_tracer, episode_id, netns, tmp_path):
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, DENY_V4)], monitor=False).start()
    srv = NsServer(netns, netns["addr"], 7101)
    try:
        res = run_in_episode(episode_id, connect_code(netns["addr"], 7101))
        assert res.exit_code == errno.EPERM
        # the same connect from outside the episode is not denied
        socket.create_connection((netns["addr"], 7101), timeout=3).close()
        assert srv.count() == 1
        a = t.wait(type="alert", rule="deny-netns")
        assert a and a[0]["action"] == "deny" and a[0]["enforced"] is True
        assert a[0]["episode"] == episode_id
    finally:
        srv.close()


def test_connect_deny_v4_rule_covers_ipv4_mapped_v6(live_tracer, episode_id, netns, tmp_path):
    """An AF_INET6 socket reaching a v4 host through ::ffff:a.b.c.d must not
    slip past a v4 deny rule (connect6 and sendmsg6 check the mapped address)."""
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, DENY_V4)], monitor=False).start()
    mapped = "::ffff:" + netns["addr"]
    srv = NsServer(netns, netns["addr"], 7103)
    udp = NsServer(netns, netns["addr"], 7104, udp=True)
    try:
        res = run_in_episode(episode_id, connect_code(mapped, 7103))
        assert res.exit_code == errno.EPERM
        res = run_in_episode(episode_id, connect_code(mapped, 7104, udp=True))
        assert res.exit_code == errno.EPERM
        # outside the episode the mapped address still works: the check is the rule's, not a blanket v6 block
        s = socket.socket(socket.AF_INET6)
        s.settimeout(3)
        s.connect((mapped, 7103))
        s.close()
        assert srv.count() == 1
        assert udp.count() == 0
        a = t.wait(type="alert", rule="deny-netns", n=2)
        assert len(a) >= 2 and all(x["enforced"] is True and x["episode"] == episode_id for x in a)
    finally:
        srv.close()
        if udp is not None:
            udp.close()


def test_connect_deny_v6_tcp_and_udp_sendmsg_v4(live_tracer, episode_id, netns, tmp_path):
    body = DENY_V4 + """
[[rule]]
name = "deny-netns6"
severity = "high"
on = "connect"
action = "deny"
match = { addr = "fd00:213::/32" }
"""
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, body)], monitor=False).start()
    srv6 = NsServer(netns, netns["addr6"], 7102)
    try:
        res = run_in_episode(episode_id, connect_code(netns["addr6"], 7102))
        assert res.exit_code == errno.EPERM
        assert srv6.count() == 0
        a = t.wait(type="alert", rule="deny-netns6")
        assert a and a[0]["enforced"] is True and a[0]["episode"] == episode_id
    finally:
        srv6.close()
    udp = NsServer(netns, netns["addr"], 7103, udp=True)
    try:
        res = run_in_episode(episode_id, connect_code(netns["addr"], 7103, udp=True))
        assert res.exit_code == errno.EPERM
        assert udp.count() == 0
        a = t.wait(type="alert", rule="deny-netns")
        assert a and a[0]["enforced"] is True and a[0]["episode"] == episode_id
    finally:
        udp.close()


GATE_SH = """
[[rule]]
name = "bad-sh"
severity = "high"
on = "exec"
action = "kill"
match = { basename = "sh", cmdline = { regex = "BADMARK" } }
"""


def test_exec_gate_kills_bad_lets_good_run(live_tracer, episode_id, tmp_path):
    # /bin/sh is a symlink (dash here): `basename` must match the name as
    # called (what the kernel gates on), not only the resolved exe
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, GATE_SH)], monitor=False).start()
    bad, good = tmp_path / "MARKERFILE", tmp_path / "GOODFILE"
    res = run_in_episode(episode_id, ["/bin/sh", "-c", f"touch {bad} # BADMARK"])
    assert res.signal == signal.SIGKILL
    a = t.wait(type="alert", rule="bad-sh")
    assert a and a[0]["enforced"] is True and a[0]["episode"] == episode_id
    time.sleep(0.2)
    assert not bad.exists()
    res = run_in_episode(f"{episode_id}g", ["/bin/sh", "-c", f"touch {good}"])
    try:
        assert res.exit_code == 0 and good.exists()
    finally:
        from episode_tracer import cgroups
        cgroups.remove(ep_cgroup(f"{episode_id}g"))


GATE_SLEEP = """
[[rule]]
name = "gate-sleep"
severity = "high"
on = "exec"
action = "kill"
match = { basename = "sleep", cmdline = { regex = "NEVERMATCHES" } }
"""


def _gated_sleep(t, episode_id):
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("res", run_in_episode(episode_id, ["/bin/sleep", "30"])),
                          daemon=True)
    th.start()
    pid = wait_for(lambda: (lambda p: p[0] if p and proc_state(p[0]) == "T" else None)(ep_pids(episode_id)), 5)
    assert pid, "the gated exec must be stopped"
    assert pid in t.rt.probes.gated()
    return th, box, pid


def _kill_episode(t, episode_id, pid, th):
    try:
        t.rt.probes.release_gated(pid)
    except Exception:
        pass
    try:
        (ep_cgroup(episode_id) / "cgroup.kill").write_text("1")
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    th.join(timeout=10)


def test_sigcont_race_is_restopped(live_tracer, episode_id, tmp_path):
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, GATE_SLEEP)], monitor=False,
                    gate_timeout=60).start(loop=False)
    th, box, pid = _gated_sleep(t, episode_id)
    try:
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.3)
        assert proc_state(pid) == "T", "a SIGCONT from outside must not release a gated exec"
        t.rt.drain()
        assert t.rt.pipeline.engine.gate_races >= 1 or t.find(type="gate_race")
    finally:
        _kill_episode(t, episode_id, pid, th)


def test_gate_timeout_kills(live_tracer, episode_id, tmp_path):
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, GATE_SLEEP)], monitor=False,
                    gate_timeout=0.3, gate_default="kill", gate_proc_grace=0).start(loop=False)
    # gate_proc_grace=0: no judgement from /proc (tests/test_failclosed_live.py), only the timeout decides
    th, box, pid = _gated_sleep(t, episode_id)
    try:
        eng = t.rt.pipeline.engine
        assert eng.poll_gates() == []
        time.sleep(0.4)
        out = eng.poll_gates()
        assert [r["type"] for r in out] == ["gate_timeout"]
        assert out[0]["pid"] == pid and out[0]["verdict"] == "killed"
        th.join(timeout=10)
        assert box["res"].signal == signal.SIGKILL
    finally:
        _kill_episode(t, episode_id, pid, th)


def _ep_rule(action, mark):
    return f"""
[[rule]]
name = "ep-{action}"
severity = "critical"
on = "exec"
action = "{action}"
match = {{ basename = "true", cmdline = {{ regex = "{mark}" }} }}
"""


def test_kill_episode_kills_every_process(live_tracer, episode_id, tmp_path):
    vd = tmp_path / "verdicts"
    vd.mkdir()
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, _ep_rule("kill-episode", "KILLEP"))],
                    monitor=False, verdict_dir=vd).start()
    res = run_in_episode(episode_id, ["/bin/sh", "-c",
                                      "sleep 30 & sleep 30 & sleep 30 & /bin/true KILLEP; wait"],
                         verdict_dir=vd, keep_stragglers=True, timeout=20)
    assert wait_for(lambda: ep_pids(episode_id) == [], 5) or ep_pids(episode_id) == []
    assert res.killed_by_policy is True and res.cli_exit_code == 86
    a = t.wait(type="alert", rule="ep-kill-episode")
    assert a and a[0]["enforced"] is True


def test_freeze_episode_freezes(live_tracer, episode_id, tmp_path):
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, _ep_rule("freeze-episode", "FREEZEEP"))],
                    monitor=False).start()
    th = threading.Thread(target=run_in_episode, args=(episode_id, ["/bin/sh", "-c",
                          "sleep 30 & sleep 30 & sleep 30 & /bin/true FREEZEEP; sleep 30"]),
                          kwargs={"timeout": 40}, daemon=True)
    th.start()
    cg = ep_cgroup(episode_id)
    try:
        assert wait_for(lambda: "frozen 1" in (cg / "cgroup.events").read_text() if cg.exists() else False, 5)
        assert len(ep_pids(episode_id)) >= 4
        a = t.wait(type="alert", rule="ep-freeze-episode")
        assert a and a[0]["enforced"] is True
    finally:
        try:
            (cg / "cgroup.kill").write_text("1")
            (cg / "cgroup.freeze").write_text("0")
        except OSError:
            pass
        th.join(timeout=10)


def test_monitor_mode_does_not_deny(live_tracer, episode_id, netns, tmp_path):
    t = live_tracer(policy=True, policy_dirs=[policy_dir(tmp_path, DENY_V4)], monitor=True).start()
    srv = NsServer(netns, netns["addr"], 7104)
    udp = None
    try:
        res = run_in_episode(episode_id, connect_code(netns["addr"], 7104))
        assert res.exit_code == 0
        assert srv.count() == 1
        a = t.wait(type="alert", rule="deny-netns")
        assert a and a[0]["enforced"] is False and a[0]["would"] == "deny"
        assert len(a) == 1   # the connect's own record said it; the kernel adds nothing for connects
        # an unconnected UDP sendto has no record of its own: the kernel's
        # sendmsg program says what it would have refused, and lets it through
        udp = NsServer(netns, netns["addr"], 7106, udp=True)
        res = run_in_episode(episode_id, connect_code(netns["addr"], 7106, udp=True))
        assert res.exit_code == 0
        assert udp.count() == 1
        a = t.wait(type="alert", rule="deny-netns", n=2)
        assert len(a) == 2, a
        u = a[1]
        assert u["enforced"] is False and u["would"] == "deny" and u["episode"] == episode_id
        assert u["call"] == "sendmsg" and u["port"] == 7106 and u["addr"] == netns["addr"]
    finally:
        srv.close()
        if udp is not None:
            udp.close()


def test_reload_broken_keeps_old_policy(live_tracer, episode_id, netns, tmp_path):
    d = policy_dir(tmp_path, DENY_V4)
    t = live_tracer(policy=True, policy_dirs=[d], monitor=False).start(loop=False)
    eng = t.rt.pipeline.engine
    (d / "50-broken.toml").write_text("[[rule]\nname = \n")
    out = eng.reload()
    assert [r["type"] for r in out] == ["policy_error"]
    assert out[0]["errors"]
    # no listener on this port: EPERM = still denied, ECONNREFUSED = allowed
    res = run_in_episode(episode_id, connect_code(netns["addr"], 7105))
    assert res.exit_code == errno.EPERM
    (d / "50-broken.toml").unlink()
    (d / "00-test.toml").write_text(DENY_V4.replace("10.213.0.0/16", "10.99.0.0/16"))
    out = eng.reload()
    assert [r["type"] for r in out] == ["policy_reload"]
    res = run_in_episode(f"{episode_id}b", connect_code(netns["addr"], 7105))
    try:
        assert res.exit_code == errno.ECONNREFUSED
    finally:
        from episode_tracer import cgroups
        cgroups.remove(ep_cgroup(f"{episode_id}b"))
