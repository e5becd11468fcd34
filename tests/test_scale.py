"""Scale without root: episode identities (slots), episode lifecycle in
stream order (cgroup_mkdir / cgroup_rmdir records, the scan's grace),
bounded memory in the number of ended episodes, retention of the live view,
and what `episode run` imports."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from episode_tracer import episodes as episodes_mod
from episode_tracer import slots
from episode_tracer.episodes import CgroupRegistry, Tracker
from episode_tracer.events import EPISODES_MAX, SLOT_CANARY
from episode_tracer.state import State

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ slots
def test_slots_recycle_with_a_new_generation_least_recently_freed_first():
    t = slots.SlotTable(capacity=3)
    a, b, c = t.take("a"), t.take("b"), t.take("c")
    assert [slots.index_of(x) for x in (a, b, c)] == [1, 2, 3]
    assert {slots.generation_of(x) for x in (a, b, c)} == {0}
    t.give_back(b)
    t.give_back(a)
    d = t.take("d")
    assert slots.index_of(d) == 2 and slots.generation_of(d) == 1 and d != b
    e = t.take("e")
    assert slots.index_of(e) == 1 and slots.generation_of(e) == 1
    t.give_back(12345678)  # not handed out: nothing happens
    assert len(t) == 3


def test_slots_at_capacity_refuse_with_the_limit_named():
    t = slots.SlotTable(capacity=2)
    t.take("a")
    t.take("b")
    with pytest.raises(slots.SlotsExhausted, match=r"'c' refused.*runs 2 episodes.*--max-episodes 2"):
        t.take("c")
    assert t.stats()["refused_total"] == 1


@pytest.mark.parametrize("bad", [0, -1, EPISODES_MAX + 1, "10"])
def test_slots_capacity_is_checked(bad):
    with pytest.raises(ValueError, match="max_episodes must be 1..8190"):
        slots.SlotTable(capacity=bad)


def test_generation_wrap_sweeps_the_index_before_a_value_comes_round_again():
    swept: list[int] = []
    t = slots.SlotTable(capacity=2, start_gen=slots.GEN_COUNT - 3, on_wrap=swept.append)
    seen: dict[int, list[int]] = {1: [], 2: []}
    for i in range(2 * slots.GEN_COUNT + 10):
        x = t.take(f"e{i}")
        seen[slots.index_of(x)].append(x)
        t.give_back(x)
        assert x != SLOT_CANARY and slots.index_of(x) in (1, 2)
    for idx, got in seen.items():
        # GEN_COUNT consecutive uses of one index never repeat an identity
        for k in range(len(got) - slots.GEN_COUNT + 1):
            assert len(set(got[k:k + slots.GEN_COUNT])) == slots.GEN_COUNT
        # the generation crossed the top right after the injected start
        gens = [slots.generation_of(x) for x in got]
        assert gens[:4] == [slots.GEN_COUNT - 3, slots.GEN_COUNT - 2, slots.GEN_COUNT - 1, 0]
    # each index swept exactly when its generations came round (use GEN_COUNT)
    assert sorted(swept) == [1, 2] and t.wraps == 2


def test_the_canary_identity_is_outside_every_episode_index():
    assert slots.index_of(SLOT_CANARY) > EPISODES_MAX
    t = slots.SlotTable(capacity=EPISODES_MAX)
    got = {t.take(str(i)) for i in range(EPISODES_MAX)}
    assert SLOT_CANARY not in got and max(slots.index_of(x) for x in got) == EPISODES_MAX


# ------------------------------------------------- lifecycle, stream order
def _tracker(tmp_path, **kw) -> Tracker:
    tr = Tracker(live=False, **kw)
    root = tmp_path / "agent-tracer"
    root.mkdir()
    reg = CgroupRegistry(root)
    reg.kernel_prefix = "/agent-tracer/"
    tr.cgroups = reg
    return tr


def _cg(kind, cg_id, ep, sub=""):
    return {"type": f"cgroup_{kind}", "ts": 1.0, "cgroup_id": cg_id, "path": f"/agent-tracer/{ep}{sub}",
            "level": 2, "pid": 1, "cgroup": 1}


def _rec(t, pid, cg, **kw):
    return {"type": t, "ts": 2.0, "pid": pid, "tid": pid, "cgroup": cg, "episode": None, **kw}


def test_a_scan_that_finds_the_directory_gone_does_not_end_the_episode_its_rmdir_does(tmp_path):
    tr = _tracker(tmp_path)
    out = tr.observe(_cg("mkdir", 11, "e1"))
    assert [r["type"] for r in out] == ["episode_start"] and out[0]["slot"] == slots.identity(1, 0)
    tr.observe(_rec("exec", 100, 11, argv=["x"]))
    # the directory is already gone (a short episode) while its records queue
    assert tr.scan_cgroups(3.0) == []
    got = tr.observe(_rec("connect", 100, 11, fd=3, result=0))
    assert got[-1]["episode"] == "e1" and got[-1]["membership"] == "cgroup"
    tr.observe(_rec("exit", 100, 11))
    tr.observe(_cg("mkdir", 12, "e1", "/sub"))
    assert tr.observe(_cg("rmdir", 12, "e1", "/sub")) == []  # a nested cgroup does not end it
    end = tr.observe(_cg("rmdir", 11, "e1"))
    assert [r["type"] for r in end] == ["episode_end"] and end[0]["episode"] == "e1"
    assert tr.observe(_cg("rmdir", 11, "e1")) == []  # once
    assert len(tr.slots) == 0 and 11 not in tr.cgroups.by_cgroup


def test_the_scan_removes_after_its_grace_when_the_rmdir_record_was_lost(tmp_path, monkeypatch):
    tr = _tracker(tmp_path)
    tr.observe(_cg("mkdir", 21, "e2"))
    clock = [100.0]
    monkeypatch.setattr(episodes_mod.time, "monotonic", lambda: clock[0])
    assert tr.scan_cgroups(1.0) == []
    clock[0] += episodes_mod.SCAN_REMOVE_GRACE_S + 0.1
    ends = tr.scan_cgroups(2.0)
    assert [(r["type"], r["episode"]) for r in ends] == [("episode_end", "e2")]


def test_at_the_limit_a_new_episode_is_refused_and_its_records_stay_its_own(tmp_path):
    tr = _tracker(tmp_path, max_episodes=1)
    assert tr.observe(_cg("mkdir", 31, "a"))[0]["type"] == "episode_start"
    ref = tr.observe(_cg("mkdir", 32, "b"))
    assert [r["type"] for r in ref] == ["episode_refused"] and "--max-episodes 1" in ref[0]["reason"]
    got = tr.observe(_rec("exec", 200, 32, argv=["y"]))
    assert [r["type"] for r in got] == ["exec"] and got[0]["episode"] == "b"  # attributed, never another's
    assert "b" not in tr.episodes
    tr.observe(_cg("rmdir", 31, "a"))
    tr.observe(_cg("rmdir", 32, "b"))
    assert "b" not in tr.refused
    st = tr.observe(_cg("mkdir", 33, "c"))
    assert st[0]["type"] == "episode_start" and st[0]["slot"] == slots.identity(1, 1)


def test_tracker_memory_is_flat_in_ended_episodes(tmp_path, monkeypatch):
    monkeypatch.setattr(episodes_mod, "ENDED_FORGET_S", 0.0)
    tr = _tracker(tmp_path, max_episodes=64)

    def run(n0, n):
        for i in range(n0, n0 + n):
            cg, pid = 1000 + i, 10_000 + i
            for r in (_cg("mkdir", cg, f"ep-{i}"), _rec("exec", pid, cg, argv=["t"]),
                      _rec("connect", pid, cg, fd=3, result=0), _rec("exit", pid, cg), _cg("rmdir", cg, f"ep-{i}")):
                tr.observe(r)
            if i % 100 == 0:
                tr.reap()
                tr.table.reap(1e18)
        tr.reap()
        tr.table.reap(1e18)

    tracemalloc.start()
    try:
        run(0, 3000)  # warm: every identity used, caches at their bounds
        base = tracemalloc.take_snapshot()
        run(3000, 4000)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    finally:
        tracemalloc.stop()
    assert len(tr.episodes) == 0 and len(tr.cgroups.by_cgroup) == 0 and len(tr.slots) == 0
    assert grown < 64 * 1024, grown  # 4,000 more ended episodes: no growth beyond caches


# -------------------------------------------------------------- retention
def _feed(st, n0, n):
    for i in range(n0, n0 + n):
        ep = f"r-{i}"
        st.observe({"type": "episode_start", "ts": 1000.0 + i, "episode": ep, "source": "cgroup", "root_pid": 5})
        st.observe({"type": "exec", "ts": 1000.0 + i, "episode": ep, "pid": 5, "tid": 5})
        st.observe({"type": "episode_end", "ts": 1000.5 + i, "episode": ep, "reason": "removed"})


def test_retention_bounds_the_view_and_counts_what_it_dropped():
    st = State(node="n", mode="enforce", policy_version="v", started=0.0, scope="episodes",
               ended_keep=50, ended_keep_s=1e9)
    _feed(st, 0, 1000)
    snap = st.snapshot(now=5000.0)
    assert len(snap["episodes"]) == 50
    assert {e["id"] for e in snap["episodes"]} == {f"r-{i}" for i in range(950, 1000)}  # the most recent
    assert snap["retention"] == {"keep": 50, "keep_s": 1e9, "dropped": 950}
    tracemalloc.start()
    try:
        _feed(st, 1000, 2000)  # warm: the memory of pruned ids is at its bound
        st.snapshot(now=9000.0)
        base = tracemalloc.take_snapshot()
        _feed(st, 3000, 4000)
        st.snapshot(now=9000.0)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown
    assert len(st.episode_ids()) <= 2 * 50


def test_retention_by_age():
    st = State(node="n", mode="enforce", policy_version="v", started=0.0, scope="episodes",
               ended_keep=1000, ended_keep_s=10.0)
    _feed(st, 0, 100)
    snap = st.snapshot(now=1000.5 + 99 + 5)  # the last 5 s of ends are within the age
    assert len(snap["episodes"]) == 6 and snap["retention"]["dropped"] == 94


@pytest.mark.parametrize("kw,msg", [({"ended_keep": -1}, "ended_keep"), ({"ended_keep_s": -2.0}, "ended_keep_s")])
def test_retention_options_are_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        State(node="n", mode="enforce", policy_version="v", started=0.0, scope="episodes", **kw)


def test_episode_list_says_how_many_were_dropped_from_view(tmp_path):
    from episode_tracer.control import ControlServer
    from episode_tracer.episode_ops import apply_episode_command

    st = State(node="n", mode="enforce", policy_version="v", started=0.0, scope="episodes",
               ended_keep=20, ended_keep_s=1e12)
    _feed(st, 0, 300)
    sock = tmp_path / "c.sock"
    srv = ControlServer(sock, st.snapshot, lambda cmd, args: apply_episode_command(None, st, cmd, args)).start()
    try:
        env = {**os.environ, "AGENT_TRACER_SOCKET": str(sock)}
        cli = [str(ROOT / ".venv/bin/agent-tracer")] if (ROOT / ".venv/bin/agent-tracer").exists() else \
            [sys.executable, "-m", "episode_tracer.cli"]
        p = subprocess.run(cli + ["episode", "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        import json

        rows = json.loads(p.stdout)
        assert len(rows) == 20
        assert "280 ended episodes dropped from view" in p.stderr
        p = subprocess.run(cli + ["episode", "list"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "280 ended episodes dropped from view" in p.stdout
    finally:
        srv.close()


# ---------------------------------------------------------------- imports
HEAVY = ("episode_tracer.bench", "episode_tracer.dashboard", "episode_tracer.policy", "episode_tracer.engine", "episode_tracer.probes", "episode_tracer.runtime",
         "episode_tracer.control", "episode_tracer.episodes", "episode_tracer.events", "rich", "bcc", "logging")

IMPORTS = f"""
import sys
import episode_tracer.api as api
class R:
    killed_by_policy = False
    cli_exit_code = 0
api.run_episode = lambda *a, **k: R()
from episode_tracer.cli import main
try:
    main(["episode", "run", "--id", "x", "--", "/bin/true"])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = {HEAVY!r}
print(sorted(m for m in sys.modules if m.startswith(heavy)))
"""


def test_episode_run_imports_only_what_it_needs():
    p = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_the_lazy_commands_are_still_there():
    from click.testing import CliRunner

    from episode_tracer.cli import main

    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for name in ("bench", "policy", "top", "episode", "run", "doctor", "replay"):
        assert name in res.output
    assert CliRunner().invoke(main, ["policy", "--help"]).exit_code == 0


ENTRY_IMPORTS = f"""
import sys
import episode_tracer.api as api
class R:
    killed_by_policy = False
    cli_exit_code = 0
seen = []
api.run_episode = lambda *a, **k: seen.append((a, k)) or R()
from episode_tracer.entry import main
sys.argv = ["agent-tracer", "episode", "run", "--id", "x", "--timeout", "5", "--", "/bin/true", "-v"]
try:
    main()
except SystemExit as e:
    assert e.code == 0, e.code
assert seen and seen[0][0] == ("x", ["/bin/true", "-v"]) and seen[0][1]["timeout"] == 5.0, seen
heavy = {HEAVY + ("click", "dataclasses", "orjson")!r}
print(sorted(m for m in sys.modules if m.startswith(heavy)))
"""


def test_the_console_script_starts_an_episode_without_click():
    p = subprocess.run([sys.executable, "-c", ENTRY_IMPORTS], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@pytest.mark.parametrize("args,want", [
    (["--id", "x", "--", "/bin/true"], {"episode_id": "x", "command": ["/bin/true"]}),
    (["--id=x", "--timeout", "2.5", "--gpu", "--keep-stragglers", "ls", "-l"],
     {"episode_id": "x", "timeout": 2.5, "gpu": True, "keep_stragglers": True, "command": ["ls", "-l"]}),
    (["--verdict-file", "/tmp/v.json", "--id", "y", "sh", "--", "-c"],
     {"episode_id": "y", "verdict_file": "/tmp/v.json", "command": ["sh", "--", "-c"]}),
    (["--help"], None), (["-h", "--id", "x", "true"], None), (["--id", "x"], None), (["--", "true"], None),
    (["--bogus", "--id", "x", "true"], None), (["--timeout", "soon", "--id", "x", "true"], None), (["--id"], None),
])
def test_the_fast_parser_takes_exactly_what_click_would_or_leaves_it_to_click(args, want):
    from episode_tracer.entry import parse_episode_run

    got = parse_episode_run(args)
    if want is None:
        assert got is None
    else:
        assert {k: got[k] for k in want} == want


def test_click_and_the_fast_path_refuse_a_bad_id_alike():
    cli = [str(ROOT / ".venv/bin/agent-tracer")]
    if not Path(cli[0]).exists():
        pytest.skip("the console script is installed by scripts/install.sh")
    fast = subprocess.run(cli + ["episode", "run", "--id", "../x", "--", "/bin/true"], capture_output=True, text=True,
                          timeout=60)
    slow = subprocess.run([sys.executable, "-m", "episode_tracer.cli", "episode", "run", "--id", "../x", "--", "/bin/true"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert fast.returncode == slow.returncode == 1
    assert "invalid episode id '../x'" in fast.stderr and "invalid episode id '../x'" in slow.stderr


def test_bench_scale_slope_and_tables():
    from episode_tracer.bench_scale import scale_tables, slope_per_1000

    assert slope_per_1000([(0, 100.0), (1000, 101.0), (2000, 102.0)]) == pytest.approx(1.0)
    assert slope_per_1000([(0, 5.0), (10_000, 5.0)]) == 0
    assert slope_per_1000([(0, 1.0)]) is None and slope_per_1000([(3, 1.0), (3, 2.0)]) is None
    sc = {"start": {"cli": {"python3 -c pass": {"median_ms": 15.0, "n": 5}, "ratio_to_python3": 4.0,
                            "episodes_per_s": 15.0},
                    "api": {"run_episode_median_ms": 8.0, "subprocess_median_ms": 1.0, "overhead_ms": 7.0,
                            "episodes_per_s": 125.0, "n": 10}},
          "concurrent": [{"episodes": 64, "offered_per_s": 20000, "produced": 1, "drained": 1, "lost": 0,
                          "drain_per_s": 1.0, "gate_hold": {"p50_ms": 1.0, "p99_ms": 2.0, "gated": 3}}],
          "long": {"episodes": 3, "failed": 0, "starts": 3, "ends": 3, "refused": 0, "episodes_per_s": 100.0,
                   "max_episodes": 16, "start_gen": 2040, "identity_wraps": 0, "lost": 0,
                   "rss_mb": [(0, 10.0), (3, 10.5)], "rss_slope_mb_per_1000": 1.0}}
    titles = [t for t, _h, _r in scale_tables(sc)]
    assert len(titles) == 3 and all(t.startswith("Scale:") for t in titles)
