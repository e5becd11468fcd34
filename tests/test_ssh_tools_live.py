"""scp, sftp, rsync -e ssh and git over ssh (issue 19, root): with a site
file that adds one host to `ssh_allowed_hosts`, each works inside an
episode against that host (a real sshd in a network namespace) with no
enforcing alert; the same commands to another address of the same sshd
(not allowed) are stopped as before (outbound-ssh / ssh-port-egress), and
sshd never sees them."""
from __future__ import annotations

import os
import subprocess

import pytest

from at_testlib import LiveTracer, have, run_in_episode, wait_for
from nethost import NetHost
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
ENFORCING = {"deny", "kill", "kill-episode", "freeze-episode"}


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups/netns")
    tmp = tmp_path_factory.mktemp("sshx")
    with NetHost(tmp) as h:
        h.start_sshd(ports=(22,), also_b=True)
        src = tmp / "src"
        src.mkdir()
        (src / "data.txt").write_text("payload\n")
        env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
               "GIT_COMMITTER_EMAIL": "a@b"}
        subprocess.run(["git", "init", "-q", "-b", "main", str(tmp / "r")], check=True, env=env)
        (tmp / "r" / "f").write_text("x\n")
        subprocess.run(["git", "-C", str(tmp / "r"), "add", "f"], check=True, env=env)
        subprocess.run(["git", "-C", str(tmp / "r"), "commit", "-qm", "i"], check=True, env=env)
        subprocess.run(["git", "clone", "-q", "--bare", str(tmp / "r"), str(tmp / "repo.git")], check=True, env=env)
        h.src, h.repo = src, tmp / "repo.git"
        yield h


@pytest.fixture(scope="module")
def tracer(ext, tmp_path_factory):
    site = tmp_path_factory.mktemp("sshx-site") / "90-site.toml"
    site.write_text(f'[[override]]\nlist = "ssh_allowed_hosts"\nappend = ["{ext.addr}", "{ext.addr6}"]\n')
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False).start()
    try:
        yield t
    finally:
        t.stop()


def _commands(ext, host: str, dst: str) -> dict[str, list[str]]:
    o = ext.ssh_opts()
    ssh = "ssh " + " ".join(o)
    return {
        "scp": ["scp", *o, f"root@{host}:{ext.src}/data.txt", f"{dst}/scp.txt"],
        "scp-legacy": ["scp", "-O", *o, f"root@{host}:{ext.src}/data.txt", f"{dst}/scp-O.txt"],
        "sftp": ["sh", "-c", f"echo 'get {ext.src}/data.txt {dst}/sftp.txt' | sftp {' '.join(o)} -b - root@{host}"],
        "rsync-e-ssh": ["rsync", "-a", "-e", ssh, f"root@{host}:{ext.src}/", f"{dst}/rsync/"],
        "git-clone-ssh": ["env", f"GIT_SSH_COMMAND={ssh}", "git", "clone", "-q", f"root@{host}:{ext.repo}",
                          f"{dst}/clone"],
    }


TOOLS = ["scp", "scp-legacy", "sftp", "rsync-e-ssh", "git-clone-ssh"]


@pytest.mark.parametrize("tool", TOOLS)
def test_to_an_allowed_host_works(tracer, ext, episode_id, tmp_path, tool):
    argv = _commands(ext, ext.addr, str(tmp_path))[tool]
    if not have(argv[0] if argv[0] not in ("env", "sh") else argv[2] if argv[0] == "env" else "sftp"):
        pytest.skip(f"{tool}: tool not installed (scripts/install.sh)")
    before = ext.sshd_connections()
    res = run_in_episode(episode_id, argv, timeout=60)
    alerts = tracer.find(type="alert", episode=episode_id)
    assert res.exit_code == 0, (res, [(a["rule"], a["action"]) for a in alerts])
    assert not [a for a in alerts if a["action"] in ENFORCING], [(a["rule"], a.get("argv")) for a in alerts]
    assert ext.sshd_connections() > before
    assert any(tmp_path.rglob("data.txt")) or any(tmp_path.rglob("*.txt")) or (tmp_path / "clone" / "f").exists()
    # the ssh the tool ran was judged (gated and continued), not missed
    assert [r for r in tracer.find(type="exec", episode=episode_id) if (r.get("exe") or "").endswith("/ssh")]


@pytest.mark.parametrize("tool", TOOLS)
def test_to_a_host_not_allowed_is_stopped(tracer, ext, episode_id, tmp_path, tool):
    argv = _commands(ext, ext.addr_b, str(tmp_path))[tool]
    before = ext.sshd_connections()
    res = run_in_episode(episode_id, argv, timeout=60)
    got = wait_for(lambda: [a for a in tracer.find(type="alert", episode=episode_id)
                            if a["rule"] in ("outbound-ssh", "ssh-port-egress") and a["enforced"]], 10)
    assert got, [(a["rule"], a["action"]) for a in tracer.find(type="alert", episode=episode_id)]
    assert res.exit_code != 0 or res.signal is not None
    assert ext.sshd_connections() == before, "sshd saw the connection"
