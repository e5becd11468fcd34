"""Scale, live: episode identities recycled with a generation (wrap-around,
per-episode deny rules on the right episode, the canary's identity never
handed out), the concurrent-episode limit (refused with a clear error, fail
closed without the start handshake), and attribution under hundreds of
episodes started at once (the cgroup_rmdir record ends an episode in stream
order)."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from at_testlib import wait_for

pytestmark = pytest.mark.root
PY = sys.executable


def ep_root() -> Path:
    from episode_tracer import cgroups

    return cgroups.cgroup2_mount() / "agent-tracer"


class Listener:
    """A loopback TCP listener that accepts and closes until stopped."""

    def __init__(self):
        self.s = socket.socket()
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.s.bind(("127.0.0.1", 0))
        self.s.listen(1024)
        self.port = self.s.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        self.s.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.s.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            c.close()

    def close(self):
        self._stop = True
        self.t.join(timeout=5)
        self.s.close()


@pytest.fixture
def listener():
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()


@pytest.fixture
def control(tmp_path):
    """A control server for a LiveTracer (the tracer's own, as `run` serves
    it): the start handshake of run_episode asks it. Closed after the test."""
    made = []

    def make(tracer):
        from episode_tracer.control import ControlServer
        from episode_tracer.episode_ops import apply_episode_command

        path = tmp_path / "control.sock"
        srv = ControlServer(path, lambda: {}, lambda cmd, args: apply_episode_command(tracer.rt, None, cmd, args))
        srv.start()
        made.append(srv)
        return path

    yield make
    for s in made:
        s.close()


@pytest.fixture
def cleanup_episodes():
    ids: list[str] = []
    yield ids
    from episode_tracer import cgroups

    for ep in ids:
        try:
            cgroups.remove(ep_root() / ep)
        except Exception:
            pass


def foreign_episodes() -> int:
    """Episodes already on this shared machine (cgroups under agent-tracer/,
    AGENT_EPISODE_ID processes): a tracer started now takes an identity for
    each, so a test's --max-episodes counts them in."""
    from episode_tracer.episode_ops import offline_episodes

    return len(offline_episodes())


def per_episode_policy(tmp_path, port):
    d = tmp_path / "pol"
    d.mkdir()
    (d / "00-scale.toml").write_text(f"""
[[rule]]
name = "blk-loopback"
severity = "high"
on = "connect"
action = "deny"
match = {{ addr = "127.0.0.0/8", port = {port}, episode = {{ glob = "blk-*" }} }}
""")
    return d


def connect_cmd(port):
    return [PY, "-S", "-c", "import socket,sys\ntry:\n s=socket.socket();s.settimeout(5);"
            f"s.connect(('127.0.0.1',{port}))\nexcept OSError as e:\n sys.exit(e.errno or 99)\n"]


def test_identity_wraps_and_per_episode_rules_follow(live_tracer, control, listener, tmp_path, cleanup_episodes):
    from episode_tracer import slots
    from episode_tracer.api import run_episode
    from episode_tracer.events import SLOT_CANARY

    start_gen = slots.GEN_COUNT - 2  # the generations cross the top within the first uses
    t = live_tracer(policy=True, policy_dirs=[per_episode_policy(tmp_path, listener.port)], monitor=False,
                    max_episodes=foreign_episodes() + 2, slot_start_gen=start_gen).start()
    sock = control(t)
    assert t.ready["selftest"]["connect_deny"] == "ok"
    tag = uuid.uuid4().hex[:6]
    results = []
    # 8 episodes through 2 identities: each index is used 4 times, from
    # generation GEN_COUNT-2 across the wrap to generation 1
    for i in range(8):
        ep = f"{'blk' if i % 3 == 0 else 'ok'}-{tag}-{i}"
        cleanup_episodes.append(ep)
        res = run_episode(ep, connect_cmd(listener.port), control_socket=sock)
        results.append((ep, res.exit_code))
    starts = {r["episode"]: r for r in t.find(type="episode_start") if tag in (r["episode"] or "")}
    assert set(starts) == {ep for ep, _ in results}
    for ep, code in results:
        want = errno.EPERM if ep.startswith("blk-") else 0
        assert code == want, (ep, code, starts[ep]["slot"])
    idents = [starts[ep]["slot"] for ep, _ in results]
    by_index: dict[int, list[int]] = {}
    for i in idents:
        by_index.setdefault(slots.index_of(i), []).append(slots.generation_of(i))
    # 8 episodes through the (about) 2 free identities: each reuse of an index
    # has the next generation, across the top (2047 -> 0)
    assert 1 <= len(by_index) <= 3, by_index
    for gens in by_index.values():
        assert all((b - a) % slots.GEN_COUNT == 1 for a, b in zip(gens, gens[1:])), by_index
    assert any(slots.GEN_COUNT - 1 in g and 0 in g for g in by_index.values()), by_index
    assert len(set(idents)) == len(idents)  # no identity named two episodes
    assert SLOT_CANARY not in idents and all(slots.index_of(i) != slots.index_of(SLOT_CANARY) for i in idents)
    # the kernel holds no mask for an ended episode's identity (a leftover
    # process of it would get the rules of every episode, not a new one's)
    wait_for(lambda: all(not (e.id.startswith(("blk-", "ok-")) and tag in e.id and not e.ended)
                         for e in list(t.rt.tracker.episodes.values())), timeout=30)
    masks = t.rt.probes.slot_masks()
    assert not (set(idents) & set(masks)), masks
    # the denied connects were refused in the kernel, each for its own episode
    denied = [r for r in t.find(type="deny") if tag in (r.get("episode") or "")]
    assert sorted(r["episode"] for r in denied) == sorted(ep for ep, _ in results if ep.startswith("blk-"))


def test_limit_refuses_with_clear_error_and_fails_closed(live_tracer, control, tmp_path, cleanup_episodes):
    from episode_tracer.api import EpisodeError, run_episode

    base = foreign_episodes()
    t = live_tracer(max_episodes=base + 2).start()
    sock = control(t)
    assert len(t.rt.tracker.slots) == base, "other episodes came or went while the tracer started"
    tag = uuid.uuid4().hex[:6]
    hold = tmp_path / "hold"
    running: list[threading.Thread] = []
    for i in range(2):
        ep = f"lim-{tag}-{i}"
        cleanup_episodes.append(ep)
        th = threading.Thread(target=run_episode, args=(ep, ["/bin/sh", "-c", f"while [ ! -e {hold} ]; do sleep 0.05; done"]),
                              kwargs={"control_socket": sock}, daemon=True)
        th.start()
        running.append(th)
    assert wait_for(lambda: len(t.rt.tracker.slots) == base + 2, timeout=30)
    # a third one is refused before its command runs
    marker = tmp_path / "ran"
    third = f"lim-{tag}-x"
    cleanup_episodes.append(third)
    with pytest.raises(EpisodeError, match=rf"refused.*limit.*--max-episodes {base + 2}"):
        run_episode(third, ["/bin/sh", "-c", f"touch {marker}"], control_socket=sock)
    assert not marker.exists()
    assert not (ep_root() / third).exists()
    assert t.wait(type="episode_refused", episode=third, timeout=10)
    # without the handshake (a cgroup made by hand): killed, never unscoped
    fourth = f"lim-{tag}-y"
    cleanup_episodes.append(fourth)
    cg = ep_root() / fourth
    cg.mkdir()
    p = subprocess.Popen(["/bin/sleep", "60"], preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
    try:
        assert p.wait(timeout=30) == -9
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert t.wait(type="episode_refused", episode=fourth, timeout=10)
    assert not t.find(type="episode_start", episode=fourth)
    # the identities come back when the episodes end: a new one is accepted
    hold.write_text("")
    for th in running:
        th.join(timeout=30)
    from episode_tracer import cgroups

    cgroups.remove(cg)
    assert wait_for(lambda: len(t.rt.tracker.slots) <= base, timeout=30)
    again = f"lim-{tag}-z"
    cleanup_episodes.append(again)
    assert run_episode(again, ["/bin/true"], control_socket=sock).exit_code == 0
    assert t.wait(type="episode_start", episode=again, timeout=10)


N_CONCURRENT = 256
ROUNDS = 3


def _round(t, listener, tag, cleanup, lagging=False):
    """256 episodes at once, each execs /bin/true and connects once. With
    `lagging`, the tracer's loop is not running: the records wait in the
    ring buffer until every episode has ended and its cgroup is gone, then
    are drained with a directory scan after every 32nd episode start (what
    the periodic scan does when the loop lags behind the kernel)."""
    from episode_tracer.api import run_episode

    eps = [f"c{tag}-{i}" for i in range(N_CONCURRENT)]
    cleanup.extend(eps)
    base = len(t.sink.records)  # the earlier rounds ended before this one starts
    errors: list[BaseException] = []
    gate = threading.Barrier(N_CONCURRENT)

    def one(ep):
        try:
            gate.wait(timeout=60)
            # the tracer is not asked (no handshake): the race is between the
            # kernel's records and the user-space resolution of the new cgroup
            run_episode(ep, ["/bin/bash", "-c", f"/bin/true {ep}; exec 3<>/dev/tcp/127.0.0.1/{listener.port}", ep],
                        control_socket=None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(ep,), daemon=True) for ep in eps]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[:3]
    want = set(eps)
    if lagging:
        rt = t.rt
        seen = [0]

        def scan_midway(rec):
            if rec["type"] == "episode_start" and rec["episode"] in want:
                seen[0] += 1
                if seen[0] % 32 == 0:
                    for r in rt.tracker.scan_cgroups(time.time()):
                        rt.pipeline.emit(r)

        rt.pipeline.observers.append(scan_midway)
        try:
            rt.drain()
        finally:
            rt.pipeline.observers.remove(scan_midway)
        assert seen[0] >= N_CONCURRENT // 2
    assert wait_for(lambda: want <= {r["episode"] for r in t.find(type="episode_end")}, timeout=90), \
        len(want - {r["episode"] for r in t.find(type="episode_end")})
    recs = t.records[base:]
    starts: dict[str, int] = {}
    for r in recs:
        if r["type"] == "episode_start" and r["episode"] in want:
            starts[r["episode"]] = starts.get(r["episode"], 0) + 1
    assert starts == {ep: 1 for ep in eps}, {ep: n for ep, n in starts.items() if n != 1}
    # the pids of each episode, named by its own argv (bash and /bin/true)
    pid_ep: dict[int, str] = {}
    for r in recs:
        if r["type"] == "exec":
            for ep in (a for a in (r.get("argv") or []) if a in want):
                pid_ep[r["pid"]] = ep
    port_connects = [r for r in recs if r["type"] == "connect" and r.get("port") == listener.port]
    by_ep: dict[str, int] = {}
    for r in port_connects:
        assert r["episode"] is not None, r
        assert r["episode"] == pid_ep.get(r["pid"]), (r["episode"], pid_ep.get(r["pid"]))
        by_ep[r["episode"]] = by_ep.get(r["episode"], 0) + 1
    assert by_ep == {ep: 1 for ep in eps}
    # none mixed: every record of an episode's process carries that episode
    mixed = [r for r in recs if r.get("pid") in pid_ep and r["type"] in ("exec", "exit", "socket", "connect")
             and r["episode"] != pid_ep[r["pid"]]]
    assert not mixed, mixed[:3]
    execs = [r for r in recs if r["type"] == "exec" and r["pid"] in pid_ep]
    assert len(execs) == 2 * N_CONCURRENT


def test_concurrent_starts_attribute_every_record(live_tracer, listener, cleanup_episodes):
    t = live_tracer().start()
    for n in range(ROUNDS):
        _round(t, listener, f"{uuid.uuid4().hex[:5]}{n}", cleanup_episodes)
    assert t.rt.lost_total() == 0
    assert not [r for r in t.records if r["type"] == "lost"]


def test_lagging_tracer_scan_never_ends_an_episode_before_its_records(live_tracer, listener, cleanup_episodes):
    t = live_tracer().start(loop=False)
    _round(t, listener, f"{uuid.uuid4().hex[:5]}l", cleanup_episodes, lagging=True)
    assert t.rt.lost_total() == 0
