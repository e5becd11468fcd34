"""The per-event fast paths (docs/benchmarks.md, issue 7 follow-up) keep the
behaviour of the slow paths they short-cut. No root needed."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from tracer.episodes import CgroupRegistry


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
    from tracer import events

    lay = events.LAYOUTS[events.Kind.SOCKET]
    return struct.pack(lay.fmt, 5, 6, int(events.Kind.SOCKET), 7, 8, 0, comm, family, 1 | 0o4000, 6, 3)


def test_decode_builds_the_whole_record_in_one_pass() -> None:
    from tracer import events

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
