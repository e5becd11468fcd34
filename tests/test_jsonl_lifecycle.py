"""JSONL lifecycle without root: node on every line, size rotation with a
kept-file count, reopen after a move, verdict-file retention. (Rotation
under live load: test_service_live.py; SIGUSR1 in a running tracer:
test_systemd.py.)"""
from __future__ import annotations

import json
import os
import time

from episode_tracer.sinks import JsonlSink, VerdictSink


def lines(p):
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_every_line_carries_node_without_touching_the_record(tmp_path):
    s = JsonlSink(tmp_path / "a.jsonl", node="gpu-7")
    rec = {"type": "exec", "ts": 1.0, "episode": "e", "argv": ["x"]}
    s.write(rec)
    s.write({"type": "ready", "ts": 2.0, "episode": None, "node": "gpu-7", "schema": 1})
    s.close()
    got = lines(tmp_path / "a.jsonl")
    assert got[0] == {"node": "gpu-7", **rec} and "node" not in rec
    assert got[1]["node"] == "gpu-7" and list(got[1]).count("node") == 1
    assert (tmp_path / "a.jsonl").read_text().count('"node"') == 2  # no duplicate key


def test_rotation_keeps_n_files_and_every_record_of_them(tmp_path):
    p = tmp_path / "ev.jsonl"
    s = JsonlSink(p, max_bytes=1000, keep=3, node="n")
    for i in range(100):
        s.write({"type": "stats", "ts": float(i), "episode": None, "i": i})
    s.close()
    files = [p.with_name(f"ev.jsonl.{k}") for k in (3, 2, 1)] + [p]
    assert not p.with_name("ev.jsonl.4").exists() and s.rotations > 3
    got = [r["i"] for f in files for r in lines(f)]
    assert got == list(range(got[0], 100))  # contiguous, newest last, nothing lost inside the kept files
    assert all(f.stat().st_size < 1000 + 100 for f in files[:-1])


def test_reopen_after_a_move(tmp_path):
    p = tmp_path / "ev.jsonl"
    s = JsonlSink(p, node="n")
    s.write({"type": "a", "ts": 1.0, "episode": None})
    os.rename(p, tmp_path / "moved")
    s.write({"type": "b", "ts": 2.0, "episode": None})  # still the moved file: logrotate's window
    s.request_reopen()
    s.write({"type": "c", "ts": 3.0, "episode": None})
    s.close()
    assert [r["type"] for r in lines(tmp_path / "moved")] == ["a", "b"]
    assert [r["type"] for r in lines(p)] == ["c"]
    assert s.reopens == 1


def test_verdict_retention(tmp_path):
    s = VerdictSink(tmp_path / "v", retention=3600)
    for ep in ("old", "running-old", "new"):
        s.write({"type": "alert", "ts": 1.0, "episode": ep, "rule": "r"})
    (tmp_path / "v" / "notes.txt").write_text("not ours")
    old = time.time() - 7200
    for ep in ("old", "running-old"):
        os.utime(tmp_path / "v" / f"{ep}.jsonl", (old, old))
    assert s.prune(running={"running-old"}) == ["old"]
    assert sorted(x.name for x in (tmp_path / "v").iterdir()) == ["new.jsonl", "notes.txt", "running-old.jsonl"]
    assert VerdictSink(tmp_path / "v", retention=0).prune() == []  # 0: kept forever


def test_a_fifo_target_works_and_is_never_rotated(tmp_path):
    """`run --log FIFO` (the benchmark reads its tracer's log this way)."""
    import threading

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    s = JsonlSink(fifo, max_bytes=10, node="n")
    for i in range(5):
        s.write({"type": "stats", "ts": float(i), "episode": None})
    s.close()
    reader.join(timeout=30)
    assert [json.loads(x)["ts"] for x in got[0].splitlines()] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert s.rotations == 0
