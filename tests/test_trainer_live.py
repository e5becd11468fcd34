"""The trainer API without root (issue 13): a throwaway unprivileged user
in the trainer group runs an episode through the control socket (its child
is placed in the episode's cgroup by the tracer, started by the exec helper
without preexec_fn), lists only its own episodes, reads its verdicts, and
may not take a snapshot, list --all, or end an episode that is not its own;
a user outside the group is refused. run_episode as root starts the command
already inside its cgroup, from a thread."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from at_testlib import wait_for

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def users():
    """Two throwaway users: a trainer (in a new group) and an outsider; removed after."""
    tag = uuid.uuid4().hex[:6]
    made: list[str] = []
    group = f"attg{tag}"
    try:
        subprocess.run(["groupadd", group], check=True)
        for name, extra in ((f"attr{tag}", ["-G", group]), (f"atto{tag}", [])):
            subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", *extra, name], check=True)
            made.append(name)
        yield group, made[0], made[1]
    finally:
        for u in made:
            subprocess.run(["userdel", u], check=False)
        subprocess.run(["groupdel", group], check=False)


def as_user(user: str, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={subprocess.check_output(['id', '-g', user]).decode().strip()}",
                           "--init-groups", sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/", env={"PATH": "/usr/bin:/bin",
                                                                                         "PYTHONPATH": str(ROOT)})


TRAINER = r"""
import json, sys
from episode_tracer.api import run_episode
from episode_tracer.control import ControlClient, ControlError
sock, ep, other = sys.argv[1:4]
out = {}
r = run_episode(ep, ["/bin/sh", "-c", "echo hello >/dev/null; exit 3"], control_socket=sock)
out["exit"] = r.exit_code
out["killed"] = r.killed_by_policy
c = ControlClient(sock)
out["list"] = [e["id"] for e in c.command("list")["episodes"]]
out["list_all"] = c.command("list", all=True)
out["kill_other"] = c.command("kill", id=other)
out["verdicts_other"] = c.request({"op": "episode_verdicts", "id": other})
try:
    c.snapshot()
    out["snapshot"] = "allowed"
except ControlError as e:
    out["snapshot"] = type(e).__name__
print(json.dumps(out))
"""

OUTSIDER = r"""
import sys
from episode_tracer.control import ControlClient, ControlError
try:
    print(ControlClient(sys.argv[1]).command("list"))
except ControlError as e:
    print(type(e).__name__, e)
"""


def test_trainer_without_root(live_tracer, users):
    from episode_tracer import cgroups
    from episode_tracer.service import _make_state, control_server
    from episode_tracer.episode_ops import apply_episode_command

    group, trainer, outsider = users
    base = Path(tempfile.mkdtemp(prefix="at-trainer-", dir="/tmp"))
    os.chmod(base, 0o711)
    sock = base / "run" / "control.sock"
    tag = uuid.uuid4().hex[:6]
    mine, other = f"trn-{tag}", f"root-{tag}"
    other_cg = cgroups.cgroup2_mount() / "agent-tracer" / other
    srv = sleeper = None
    try:
        t = live_tracer(trainer_group=group, verdict_dir=base / "verdicts", control_socket=sock).start()
        state = _make_state(t.rt)
        t.rt.add_observer(state.observe)
        srv = control_server(t.rt, state.snapshot, lambda c, a: apply_episode_command(t.rt, state, c, a), None)
        srv.start()
        other_cg.mkdir(parents=True)
        sleeper = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {other_cg}/cgroup.procs; exec sleep 60"])
        assert wait_for(lambda: (lambda e: e is not None and e.kernel)(t.rt.tracker.episodes.get(other)), timeout=30)
        p = as_user(trainer, TRAINER, str(sock), mine, other)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["exit"] == 3 and out["killed"] is False
        assert out["list"] == [mine]  # its own episode, not root's
        assert out["list_all"]["ok"] is False and "list --all is for root" in out["list_all"]["error"]
        assert out["kill_other"]["ok"] is False and "permission denied" in out["kill_other"]["error"]
        assert out["verdicts_other"]["ok"] is False and "permission denied" in out["verdicts_other"]["error"]
        assert out["snapshot"] == "ControlPermissionError"
        assert sleeper.poll() is None  # root's episode still runs
        # the tracer saw the episode, its command exec'd inside the cgroup
        start = t.wait(type="episode_start", episode=mine, timeout=30)
        assert start and start[0]["source"] == "cgroup"
        assert t.wait(type="exec", episode=mine, timeout=30, filename=lambda f: f and f.endswith("sh"))
        assert not (cgroups.cgroup2_mount() / "agent-tracer" / mine).exists()  # closed: removed
        q = as_user(outsider, OUTSIDER, str(sock))
        assert "ControlPermissionError" in q.stdout and "root-only" in q.stdout, (q.stdout, q.stderr)
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        if srv is not None:
            srv.close()
        for ep in (mine, other):
            try:
                cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / ep)
            except Exception:
                pass
        shutil.rmtree(base, ignore_errors=True)


def test_run_episode_starts_inside_its_cgroup_from_a_thread(tmp_path):
    from episode_tracer.api import run_episode

    ep = f"helper-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "cg"
    res: dict = {}
    th = threading.Thread(target=lambda: res.update(r=run_episode(
        ep, ["/bin/sh", "-c", f"cat /proc/self/cgroup > {out}"], control_socket=None, verdict_dir=tmp_path)))
    th.start()
    th.join(60)
    assert res["r"].exit_code == 0
    assert f"/agent-tracer/{ep}" in out.read_text()
    with pytest.raises(Exception, match="command not found: no-such-cmd-xyz"):
        run_episode(ep, ["no-such-cmd-xyz"], control_socket=None, verdict_dir=tmp_path)
