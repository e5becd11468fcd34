"""Helpers for the live (root) tests: a tracer running in a thread that
records into memory, waiting, running commands in episodes."""
from __future__ import annotations

import fcntl
import shutil
import threading
import time
from typing import Any, Callable


LIVE_LOCK = "/run/agent-tracer-live-test.lock"


def _has_gpu() -> bool:
    try:
        from episode_tracer.gpu import nvml_status

        return nvml_status()[0]
    except Exception:
        return False


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


class LiveTracer:
    """A Runtime running its loop in a thread, recording into memory."""

    def __init__(self, **opts):
        from episode_tracer.runtime import Runtime, RunOptions
        from episode_tracer.sinks import MemorySink

        self.sink = MemorySink()
        o = dict(log=None, control_socket=None, verdict_dir=None, extra_sinks=[self.sink], policy=False)
        o.update(opts)
        self.rt = Runtime(RunOptions(**o))
        self.thread: threading.Thread | None = None

    def start(self, loop: bool = True) -> "LiveTracer":
        # One live tracer at a time on this machine: the deny rules of one
        # apply to every episode cgroup, so parallel test runs (and benchmarks)
        # take turns here instead of seeing each other's enforcement.
        self._lock = open(LIVE_LOCK, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self.ready = self.rt.start()
        except BaseException:
            self._unlock()
            raise
        if loop:
            self.thread = threading.Thread(target=self.rt.loop, kwargs={"poll_ms": 20}, daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        self.rt.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        try:
            self.rt.close()
        finally:
            self._unlock()

    def _unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            self._lock = None
            lock.close()

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.sink.records)

    def find(self, **kw) -> list[dict[str, Any]]:
        out = []
        for r in self.records:
            if all((v(r.get(k)) if callable(v) else r.get(k) == v) for k, v in kw.items()):
                out.append(r)
        return out

    def wait(self, timeout: float = 5.0, n: int = 1, **kw) -> list[dict[str, Any]]:
        return wait_for(lambda: (lambda f: f if len(f) >= n else None)(self.find(**kw)), timeout) or self.find(**kw)

    def expect_alert(self, episode: str, rule: str, timeout: float = 5.0) -> dict[str, Any]:
        """The first `rule` alert of `episode`; fails listing the alerts seen."""
        a = self.wait(type="alert", episode=episode, rule=rule, timeout=timeout)
        assert a, f"no {rule} alert for {episode}; alerts: {[(x['rule'], x['episode']) for x in self.find(type='alert')]}"
        return a[0]


def run_in_episode(ep: str, argv: list[str], **kw):
    from episode_tracer.api import run_episode

    return run_episode(ep, argv, **kw)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
