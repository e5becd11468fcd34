"""The console's data (State.detail, set_held, reload status, holds/s), the
control socket's episode_detail op, and run_console's loop driven by scripted
keys against a real control socket in a tmp dir (no terminal, no root)."""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from rich.console import Console

from dash_helpers import T0, state_from
from episode_tracer.control import ControlClient, ControlError, ControlServer
from episode_tracer.cpu import CpuSampler, proc_stat
from episode_tracer.dashboard import run_console
from episode_tracer.state import State


def test_detail_tracks_processes_listeners_and_end() -> None:
    st = state_from("basic.jsonl")
    d = st.detail("rollout-7f3a-0001", now=T0 + 10)
    assert [(p["pid"], p["depth"], p["state"]) for p in d["processes"]] == [
        (4100, 0, "running"), (4101, 1, "exited"), (4102, 1, "running")]
    assert d["processes"][1]["code"] == 0 and d["processes"][1]["exe"] == "/usr/bin/git"
    gpu = {p["pid"]: p["gpu"] for p in d["processes"]}
    assert gpu[4102] == [{"gpu_index": 0, "used_mib": 30720, "sm_util": 85}]
    assert [c["addr"] for c in d["connections"]] == ["140.82.112.3"]
    assert [a["rule"] for a in d["alerts"]] == ["gpu-unexpected-process"]
    assert d["tail"][0]["type"] == "alert" and d["tail"][-1]["type"] == "episode_start"
    assert d["source"] == "cgroup" and d["root_pid"] == 4100 and d["events"] == 8
    assert st.detail("no-such-episode") is None
    # a listener leaves with its process; the end marks every process exited
    st.observe({"type": "listen", "ts": T0 + 11, "episode": "rollout-7f3a-0001", "pid": 4102, "fd": 7,
                "addr": "127.0.0.1", "port": 6006, "result": 0})
    assert [ln["port"] for ln in st.detail("rollout-7f3a-0001")["listeners"]] == [6006]
    st.observe({"type": "exit", "ts": T0 + 12, "episode": "rollout-7f3a-0001", "pid": 4102, "tid": 4102, "code": 0})
    assert st.detail("rollout-7f3a-0001")["listeners"] == []
    st.observe({"type": "episode_end", "ts": T0 + 13, "episode": "rollout-7f3a-0001", "exit_code": 0, "reason": "exited"})
    d = st.detail("rollout-7f3a-0001")
    assert all(p["state"] == "exited" for p in d["processes"]) and d["end_reason"] == "exited"


def test_held_right_now_and_node_strip_data() -> None:
    st = state_from("basic.jsonl")
    st.observe({"type": "exec", "ts": T0 + 8, "episode": "rollout-7f3a-0001", "pid": 4103, "tid": 4103,
                "ppid": 4100, "exe": "/tmp/xmrig", "argv": ["xmrig"], "gated": True})
    st.set_held({4103: T0 + 8})
    snap = st.snapshot(now=T0 + 9)
    ep = next(e for e in snap["episodes"] if e["id"] == "rollout-7f3a-0001")
    assert snap["held_now"] == 1
    assert ep["held"] == [{"pid": 4103, "kind": "exec", "what": "gated exec /tmp/xmrig", "exe": "/tmp/xmrig",
                           "since": T0 + 8, "for_s": 1.0}]
    st.set_held({})
    snap = st.snapshot(now=T0 + 9)
    assert snap["held_now"] == 0 and all(not e["held"] for e in snap["episodes"])
    # holds per second from the kernel counters of two stats records
    st.observe({"type": "stats", "ts": T0 + 10, "episode": None, "counters": {"gated": 10, "wire_held": 1}})
    st.observe({"type": "stats", "ts": T0 + 12, "episode": None, "counters": {"gated": 16, "wire_held": 1}})
    assert st.snapshot(now=T0 + 12)["holds_per_s"] == {"gated": 3.0, "wire_held": 0.0}
    # reload status: refused keeps the old version and says why
    st.observe({"type": "policy_error", "ts": T0 + 13, "episode": None, "kept_version": "a1b2c3d",
                "errors": ["policies/x.toml: rule 'r': unknown key 'matchh'"]})
    snap = st.snapshot(now=T0 + 14)
    assert snap["reload"]["status"] == "refused" and "matchh" in snap["reload"]["errors"][0]
    assert snap["policy_version"] == "a1b2c3d"
    st.observe({"type": "policy_reload", "ts": T0 + 15, "episode": None, "old_version": "a1b2c3d",
                "policy_version": "ffee", "rules": 3})
    snap = st.snapshot(now=T0 + 16)
    assert snap["reload"]["status"] == "reloaded" and snap["policy_version"] == "ffee"
    assert snap["programs"][:1] == ["sched_process_fork"]


def test_detail_is_bounded() -> None:
    from episode_tracer import episode_detail as ed

    st = State(node="n", mode="enforce", policy_version="v", started=T0, scope="episodes")
    st.observe({"type": "episode_start", "ts": T0, "episode": "big", "source": "cgroup", "root_pid": 1})
    for i in range(2, 2 + ed.PROC_MAX + 200):
        st.observe({"type": "fork", "ts": T0 + i * 1e-3, "episode": "big", "pid": 1, "child_pid": i})
        st.observe({"type": "connect", "ts": T0 + i * 1e-3, "episode": "big", "pid": i, "fd": 3, "addr": "10.0.0.1",
                    "port": i, "result": 0})
        if i % 2:
            st.observe({"type": "exit", "ts": T0 + i * 1e-3, "episode": "big", "pid": i, "tid": i, "code": 0})
    d = st.detail("big")
    assert len(d["processes"]) <= ed.PROC_MAX
    assert sum(1 for p in d["processes"] if p["state"] == "exited") <= ed.EXITED_KEEP
    assert len(d["connections"]) == ed.CONN_KEEP and len(d["tail"]) == ed.TAIL_KEEP
    assert d["connections"][0]["port"] == 1 + ed.PROC_MAX + 200          # newest first


def test_cpu_sampler_real_proc() -> None:
    import os

    st = proc_stat(os.getpid())
    assert st is not None and st[0] in "RSD"
    clock = [100.0]
    s = CpuSampler(min_interval=1.0, clock=lambda: clock[0])
    assert s.processes([os.getpid()])[os.getpid()][1] is None            # first sample: no rate yet
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:                                # burn CPU that /proc will show
        pass
    clock[0] += 1.0
    letter, pct = s.processes([os.getpid()])[os.getpid()]
    assert pct is not None and pct > 5
    assert s.episodes({"e": (None, [os.getpid()])}) == {"e": None}
    clock[0] += 1.0
    assert (s.episodes({"e": (None, [os.getpid()])})["e"] or 0) >= 0


# ---------------------------------------------------------------------- control + loop
def _server(path: Path, st: State, calls: list) -> ControlServer:
    def handle(cmd: str, req: dict) -> dict:
        calls.append((cmd, req.get("id")))
        if req.get("id") == "coder-sbx-0002" and cmd != "list":
            return {"ok": False, "error": "no running episode 'coder-sbx-0002'"}
        new = {"freeze": "frozen", "thaw": "running", "kill": "killed"}.get(cmd)
        if new:
            st.set_episode_state(req["id"], new)
        return {"ok": True, "message": f"{cmd} {req.get('id')}: ok"}

    return ControlServer(path, lambda: st.snapshot(now=T0 + 10), handle,
                         get_detail=lambda ep: st.detail(ep, now=T0 + 10)).start()


def test_episode_detail_op(tmp_path: Path) -> None:
    st = state_from("basic.jsonl")
    srv = _server(tmp_path / "c.sock", st, [])
    try:
        cl = ControlClient(tmp_path / "c.sock")
        d = cl.detail("rollout-7f3a-0001")
        assert d["id"] == "rollout-7f3a-0001" and d["processes"][0]["pid"] == 4100
        with pytest.raises(ControlError, match="no episode 'nope' known"):
            cl.detail("nope")
        assert "an 'id' is required" in cl.request({"op": "episode_detail"})["error"]
    finally:
        srv.close()
    bare = ControlServer(tmp_path / "d.sock", lambda: {}, lambda c, r: {}).start()
    try:
        assert "serves no detail" in ControlClient(tmp_path / "d.sock").request(
            {"op": "episode_detail", "id": "x"})["error"]
    finally:
        bare.close()


class ScriptKeys:
    """Presses each step's keys once the screen shows its text (never on a timer)."""

    def __init__(self, screen: Callable[[], str], steps: list[tuple[str, list[str]]]) -> None:
        self.screen = screen
        self.steps = list(steps)
        self.done: list[str] = []

    def __enter__(self) -> "ScriptKeys":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, timeout: float) -> list[str]:
        if self.steps:
            want, ks = self.steps[0]
            if want in self.screen():
                self.steps.pop(0)
                self.done.append(want)
                return ks
        time.sleep(timeout)
        return []


def test_run_console_drives_the_tracer(tmp_path: Path) -> None:
    st = state_from("basic.jsonl")
    calls: list = []
    path = tmp_path / "c.sock"
    srv = _server(path, st, calls)
    buf = io.StringIO()
    con = Console(record=True, width=120, height=40, file=buf, color_system=None, legacy_windows=False)
    lock = threading.Lock()

    def screen() -> str:
        with lock:
            return con.export_text(clear=False)[-6000:]

    script = ScriptKeys(screen, [
        ("rollout-7f3a-0001", ["enter"]),                       # detail view of the selected (first) episode
        ("Processes", ["esc", "f"]),
        ("freeze rollout-7f3a-0001: ok", ["down", "t"]),        # thaw the killed one: the error is shown
        ("failed: no running episode 'coder-sbx-0002'", ["up", "K"]),
        ("y kills 2 processes", ["y"]),
        ("kill rollout-7f3a-0001: ok", ["/", *"coder", "enter"]),
        ('filter "coder": 1 of 2', ["q"]),
    ])
    result: list[int] = []
    stop = threading.Event()
    th = threading.Thread(target=lambda: result.append(
        run_console(path, script, refresh=0.1, console=con, stop_event=stop)))
    th.start()
    try:
        th.join(timeout=60)
    finally:
        stop.set()
        th.join(timeout=10)
        srv.close()
    assert result == [0], (script.steps, screen()[-3000:])
    assert not script.steps
    assert calls == [("freeze", "rollout-7f3a-0001"), ("thaw", "coder-sbx-0002"), ("kill", "rollout-7f3a-0001")]
    assert "4102" in con.export_text(clear=False)          # the detail view listed its processes


def test_console_feed_held_and_cpu() -> None:
    """ConsoleFeed between the tracer and State: the pids of the kernel's `gated`
    map (read through probes.gated(), here a stand-in for the one BPF map read)
    become "held right now" with the time first seen; canary pids are left out."""
    import os
    import types

    from episode_tracer import console_feed
    from episode_tracer.console_feed import ConsoleFeed

    st = state_from("basic.jsonl")
    gated: dict[int, int] = {}
    probes = types.SimpleNamespace(gated=lambda: dict(gated))
    rt = types.SimpleNamespace(probes=probes, pipeline=types.SimpleNamespace(engine=types.SimpleNamespace(canary_pids={77})))
    feed = ConsoleFeed(rt, st)
    console_feed.HELD_POLL_S = 0.0
    try:
        feed.poll_held()
        assert st.snapshot()["held_now"] == 0
        gated.update({4102: 1, 77: 1})
        feed.poll_held()
        snap = st.snapshot()
        assert snap["held_now"] == 1
        ep = next(e for e in snap["episodes"] if e["id"] == "rollout-7f3a-0001")
        since = ep["held"][0]["since"]
        assert ep["held"][0]["pid"] == 4102
        feed.poll_held()                                   # still held: the first-seen time is kept
        ep = next(e for e in st.snapshot()["episodes"] if e["id"] == "rollout-7f3a-0001")
        assert ep["held"][0]["since"] == since
        assert next(p for p in feed.detail("rollout-7f3a-0001")["processes"] if p["pid"] == 4102)["state"] == "held"
        gated.clear()
        feed.poll_held()
        assert st.snapshot()["held_now"] == 0
    finally:
        console_feed.HELD_POLL_S = 0.2
    # CPU of a running episode whose member is this test process (real /proc)
    st.observe({"type": "exec", "ts": T0 + 9, "episode": "rollout-7f3a-0001", "pid": os.getpid(), "tid": os.getpid(),
                "exe": "/usr/bin/python3"})
    clock = [0.0]
    feed.cpu = CpuSampler(min_interval=0.5, clock=lambda: clock[0])
    feed.snapshot()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:
        pass
    clock[0] += 1.0
    ep = next(e for e in feed.snapshot()["episodes"] if e["id"] == "rollout-7f3a-0001")
    assert ep["cpu_pct"] is not None and ep["cpu_pct"] > 5


def test_operator_kill_reaches_the_verdict_file(tmp_path: Path) -> None:
    """An operator's kill (episode kill, top's K) is in the episode's verdict file,
    which is how `episode run` knows to exit 86 (the live check: tests/test_top_tmux.py)."""
    from episode_tracer.api import _operator_killed, read_verdicts
    from episode_tracer.sinks import VerdictSink

    sink = VerdictSink(tmp_path)
    sink.write({"type": "episode_command", "ts": 1.0, "episode": "ep-1", "cmd": "freeze", "by": "operator"})
    assert not _operator_killed("ep-1", tmp_path)
    sink.write({"type": "episode_command", "ts": 2.0, "episode": "ep-1", "cmd": "kill", "by": "operator"})
    assert _operator_killed("ep-1", tmp_path) and not _operator_killed("ep-2", tmp_path)
    assert read_verdicts("ep-1", tmp_path) == []              # not counted as an alert


class QueueKeys:
    def __init__(self) -> None:
        import queue

        self.q: Any = queue.Queue()

    def __enter__(self) -> "QueueKeys":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, timeout: float) -> list[str]:
        import queue

        try:
            return [self.q.get(timeout=timeout)]
        except queue.Empty:
            return []


def test_run_console_waits_reconnects_and_quits(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    con = Console(record=True, width=100, height=30, file=io.StringIO(), color_system=None, legacy_windows=False)
    text = lambda: con.export_text(clear=False)                      # noqa: E731
    keys = QueueKeys()
    result: list[int] = []
    th = threading.Thread(target=lambda: result.append(run_console(path, keys, refresh=0.1, console=con, retry_s=0.2)))
    th.start()
    srv = None
    try:
        assert _wait(lambda: "tracer not running at" in text())
        st = state_from("basic.jsonl")
        srv = _server(path, st, [])
        assert _wait(lambda: "node gpu-node-07" in text())
        srv.close()
        assert _wait(lambda: text().rfind("tracer not running") > text().rfind("node gpu-node-07"))
        keys.q.put("q")                                              # q works on the waiting screen too
        th.join(timeout=20)
    finally:
        keys.q.put("q")
        th.join(timeout=20)
        if srv is not None:
            srv.close()
    assert result == [0] and not th.is_alive()


def _wait(pred: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()
