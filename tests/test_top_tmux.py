"""End to end: a real `agent-tracer run`, `agent-tracer top` attached in a
real tmux pane, two episodes of which one triggers an alert, and an operator
who drives the tracer with top's keys (send-keys); the screen is read back
with capture-pane.

Set AT_TOP_CAPTURE=FILE to append the main and detail screens to FILE
(docs/top-capture.txt is made this way, see scripts/capture-top.sh)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from at_testlib import LIVE_LOCK, wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (scripts/install.sh installs it)"),
]

BIN = Path(sys.executable).parent / "agent-tracer"
COLS, ROWS = 132, 40

POLICY = """
[[rule]]
name = "e2e-marker-exec"
description = "an exec carrying the end-to-end test's token"
severity = "high"
on = "exec"
action = "alert"
match = {{ cmdline = {{ regex = "{token}" }} }}
"""


class Tmux:
    def __init__(self, name: str):
        self.name = name

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", *args], check=check, capture_output=True, text=True, timeout=10)

    def start(self, command: list[str], env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        # COLUMNS/LINES from the caller would pin rich's size: the pane decides
        cmd = f"env -u COLUMNS -u LINES {exports} " + " ".join(command)
        self.run("new-session", "-d", "-s", self.name, "-x", str(COLS), "-y", str(ROWS), cmd)
        self.run("set-option", "-t", self.name, "remain-on-exit", "on")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.name, check=False).stdout

    def wait_screen(self, *needles: str, timeout: float = 15.0) -> str:
        got = wait_for(lambda: (lambda s: s if all(n in s for n in needles) else None)(self.screen()), timeout, 0.2)
        return got or self.screen()

    def kill(self) -> None:
        self.run("kill-session", "-t", self.name, check=False)


def _read_log(path: Path) -> list[dict]:
    out = []
    try:
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    except OSError:
        pass
    return out


@pytest.fixture
def live_lock():
    with open(LIVE_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture
def tracer_proc(live_lock, tmp_path):
    """`agent-tracer run` as its own process, with a test policy and socket."""
    token = "E2E" + uuid.uuid4().hex[:10].upper()
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "e2e.toml").write_text(POLICY.format(token=token))
    sock = tmp_path / "ctl.sock"
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, AGENT_TRACER_SOCKET=str(sock))
    p = subprocess.Popen([str(BIN), "run", "--no-dashboard", "--log", str(log), "--policy-dir", str(pol)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        ready = wait_for(lambda: [r for r in _read_log(log) if r.get("type") == "ready"], 30, 0.1)
        if not ready:
            p.kill()
            pytest.fail(f"tracer did not get ready: {p.communicate(timeout=10)[1][-2000:]}")
        yield {"proc": p, "sock": sock, "log": log, "env": env, "token": token}
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _cli(env, *args, timeout=20) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _episodes(env) -> dict[str, dict]:
    res = _cli(env, "episode", "list", "--json")
    assert res.returncode == 0, res.stderr
    return {e["id"]: e for e in json.loads(res.stdout)}


def _capture(tmux: Tmux, name: str) -> None:
    """AT_TOP_CAPTURE=FILE: append this screen to FILE under a heading (scripts/capture-top.sh)."""
    target = os.environ.get("AT_TOP_CAPTURE")
    if target:
        with open(target, "a") as f:
            f.write(f"--- {name} ({COLS}x{ROWS}) ---\n{tmux.screen().rstrip()}\n\n")


def test_top_console_keys_drive_the_tracer(tracer_proc, episode_id, second_episode_id):
    """Two episodes, one trips a rule; the operator selects it, reads its detail,
    freezes, thaws and kills it with keys; filters; quits with q."""
    t = tracer_proc
    env = t["env"]
    bad, calm = episode_id, second_episode_id
    tmux = Tmux(f"at-top-{uuid.uuid4().hex[:6]}")
    procs: list[subprocess.Popen] = []
    try:
        # after top: its exit status and the terminal's modes, into files (not the screen)
        after = t["log"].parent / "after-top.txt"
        tty_check = (f"python3 -c 'import termios; a = termios.tcgetattr(0); "
                     f"print(bool(a[3] & termios.ECHO), bool(a[3] & termios.ICANON))' >> {after}")
        tmux.start([str(BIN), "top", "--refresh", "0.2", ";", "echo", "$?", ">", str(after), ";", tty_check,
                    ";", "echo", "AFTER-TOP", ";", "sleep", "120"],   # the pane stays alive for the mode checks
                   {"AGENT_TRACER_SOCKET": str(t["sock"]), "TERM": "xterm-256color"})
        screen = tmux.wait_screen("agent-tracer", "ENFORCE", "q quit")
        assert "tracer not running" not in screen, screen

        procs.append(subprocess.Popen([str(BIN), "episode", "run", "--id", calm, "--", "sleep", "120"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        tmux.wait_screen(calm)
        bad_proc = subprocess.Popen([str(BIN), "episode", "run", "--id", bad, "--",
                                     "/bin/sh", "-c", f"echo {t['token']} >/dev/null; exec sleep 120"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(bad_proc)
        screen = tmux.wait_screen(bad, calm, "e2e-marker-exec")
        assert any(bad in ln and "e2e-marker-exec" in ln for ln in screen.splitlines()), screen
        _capture(tmux, "main view: two episodes, one tripped a rule")

        # select it (recent alerts first: it is the top row once a snapshot has its alert; j/k move
        # off it and back) and open its detail
        def first_row() -> str | None:
            lines = tmux.screen().splitlines()
            head = next((i for i, ln in enumerate(lines) if ln.startswith("EPISODE ")), None)
            return lines[head + 1].split()[0] if head is not None and head + 1 < len(lines) and lines[head + 1].split() else None

        assert wait_for(lambda: first_row() == bad, 15, 0.2), tmux.screen()
        tmux.run("send-keys", "-t", tmux.name, "Home", "j", "k", "Enter")
        screen = tmux.wait_screen(f"Episode {bad}", "Processes", "/usr/bin/sleep", "cmdline=")
        assert f"Episode {bad}" in screen, screen
        assert "/usr/bin/sleep" in screen and "sleep 120" in screen, screen           # its process
        assert "e2e-marker-exec" in screen and "cmdline=" in screen and t["token"] in screen, screen  # matched
        _capture(tmux, f"detail view of {bad}")

        # f freezes through the control socket; the result is on screen and `episode list` agrees
        tmux.run("send-keys", "-t", tmux.name, "f")
        tmux.wait_screen(f"freeze {bad}: ok")
        assert wait_for(lambda: _episodes(env)[bad]["state"] == "frozen", 15), _episodes(env)
        assert _episodes(env)[calm]["state"] == "running"
        tmux.run("send-keys", "-t", tmux.name, "t")
        tmux.wait_screen(f"thaw {bad}: ok")
        assert wait_for(lambda: _episodes(env)[bad]["state"] == "running", 15), _episodes(env)

        # K asks first and says what it kills; y kills; the episode ends killed, `episode run` exits 86
        tmux.run("send-keys", "-t", tmux.name, "Escape")
        tmux.wait_screen(" Episodes ", "sort:")
        tmux.run("send-keys", "-t", tmux.name, "K")
        screen = tmux.wait_screen(f"KILL {bad}? y kills")
        assert f"KILL {bad}? y kills" in screen and "sleep" in screen, screen
        tmux.run("send-keys", "-t", tmux.name, "y")
        tmux.wait_screen(f"kill {bad}: ok")
        bad_proc.wait(timeout=30)
        assert bad_proc.returncode == 86, bad_proc.stderr.read() if bad_proc.stderr else ""
        screen = tmux.wait_screen("killed")
        assert any(bad in ln and "killed" in ln for ln in screen.splitlines()), screen
        assert _episodes(env)[calm]["state"] == "running"           # the other one is untouched

        # / filters to one episode
        tmux.run("send-keys", "-t", tmux.name, "/", *calm, "Enter")
        screen = tmux.wait_screen(f'filter "{calm}": 1 of 2')
        rows = [ln for ln in screen.splitlines() if ln.startswith((bad, calm))]
        assert rows and all(ln.startswith(calm) for ln in rows), screen
        _capture(tmux, f"main view filtered to {calm}, {bad} killed")

        # resize: the console redraws for the new size (80x24: the compact footer), and back
        tmux.run("resize-window", "-t", tmux.name, "-x", "80", "-y", "24")
        screen = tmux.wait_screen("⏎ detail", calm)
        assert "⏎ detail" in screen and max(len(ln) for ln in screen.splitlines()) <= 80, screen
        tmux.run("resize-window", "-t", tmux.name, "-x", str(COLS), "-y", str(ROWS))
        tmux.wait_screen("Enter detail")

        # the tracer goes away: top says so and keeps retrying instead of crashing; keys still work
        t["proc"].send_signal(signal.SIGINT)
        t["proc"].wait(timeout=30)
        screen = tmux.wait_screen("tracer not running", "retrying")
        assert "tracer not running" in screen and "Traceback" not in screen, screen
        assert tmux.run("list-panes", "-t", tmux.name, "-F", "#{pane_dead}").stdout.strip() == "0"

        # q quits with 0 and leaves the terminal as it was (no alternate screen, cursor shown, echo on)
        tmux.run("send-keys", "-t", tmux.name, "q")
        screen = tmux.wait_screen("AFTER-TOP")
        assert "Traceback" not in screen, screen
        assert wait_for(lambda: len(after.read_text().split()) == 3 if after.exists() else False, 15)
        code, echo, icanon = after.read_text().split()
        assert code == "0"                                            # q exits 0
        assert (echo, icanon) == ("True", "True")                    # cbreak mode undone
        modes = tmux.run("display", "-p", "-t", tmux.name, "#{alternate_on} #{cursor_flag}").stdout.split()
        assert modes == ["0", "1"], modes                             # main screen back, cursor shown
        assert " Episodes " not in screen                             # the console's screen is gone
    finally:
        tmux.kill()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
