"""What makes `agent-tracer run` a node service: Prometheus metrics and
health, alert outputs, systemd notify and watchdog, log reopen, verdict
retention and configuration reload.

The Runtime owns one `NodeService` and calls it at fixed points, all on the
loop thread (one owner for live state): `start()` before the ready record,
`observe()` for every record (a pipeline observer), `after_poll()` after each
ring-buffer poll, `tick()` once per stats interval, `close()` last. Signal
handlers only set flags (`request_reopen`, Runtime.request_reload).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

PRUNE_S = 60.0  # seconds between verdict-file retention sweeps
STATUS_S = 5.0  # seconds between systemd STATUS= updates


class NodeService:
    def __init__(self, rt):
        from .outputs import build_outputs
        from .sdnotify import Notifier

        self.rt = rt
        opts = rt.opts
        self.outputs = build_outputs(opts.outputs or [])
        self.notifier = Notifier.from_env()
        self.metrics = None
        self.server = None
        self._dropped_seen: dict[str, int] = {}
        self._last_prune = 0.0
        self._last_status = 0.0
        self._alerts = 0
        self._reopen = False
        self.config_loader: Callable[[], Any] | None = opts.config_loader
        self.config = opts.config
        self._config_sig = self.config.signature() if self.config is not None else None

    # ---------------------------------------------------------------- start
    def start(self) -> None:
        """Before the ready record: the metrics server answers from here on
        (healthz 503 until the ready record says the probes are attached)."""
        opts = self.rt.opts
        for o in self.outputs:
            o.start()
        if opts.metrics_listen:
            from .metrics import Metrics, MetricsServer

            self.metrics = Metrics(output_stats=self.output_stats)
            host, port = opts.metrics_listen
            self.server = MetricsServer(self.metrics, host, port).start()
            from .events import Kind

            self.metrics.init_kinds(k.record_type for k in Kind)
            eng = self._engine()
            if eng is not None:
                self.metrics.init_policy(eng.policy)
                if hasattr(eng, "hold_observers"):
                    eng.hold_observers.append(self.metrics.observe_hold)

    def _engine(self):
        return self.rt.pipeline.engine if self.rt.pipeline is not None else None

    def ready_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.server is not None:
            out["metrics"] = self.server.listen
        if self.outputs:
            out["outputs"] = [o.name for o in self.outputs]
        if self.config is not None:
            out["config_files"] = [str(f) for f in self.config.files]
        return out

    def output_stats(self) -> dict[str, dict[str, int]]:
        return {o.name: o.stats() for o in self.outputs}

    # ------------------------------------------------------------ per record
    def observe(self, rec: dict[str, Any]) -> None:
        t = rec["type"]
        if self.metrics is not None:
            self.metrics.observe(rec)
        if t == "alert":
            self._alerts += 1
            for o in self.outputs:
                o.offer(rec)
        elif t == "ready":
            self.notifier.ready(self._status_line())
        elif t == "policy_reload" and self.metrics is not None and self._engine() is not None:
            self.metrics.init_policy(self._engine().policy)

    def _status_line(self) -> str:
        rt = self.rt
        ready = rt.ready_record or {}
        failed = [k for k, v in (ready.get("selftest") or {}).items() if not str(v).startswith("ok")]
        running = sum(1 for e in rt.tracker.episodes.values() if not e.ended) if rt.tracker else 0
        s = (f"{ready.get('mode', 'enforce')}, {running} episode(s) running, "
             f"{rt.pipeline.count if rt.pipeline else 0} records, {self._alerts} alert(s), "
             f"lost {sum(rt._lost_seen.values())}")
        if failed:
            s += f", self-test FAILED: {', '.join(failed)}"
        return s

    # --------------------------------------------------------------- polling
    def after_poll(self) -> None:
        self.notifier.watchdog()
        if self._reopen:
            self._reopen = False
            for s in self.rt.pipeline.sinks:
                if hasattr(s, "request_reopen"):
                    s.request_reopen()
                    s.flush()

    def request_reopen(self) -> None:
        """SIGUSR1: reopen the JSONL log (after logrotate moved it)."""
        self._reopen = True

    def tick(self, wall: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        now = time.monotonic()
        for o in self.outputs:
            seen = self._dropped_seen.get(o.name, 0)
            if o.dropped > seen:
                out.append({"type": "output_dropped", "ts": wall, "episode": None, "output": o.name,
                            "count": o.dropped - seen, "total": o.dropped, "queue_full": o.dropped_full,
                            "failed": o.dropped_failed, "last_error": o.last_error or None})
                self._dropped_seen[o.name] = o.dropped
        if now - self._last_prune >= PRUNE_S:
            self._last_prune = now
            self.prune_verdicts(wall)
        if self.notifier.enabled and now - self._last_status >= STATUS_S:
            self._last_status = now
            self.notifier.status(self._status_line())
        if self.config_loader is not None and self.config is not None and not self.rt._reload_pending:
            sig = self.config.signature()
            if sig != self._config_sig:
                self.rt._reload_pending = True  # a changed config file (ConfigMap swap) reloads like SIGHUP
        return out

    def prune_verdicts(self, wall: float | None = None) -> list[str]:
        from .sinks import VerdictSink

        running = {e.id for e in self.rt.tracker.episodes.values() if not e.ended} if self.rt.tracker else set()
        removed: list[str] = []
        for s in self.rt.pipeline.sinks:
            if isinstance(s, VerdictSink):
                removed += s.prune(running, wall)
        return removed

    # ---------------------------------------------------------------- reload
    def reload_config(self, wall: float) -> list[dict[str, Any]]:
        """Re-read the config files. A bad config keeps the running one (a
        `config_error` record names file and key); a good one applies the
        keys a reload can change and names the others (restart needed)."""
        if self.config_loader is None:
            return []
        from .config import KEYS, ConfigError, policy_paths

        self.notifier.reloading()
        try:
            new = self.config_loader()
        except ConfigError as e:
            if self.config is not None:
                self._config_sig = self.config.signature()  # do not retry the same bad files every tick
            for m in e.errors:
                log.error("config reload refused, keeping the running configuration: %s", m)
            return [{"type": "config_error", "ts": wall, "episode": None, "errors": e.errors}]
        old = self.config
        self.config = new
        self._config_sig = new.signature()
        changed = [k for k in KEYS if old is None or old.values[k] != new.values[k]]
        applied, restart = [], []
        rt, eng = self.rt, (self.rt.pipeline.engine if self.rt.pipeline else None)
        for k in changed:
            key = KEYS[k]
            if not key.reload:
                restart.append(k)
                continue
            v = new.values[k]
            if k in ("policy_dirs", "site_policy_dir"):
                if eng is not None:
                    eng.policy_paths = policy_paths(new)
                rt.opts.policy_dirs = policy_paths(new)
            elif k in ("gate_timeout", "gate_default"):
                setattr(rt.opts, k, v)
                if eng is not None:
                    setattr(eng, k, v)
            elif k == "verdict_retention":
                rt.opts.verdict_retention = v
                from .sinks import VerdictSink

                for s in rt.pipeline.sinks:
                    if isinstance(s, VerdictSink):
                        s.retention = v
            else:  # relay_interval, relay_min_age, stats_interval
                setattr(rt.opts, k, v)
                if k == "relay_min_age" and rt.relay is not None:
                    rt.relay.min_age_s = v
            applied.append(k)
        if restart:
            log.warning("config reload: %s changed; these take effect at the next restart", ", ".join(restart))
        return [{"type": "config_reload", "ts": wall, "episode": None, "files": [str(f) for f in new.files],
                 "applied": applied, "restart_needed": restart}]

    def reload_done(self) -> None:
        if self.notifier.enabled:
            self.notifier.ready(self._status_line())

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        self.notifier.stopping()
        for o in self.outputs:
            o.close()
        if self.server is not None:
            self.server.close()
            self.server = None
        self.notifier.close()


def default_log_dir() -> Path:
    return Path("/var/log/agent-tracer")
