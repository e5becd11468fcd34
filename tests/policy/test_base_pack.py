"""episode_tracer/policies/base.toml: the shared ssh macros behave as documented."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from episode_tracer import paths

from .helpers import load_ok, write

PACK = """
[[rule]]
name = "ssh-reverse-tunnel"
severity = "high"
on = "exec"
action = "kill"
match = { macro = "ssh_remote_forward" }

[[rule]]
name = "ssh-forward-option"
severity = "high"
on = "exec"
action = "kill"
match = { macro = "ssh_forward_option" }

[[rule]]
name = "ssh-local-forward"
severity = "medium"
on = "exec"
action = "alert"
match = { macro = "ssh_local_forward" }
"""


@pytest.mark.parametrize(
    "argv,rules",
    [
        (["ssh", "-NR", "8080:localhost:22", "host"], ["ssh-reverse-tunnel"]),
        (["ssh", "-R8080:x:22", "host"], ["ssh-reverse-tunnel"]),
        (["ssh", "host", "-R", "8080:x:22"], ["ssh-reverse-tunnel"]),
        (["ssh", "-o", "RemoteForward=8080 x:22", "host"], ["ssh-forward-option"]),
        (["ssh", "-oRemoteForward=8080 x:22", "host"], ["ssh-forward-option"]),
        (["ssh", "-fND", "1080", "host"], ["ssh-local-forward"]),
        (["ssh", "-p", "22", "host"], []),
        (["ssh", "host", "ls", "-R"], []),
        (["ssh", "host", "ssh", "-R", "1:x:2", "other"], []),  # the remote command's own ssh
    ],
)
def test_base_ssh_macros(tmp_path: Path, argv: list[str], rules: list[str]) -> None:
    shutil.copy(paths.POLICY_DIR / "base.toml", tmp_path / "00-base.toml")
    write(tmp_path, "10-pack.toml", PACK)
    policy = load_ok(tmp_path)
    event = {"type": "exec", "episode": "e", "pid": 1, "exe": "/usr/bin/ssh", "argv": argv}
    assert [v.rule for v in policy.evaluate(event)] == rules
