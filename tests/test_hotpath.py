"""The per-event fast paths (docs/benchmarks.md, issue 7 follow-up) keep the
behaviour of the slow paths they short-cut. No root needed."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from episode_tracer.episodes import CgroupRegistry


def test_unknown_cgroup_rescans_once_not_per_record(tmp_path: Path) -> None:
    reg = CgroupRegistry(tmp_path)
    outside = 987654321  # a cgroup id that is no episode's
    assert reg.first_miss(outside) is True
    reg.scan()  # what the tracker does on a first miss
    # the id is still unknown after the rescan: no second walk of the root
    assert reg.first_miss(outside) is False
    reg.scan()  # a periodic scan does not forget it either
    assert reg.first_miss(outside) is False
    # a new episode cgroup is still found by its first miss
    (tmp_path / "ep-1").mkdir()
    ino = os.stat(tmp_path / "ep-1").st_ino
    assert reg.first_miss(ino) is True
    added, _ = reg.scan()
    assert [a[0] for a in added] == ["ep-1"]
    assert reg.episode_of(ino) == "ep-1"
    assert reg.first_miss(ino) is False


def _socket_raw(comm: bytes, family: int = 2) -> bytes:
    from episode_tracer import events

    lay = events.LAYOUTS[events.Kind.SOCKET]
    return struct.pack(lay.fmt, 5, 6, int(events.Kind.SOCKET), 7, 8, 0, comm, family, 1 | 0o4000, 6, 3)


def test_decode_builds_the_whole_record_in_one_pass() -> None:
    from episode_tracer import events

    r = events.decode(_socket_raw(b"curl\0junk"))
    assert list(r.items()) == [("type", "socket"), ("ktime", 5), ("cgroup", 6), ("pid", 7), ("tid", 8),
                               ("uid", 0), ("comm", "curl"), ("family", "inet"), ("sock_type", "stream"),
                               ("protocol", 6), ("result", 3)]
    # the comm cache keys on the raw bytes: different bytes, different names
    assert events.decode(_socket_raw(b"curl\0other"))["comm"] == "curl"
    assert events.decode(_socket_raw(b"curly"))["comm"] == "curly"
    assert events.decode(_socket_raw(b"x", family=77))["family"] == "77"
    raw = _socket_raw(b"x")
    with pytest.raises(events.DecodeError, match=rf"^socket record of 30 bytes, expected {len(raw)}$"):
        events.decode(raw[:30])
    with pytest.raises(events.DecodeError, match=r"^record of 19 bytes is shorter than its header$"):
        events.decode(memoryview(raw)[:19])


def _random_stream(rnd, n: int, ep_ids: dict[int, str]) -> list[dict]:
    """Records of a few fake processes (pids above any pid_max, so nothing
    is read from /proc): forks, execs with and without an env marker, exits,
    cgroup moves and many socket-like records."""
    pids = [9_000_001]
    cgs = list(ep_ids) + [555, 556]
    out = []
    for i in range(n):
        pid = rnd.choice(pids)
        cg = rnd.choice(cgs)
        base = {"ts": 1000.0 + i, "ktime": i, "pid": pid, "tid": pid, "uid": 0, "comm": rnd.choice(["a", "b", ""]),
                "cgroup": cg if rnd.random() < 0.1 else None}
        x = rnd.random()
        if x < 0.06:
            child = 9_000_001 + len(pids)
            pids.append(child)
            out.append({**base, "type": "fork", "child_pid": child})
        elif x < 0.12:
            out.append({**base, "type": "exec", "argv": ["x"], "filename": "/bin/x", "old_pid": pid,
                        "env_episode": rnd.choice([None, None, "env-ep"])})
        elif x < 0.15 and len(pids) > 1:
            out.append({**base, "type": "exit", "code": 0, "signal": None})
            pids.remove(pid)
        else:
            t = rnd.choice(["socket", "connect", "bind", "memfd", "gpu_open", "protocol", "deny"])
            r = {**base, "type": t}
            r["cgroup"] = rnd.choice([cg, None]) if rnd.random() < 0.2 else None
            if t == "socket":
                r.update(result=rnd.choice([-1, 3, 4, 5]), sock_type=rnd.choice(["stream", "dgram"]))
            elif t in ("connect", "bind"):
                r.update(fd=rnd.choice([3, 4, 5, 9]), result=0)
            out.append(r)
    return out


def _replay(monkeypatch, tmp_path: Path, stream: list[dict], fast: bool, ep_ids: dict[int, str]):
    import copy

    from episode_tracer import episodes

    monkeypatch.setattr(episodes, "_FAST_TYPES", episodes._FAST_TYPES if fast else frozenset())
    tr = episodes.Tracker(tmp_path, live=True)
    for cg, ep in ep_ids.items():
        tr.cgroups.by_cgroup[cg] = ep
    from episode_tracer.proctable import Proc

    tr.table.procs[9_000_001] = Proc(pid=9_000_001, ppid=1, cgroup=555)
    got = []
    for rec in copy.deepcopy(stream):
        # the cgroup of a record is the process's current one (what the kernel reports)
        p = tr.table.get(rec["pid"])
        if rec["cgroup"] is None:
            rec["cgroup"] = p.cgroup if p is not None and p.cgroup is not None else 555
        got.append(tr.observe(rec))
    procs = {pid: (p.episode, p.membership, p.comm, dict(p.sock_types)) for pid, p in tr.table.procs.items()}
    return got, procs, {e.id: (e.source, e.ended) for e in tr.episodes.values()}


@pytest.mark.parametrize("seed", range(6))
def test_settled_fast_path_matches_the_general_path(monkeypatch, tmp_path: Path, seed: int) -> None:
    import random

    ep_ids = {777: "cg-ep", 778: "cg-ep"}
    stream = _random_stream(random.Random(seed), 3000, ep_ids)
    slow = _replay(monkeypatch, tmp_path, stream, False, ep_ids)
    fast = _replay(monkeypatch, tmp_path, stream, True, ep_ids)
    assert fast == slow
    # the stream exercised memberships of every kind
    mems = {r.get("membership") for recs in slow[0] for r in recs}
    assert {"cgroup", "env", "lineage", None} <= mems
