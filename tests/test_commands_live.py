"""The loop thread is the only writer of core state (issue 14): operator
commands from several threads at once, over the real control socket, while
the loop runs a busy episode (a shell forking and exec'ing as fast as it
can): every command is answered, each ran on the loop thread, every
freeze/thaw/kill is recorded, and no record is lost."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from at_testlib import wait_for

pytestmark = pytest.mark.root


def test_control_commands_from_threads_under_load(live_tracer, tmp_path, monkeypatch):
    from episode_tracer import cgroups, commands
    from episode_tracer.api import run_episode
    from episode_tracer.control import ControlClient, ControlServer
    from episode_tracer.episode_ops import apply_episode_command
    from episode_tracer.service import _make_state

    ran_on: set[int] = set()
    real_action = commands._episode_action

    def spy(rt, state, op):
        ran_on.add(threading.get_ident())
        return real_action(rt, state, op)

    monkeypatch.setattr(commands, "_episode_action", spy)
    t = live_tracer().start()
    state = _make_state(t.rt)
    t.rt.add_observer(state.observe)
    sock = tmp_path / "control.sock"
    srv = ControlServer(sock, state.snapshot, lambda cmd, args: apply_episode_command(t.rt, state, cmd, args)).start()
    ep = f"busy-{uuid.uuid4().hex[:8]}"
    stop = tmp_path / "stop"
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(res=run_episode(
            ep, ["/bin/sh", "-c", f"while [ ! -e {stop} ]; do /bin/true; done"], control_socket=sock)),
        daemon=True)
    try:
        runner.start()
        assert wait_for(lambda: (lambda e: e is not None and e.kernel)(t.rt.tracker.episodes.get(ep)), timeout=30)
        assert wait_for(lambda: len(t.find(type="exec", episode=ep)) >= 50, timeout=30), "the episode is not busy"
        replies: dict[int, list[tuple[str, dict]]] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()  # one freeze/thaw pair at a time: thaw always follows its freeze

        def client(i: int) -> None:
            c = ControlClient(sock, timeout=30)
            got = replies.setdefault(i, [])
            try:
                for k in range(15):
                    got.append(("status", c.command("status", id=ep)))
                    got.append(("list", c.command("list")))
                    if i % 2 == 0:
                        with lock:
                            got.append(("freeze", c.command("freeze", id=ep)))
                            got.append(("thaw", c.command("thaw", id=ep)))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(300)
        assert not errors, errors
        sent = [r for got in replies.values() for r in got]
        assert len(sent) == 6 * 15 * 2 + 3 * 15 * 2  # every command got its reply
        bad = [(cmd, r) for cmd, r in sent if r.get("ok") is not True]
        assert not bad, bad[:5]
        assert all(r["state"] == "registered" for cmd, r in sent if cmd == "status")
        assert all(any(e["id"] == ep for e in r["episodes"]) for cmd, r in sent if cmd == "list")
        assert {r["state"] for cmd, r in sent if cmd in ("freeze", "thaw")} == {"frozen", "running"}
        assert not cgroups.is_frozen(cgroups.cgroup2_mount() / "agent-tracer" / ep)
        kill = ControlClient(sock, timeout=30).command("kill", id=ep)
        assert kill["ok"] is True and kill["state"] == "killed"
        runner.join(60)
        assert result["res"].signal is not None  # the loop's kill ended the episode
        assert ran_on == {t.thread.ident}  # every freeze/thaw/kill ran on the loop thread
        recorded = t.wait(type="episode_command", episode=ep, n=3 * 15 * 2 + 1, timeout=30)
        assert len(recorded) == 3 * 15 * 2 + 1
        assert t.rt.commands.timed_out == 0 and t.rt.commands.failed == 0
        assert wait_for(lambda: t.find(type="episode_end", episode=ep), timeout=30)
        assert t.rt.lost_total() == 0 and not t.find(type="lost")
    finally:
        stop.touch()
        srv.close()
        runner.join(30)
        try:
            cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep)
        except Exception:
            pass
