"""Unix deny rules on a kernel without the cgroup unix-connect hook (root):
the hook is left unattached (RunOptions.unix_connect_hook=False, as on a
kernel before 6.7). The rules then alert from the connect record, with
enforced false, and the `ready` record says the hook is absent."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from at_testlib import run_in_episode, wait_for
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable

CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[2])
    r = "ok"
except OSError as e:
    r = str(e.errno)
open(sys.argv[1], "w").write(r)
"""


def test_without_the_hook_unix_rules_alert(live_tracer, tmp_path, episode_id):
    d = Path(f"/tmp/at-nodesvc-nh-{uuid.uuid4().hex[:8]}")
    d.mkdir()
    path = d / "engine.sock"
    site = tmp_path / "90-site.toml"
    site.write_text(f'[[override]]\nlist = "container_engine_sockets"\nappend = ["{path}"]\n')
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(20)
    got = []
    th = threading.Thread(target=lambda: got.append(srv.accept()[0]), daemon=True)
    try:
        t = live_tracer(policy=True, policy_dirs=[POLICY_DIR, site], monitor=False,
                        unix_connect_hook=False).start()
        assert t.ready["hooks"]["unix_connect"].startswith("absent:")
        assert "cgroup:at_connect_unix" not in t.ready["programs"]
        assert t.ready["selftest"]["unix_connect_deny"].startswith("failed:")
        th.start()  # accepts within 20 s from now
        (tmp_path / "c.py").write_text(CLIENT)
        res = run_in_episode(episode_id, [PY, "-S", str(tmp_path / "c.py"), str(tmp_path / "out"), str(path)],
                             timeout=30)
        assert res.exit_code == 0, res
        assert (tmp_path / "out").read_text() == "ok"  # not refused: no hook
        th.join(20)
        assert got, "the listener should have got the connection"
        a = t.expect_alert(episode_id, "container-engine-socket", timeout=10)
        assert a["enforced"] is False and a["detail"] == "not denied in the kernel" and a["path"] == str(path), a
    finally:
        for c in got:
            c.close()
        srv.close()
        path.unlink()
        d.rmdir()
