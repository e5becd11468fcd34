"""`agent-tracer bench --only wire`: what wire inspection costs a benign
episode flow, side by side.

Configurations, interleaved per repetition (the order rotates):
  baseline  no tracer
  packet    this tracer with the default packs: the packet path (episode_tracer/bpf/wire.h)
            holds each flow's first message until user space has judged it
  previous  (when AGENT_TRACER_BENCH_PREVIOUS=DIR names a checkout of an
            older agent-tracer, e.g. `git archive <commit> | tar -x -C DIR`)
            that tracer, run from DIR with its own packs: the write-syscall
            capture, which stopped the writer after a candidate first write

Measured in an episode cgroup against a loopback server of the benchmark
(outside the episode):
  first message  connect, send one request, wait for the reply: the time from
                 the send to the reply, for an HTTP GET and for a JSON-RPC
                 line (p50/p99 over n fresh connections)
  bulk           one connection: an HTTP PUT head, then 64 MiB; MB/s
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .paths import ROOT

SIZES = {"quick": {"n": 10, "bulk_mib": 8, "reps": 1}, "full": {"n": 100, "bulk_mib": 64, "reps": 3}}

CLIENT = r"""
import json, socket, sys, time
port, kind, n, bulk_mib = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
msgs = {"http": b"GET /simple/ HTTP/1.1\r\nHost: localhost\r\n\r\n", "json": b'{"id":1,"jsonrpc":"2.0","method":"status","params":[]}\n'}
out = []
if kind == "bulk":
    data = b"x" * (1 << 20)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    t0 = time.perf_counter()
    s.sendall(b"PUT /blob HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (bulk_mib << 20))
    for _ in range(bulk_mib):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(10) == b"ok\n"
    out.append(time.perf_counter() - t0)
else:
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        t0 = time.perf_counter()
        s.sendall(msgs[kind])
        assert s.recv(10) == b"ok\n"
        out.append(time.perf_counter() - t0)
        s.close()
print(json.dumps(out))
"""


class _Server:
    """Loopback server: replies "ok" to a complete first message; for a
    bulk upload after the peer's EOF."""

    def __init__(self):
        self.l = socket.socket()
        self.l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.l.bind(("127.0.0.1", 0))
        self.l.listen(64)
        self.port = self.l.getsockname()[1]
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.l.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c):
        with c:
            buf = b""
            try:
                while not (b"\n" in buf and (buf.startswith(b"{") or b"\r\n\r\n" in buf)):
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                if buf.startswith(b"PUT "):
                    while c.recv(1 << 20):
                        pass
                c.sendall(b"ok\n")
            except OSError:
                return

    def close(self):
        self._stop = True
        self.l.close()


def _tracer(root: Path, work: Path, policy_dirs, timeout: float = 120.0) -> tuple[subprocess.Popen, Path]:
    tag = uuid.uuid4().hex[:8]
    log = work / f"wire-{tag}.jsonl"
    cmd = [sys.executable, "-m", "episode_tracer.cli", "run", "--no-dashboard", "--log", str(log), "--control-socket",
           str(work / f"wire-{tag}.sock")]
    for d in policy_dirs:
        cmd += ["--policy-dir", str(d)]
    env = dict(os.environ, PYTHONPATH=str(root))
    p = subprocess.Popen(cmd, cwd=str(root), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"tracer from {root} exited {p.returncode} before ready")
        if log.exists() and '"type": "ready"' in log.read_text(errors="replace").replace('"type":"ready"',
                                                                                         '"type": "ready"'):
            return p, log
        time.sleep(0.05)
    _stop(p)
    raise RuntimeError(f"tracer from {root} not ready after {timeout:.0f} s")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _measure(bench, srv: _Server, kind: str, n: int, bulk_mib: int) -> list[float]:
    from .bench import EpisodeCgroup

    ep = EpisodeCgroup(bench.cleanup, f"wire-{kind}")
    try:
        _dt, out = bench.run_cmd([sys.executable, "-S", "-c", CLIENT, str(srv.port), kind, str(n), str(bulk_mib)],
                                 ep, timeout=600)
    finally:
        ep.remove()
    return json.loads(out.strip().splitlines()[-1])


def section_wire(bench) -> dict[str, Any]:
    from .bench import latency_summary, rotate, summarize

    size = SIZES["quick" if bench.cfg.size.value == "quick" else "full"]
    reps = bench.cfg.reps or size["reps"]
    prev = os.environ.get("AGENT_TRACER_BENCH_PREVIOUS")
    groups = ["baseline", "packet"] + (["previous"] if prev else [])
    lat: dict[str, dict[str, list[float]]] = {k: {} for k in ("http", "json")}
    bulk: dict[str, list[float]] = {}
    srv = _Server()
    bench.cleanup.push("wire server", srv.close)
    try:
        for r in range(reps):
            order = rotate(groups, r)
            bench.say(f"wire repetition {r + 1}/{reps}: {', '.join(order)}")
            with bench.live.lock():
                for g in order:
                    proc = None
                    if g == "packet":
                        proc, _ = _tracer(ROOT, bench.work, bench.cfg.policy_dirs)
                    elif g == "previous":
                        proc, _ = _tracer(Path(prev), bench.work, [Path(prev) / "policies"])
                    try:
                        for kind in ("http", "json"):
                            lat[kind].setdefault(g, []).extend(_measure(bench, srv, kind, size["n"], 0))
                        (dt,) = _measure(bench, srv, "bulk", 0, size["bulk_mib"])
                        bulk.setdefault(g, []).append(size["bulk_mib"] * 1.048576 / dt)
                    finally:
                        if proc is not None:
                            _stop(proc)
    finally:
        srv.close()
    out: dict[str, Any] = {"previous": prev, "bulk_mib": size["bulk_mib"], "first_message": {}, "bulk_mb_s": {}}
    for kind, by in lat.items():
        out["first_message"][kind] = {g: latency_summary(v) for g, v in by.items()}
    for g, v in bulk.items():
        s = summarize(v)
        out["bulk_mb_s"][g] = s
    base = summarize(bulk.get("baseline", [])).get("median")
    for g, s in out["bulk_mb_s"].items():
        if base and s.get("median"):
            s["ratio"] = round(s["median"] / base, 3)
    return out


LABELS = {"baseline": "no tracer", "packet": "packet path (this tracer)", "previous": "previous design (write capture)"}


def wire_tables(w: dict[str, Any] | None) -> list[tuple[str, list[str], list[list[Any]]]]:
    if not w:
        return []
    rows = []
    for kind, by in (w.get("first_message") or {}).items():
        for g, s in by.items():
            rows.append([f"{kind} first message, {LABELS.get(g, g)}", s.get("n"), s.get("p50_ms"), s.get("p99_ms"),
                         s.get("max_ms")])
    out = [("Wire: first message of a benign episode flow (send -> reply, loopback)",
            ["what", "n", "p50 ms", "p99 ms", "max ms"], rows)]
    rows = [[LABELS.get(g, g), s.get("median"), s.get("min"), s.get("max"), s.get("ratio")]
            for g, s in (w.get("bulk_mb_s") or {}).items()]
    out.append((f"Wire: bulk TCP upload in an episode ({w.get('bulk_mib')} MiB, loopback)",
                ["configuration", "median MB/s", "min", "max", "ratio to no tracer"], rows))
    return out
