"""systemd: the shipped unit passes `systemd-analyze verify` with no warning,
the notify protocol against a real NOTIFY_SOCKET datagram socket the test
owns (READY=1 once the ready record is written, STATUS=, WATCHDOG=1,
RELOADING=1 at SIGHUP, STOPPING=1), and SIGUSR1 reopening a log that was
moved away the way logrotate does, without losing a record."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from at_testlib import LIVE_LOCK, wait_for
from episode_tracer.sdnotify import Notifier
from episode_tracer.unit import render_unit

ANALYZE = shutil.which("systemd-analyze")


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                return self.messages
            self.messages.append(dict(ln.split("=", 1) for ln in data.decode().splitlines() if "=" in ln))

    def seen(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [m for m in self.poll() if key in m and (value is None or m[key] == value)]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt: systemd)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    exe = tmp_path / "agent-tracer"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "agent-tracer.service"
    unit.write_text(render_unit(str(exe)))
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
    text = unit.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                 "RuntimeDirectory=agent-tracer", "Delegate=yes", "WatchdogSec=30s", f"ExecStart={exe} run"):
        assert line in text.splitlines() or any(ln.startswith(line) for ln in text.splitlines()), line
    # the check can fail: a typo in a directive and a missing executable are both reported
    bad = tmp_path / "bad.service"
    bad.write_text(text.replace("Type=notify", "Type=notifyy").replace("Delegate=yes", "Delegat=yes"))
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(bad)], capture_output=True, text=True)
    assert "notifyy" in r.stderr and "Delegat" in r.stderr
    bad.write_text(render_unit(str(tmp_path / "missing")))
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "not executable" in r.stderr


def test_service_install_writes_unit_config_and_site_dir(tmp_path):
    from click.testing import CliRunner

    from episode_tracer.cli import main

    r = CliRunner().invoke(main, ["service", "install", "--root", str(tmp_path), "--no-reload"])
    assert r.exit_code == 0, r.output
    unit = (tmp_path / "etc/systemd/system/agent-tracer.service").read_text()
    assert "@EXEC@" not in unit and f"ExecStart={Path(sys.executable).parent / 'agent-tracer'} run" in unit
    conf = tmp_path / "etc/agent-tracer/config.toml"
    assert (tmp_path / "etc/agent-tracer/policies.d").is_dir() and (tmp_path / "etc/agent-tracer/config.d").is_dir()
    from episode_tracer import config

    assert config.load(conf)["metrics_listen"] == "127.0.0.1:9464"  # the shipped default config is valid
    conf.write_text("monitor = true\n")
    r = CliRunner().invoke(main, ["service", "install", "--root", str(tmp_path), "--no-reload"])
    assert "kept" in r.output and conf.read_text() == "monitor = true\n"  # an operator's config is never replaced


def test_notifier_speaks_the_protocol(tmp_path):
    ns = NotifySocket(tmp_path / "notify")
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval == 1.0
        n.ready("enforce, 0 episodes")
        n.watchdog(100.0)
        n.watchdog(100.5)  # within half the interval: no second ping
        n.watchdog(101.1)
        n.reloading()
        n.stopping()
        msgs = ns.poll()
        assert msgs[0]["READY"] == "1" and msgs[0]["STATUS"] == "enforce, 0 episodes"
        assert msgs[0]["MAINPID"] == str(os.getpid())
        assert [m for m in msgs if "WATCHDOG" in m] == [{"WATCHDOG": "1"}, {"WATCHDOG": "1"}]
        assert msgs[3]["RELOADING"] == "1" and int(msgs[3]["MONOTONIC_USEC"]) > 0
        assert msgs[4]["STOPPING"] == "1"
    finally:
        ns.close()
    other = Notifier.from_env({"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval == 0  # the watchdog is for another process
    assert Notifier.from_env({}).notify("READY=1") is False  # not under systemd: nothing


@pytest.mark.root
def test_run_under_a_notify_socket_reload_reopen_and_stop(tmp_path):
    """`agent-tracer run` as systemd starts it: NOTIFY_SOCKET and
    WATCHDOG_USEC set, SIGHUP, SIGUSR1 after a logrotate-style rename,
    SIGTERM."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs")
    ns = NotifySocket(tmp_path / "notify")
    log = tmp_path / "log" / "events.jsonl"
    conf = tmp_path / "config.toml"
    conf.write_text(f'log = "{log}"\ncontrol_socket = ""\nverdict_dir = ""\ngpu_interval = 0\n'
                    f'stats_interval = 0.2\nsite_policy_dir = ""\n')
    env = {**os.environ, "NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "600000"}
    lock = open(LIVE_LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one live tracer at a time on this machine
    p = subprocess.Popen([sys.executable, "-m", "episode_tracer", "run", "--config", str(conf), "--no-dashboard"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        ready = wait_for(lambda: ns.seen("READY", "1"), timeout=120)
        assert ready, (p.poll(), ns.messages)
        # READY=1 came after the ready record was written (flushed at once)
        recs = [json.loads(x) for x in log.read_text().splitlines()]
        assert any(r["type"] == "ready" for r in recs)
        # other episodes on this node may be running: only the shape is fixed
        assert re.match(r"enforce, \d+ episode\(s\) running, \d+ records, 0 alert\(s\), lost \d+$", ready[0]["STATUS"]), \
            ready[0]["STATUS"]
        assert ready[0]["MAINPID"] == str(p.pid)
        assert wait_for(lambda: len(ns.seen("WATCHDOG", "1")) >= 2, timeout=30), ns.messages
        # logrotate: move the file away, then SIGUSR1 (postrotate)
        rotated = tmp_path / "log" / "events.jsonl.1"
        os.rename(log, rotated)
        p.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: log.exists() and b'"stats"' in log.read_bytes(), timeout=30)
        # SIGHUP: RELOADING=1, a config and a policy reload, READY=1 again
        n_ready = len(ns.seen("READY", "1"))
        p.send_signal(signal.SIGHUP)
        assert wait_for(lambda: ns.seen("RELOADING", "1"), timeout=30), ns.messages
        assert wait_for(lambda: len(ns.seen("READY", "1")) > n_ready, timeout=30)
        assert wait_for(lambda: b'"config_reload"' in log.read_bytes() and b'"policy_reload"' in log.read_bytes(),
                        timeout=30)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, p.stderr.read().decode()[-2000:]
        assert ns.seen("STOPPING", "1")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        ns.close()
        lock.close()
    # nothing lost across the move and the reopen: the last stats record
    # counts every record written before it
    lines = [json.loads(x) for f in (rotated, log) for x in f.read_text().splitlines()]
    last = max(i for i, r in enumerate(lines) if r["type"] == "stats")
    assert lines[last]["events"] == last
    assert len(rotated.read_text().splitlines()) > 0 and len(log.read_text().splitlines()) > 0
