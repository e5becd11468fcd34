"""The per-event fast paths (docs/benchmarks.md, issue 7 follow-up) keep the
behaviour of the slow paths they short-cut. No root needed."""
from __future__ import annotations

import os
from pathlib import Path

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
