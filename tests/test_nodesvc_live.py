"""Node services that run things for the agent (services.toml), live (root):
real unix listeners standing in for a container engine's API socket at a
path the site list is pointed at, a real tmux server outside the episode, a
Ray-like job API port on loopback, real systemd-run / busctl clients. Each
attack runs inside a test episode under a live tracer enforcing the default
packs plus a test site file; the test asserts the effect did not happen (the
listener got no connection), the alert names the rule, the same commands
outside episodes are untouched, and a tmux started inside the episode works."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from at_testlib import LiveTracer, have, run_in_episode, wait_for
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable

CLIENT = r"""
import errno, os, socket, sys
out, fam = sys.argv[1], sys.argv[2]
res = []
for target in sys.argv[3:]:
    if fam == "unix":
        s = socket.socket(socket.AF_UNIX)
        addr = ("\0" + target[1:]) if target.startswith("@") else target
    else:
        s = socket.socket()
        host, port = target.rsplit(":", 1)
        addr = (host, int(port))
    s.settimeout(5)
    try:
        s.connect(addr)
    except OSError as e:
        res.append(errno.errorcode.get(e.errno, str(e.errno)))
        s.close()
        continue
    res.append("ok")
    try:
        s.send(b"GET /containers/json HTTP/1.0\r\n\r\n")  # the listener may have closed already
    except OSError:
        pass
    s.close()
with open(out, "w") as f:
    f.write(" ".join(res))
"""


class Listener:
    """A real listener (unix path, abstract name or TCP port) that counts
    the connections it accepts."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.accepted = 0
        self._stop = False
        sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @classmethod
    def unix(cls, path: str) -> "Listener":
        s = socket.socket(socket.AF_UNIX)
        s.bind(("\0" + path[1:]) if path.startswith("@") else path)
        s.listen(16)
        return cls(s)

    @classmethod
    def tcp(cls, port: int) -> "Listener":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(16)
        return cls(s)

    def _run(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def sockdir():
    d = Path(f"/tmp/at-nodesvc-{uuid.uuid4().hex[:8]}")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tracer(sockdir, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups")
    site = tmp_path_factory.mktemp("site") / "90-site.toml"
    # the stand-in engine socket: the site list is pointed at it (the
    # machine's real sockets are never touched)
    site.write_text(
        "[[override]]\n"
        'list = "container_engine_sockets"\n'
        f'append = ["{sockdir}/engine.sock", "{sockdir}/engines/*", "@{sockdir.name}-abstract"]\n')
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False).start()
    try:
        yield t
    finally:
        t.stop()


def _client(tmp: Path, fam: str, *targets: str, episode: str | None = None, cwd: str | None = None) -> list[str]:
    script = tmp / "client.py"
    script.write_text(CLIENT)
    out = tmp / f"out-{uuid.uuid4().hex[:6]}"
    argv = [PY, "-S", str(script), str(out), fam, *targets]
    if episode:
        res = run_in_episode(episode, argv, timeout=30, cwd=cwd)
        assert res.exit_code == 0 and not res.signal, res
    else:
        subprocess.run(argv, check=True, timeout=30, cwd=cwd)
    return out.read_text().split()


def test_ready_reports_the_unix_hook(tracer):
    assert tracer.ready["hooks"]["unix_connect"] == "ok"
    assert "cgroup:at_connect_unix" in tracer.ready["programs"]
    assert tracer.ready["selftest"]["unix_connect_deny"] == "ok"


def test_engine_socket_refused_in_episode_not_outside(tracer, sockdir, tmp_path, episode_id):
    (sockdir / "engines").mkdir(exist_ok=True)
    paths = [str(sockdir / "engine.sock"), str(sockdir / "engines" / "podman.sock"), f"@{sockdir.name}-abstract"]
    lst = [Listener.unix(p) for p in paths]
    try:
        got = _client(tmp_path, "unix", *paths, episode=episode_id)
        assert got == ["ECONNREFUSED"] * 3, got
        assert [x.accepted for x in lst] == [0, 0, 0]
        alerts = tracer.wait(type="alert", episode=episode_id, rule="container-engine-socket", n=3, timeout=10)
        assert sorted(a["path"] for a in alerts) == sorted(paths)
        assert all(a["action"] == "deny" and a["enforced"] for a in alerts), alerts
        # the same connects outside every episode are untouched
        assert _client(tmp_path, "unix", *paths) == ["ok"] * 3
        assert wait_for(lambda: [x.accepted for x in lst] == [1, 1, 1], 5), [x.accepted for x in lst]
    finally:
        for x in lst:
            x.close()
        for p in paths[:2]:
            os.unlink(p)


def test_other_spellings_of_a_denied_socket_refused(tracer, sockdir, tmp_path, episode_id):
    """The same socket by a relative path, with '//', '/./' or '..', through
    a symlink the episode made, and through a hard link: the text does not
    name the socket, so the connect is held (unix_gate) and judged on the
    socket its path resolves to, in the connecting thread's cwd."""
    path = sockdir / "engine.sock"
    lst = Listener.unix(str(path))
    link, hard = tmp_path / "innocent.sock", tmp_path / "hard.sock"
    try:
        link.symlink_to(path)
        os.link(path, hard)
        spellings = ["engine.sock", f"{sockdir}//engine.sock", f"{sockdir}/./engine.sock",
                     f"{sockdir}/../{sockdir.name}/engine.sock", str(link), str(hard)]
        got = _client(tmp_path, "unix", *spellings, episode=episode_id, cwd=str(sockdir))
        assert got == ["ECONNREFUSED"] * len(spellings), got
        assert lst.accepted == 0
        alerts = tracer.wait(type="alert", episode=episode_id, rule="container-engine-socket",
                             n=len(spellings), timeout=10)
        assert sorted(a["path"] for a in alerts) == sorted(spellings), alerts
        gates = tracer.find(type="unix_gate", episode=episode_id)
        assert {g["path"]: g["verdict"] for g in gates} == {p: "denied" for p in spellings}, gates
        # a hard link is its own name for the socket: refused by its inode
        assert {g["path"]: g["resolved"] for g in gates} == {**{p: str(path) for p in spellings}, str(hard): str(hard)}
        assert _client(tmp_path, "unix", *spellings, cwd=str(sockdir)) == ["ok"] * len(spellings)
    finally:
        lst.close()
        path.unlink()
        hard.unlink(missing_ok=True)


def test_own_sockets_by_any_spelling_work(tracer, tmp_path, episode_id):
    """A socket the episode made in its own directory, reached by a
    relative path or a symlink: held, judged, allowed (no alert)."""
    lst = Listener.unix(str(tmp_path / "app.sock"))
    (tmp_path / "via.sock").symlink_to(tmp_path / "app.sock")
    try:
        got = _client(tmp_path, "unix", "app.sock", "./via.sock", str(tmp_path / "app.sock"),
                      episode=episode_id, cwd=str(tmp_path))
        assert got == ["ok"] * 3, got
        assert wait_for(lambda: lst.accepted == 3, 5), lst.accepted
        gates = tracer.wait(type="unix_gate", episode=episode_id, n=3, timeout=10)
        assert [g["verdict"] for g in gates] == ["allowed"] * 3, gates
        assert not tracer.find(type="alert", episode=episode_id)
    finally:
        lst.close()


def test_default_list_matches_real_default_paths(tracer):
    from episode_tracer.nodesvc import unix_deny_entries

    plan = tracer.rt.pipeline.engine.policy.kernel_plan()
    entries = unix_deny_entries(plan.unix_deny)

    def denied(path: str) -> bool:
        b = path.encode()
        return any((b == p) if not pre else b.startswith(p) for (p, pre) in entries)

    for real in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                 "/run/crio/crio.sock", "/run/podman/podman.sock", "/run/systemd/private",
                 "/run/dbus/system_bus_socket", "/run/user/1000/bus", "/run/user/1000/podman/podman.sock",
                 "/tmp/tmux-0/default", "/run/screen/S-root/1.pts-0.h", "/run/munge/munge.socket.2"):
        assert denied(real), real
    for benign in ("/run/systemd/journal/socket", "/run/systemd/userdb/io.systemd.Multiplexer",
                   "/tmp/.X11-unix/X0", "/tmp/app.sock"):
        assert not denied(benign), benign


@pytest.mark.skipif(not have("tmux"), reason="needs tmux")
def test_tmux_outside_refused_inside_works(tracer, tmp_path, episode_id):
    name = f"at-ns-{uuid.uuid4().hex[:6]}"
    mine = f"at-ep-{uuid.uuid4().hex[:6]}"
    subprocess.run(["tmux", "-L", name, "new-session", "-d", "-s", "outside", "sleep 300"], check=True, timeout=20)
    try:
        out = tmp_path / "ls.txt"
        script = tmp_path / "t.sh"
        script.write_text(f"tmux -L {name} list-sessions > {out} 2>&1; echo rc=$? >> {out}\n"
                          f"tmux -L {name} send-keys -t outside 'touch {tmp_path}/pwned' Enter >> {out} 2>&1\n")
        res = run_in_episode(episode_id, ["/bin/sh", str(script)], timeout=30)
        assert res.exit_code is not None, res
        text = out.read_text()
        assert "outside" not in text and "rc=1" in text, text
        assert not (tmp_path / "pwned").exists()
        a = tracer.expect_alert(episode_id, "terminal-multiplexer-socket")
        assert a["path"].endswith(f"/{name}") and a["enforced"], a
        # outside the episode the server is reachable
        ls = subprocess.run(["tmux", "-L", name, "list-sessions"], capture_output=True, text=True, timeout=20)
        assert ls.returncode == 0 and "outside" in ls.stdout, ls
        # a tmux server the episode starts itself works (its socket is the episode's)
        out2 = tmp_path / "mine.txt"
        script2 = tmp_path / "m.sh"
        script2.write_text(f"tmux -L {mine} new-session -d -s inside 'sleep 30' && "
                           f"tmux -L {mine} list-sessions > {out2} 2>&1; rc=$?; "
                           f"tmux -L {mine} kill-server; exit $rc\n")
        res2 = run_in_episode(episode_id + "-2", ["/bin/sh", str(script2)], timeout=30)
        assert res2.exit_code == 0, (res2, out2.read_text() if out2.exists() else None)
        assert "inside" in out2.read_text()
        assert not tracer.find(type="alert", episode=episode_id + "-2", rule="terminal-multiplexer-socket")
    finally:
        subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True, timeout=20)
        from episode_tracer import cgroups

        cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / (episode_id + "-2"))


def test_job_api_port_refused(tracer, tmp_path, episode_id):
    try:
        lst = Listener.tcp(8265)
    except OSError as e:
        pytest.skip(f"loopback port 8265 (Ray's job API) is in use here: {e}")
    try:
        got = _client(tmp_path, "inet", "127.0.0.1:8265", episode=episode_id)
        assert got == ["EPERM"], got
        assert lst.accepted == 0
        a = tracer.expect_alert(episode_id, "node-control-port")
        assert a["port"] == 8265 and a["enforced"], a
        assert _client(tmp_path, "inet", "127.0.0.1:8265") == ["ok"]
        assert wait_for(lambda: lst.accepted == 1, 5)
    finally:
        lst.close()


@pytest.mark.skipif(not have("systemd-run") or not have("busctl"), reason="needs systemd-run and busctl")
def test_handoff_clients_killed(tracer, tmp_path, episode_id):
    marker = tmp_path / "ran"
    res = run_in_episode(episode_id, ["systemd-run", "--unit", f"at-{episode_id}", "/bin/touch", str(marker)],
                         timeout=30)
    assert res.signal == 9, res
    a = tracer.expect_alert(episode_id, "daemon-handoff")
    assert a["enforced"], a
    res = run_in_episode(episode_id + "-b", ["busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                                            "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
                                            "x.service", "fail", "0", "0"], timeout=30)
    assert res.signal == 9, res
    tracer.expect_alert(episode_id + "-b", "dbus-systemd-call")
    assert not marker.exists()
    # outside episodes the clients run (they fail on their own here: no systemd as PID 1)
    out = subprocess.run(["systemd-run", "--version"], capture_output=True, timeout=30)
    assert out.returncode == 0
    from episode_tracer import cgroups

    cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / (episode_id + "-b"))
