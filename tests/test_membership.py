"""Membership an episode cannot leave, on records (no root): the tracker
keeps an escaped member (and what it starts) in its episode; a member seen
in a cgroup outside its episode without an attach record is an escape too."""
from __future__ import annotations

from episode_tracer.episodes import Episode, Tracker, _fileless
from episode_tracer.proctable import Proc

EP_CG, OUT_CG = 4242, 777


def _tracker(live: bool = False) -> Tracker:
    t = Tracker(None, live=False)
    t.live = live
    t.cgroups.by_cgroup[EP_CG] = "ep-1"
    t.cgroups.kernel_prefix = "/agent-tracer/"
    t.episodes["ep-1"] = Episode("ep-1", "cgroup", 3, "/sys/fs/cgroup/agent-tracer/ep-1", {EP_CG})
    t.table.procs[100] = Proc(pid=100, ppid=1, exe="/usr/bin/python3", cgroup=EP_CG, episode="ep-1",
                              membership="cgroup", argv=["python3", "agent.py"])
    return t


def _escape(pid=100, by=100, dst=OUT_CG, path="/elsewhere", slot=3):
    return {"type": "escape", "ts": 1.0, "pid": pid, "tid": pid, "by_pid": by, "by_cgroup": EP_CG,
            "dst_cgroup": dst, "cgroup": dst, "dst_path": path, "slot": slot, "outside": not path.startswith("/agent-tracer/"),
            "by_other": by != pid, "untracked": False}


def test_escaped_member_keeps_its_episode_and_lineage():
    t = _tracker()
    out = t.observe(_escape())
    assert [r["type"] for r in out] == ["escape"]
    esc = out[0]
    assert esc["episode"] == "ep-1" and esc["membership"] == "escaped" and esc["argv"] == ["python3", "agent.py"]
    # its later records, from the cgroup outside, are still the episode's
    c = t.observe({"type": "connect", "ts": 2.0, "pid": 100, "cgroup": OUT_CG, "addr": "10.0.0.1", "port": 3333})
    assert c[-1]["episode"] == "ep-1" and c[-1]["membership"] == "escaped"
    # and so is what it starts
    t.observe({"type": "fork", "ts": 3.0, "pid": 100, "cgroup": OUT_CG, "child_pid": 101})
    e = t.observe({"type": "exec", "ts": 3.1, "pid": 101, "cgroup": OUT_CG, "argv": ["xmrig"], "filename": "/tmp/x"})
    assert e[-1]["episode"] == "ep-1" and e[-1]["membership"] == "lineage"
    assert [p.pid for p in t.table.members("ep-1")] == [100, 101]  # kill-episode reaches both


def test_move_inside_its_own_episode_is_not_an_escape():
    t = _tracker()
    assert t.observe(_escape(dst=999, path="/agent-tracer/ep-1/workers")) == []
    assert t.cgroups.episode_of(999) == "ep-1"
    r = t.observe({"type": "socket", "ts": 2.0, "pid": 100, "cgroup": 999})
    assert r[-1]["episode"] == "ep-1" and r[-1]["membership"] == "cgroup"


def test_move_into_another_episode_stays_in_the_first():
    t = _tracker()
    t.cgroups.by_cgroup[5151] = "ep-2"
    t.episodes["ep-2"] = Episode("ep-2", "cgroup", 4, None, {5151})
    out = t.observe(_escape(dst=5151, path="/agent-tracer/ep-2"))
    assert out[-1]["episode"] == "ep-1" and out[-1]["dst_episode"] == "ep-2"
    r = t.observe({"type": "socket", "ts": 2.0, "pid": 100, "cgroup": 5151})
    assert r[-1]["episode"] == "ep-1" and r[-1]["membership"] == "escaped"


def test_escape_of_an_unknown_process_takes_the_slots_episode():
    t = _tracker()
    out = t.observe(_escape(pid=300, by=100))
    assert out[-1]["episode"] == "ep-1" and out[-1]["by_other"] is True


def test_member_seen_outside_without_attach_record_is_an_escape():
    """clone3(CLONE_INTO_CGROUP) into another cgroup makes no attach record:
    the first record showing the member outside says it (live only)."""
    t = _tracker(live=True)
    t.table.procs[100].membership = "cgroup"
    out = t.observe({"type": "connect", "ts": 2.0, "pid": 100, "cgroup": OUT_CG, "addr": "10.0.0.1", "port": 1})
    assert [r["type"] for r in out] == ["escape", "connect"]
    assert out[0]["via"] == "cgroup-change" and out[0]["episode"] == "ep-1" and out[0]["slot"] == 3
    assert out[1]["episode"] == "ep-1"
    # said once
    again = t.observe({"type": "connect", "ts": 3.0, "pid": 100, "cgroup": OUT_CG, "addr": "10.0.0.1", "port": 1})
    assert [r["type"] for r in again] == ["connect"]


def test_member_of_an_ended_episode_is_not_escaped():
    t = _tracker(live=True)
    t.episodes["ep-1"].ended = True
    out = t.observe({"type": "connect", "ts": 2.0, "pid": 100, "cgroup": OUT_CG, "addr": "10.0.0.1", "port": 1})
    assert [r["type"] for r in out] == ["connect"] and out[0]["episode"] is None


def test_fileless():
    assert _fileless("/memfd:x (deleted)", "/proc/self/fd/3", exe_known=True)
    assert _fileless("/tmp/x (deleted)", "/tmp/x", exe_known=True)
    assert not _fileless("/usr/bin/true", "/dev/fd/3", exe_known=True)   # fexecve of a file on disk
    assert _fileless("/dev/fd/3", "/dev/fd/3", exe_known=False)         # gone before /proc was read: fail closed
    assert _fileless("/proc/self/fd/5", "/proc/self/fd/5")
    assert not _fileless("/usr/bin/python3", "/usr/bin/python3")


class _Probes:
    def __init__(self):
        self.released = []

    def release_gated(self, pid):
        self.released.append(pid)
        return True


def _engine(gate_default="kill"):
    from episode_tracer.engine import Engine, load_policy_or_raise
    from episode_tracer.paths import POLICY_DIR

    e = Engine(load_policy_or_raise([POLICY_DIR]), [POLICY_DIR], monitor=False, gate_timeout=2.0,
               gate_default=gate_default)
    e.probes = _Probes()
    return e


def test_gated_exec_whose_argv_cannot_be_read_gets_the_gate_default():
    """No syscall-entry record and no /proc/<pid>/cmdline: it cannot be
    judged, so an episode's process is killed (gate default)."""
    import subprocess

    p = subprocess.Popen(["sleep", "30"])
    try:
        e = _engine()
        out = e.process({"type": "exec", "pid": p.pid, "episode": "ep-1", "gated": True, "argv": [],
                         "argv_unreadable": True, "exe": "/usr/bin/sleep"})
        assert [(r["type"], r["verdict"], r["reason"]) for r in out] == [("gate_timeout", "killed", "argv unreadable")]
        assert p.wait(timeout=10) == -9
        assert e.probes.released == [p.pid]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_unreadable_argv_outside_episodes_or_gate_default_allow_continues():
    import signal
    import subprocess

    for ep, default in ((None, "kill"), ("ep-1", "allow")):
        p = subprocess.Popen(["sleep", "30"])
        try:
            e = _engine(default)
            out = e.process({"type": "exec", "pid": p.pid, "episode": ep, "gated": True, "argv": [],
                             "argv_unreadable": True})
            assert out[0]["verdict"] == "allowed"
            assert p.poll() is None  # continued (SIGCONT), not killed
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
