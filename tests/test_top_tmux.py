"""End to end: a real `agent-tracer run`, `agent-tracer top` attached in a
real tmux pane, an episode that triggers an alert, and operator commands
through the control socket; the screen is read back with capture-pane.

Set AT_TOP_CAPTURE=FILE to keep the final screen (docs/top-capture.txt is
made this way, see scripts/capture-top.sh)."""
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


def test_top_shows_episode_alert_and_operator_commands(tracer_proc, episode_id):
    t = tracer_proc
    env = t["env"]
    tmux = Tmux(f"at-top-{uuid.uuid4().hex[:6]}")
    ep_proc = None
    try:
        tmux.start([str(BIN), "top", "--refresh", "0.2"], {"AGENT_TRACER_SOCKET": str(t["sock"]), "TERM": "xterm-256color"})
        # the header is up before anything happens
        screen = tmux.wait_screen("agent-tracer", "enforce")
        assert "tracer not running" not in screen, screen

        # an episode that trips the rule and then stays alive for the commands
        ep_proc = subprocess.Popen([str(BIN), "episode", "run", "--id", episode_id, "--",
                                    "/bin/sh", "-c", f"echo {t['token']} >/dev/null; exec sleep 60"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        screen = tmux.wait_screen(episode_id, "e2e-marker-exec")
        assert episode_id in screen and "e2e-marker-exec" in screen, screen
        alert_lines = [ln for ln in screen.splitlines() if "e2e-marker-exec" in ln]
        assert any(episode_id in ln for ln in alert_lines), screen   # the feed names the episode with the rule

        # the same alert is in the tracer's log, attributed to the episode
        alerts = wait_for(lambda: [r for r in _read_log(t["log"]) if r.get("type") == "alert"
                                   and r.get("rule") == "e2e-marker-exec"], 5)
        assert alerts and alerts[0]["episode"] == episode_id

        # operator commands go through the control socket
        res = _cli(env, "episode", "list", "--json")
        assert res.returncode == 0, res.stderr
        eps = {e["id"]: e for e in json.loads(res.stdout)}
        assert episode_id in eps and eps[episode_id]["state"] == "running"

        res = _cli(env, "episode", "freeze", episode_id)
        assert res.returncode == 0, res.stderr
        screen = tmux.wait_screen("frozen")
        assert any(episode_id in ln and "frozen" in ln for ln in screen.splitlines()), screen

        res = _cli(env, "episode", "thaw", episode_id)
        assert res.returncode == 0, res.stderr
        res = _cli(env, "episode", "kill", episode_id)
        assert res.returncode == 0, res.stderr
        ep_proc.wait(timeout=15)
        assert ep_proc.returncode != 0
        screen = tmux.wait_screen("killed")
        assert any(episode_id in ln and ("killed" in ln or "ended" in ln) for ln in screen.splitlines()), screen
        if os.environ.get("AT_TOP_CAPTURE"):
            Path(os.environ["AT_TOP_CAPTURE"]).write_text(tmux.screen())
        assert tmux.run("display", "-p", "-t", tmux.name, "#{pane_width}x#{pane_height}").stdout.strip() == f"{COLS}x{ROWS}"

        # the tracer goes away: top says so and keeps retrying instead of crashing
        t["proc"].send_signal(signal.SIGINT)
        t["proc"].wait(timeout=15)
        screen = tmux.wait_screen("tracer not running", "retrying")
        assert "tracer not running" in screen, screen
        assert "Traceback" not in screen
        assert tmux.run("list-panes", "-t", tmux.name, "-F", "#{pane_dead}").stdout.strip() == "0"
    finally:
        tmux.kill()
        if ep_proc is not None and ep_proc.poll() is None:
            ep_proc.kill()
            ep_proc.wait()
