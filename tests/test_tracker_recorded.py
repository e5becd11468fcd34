"""Decoding, process table and episode resolution from recorded data (no
root): the same pipeline the live tracer runs."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from episode_tracer import events
from episode_tracer.episodes import Tracker, check_episode_id
from episode_tracer.pipeline import Pipeline
from episode_tracer.sinks import MemorySink, read_jsonl

DATA = Path(__file__).parent / "data"


def _run(path):
    sink = MemorySink()
    Pipeline(Tracker(live=False), [sink]).run_records(read_jsonl(path))
    return sink.records


def test_env_marker_lineage_and_episode_lifecycle():
    recs = _run(DATA / "lineage.jsonl")
    types = [r["type"] for r in recs]
    assert types[0] == "episode_start" and recs[0]["episode"] == "ep-env" and recs[0]["source"] == "env"
    by = {(r["type"], r.get("pid")): r for r in recs}
    assert by[("exec", 100)]["membership"] == "env"
    # the child's new image has no marker: it stays in by lineage
    assert by[("exec", 101)]["episode"] == "ep-env" and by[("exec", 101)]["membership"] == "lineage"
    # the grandchild outlives its parent (reparented): still in the episode
    c = by[("connect", 102)]
    assert c["episode"] == "ep-env" and c["ppid"] == 101 and c["exe"] == "/usr/bin/true"
    assert by[("exec", 200)]["episode"] is None
    end = [r for r in recs if r["type"] == "episode_end"]
    assert len(end) == 1 and end[0]["episode"] == "ep-env" and types[-1] == "episode_end"


def test_process_table_ancestry_and_reap():
    tr = Tracker(live=False)
    for r in read_jsonl(DATA / "lineage.jsonl"):
        tr.observe(r)
    assert [p.pid for p in tr.table.ancestors(102)] == [101, 100]
    assert tr.ancestors_exe(102) == ["/usr/bin/true", "/bin/sh"]
    assert tr.table.reap(now_mono=1e12) and tr.table.get(100) is None


def _pack(kind, **fields):
    lay = events.LAYOUTS[kind]
    vals = []
    for name, fmt in lay.fields:
        v = fields.get(name, kind if name == "h.kind" else (b"" if fmt.endswith("s") else 0))
        if fmt.endswith("Q") and fmt[0].isdigit():
            vals.extend(v or [0] * int(fmt[:-1]))
        else:
            vals.append(v)
    return struct.pack(lay.fmt, *vals)


def test_decode_exec_packed_argv():
    raw = _pack(events.Kind.EXEC, **{"h.pid": 7, "h.tid": 7, "h.comm": b"ssh", "flags": events.EXEC_ARGV_TRUNCATED | events.EXEC_ENV_MARKER,
                                     "argc": 3, "args_len": 17, "filename": b"/usr/bin/ssh", "episode": b"ep-1",
                                     "args": b"ssh\0-R\0host:22\0\0\0"})
    r = events.decode(raw)
    assert r["type"] == "exec" and r["pid"] == 7 and r["comm"] == "ssh"
    assert r["argv"] == ["ssh", "-R", "host:22"] and r["argv_truncated"] is True
    assert r["env_episode"] == "ep-1" and r["filename"] == "/usr/bin/ssh"


def test_decode_connect_v4_v6_unix():
    import socket
    v4 = struct.pack("<H", socket.AF_INET) + (2222).to_bytes(2, "big") + bytes([10, 0, 0, 9])
    r = events.decode(_pack(events.Kind.CONNECT, fd=3, result=-1, addrlen=16, addr=v4))
    assert (r["family"], r["addr"], r["port"], r["result"]) == ("inet", "10.0.0.9", 2222, -1)
    v6 = struct.pack("<H", socket.AF_INET6) + (443).to_bytes(2, "big") + b"\0" * 4 + socket.inet_pton(socket.AF_INET6, "fd00::2")
    r = events.decode(_pack(events.Kind.CONNECT, addrlen=28, addr=v6))
    assert (r["family"], r["addr"], r["port"]) == ("inet6", "fd00::2", 443)
    un = struct.pack("<H", socket.AF_UNIX) + b"/run/x.sock\0"
    r = events.decode(_pack(events.Kind.CONNECT, addrlen=14, addr=un))
    assert (r["family"], r["path"]) == ("unix", "/run/x.sock")


def test_decode_rejects_garbage():
    with pytest.raises(events.DecodeError, match="shorter than its header"):
        events.decode(b"\0" * 8)
    with pytest.raises(events.DecodeError, match="unknown event kind 99"):
        events.decode(b"\0" * 16 + struct.pack("<I", 99) + b"\0" * 40)


def test_episode_id_validation():
    assert check_episode_id("rollout-17.a:b") == "rollout-17.a:b"
    with pytest.raises(ValueError, match="invalid episode id '../x'"):
        check_episode_id("../x")


def test_sweep_drops_gone_processes_outside_episodes_only():
    """Outside episodes the kernel reports no exits (no --all): entries whose
    /proc is gone are swept; live ones and episode members are kept."""
    from episode_tracer.proctable import Proc, ProcessTable

    gone = 4_194_304 + 7  # above the largest pid_max: never a live process
    t = ProcessTable()
    t.procs[gone] = Proc(pid=gone)
    t.procs[gone + 1] = Proc(pid=gone + 1, episode="ep", membership="cgroup")
    t.procs[os.getpid()] = Proc(pid=os.getpid())
    assert t.sweep_outside() == [gone]
    assert set(t.procs) == {gone + 1, os.getpid()}
