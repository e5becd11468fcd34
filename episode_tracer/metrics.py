"""Prometheus /metrics and /healthz (`--metrics-listen HOST:PORT`).

The loop thread owns every value: `Metrics.observe` runs as a pipeline
observer (cheap: it looks only at rare record kinds and at the `stats`
record the loop writes every stats interval for the per-kind event counts),
and the HTTP server thread only reads the prometheus_client objects (which
lock themselves) and one health tuple replaced whole.

No episode id is ever a label (unbounded); labels are bounded sets: record
kinds, rule names from the loaded policy, severities, actions, GPUs.
"""
from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__

log = logging.getLogger(__name__)

PREFIX = "agent_tracer_"
# the loop thread ticks every stats interval: healthz says "stalled" after this long without one
STALL_S = 30.0
HOLD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)


def selftest_ok(result: str) -> bool:
    """'ok' (or 'ok (monitor mode: not enforced)') counts as passed."""
    return str(result).startswith("ok")


class Metrics:
    def __init__(self, output_stats: Callable[[], dict[str, dict[str, int]]] | None = None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.events = Counter(p + "events", "Records the tracer emitted, by kind", ["kind"], registry=r)
        self.lost = Counter(p + "events_lost", "Kernel events lost (ring buffer full), by kind", ["kind"],
                            registry=r)
        self.alerts = Counter(p + "alerts", "Policy alerts", ["rule", "severity", "action", "enforced"],
                              registry=r)
        self.episodes = Gauge(p + "episodes", "Episodes seen since start by state (running: now)", ["state"],
                              registry=r)
        self.gate_hold = Histogram(p + "gate_hold_seconds",
                                   "Time a gated exec or held flow waited for its verdict (kernel stop or "
                                   "first held packet to user-space decision)", ["kind"], buckets=HOLD_BUCKETS, registry=r)
        for k in ("exec", "flow"):
            self.gate_hold.labels(k)
        self.gate_timeouts = Counter(p + "gate_timeouts", "Gated execs whose verdict did not come in time",
                                     ["verdict"], registry=r)
        self.reloads = Counter(p + "policy_reloads", "Policy reloads by result", ["result"], registry=r)
        self.config_reloads = Counter(p + "config_reloads", "Configuration reloads by result", ["result"],
                                      registry=r)
        self.selftest = Gauge(p + "selftest_ok", "1 when the enforcement path passed the start-up self-test",
                              ["path"], registry=r)
        self.build = Gauge(p + "build_info", "Version of the tracer and of the loaded policy",
                           ["version", "policy_version"], registry=r)
        self.up_since = Gauge(p + "start_time_seconds", "When the tracer started (Unix time)", registry=r)
        self.ready = Gauge(p + "ready", "1 once the probes are attached and the ready record written", registry=r)
        gl = ["gpu", "UUID", "modelName"]  # as DCGM's exporter labels its gauges
        self.gpu_util = Gauge(p + "gpu_utilization_percent", "GPU utilisation (NVML)", gl, registry=r)
        self.gpu_mem_util = Gauge(p + "gpu_mem_copy_utilization_percent", "GPU memory utilisation (NVML)", gl,
                                  registry=r)
        self.gpu_fb_used = Gauge(p + "gpu_fb_used_mib", "GPU framebuffer memory used, MiB", gl, registry=r)
        self.gpu_fb_total = Gauge(p + "gpu_fb_total_mib", "GPU framebuffer memory total, MiB", gl, registry=r)
        self.gpu_power = Gauge(p + "gpu_power_usage_watts", "GPU power draw, W", gl, registry=r)
        self._gpu_labels: set[tuple[str, str, str]] = set()
        self._output_stats = output_stats
        if output_stats is not None:
            r.register(_OutputCollector(output_stats))
        self._events_seen: dict[str, int] = {}
        self._policy_version = ""
        self._running: set[str] = set()
        self._ended: dict[str, int] = {}
        self.last_tick = time.monotonic()
        # (ok, reason): replaced whole by the loop thread, read by the HTTP thread
        self.health: tuple[bool, str] = (False, "starting: probes not attached yet")
        self.up_since.set(time.time())

    # ------------------------------------------------------- loop thread only
    def observe(self, rec: dict[str, Any]) -> None:
        t = rec["type"]
        if t == "stats":
            self.last_tick = time.monotonic()
            seen = self._events_seen
            for kind, n in (rec.get("events_by_kind") or {}).items():
                d = n - seen.get(kind, 0)
                if d > 0:
                    self.events.labels(kind).inc(d)
                    seen[kind] = n
        elif t == "alert":
            self.alerts.labels(rec.get("rule") or "", rec.get("severity") or "", rec.get("action") or "",
                               "true" if rec.get("enforced") else "false").inc()
        elif t == "lost":
            self.lost.labels(rec.get("kind") or "unknown").inc(rec.get("count") or 0)
        elif t == "episode_start":
            if rec.get("episode"):
                self._running.add(rec["episode"])
                self._episode_gauges()
        elif t == "episode_end":
            ep = rec.get("episode")
            if ep in self._running:
                self._running.discard(ep)
                reason = rec.get("reason") or "exited"
                self._ended[reason] = self._ended.get(reason, 0) + 1
                self._episode_gauges()
        elif t == "ready":
            self.on_ready(rec)
        elif t == "policy_reload":
            self.reloads.labels("ok").inc()
            self._set_policy_version(rec.get("policy_version") or "")
        elif t == "policy_error":
            self.reloads.labels("failed").inc()
        elif t == "config_reload":
            self.config_reloads.labels("ok").inc()
        elif t == "config_error":
            self.config_reloads.labels("failed").inc()
        elif t == "gate_timeout":
            self.gate_timeouts.labels(rec.get("verdict") or "").inc()
        elif t == "gpu_node":
            self._gpus(rec.get("gpus") or [])

    def init_policy(self, policy) -> None:
        """Every (rule, severity, action, enforced) of the loaded policy
        starts at 0, so the first alert is an increase Prometheus can see
        (a counter that appears at 1 has no increase)."""
        for r in getattr(policy, "rules", ()):
            if not getattr(r, "enabled", True):
                continue
            sev, act = getattr(r.severity, "value", r.severity), getattr(r.action, "value", r.action)
            for enforced in ("true", "false"):
                self.alerts.labels(r.name, sev, act, enforced)

    def init_kinds(self, kinds) -> None:
        for k in kinds:
            self.lost.labels(k)

    def observe_hold(self, kind: str, rec: dict[str, Any]) -> None:
        """A gated exec or held flow got its verdict now (engine hook)."""
        kt = rec.get("ktime")
        if kt:
            self.gate_hold.labels("exec" if kind == "exec" else "flow").observe(
                max(time.clock_gettime_ns(time.CLOCK_MONOTONIC) - kt, 0) / 1e9)

    def on_ready(self, rec: dict[str, Any]) -> None:
        self._set_policy_version(rec.get("policy_version") or "")
        self.ready.set(1)
        selftest = rec.get("selftest") or {}
        for path, res in selftest.items():
            self.selftest.labels(path).set(1 if selftest_ok(res) else 0)
        self.health = health_from_ready(rec)
        self.last_tick = time.monotonic()

    def _set_policy_version(self, v: str) -> None:
        if v == self._policy_version:
            return
        if self._policy_version:
            self.build.remove(__version__, self._policy_version)
        self._policy_version = v
        self.build.labels(__version__, v).set(1)

    def _episode_gauges(self) -> None:
        self.episodes.labels("running").set(len(self._running))
        for reason, n in self._ended.items():
            self.episodes.labels(reason).set(n)

    def _gpus(self, gpus: list[dict[str, Any]]) -> None:
        now = set()
        for g in gpus:
            lab = (str(g.get("index")), str(g.get("uuid") or ""), str(g.get("name") or ""))
            now.add(lab)
            for gauge, k in ((self.gpu_util, "util"), (self.gpu_mem_util, "mem_util"),
                             (self.gpu_fb_used, "mem_used_mib"), (self.gpu_fb_total, "mem_total_mib"),
                             (self.gpu_power, "power_w")):
                v = g.get(k)
                if v is not None:
                    gauge.labels(*lab).set(v)
        for lab in self._gpu_labels - now:
            for gauge in (self.gpu_util, self.gpu_mem_util, self.gpu_fb_used, self.gpu_fb_total, self.gpu_power):
                try:
                    gauge.remove(*lab)
                except KeyError:
                    pass
        self._gpu_labels = now

    # ------------------------------------------------------------ HTTP thread
    def healthz(self) -> tuple[bool, str]:
        ok, reason = self.health
        if ok and time.monotonic() - self.last_tick > STALL_S:
            return False, f"loop stalled: no stats tick for {time.monotonic() - self.last_tick:.0f} s"
        return ok, reason

    def render(self) -> bytes:
        return generate_latest(self.registry)


def health_from_ready(rec: dict[str, Any]) -> tuple[bool, str]:
    """200 only when probes are attached and every self-test path passed."""
    if not rec.get("programs"):
        return False, "no BPF programs attached"
    failed = {k: v for k, v in (rec.get("selftest") or {}).items() if not selftest_ok(v)}
    if not rec.get("selftest") and rec.get("policy_version"):
        return False, "self-test did not run"
    if failed:
        return False, "self-test failed: " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
    return True, "ok"


class _OutputCollector:
    """agent_tracer_output_dropped_total{output} and _sent_total, read from the
    outputs' own counters at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, int]]]):
        self.stats = stats

    def collect(self):
        dropped = CounterMetricFamily(PREFIX + "output_dropped", "Alerts an output dropped (queue full or "
                                      "delivery failed after retries)", labels=["output"])
        sent = CounterMetricFamily(PREFIX + "output_sent", "Alerts an output delivered", labels=["output"])
        for name, s in self.stats().items():
            dropped.add_metric([name], s.get("dropped", 0))
            sent.add_metric([name], s.get("sent", 0))
        yield dropped
        yield sent

    def describe(self):
        return []


class MetricsServer:
    """/metrics (Prometheus text format) and /healthz (200 'ok' or 503 and
    the reason; JSON with ?format=json) on HOST:PORT (port 0: a free one)."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        self.metrics = metrics
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path, _, query = self.path.partition("?")
                if path == "/metrics":
                    self._send(200, m.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, reason = m.healthz()
                    if "format=json" in query:
                        self._send(200 if ok else 503, orjson.dumps({"ok": ok, "reason": reason}),
                                   "application/json")
                    else:
                        self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: /metrics, /healthz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args) -> None:
                log.debug("metrics: " + fmt, *args)

        family = _family(host)

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.httpd = Server((host, port), Handler)
        self.address = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    @property
    def listen(self) -> str:
        h, p = self.address
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

    def start(self) -> "MetricsServer":
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _family(host: str):
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
