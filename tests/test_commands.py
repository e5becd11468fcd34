"""Commands to the loop thread (episode_tracer/commands.py), without root: typed
commands parsed once, run by the draining thread only, answered through
futures from many submitting threads; a command the loop does not take in
time is withdrawn and never runs later."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from episode_tracer.commands import (Caller, CommandQueue, CommandTimeout, EpisodeAction, EpisodeOpError, EpisodeStatus,
                             ListEpisodes, parse)

TRAINER = Caller(pid=4242, uid=1001, trainer=True)


def test_parse_validates_once_into_typed_commands():
    assert parse("list", {}) == ListEpisodes()
    assert parse("status", {"id": "ep-1"}) == EpisodeStatus("ep-1")
    assert parse("freeze", {"id": "ep-1"}) == EpisodeAction("freeze", "ep-1")
    with pytest.raises(EpisodeOpError, match="unknown episode command 'boom'"):
        parse("boom", {"id": "ep-1"})
    with pytest.raises(EpisodeOpError, match="kill: an episode id is required"):
        parse("kill", {})
    with pytest.raises(ValueError):
        parse("thaw", {"id": "../etc"})


class FakeState:
    """A live view that records which thread reads it."""

    def __init__(self):
        self.threads: set[int] = set()

    def snapshot(self):
        self.threads.add(threading.get_ident())
        return {"episodes": [{"id": "a"}], "retention": {"keep": 1}}


class FakeSlots:
    capacity = 2

    def __len__(self):
        return 2


def fake_rt(episodes=None, refused=()):
    tracker = SimpleNamespace(episodes=episodes or {}, refused=dict.fromkeys(refused, 0.0),
                              slots=FakeSlots())
    return SimpleNamespace(tracker=tracker, pipeline=None)


def run_loop(q, rt, stop):
    while not stop.is_set():
        q.drain(rt)
        time.sleep(0.001)


def test_many_threads_are_answered_by_the_loop_thread_only():
    q, st, stop = CommandQueue(), FakeState(), threading.Event()
    rt = fake_rt(episodes={"ep-1": SimpleNamespace(ended=False, kernel=True, slot=7)})
    rt.commands = q
    q.owners["ep-1"] = TRAINER.uid  # a trainer's status goes through the loop (its owner is checked there)
    loop = threading.Thread(target=run_loop, args=(q, rt, stop))
    loop.start()
    replies: list[dict] = []
    errors: list[BaseException] = []

    def client(i):
        try:
            for k in range(50):
                op = ListEpisodes() if k % 2 else EpisodeStatus("ep-1", TRAINER)
                replies.append(q.submit(rt, st, op, timeout=30))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
    finally:
        stop.set()
        loop.join(10)
    assert not errors
    assert len(replies) == 400 and q.executed == 400 and q.timed_out == 0
    assert sum(r.get("state") == "registered" and r["slot"] == 7 for r in replies) == 200
    assert sum(r.get("episodes") == [{"id": "a"}] for r in replies) == 200
    assert st.threads == {loop.ident}


def test_errors_reach_the_submitter_and_the_loop_goes_on():
    q, stop = CommandQueue(), threading.Event()
    rt = fake_rt()
    loop = threading.Thread(target=run_loop, args=(q, rt, stop))
    loop.start()
    try:
        with pytest.raises(EpisodeOpError, match="no running episode 'gone'"):
            q.submit(rt, None, EpisodeAction("kill", "gone"), timeout=30)
        with pytest.raises(EpisodeOpError, match="list: this tracer keeps no live view"):
            q.submit(rt, None, ListEpisodes(), timeout=30)
        assert q.submit(rt, None, EpisodeStatus("x"), timeout=30)["state"] == "unknown"
    finally:
        stop.set()
        loop.join(10)
    assert q.failed == 2


def test_refused_status_names_the_limit():
    q = CommandQueue()
    rt = fake_rt(refused=["ep-9"])
    q.drain(rt)  # this thread is now the loop thread: a command it submits runs at once
    r = q.submit(rt, None, EpisodeStatus("ep-9"))
    assert r["state"] == "refused" and "--max-episodes 2" in r["error"]


def test_admin_status_reads_the_view_the_loop_publishes():
    rt = fake_rt(episodes={"ep-1": SimpleNamespace(ended=False, kernel=True, slot=3)}, refused=["ep-9"])
    q = CommandQueue(rt)
    assert q.submit(rt, None, EpisodeStatus("ep-1"), timeout=0.1)["state"] == "unknown"  # not published yet
    q.observe({"type": "episode_start", "episode": "ep-1"})
    q.observe({"type": "episode_refused", "episode": "ep-9"})
    # answered on this thread without a loop draining: from the published view
    assert q.submit(rt, None, EpisodeStatus("ep-1"), timeout=0.1) == {"ok": True, "episode": "ep-1",
                                                                       "state": "registered", "slot": 3}
    assert q.submit(rt, None, EpisodeStatus("ep-9"), timeout=0.1)["state"] == "refused"
    q.observe({"type": "episode_end", "episode": "ep-1"})
    assert q.submit(rt, None, EpisodeStatus("ep-1"), timeout=0.1)["state"] == "unknown"
    assert q.executed == 0 and q.timed_out == 0


def test_a_command_not_taken_in_time_is_withdrawn():
    q = CommandQueue()
    st = FakeState()
    with pytest.raises(CommandTimeout, match="did not take the command within 0.2 s"):
        q.submit(fake_rt(), st, ListEpisodes(), timeout=0.2)
    assert q.timed_out == 1
    assert q.drain(fake_rt()) == 0 and not st.threads  # it never runs later


def test_poll_is_short_while_commands_come():
    q = CommandQueue()
    assert q.poll_ms(100) == 100
    q._q.append((ListEpisodes(), FakeState(), __import__("concurrent.futures").futures.Future()))
    assert q.poll_ms(100) == 5
    q.drain(fake_rt())
    assert q.poll_ms(100) == 5  # a handshake's next question comes soon
