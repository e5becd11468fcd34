"""The benign corpus (tests/data/benign/*.toml, described in its README):
loading and checking the entries, the services they talk to, and running
them live in episodes. Used by tests/test_benign_corpus.py and
scripts/record-benign.py (which refreshes the recording that replays
without root)."""
from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS_DIR = HERE / "data" / "benign"
RECORDING = CORPUS_DIR / "recording.jsonl"
SITE_FILE = HERE.parent / "docs" / "site-example.toml"
ENFORCING = frozenset({"deny", "kill", "kill-episode", "freeze-episode"})
EPISODE_PREFIX = "benign-"
PY = "/usr/bin/python3"
HTTP_AUTH = ("agent", "s3cret-token-123")
# The corpus measures the policy's verdicts, not how fast a loaded CI
# machine drains: its tracer waits up to 10 s for a gated exec's verdict
# (default 2 s) before the fail-closed default; a gate timeout still fails it.
GATE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Entry:
    id: str
    file: str
    category: str
    run: str
    why: str
    allow: dict[str, str]  # rule -> why it may fire (log/alert level only)
    needs: tuple[str, ...] = ()
    timeout: float = 120.0

    @property
    def episode(self) -> str:
        return EPISODE_PREFIX + self.id


KEYS = {"id", "category", "run", "why", "allow", "needs", "timeout"}
NEEDS = {"ext", "ssh", "tools"}


def load_corpus(root: Path = CORPUS_DIR) -> list[Entry]:
    """Every entry of every corpus file; ValueError naming file, entry and
    key for anything malformed."""
    out: list[Entry] = []
    seen: dict[str, str] = {}
    for f in sorted(root.glob("*.toml")):
        data = tomllib.loads(f.read_text())
        for i, e in enumerate(data.get("entry", []), 1):
            where = f"{f.name}: entry #{i}"
            bad = set(e) - KEYS
            if bad:
                raise ValueError(f"{where}: unknown keys {sorted(bad)}")
            for k in ("id", "run", "why"):
                if not isinstance(e.get(k), str) or not e[k].strip():
                    raise ValueError(f"{where}: {k}: a non-empty string is required")
            if e["id"] in seen:
                raise ValueError(f"{where}: id: {e['id']!r} also in {seen[e['id']]}")
            seen[e["id"]] = f.name
            allow = {}
            for j, a in enumerate(e.get("allow", [])):
                if set(a) != {"rule", "why"} or not all(isinstance(a[k], str) and a[k].strip() for k in a):
                    raise ValueError(f"{where} ({e['id']}): allow[{j}]: needs rule and why (non-empty strings)")
                allow[a["rule"]] = a["why"]
            needs = tuple(e.get("needs", ()))
            if set(needs) - NEEDS:
                raise ValueError(f"{where} ({e['id']}): needs: unknown {sorted(set(needs) - NEEDS)}")
            out.append(Entry(e["id"], f.name, e.get("category", f.stem), e["run"], e["why"], allow, needs,
                             float(e.get("timeout", 120))))
    return out


def judge(entries: list[Entry], alerts: list[dict[str, Any]], enforcing_rules: frozenset[str] | None = None
          ) -> list[str]:
    """Problems with the alerts of the corpus episodes: every enforcing one,
    and every other one the entry does not allow (pure)."""
    by_ep = {e.episode: e for e in entries}
    problems = []
    for a in alerts:
        e = by_ep.get(a.get("episode"))
        if e is None:
            continue
        action = a.get("would") or a.get("action")
        what = f"{e.id} ({e.file}): {a.get('rule')} [{action}] argv={a.get('argv')} addr={a.get('addr')}"
        if action in ENFORCING:
            problems.append("enforcing alert: " + what)
        elif a.get("rule") not in e.allow:
            problems.append("alert not justified in the corpus: " + what)
    return problems


# ------------------------------------------------------------------ services

class _Http(http.server.SimpleHTTPRequestHandler):
    """Files under the fixture's www/; absolute-URI (proxy) requests served
    the same; /private/ needs basic auth; POST echoes JSON; /jsonrpc answers
    JSON-RPC 2.0 like a Jupyter or language server's HTTP side."""

    def log_message(self, *a):  # noqa: D401 - quiet
        pass

    def _strip(self) -> None:
        if self.path.startswith("http://") or self.path.startswith("https://"):
            rest = self.path.split("://", 1)[1]
            self.path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"

    def _auth_ok(self) -> bool:
        want = "Basic " + base64.b64encode(f"{HTTP_AUTH[0]}:{HTTP_AUTH[1]}".encode()).decode()
        return self.headers.get("Authorization") == want or self.headers.get("Authorization") == f"Bearer {HTTP_AUTH[1]}"

    def do_GET(self):
        self._strip()
        if self.path.startswith("/private/") and not self._auth_ok():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="x"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/private/"):
            self.path = self.path[len("/private"):]
        return super().do_GET()

    def do_HEAD(self):
        self._strip()
        return super().do_HEAD()

    def do_POST(self):
        self._strip()
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path.startswith("/jsonrpc"):
            try:
                req = json.loads(body)
                out = {"jsonrpc": "2.0", "id": req.get("id"), "result": {"method": req.get("method"), "ok": True}}
            except ValueError:
                out = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}}
        else:
            out = {"received": len(body), "path": self.path}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_PUT = do_POST


class _Rpc(socketserver.StreamRequestHandler):
    """JSON-RPC 2.0 on a TCP port, newline-delimited (kernel gateways,
    RL environment servers) or Content-Length framed (language servers)."""

    def handle(self):
        while True:
            line = self.rfile.readline()
            if not line:
                return
            framed = line.lower().startswith(b"content-length:")
            if framed:
                n = int(line.split(b":", 1)[1])
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                line = self.rfile.read(n)
            try:
                req = json.loads(line)
            except ValueError:
                continue
            if "id" not in req:
                continue  # a notification
            out = json.dumps({"jsonrpc": "2.0", "id": req["id"],
                              "result": {"method": req.get("method"), "params": req.get("params")}}).encode()
            if framed:
                self.wfile.write(b"Content-Length: %d\r\n\r\n" % len(out) + out)
            else:
                self.wfile.write(out + b"\n")
            self.wfile.flush()


class _Threading(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data, self.client_address)


def make_fixtures(fix: Path) -> None:
    """Files the entries read: a web root, a bare git repo, a python
    package, a C project, data files."""
    www = fix / "www"
    (www / "api").mkdir(parents=True, exist_ok=True)
    (www / "data.json").write_text(json.dumps({"rows": [1, 2, 3], "name": "benign"}) + "\n")
    (www / "data.csv").write_text("id,score,split\n" + "".join(f"{i},{i * 0.5},{'train' if i % 4 else 'test'}\n"
                                                            for i in range(200)))
    (www / "api" / "status").write_text('{"status": "ok"}\n')
    (www / "index.html").write_text("<html><body>benign</body></html>\n")
    (www / "big.bin").write_bytes(os.urandom(256 * 1024))
    # a python package (no dependencies) that builds offline
    pkg = fix / "pyproj"
    (pkg / "src" / "benignpkg").mkdir(parents=True, exist_ok=True)
    (pkg / "src" / "benignpkg" / "__init__.py").write_text("def add(a, b):\n    return a + b\n")
    (pkg / "tests").mkdir(exist_ok=True)
    (pkg / "tests" / "test_add.py").write_text(
        "import unittest\nfrom benignpkg import add\n\n\nclass T(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "benignpkg"\nversion = "0.1.0"\n\n[tool.setuptools.packages.find]\nwhere = ["src"]\n')
    # a C project
    c = fix / "cproj"
    c.mkdir(exist_ok=True)
    (c / "main.c").write_text('#include <stdio.h>\n#include "lib.h"\nint main(void){printf("%d\\n", twice(21));return 0;}\n')
    (c / "lib.c").write_text('#include "lib.h"\nint twice(int x){return 2*x;}\n')
    (c / "lib.h").write_text("int twice(int x);\n")
    (c / "Makefile").write_text("CFLAGS=-O2 -Wall\nall: app\napp: main.o lib.o\n\t$(CC) -o $@ $^\nclean:\n\trm -f *.o app\n")
    # a bare git repo with two commits
    if not (fix / "repo.git").exists():
        src = fix / "repo-src"
        env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
               "GIT_COMMITTER_EMAIL": "a@b"}
        subprocess.run(["git", "init", "-q", "-b", "main", str(src)], check=True, env=env)
        (src / "README.md").write_text("# repo\n")
        (src / "train.py").write_text("print('training')\n")
        subprocess.run(["git", "-C", str(src), "add", "."], check=True, env=env)
        subprocess.run(["git", "-C", str(src), "commit", "-qm", "init"], check=True, env=env)
        (src / "README.md").write_text("# repo\nmore\n")
        subprocess.run(["git", "-C", str(src), "commit", "-qam", "more"], check=True, env=env)
        subprocess.run(["git", "clone", "-q", "--bare", str(src), str(fix / "repo.git")], check=True, env=env)
    # a sqlite database
    db = fix / "runs.db"
    if not db.exists():
        import sqlite3

        con = sqlite3.connect(db)
        con.execute("create table runs(id integer primary key, reward real, episode text)")
        con.executemany("insert into runs(reward, episode) values (?, ?)", [(i / 10, f"ep-{i}") for i in range(50)])
        con.commit()
        con.close()
    os.system(f"chmod -R a+rX {fix}")


@dataclass
class Services:
    """The local services of the corpus (loopback) and, when given, the
    outside host (a tests/nethost.py NetHost with sshd and an HTTP server)."""

    tmp: Path
    ext: Any = None
    env: dict[str, str] = field(default_factory=dict)
    _servers: list[Any] = field(default_factory=list)

    def start(self) -> "Services":
        fix = self.tmp / "fix"
        fix.mkdir(parents=True, exist_ok=True)
        make_fixtures(fix)
        web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Http, directory=str(fix / "www")))
        rpc = _Threading(("127.0.0.1", 0), _Rpc)
        udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _Udp)
        for s in (web, rpc, udp):
            threading.Thread(target=s.serve_forever, daemon=True).start()
            self._servers.append(s)
        self.env = {
            "FIX": str(fix), "PY": PY, "HTTP": str(web.server_address[1]), "RPC": str(rpc.server_address[1]),
            "UDP": str(udp.server_address[1]), "HTTP_USER": HTTP_AUTH[0], "HTTP_PASS": HTTP_AUTH[1],
            "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
            "npm_config_offline": "true", "npm_config_update_notifier": "false", "npm_config_fund": "false",
            "npm_config_audit": "false", "CARGO_NET_OFFLINE": "true", "GIT_TERMINAL_PROMPT": "0",
        }
        if self.ext is not None:
            ssh_opts = " ".join(self.ext.ssh_opts())
            www = fix / "www"
            self.ext.spawn_ns([PY, "-m", "http.server", "8080", "--bind", "::", "-d", str(www)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.ext.wait_listening(8080, timeout=15)
            self.env.update({
                "EXT": self.ext.addr, "EXT6": self.ext.addr6, "EXT_HTTP": "8080", "SSH_KEY": str(self.ext.key),
                "SSH_OPTS": ssh_opts, "GIT_SSH_COMMAND": "ssh " + ssh_opts,
                "RSYNC_RSH": "ssh " + ssh_opts,
            })
        return self

    def close(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        self._servers.clear()


def entry_env(services: Services, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k != "AGENT_EPISODE_ID"}
    env.update(services.env)
    home = os.environ.get("HOME", "/root")
    for var, d in (("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")):  # toolchains stay where they are
        if var not in env and os.path.isdir(f"{home}/{d}"):
            env[var] = f"{home}/{d}"
    env.update({"WORK": str(work), "HOME": str(work / "home"), "LC_ALL": "C.UTF-8"})
    return env


def run_entry(e: Entry, services: Services, root: Path) -> dict[str, Any]:
    """Run one entry in its own episode; what happened, for the report."""
    from episode_tracer.api import run_episode

    work = root / e.id
    (work / "home").mkdir(parents=True, exist_ok=True)
    script = "set -eu\ncd \"$WORK\"\n" + e.run + "\n"
    res = run_episode(e.episode, ["/bin/bash", "-c", script], env=entry_env(services, work), cwd=str(work),
                      timeout=e.timeout)
    return {"id": e.id, "exit_code": res.exit_code, "signal": res.signal, "killed": res.killed_by_policy}


def run_corpus(entries: list[Entry], services: Services, root: Path, workers: int = 3) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda e: run_entry(e, services, root), entries))


def unique_prefix() -> str:
    return f"{EPISODE_PREFIX}{uuid.uuid4().hex[:6]}-"


def available(e: Entry, have_ext: bool) -> bool:
    return have_ext or not ({"ext", "ssh"} & set(e.needs))


def missing_tools() -> list[str]:
    need = ["git", "gcc", "make", "curl", "wget", "ssh", "scp", "sftp", "rsync", "http", "jq", "sqlite3", "node",
            "npm", "perl", "tar", "zstd", "xz"]
    return [t for t in need if shutil.which(t) is None]


if __name__ == "__main__":  # pragma: no cover - a quick look at the corpus
    es = load_corpus()
    print(f"{len(es)} entries in {len({e.file for e in es})} files", file=sys.stderr)


# ------------------------------------------------------------------ live run

KEEP_TYPES = frozenset({"exec", "exit", "fork", "connect", "socket", "bind", "listen", "memfd", "protocol",
                        "relay", "gpu_open", "alert", "gate_timeout", "deny"})


@dataclass
class LiveRun:
    entries: list[Entry]
    results: list[dict[str, Any]]
    records: list[dict[str, Any]]  # the tracer's records of the corpus episodes, alerts included

    def alerts(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == "alert"]

    def problems(self) -> list[str]:
        out = judge(self.entries, self.alerts())
        for r in self.records:
            if r.get("type") in ("gate_timeout", "deny"):
                out.append(f"{r.get('type')}: {r.get('episode')} {r}")
        for res in self.results:
            if res["exit_code"] != 0 or res["killed"]:
                out.append(f"entry failed: {res}")
        seen = {r.get("episode") for r in self.records if r.get("type") == "exec"}
        for e in self.entries:
            if e.episode not in seen:
                out.append(f"entry not seen by the tracer: {e.id}")
        return out


def run_live(tracer, services: Services, root: Path, entries: list[Entry], workers: int = 3) -> LiveRun:
    """Run `entries` in episodes under `tracer` (an at_testlib.LiveTracer),
    then wait until the tracer has caught up (a marker episode's exec is
    seen: the ring buffer is one ordered stream)."""
    from episode_tracer import cgroups
    from episode_tracer.api import run_episode

    for e in entries:  # a run that died half-way may have left one behind
        cgroups.remove(cgroups.cgroup2_mount() / "agent-tracer" / e.episode)
    results = run_corpus(entries, services, root, workers)
    marker = f"{EPISODE_PREFIX}marker-{uuid.uuid4().hex[:6]}"
    run_episode(marker, ["/bin/true"])
    from at_testlib import wait_for

    wait_for(lambda: tracer.find(type="exec", episode=marker), timeout=60)
    wait_for(lambda: False, timeout=0.5)  # alerts of the last records
    eps = {e.episode for e in entries}
    recs = [r for r in tracer.records if r.get("episode") in eps and r.get("type") in KEEP_TYPES]
    return LiveRun(entries, results, recs)


def write_recording(run: LiveRun, path: Path = RECORDING) -> int:
    """The corpus episodes' records, alerts left out (replay re-decides
    them), sorted by time; pids and paths are this machine's."""
    import orjson

    recs = sorted((r for r in run.records if r.get("type") != "alert"), key=lambda r: r.get("ts") or 0)
    with open(path, "wb") as f:
        for r in recs:
            f.write(orjson.dumps(r, default=str) + b"\n")
    return len(recs)
