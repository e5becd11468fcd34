"""The live tracer: probes + pipeline + periodic housekeeping.

`agent-tracer run` builds one Runtime, calls start(), then loop() until a
signal, then close(); close() detaches every BPF program and cgroup
attachment (bcc's cleanup plus explicit detach of the sock_addr programs).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .commands import CommandQueue
from .episodes import Tracker
from .events import TRACK_CGROUP, TRACK_ENV, TRACK_ESCAPED, TRACK_LINEAGE
from .paths import CONTROL_SOCKET, RUN_DIR
from .pipeline import Pipeline, Sink
from .probes import ProbeConfig, Probes
from .nodesvc import EPISODE_BURST, EPISODE_RATE, EpisodeLoss
from .sinks import JsonlSink, VerdictSink

log = logging.getLogger(__name__)

SWEEP_S = 30.0  # seconds between sweeps of gone processes outside episodes (ProcessTable.sweep_outside)


@dataclass
class RunOptions:
    log: str | None = "-"
    scope_all: bool = False
    monitor: bool = False
    policy_dirs: list[Path] = field(default_factory=list)
    ringbuf_pages: int = 2048
    control_socket: Path | None = CONTROL_SOCKET
    # the trainer API without root (docs/episodes.md "Trainer API"): peers of
    # this group (name or gid) or these uids may run, list and end their own
    # episodes and read their verdicts on the control socket
    trainer_group: str | None = None
    trainer_uids: list[int] = field(default_factory=list)
    verdict_dir: Path | None = RUN_DIR / "verdicts"
    stats_interval: float = 1.0
    preexisting_sockets: bool = True
    gpu_prefixes: tuple[str, ...] | None = None
    gpu_interval: float = 1.0  # seconds between GPU watcher samples; 0 turns the watcher off
    policy: bool = True
    gate_timeout: float = 2.0
    gate_default: str = "kill"
    gate_proc_grace: float = 0.5  # a held exec whose record has not come after this long is judged from /proc (0: off)
    relay_interval: float = 2.0  # seconds between reverse-tunnel shape scans (episode_tracer/relay.py); 0 turns it off
    relay_min_age: float = 5.0  # both legs of a relay must have been seen this long
    wire_timeout: float = 3.0  # seconds an undecided episode flow may stay held before it is denied
    extra_sinks: list[Sink] = field(default_factory=list)
    # scale (docs/scale.md): concurrent episodes the tracer gives a kernel
    # identity (more are refused), the first generation of each identity
    # (tests start near the wrap), and how many ended episodes the live
    # view (`top`, `episode list`) keeps, for how long
    max_episodes: int = 4096
    slot_start_gen: int = 0
    ended_keep: int = 200
    ended_keep_s: float = 600.0
    unix_connect_hook: bool = True  # attach the cgroup unix-connect program where the kernel has it
    episode_rate: int = EPISODE_RATE  # per-episode record rate limit in the kernel (records/s; 0: off)
    episode_burst: int = EPISODE_BURST
    dns_upstreams: list[str] | None = None  # egress mode's DNS stub forwards here (None: /etc/resolv.conf)
    dns_ttl_grace: float = 2.0  # seconds an answered address stays allowed beyond its TTL
    # node service (episode_tracer/node_service.py, episode_tracer/config.py)
    log_max_bytes: int = 0  # rotate the JSONL log at this size (0: never)
    log_keep: int = 5  # rotated files kept
    verdict_retention: float = 0.0  # seconds a finished episode's verdict file is kept (0: forever)
    metrics_listen: tuple[str, int] | None = None  # Prometheus /metrics and /healthz
    outputs: list[dict[str, Any]] = field(default_factory=list)  # validated [[outputs]] tables
    pin_dir: Path | None = None  # pinned state base (episode_tracer/pins.py PIN_BASE); None: nothing pinned
    keep_enforcing: bool = False  # a clean stop leaves the pins
    orphan_episode: str = "kill"  # an episode whose runner died (episode_tracer/runners.py): kill | freeze | keep
    orphan_grace: float = 5.0  # seconds after the runner's death
    config: Any = None  # the episode_tracer.config.Config this run started from
    config_loader: Callable[[], Any] | None = None  # re-reads the config files at a reload
    containers: dict[str, Any] | None = None  # the [containers] table: container episodes (episode_tracer/sources.py)


# `ready` carries it; docs/record-schema.json describes this version of the records
SCHEMA_VERSION = 1


class Runtime:
    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.started = time.time()
        self.tracker: Tracker | None = None
        self.pipeline: Pipeline | None = None
        self.probes: Probes | None = None
        self.engine: Any = None
        self.state: Any = None
        self.control: Any = None
        self._lost_seen: dict[str, int] = {}
        self._last_tick = 0.0
        self._last_sweep = time.monotonic()
        self._last_count = 0
        self.ready_record: dict[str, Any] | None = None
        self._observers: list[Callable[[dict[str, Any]], None]] = []
        self._poll_hooks: list[Callable[[], None]] = []
        self.stop_event = threading.Event()
        self.gpu: Any = None  # episode_tracer.gpu_watch.GpuWatcher once started
        self.relay: Any = None  # episode_tracer.relay.Scanner when relay_interval > 0
        self.flows: Any = None  # episode_tracer.flows.FlowInspector (wire verdicts, held-flow timeouts)
        self._last_relay = 0.0
        self.scale_failed_closed = 0  # episodes/processes stopped because a kernel map could not name them
        self.episode_loss = EpisodeLoss()
        self.service: Any = None  # episode_tracer.node_service.NodeService once started
        self.runners: Any = None  # episode_tracer.runners.RunnerWatch once started
        self.source_ops: Any = None  # episode_tracer.attach_ops.SourceOps once started
        self._reload_pending = False
        # commands of other threads, run by the loop thread (episode_tracer/commands.py)
        self.commands = CommandQueue(self)
        self._observers.append(self.commands.observe)  # publishes the start handshake's answers
        self.operator_enforcer: Any = None  # the one Enforcer of a tracer without policy (commands.enforcer_of)

    # ----------------------------------------------------------------- start
    def start(self) -> dict[str, Any]:
        opts = self.opts
        sinks: list[Sink] = []
        if opts.log:
            sinks.append(JsonlSink(opts.log, max_bytes=opts.log_max_bytes, keep=opts.log_keep))
        if opts.verdict_dir is not None:
            sinks.append(VerdictSink(opts.verdict_dir, retention=opts.verdict_retention))
        sinks.extend(opts.extra_sinks)
        pcfg = ProbeConfig(scope_all=opts.scope_all, ringbuf_pages=opts.ringbuf_pages,
                           attach_unix_connect=opts.unix_connect_hook, pin_base=opts.pin_dir,
                           keep_pins=opts.keep_enforcing)
        if opts.gpu_prefixes is not None:
            pcfg.gpu_prefixes = opts.gpu_prefixes
        # the engine (policy + actions) is built before the probes so that an
        # invalid policy refuses to start before anything is attached
        engine = self._make_engine()
        self.probes = Probes(pcfg, self._on_raw)
        self.probes.set_episode_rate(opts.episode_rate, opts.episode_burst)
        self.tracker = Tracker(self.probes.episode_root, live=True, max_episodes=opts.max_episodes,
                               slot_start_gen=opts.slot_start_gen)
        self.tracker.slots.on_wrap = self.probes.untrack_slot_index
        self.pipeline = Pipeline(self.tracker, sinks, engine, observers=[self._sync_kernel, *self._observers])
        from . import attach_ops

        self.source_ops = attach_ops.install(self)  # attached cgroups, container episodes (docs/episodes.md)
        from .flows import FlowInspector

        self.flows = FlowInspector(self.probes, self.tracker, timeout_s=opts.wire_timeout)
        self.pipeline.wire = self.flows.feed
        from .node_service import NodeService

        self.service = NodeService(self)
        self.pipeline.observers.append(self.service.observe)
        if engine is not None:
            engine.attach(self.probes, self.tracker, self.pipeline)
            engine.flows = self.flows
            engine.load_kernel()
            self.add_poll_hook(engine.egress.drain_into(self.pipeline.handle))
        now = time.time()
        for r in self.tracker.seed(now):
            self.pipeline.emit(r)
        self._seed_kernel_membership()
        if engine is not None and engine.gpu_rights is not None:
            engine.gpu_rights.seed()  # processes already running that hold the GPU right
        if opts.preexisting_sockets:
            self._emit_preexisting_sockets()
        selftest = engine.selftest() if engine is not None else {}
        # policy and episodes are in our maps: an older layout's pinned set
        # hands over now (episode_tracer/probes.py commit)
        pinned = self.probes.commit()
        from .runners import RunnerWatch

        self.runners = RunnerWatch(opts.orphan_episode, opts.orphan_grace)
        self.service.start()
        self.ready_record = {
            "type": "ready",
            "ts": time.time(),
            "episode": None,
            "version": __version__,
            "scope": "all" if opts.scope_all else "episodes",
            "mode": "monitor" if opts.monitor else "enforce",
            "programs": self.probes.attached_programs(),
            "hooks": dict(self.probes.hooks),
            "pinned": pinned,
            "policy_version": engine.policy_version if engine is not None else None,
            "selftest": selftest,
            "compile_s": round(self.probes.compile_s, 3),
            "startup_s": round(time.time() - self.started, 3),
            "node": socket.gethostname(),
            "schema": SCHEMA_VERSION,
            **self.service.ready_fields(),
        }
        self.pipeline.emit(self.ready_record)
        self.pipeline.flush()
        self._start_gpu_watcher()
        if opts.relay_interval > 0:
            from .relay import Scanner

            self.relay = Scanner(self.tracker, min_age_s=opts.relay_min_age)
        self._last_tick = time.monotonic()
        return self.ready_record

    # ------------------------------------------------------------------- GPU
    def _start_gpu_watcher(self) -> None:
        """Lazily, after the tracer is ready: NVML is loaded and initialised
        in the watcher's thread, so a node without GPUs starts as fast as
        ever and says why GPU watching is off in a `gpu_status` record."""
        if self.opts.gpu_interval <= 0:
            return
        from .gpu_watch import GpuWatcher

        self.gpu = GpuWatcher(self.tracker, interval=self.opts.gpu_interval)
        self.pipeline.observers.append(self._gpu_observe)
        self.gpu.start()

    def _gpu_observe(self, rec: dict[str, Any]) -> None:
        if rec["type"] == "episode_end" and rec.get("episode") and self.gpu is not None:
            self.gpu.episode_ended(rec["episode"], rec.get("ts") or time.time())

    def poll_gpu(self) -> None:
        if self.gpu is None:
            return
        pl = self.pipeline
        for r in self.gpu.poll():
            if r["type"] in ("gpu", "gpu_budget"):
                pl.handle(r)  # through the policy
            else:
                pl.emit(r)

    def add_poll_hook(self, fn: Callable[[], None]) -> None:
        """fn() runs on the loop's thread after each ring-buffer poll (and
        once more at close): where per-poll batches are handed on."""
        self._poll_hooks.append(fn)

    def add_observer(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self._observers.append(fn)
        if self.pipeline is not None:
            self.pipeline.observers.append(fn)

    def _make_engine(self):
        if not self.opts.policy:
            return None
        from .engine import Engine

        return Engine.from_options(self.opts)

    def _on_raw(self, buf: bytes) -> None:
        self.pipeline.feed_raw(buf)

    # ------------------------------------------------- kernel map membership
    def _sync_kernel(self, rec: dict[str, Any]) -> None:
        t = rec["type"]
        if t in ("exec", "fork") and rec.get("episode") in self.tracker.refused:
            # a process that entered a refused episode's cgroup after the
            # refusal's kill (a cgroup made by hand, filled later): killed too
            self._fail_closed(rec["episode"], "refused episode: a process joined after the refusal")
            if t == "exec":
                self._kill_pid(rec.get("pid"), "refused episode")
            return
        if t == "episode_start":
            e = self.tracker.episodes.get(rec["episode"])
            if e is not None:
                self.episode_loss.started(self.probes, e)
                # the identity's mask before the cgroups that name it
                if self.engine_slot_hook:
                    self.engine_slot_hook(e)
                ok = True
                for cg in e.cgroup_ids:
                    if not self.probes.add_episode_cgroup(cg, e.slot):
                        ok = False
                        self._fail_closed(rec["episode"], "episode_cgroups map full")
                e.kernel = ok
                if e.source in ("attach", "container"):
                    from .attach_ops import track_members

                    track_members(self, e)
        elif t == "episode_end":
            e = self.tracker.episodes.get(rec["episode"])
            if e is not None:
                self.episode_loss.ended(self.probes, e)
                for cg in e.cgroup_ids:
                    self.probes.remove_episode_cgroup(cg)
                self.probes.clear_slot_mask(e.slot)
        elif t == "escape" and rec.get("episode"):
            # still a member: the kernel keeps it (and its slot's rules)
            slot = self.tracker.episode_slot(rec["episode"]) or rec.get("slot") or 0
            self.probes.track_pid(rec["pid"], TRACK_ESCAPED, slot)
        elif t == "exec" and rec.get("env_episode") and rec.get("membership") == "env":
            slot = self.tracker.episode_slot(rec["env_episode"]) or 0
            if not self.probes.track_pid(rec["pid"], TRACK_ENV, slot):
                self._kill_pid(rec["pid"], "tracked map full")
        elif t == "episode_refused":
            self._fail_closed(rec["episode"], rec.get("reason") or "refused")
        elif t == "fork" and rec.get("untracked") and rec.get("membership") in ("env", "lineage"):
            # only lineage kept the child in its episode, and the kernel could
            # not track it: it would run unscoped, so it does not run
            self._kill_pid(rec.get("child_pid"), "tracked map full")

    def _fail_closed(self, episode: str, why: str) -> None:
        """An episode the kernel maps cannot name does not run: killed
        (cgroup.kill, else its processes), counted, logged."""
        from . import cgroups

        self.scale_failed_closed += 1
        log.warning("episode %s stopped: %s", episode, why)
        path = self.tracker.cgroups.paths.get(episode) or (self.probes.episode_root / episode)
        if not (path.exists() and cgroups.kill(path)):
            for p in self.tracker.table.members(episode):
                self._kill_pid(p.pid, why)

    def _kill_pid(self, pid: int | None, why: str) -> None:
        if not pid:
            return
        self.scale_failed_closed += 1
        log.warning("pid %d stopped: %s", pid, why)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass

    @property
    def engine_slot_hook(self):
        eng = self.pipeline.engine if self.pipeline else None
        return getattr(eng, "on_episode_slot", None)

    def _seed_kernel_membership(self) -> None:
        sources = {"env": TRACK_ENV, "cgroup": TRACK_CGROUP, "escaped": TRACK_ESCAPED}
        for p in self.tracker.table.live():
            if p.episode is None:
                continue
            # cgroup members too: one that is moved out later stays a member (episode_tracer/bpf/membership.h)
            slot = self.tracker.episode_slot(p.episode) or 0
            self.probes.track_pid(p.pid, sources.get(p.membership, TRACK_LINEAGE), slot)
        for e in self.tracker.episodes.values():
            for cg in e.cgroup_ids:
                self.probes.add_episode_cgroup(cg, e.slot)

    def _emit_preexisting_sockets(self) -> None:
        from .sockets import preexisting_records

        try:
            recs = preexisting_records(self.tracker, include_all=self.opts.scope_all)
        except Exception as e:  # sock_diag unavailable: say so, keep running
            log.warning("could not enumerate existing sockets: %s", e)
            return
        for r in recs:
            self.pipeline.handle(r)

    # ------------------------------------------------------------------ loop
    def loop(self, poll_ms: int = 100) -> None:
        """The loop thread: the only writer of the tracker, process table,
        engine, kernel maps and pipeline. Other threads reach them through
        self.commands, drained here after every poll (episode_tracer/commands.py)."""
        hooks = self._poll_hooks
        commands = self.commands
        while not self.stop_event.is_set():
            self.probes.poll(commands.poll_ms(poll_ms))
            for h in hooks:
                h()
            commands.drain(self)
            self.service.after_poll()
            self.poll_gpu()
            now = time.monotonic()
            eng = self.pipeline.engine
            if eng is not None and eng._gate_seen is not None:
                for r in eng.poll_gates(now):
                    self.pipeline.emit(r)
            for r in self.flows.poll():
                self.pipeline.emit(r)
            if now - self._last_tick >= self.opts.stats_interval:
                self.tick(now)
            if self.relay is not None and now - self._last_relay >= self.opts.relay_interval:
                self.scan_relays(now)

    def scan_relays(self, now_mono: float | None = None) -> None:
        self._last_relay = now_mono if now_mono is not None else time.monotonic()
        try:
            recs = self.relay.scan()
        except Exception as e:  # sock_diag unavailable: say so once, stop scanning
            log.warning("relay scan failed, relay detection off: %s", e)
            self.relay = None
            return
        for r in recs:
            self.pipeline.handle(r)

    def tick(self, now_mono: float | None = None) -> None:
        now_mono = now_mono if now_mono is not None else time.monotonic()
        pl = self.pipeline
        wall = time.time()
        for kind, total in self.probes.lost_counts().items():
            seen = self._lost_seen.get(kind, 0)
            if total > seen:
                pl.emit({"type": "lost", "ts": wall, "episode": None, "kind": kind,
                         "count": total - seen, "total": total})
                self._lost_seen[kind] = total
        for r in self.episode_loss.records(self.probes, list(self.tracker.episodes.values()), wall):
            pl.emit(r)
        for r in self.tracker.scan_cgroups(wall):
            pl.emit(r)
        if self.runners is not None:  # episodes whose runner died (episode_tracer/runners.py)
            for r in self.runners.poll(self.tracker, now_mono, wall):
                pl.emit(r)
        svc = self.service
        for r in svc.tick(wall):
            pl.emit(r)
        reloading = self._reload_pending
        if reloading:  # SIGHUP or a changed config file: config first, then the policy with it
            self._reload_pending = False
            for r in svc.reload_config(wall):
                pl.emit(r)
            self._ensure_relay()
            if pl.engine is not None:
                pl.engine.request_reload()
        if pl.engine is not None:
            for r in pl.engine.tick(wall):
                pl.emit(r)
        if reloading:
            svc.reload_done()
        self.tracker.reap()
        if now_mono - self._last_sweep >= SWEEP_S:
            self._last_sweep = now_mono
            self.tracker.table.sweep_outside()
        dt = max(now_mono - self._last_tick, 1e-6)
        pl.emit({"type": "stats", "ts": wall, "episode": None, "events": pl.count,
                 "rate": round((pl.count - self._last_count) / dt, 1),
                 "lost_total": sum(self._lost_seen.values()),
                 "counters": self.probes.counters(),
                 "slots": {**self.tracker.slots.stats(), "failed_closed": self.scale_failed_closed},
                 **({"containers": self.tracker.containers.stats()} if self.tracker.containers else {}),
                 "events_by_kind": dict(pl.by_kind)})
        self._last_count = pl.count
        self._last_tick = now_mono
        pl.flush()

    def request_reload(self) -> None:
        """SIGHUP: configuration and policy reload at the next tick (safe
        from a signal handler: only sets a flag)."""
        self._reload_pending = True

    def request_reopen(self) -> None:
        """SIGUSR1: reopen the JSONL log (logrotate's postrotate)."""
        if self.service is not None:
            self.service.request_reopen()

    def _ensure_relay(self) -> None:
        if self.opts.relay_interval > 0 and self.relay is None and self.tracker is not None:
            from .relay import Scanner

            self.relay = Scanner(self.tracker, min_age_s=self.opts.relay_min_age)
        elif self.opts.relay_interval <= 0:
            self.relay = None

    def drain(self) -> None:
        """Consume everything already in the ring buffer (tests, shutdown)."""
        self.probes.consume()

    def lost_total(self) -> int:
        return sum(self.probes.lost_counts().values())

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        # the final drain first: its episode_end records reach the GPU
        # watcher, whose last records (totals) then go out before the sinks close
        if self.probes is not None:
            try:
                self.probes.consume()
                self.tick()
            except Exception as e:  # pragma: no cover
                log.warning("final drain: %s", e)
        if self.gpu is not None:
            self.gpu.stop()
            if self.pipeline is not None:
                try:
                    self.poll_gpu()
                except Exception as e:  # pragma: no cover
                    log.warning("final GPU records: %s", e)
            self.gpu = None
        for h in self._poll_hooks:
            h()
        if self.runners is not None:
            self.runners.close()
        if self.flows is not None and self.probes is not None:
            self.flows.close()  # before the wire programs go: held flows cannot stay held
        if self.pipeline is not None and self.pipeline.engine is not None:
            self.pipeline.engine.close()
        if self.probes is not None:
            self.probes.close()
            self.probes = None
        if self.pipeline is not None:
            self.pipeline.close()
        if self.service is not None:
            self.service.close()
            self.service = None


def is_root() -> bool:
    return os.geteuid() == 0
