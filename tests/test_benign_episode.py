"""False positives (root): a realistic agent task in an episode under the
default packs (policies/) raises no alert at all: python scripts, pip
refused cleanly offline, git init/commit/clone from a local repo, curl to
a local HTTP server, a gcc compile and run, a subprocess-heavy test run."""
from __future__ import annotations

import http.server
import os
import sys
import threading
from functools import partial

import pytest

from at_testlib import LiveTracer, have, run_in_episode
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root
PY = sys.executable

TASK = r"""
set -eu
cd "$WORK"
# a python project with a helper script
mkdir -p proj/pkg && cd proj
printf 'def add(a, b):\n    return a + b\n' > pkg/__init__.py
printf 'import pkg, json, socket\nprint(json.dumps({"sum": pkg.add(2, 3), "host": socket.gethostname()}))\n' > run.py
"$PY" run.py > out.json
"$PY" -c 'import json; assert json.load(open("out.json"))["sum"] == 5'
# pip: no network here, refused cleanly
mkdir -p wheels dl
if "$PY" -m pip download --no-index --find-links wheels -d dl --no-deps requests >pip.log 2>&1; then
  echo "pip unexpectedly succeeded"; exit 1
fi
grep -q "No matching distribution" pip.log
# git: init, commit, clone from the local repo, commit in the clone
git init -q -b main repo
cd repo && printf 'hello\n' > README && git add README
git -c user.email=a@b -c user.name=agent commit -qm init && cd ..
git clone -q repo clone
cd clone && printf 'more\n' >> README && git -c user.email=a@b -c user.name=agent commit -qam more && git log --oneline | wc -l | grep -q 2 && cd ..
# curl to the local HTTP server
curl -sf "http://127.0.0.1:$HTTP_PORT/data.json" -o data.json
grep -q '"rows"' data.json
# compile and run a C program
printf '#include <stdio.h>\nint main(void){puts("built");return 0;}\n' > hello.c
gcc -O2 -o hello hello.c && ./hello | grep -q built
# a subprocess-heavy test run
cat > test_many.py <<'EOF'
import subprocess, sys, concurrent.futures as cf
def one(i):
    r = subprocess.run([sys.executable, "-c", f"print({i}*{i})"], capture_output=True, text=True)
    return int(r.stdout)
def main():
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(one, range(40)))
    assert got == [i * i for i in range(40)]
    for cmd in (["ls", "-la"], ["sh", "-c", "echo a | tr a b"], ["grep", "-c", "x", "test_many.py"], ["env"]):
        subprocess.run(cmd, check=False, capture_output=True)
    print("40 passed")
main()
EOF
"$PY" test_many.py | grep -q "40 passed"
echo TASK-OK
"""


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.json").write_text('{"rows": [1, 2, 3]}\n')
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.skipif(not all(have(x) for x in ("git", "gcc", "curl")), reason="needs git, gcc and curl (scripts/install.sh)")
def test_benign_agent_task_raises_no_alert(episode_id, tmp_path, http_server):
    work = tmp_path / "work"
    work.mkdir()
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], monitor=False).start()
    try:
        env = {**os.environ, "WORK": str(work), "PY": PY, "HTTP_PORT": str(http_server)}
        res = run_in_episode(episode_id, ["/bin/bash", "-c", TASK], env=env, timeout=300)
        execs = t.find(type="exec", episode=episode_id)
        alerts = t.find(type="alert", episode=episode_id)
        assert res.exit_code == 0, (res, alerts)
        assert alerts == [], [(a["rule"], a.get("argv"), a.get("addr")) for a in alerts]
        # the task really ran in the episode (the tracer saw it)
        assert len(execs) > 60
        names = {e["exe"].rsplit("/", 1)[-1] for e in execs if e.get("exe")}
        assert {"git", "curl", "bash"} <= names and any(n.startswith("python") for n in names)
    finally:
        t.stop()
