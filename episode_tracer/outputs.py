"""Alert outputs: Falco's HTTP output format (for Falcosidekick), a plain
JSON webhook with our alert record, and syslog (RFC 5424 over a local unix
socket, /dev/log by default).

Each output owns a thread and a bounded queue. The loop thread only offers
(`put_nowait`): a full queue drops the alert and counts it, so a slow or
dead receiver never blocks the event pipeline. A delivery that fails is
retried with exponential back-off (`backoff` * 2^n, `retries` times), then
dropped and counted. The loop thread reads the counters each tick and writes
an `output_dropped` record when they grew (loss is never silent), and the
metrics expose them as agent_tracer_output_dropped_total{output}.
"""
from __future__ import annotations

import datetime as _dt
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import orjson

log = logging.getLogger(__name__)

SEVERITY_RANK = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
# Falco's priorities (falco.yaml): Emergency Alert Critical Error Warning Notice Informational Debug
FALCO_PRIORITY = {"critical": "Critical", "high": "Error", "medium": "Warning", "low": "Notice",
                  "info": "Informational"}
# RFC 5424 severities
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "info": 6}
SYSLOG_FACILITY = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
                   **{f"local{i}": 16 + i for i in range(8)}}
SD_ID = "agent-tracer@32473"  # 32473: the example private enterprise number RFC 5612 reserves for documentation

_STOP = object()
# direct connections: an http_proxy in the service's environment must not
# reroute alerts (a receiver behind a proxy is a URL of the proxy)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _rfc3339(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _falco_time(ts: float) -> str:
    # Falco writes nanoseconds: 2024-01-01T00:00:00.123456789Z
    return _dt.datetime.fromtimestamp(int(ts), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + \
        f".{int(round((ts % 1) * 1e9)):09d}Z"


def _cmdline(argv: Any) -> str:
    return " ".join(argv) if isinstance(argv, list) else (argv or "")


def falco_event(alert: dict[str, Any], hostname: str) -> dict[str, Any]:
    """Falco's JSON output (json_output: true, json_include_output_property,
    json_include_tags_property): the fields Falcosidekick reads."""
    sev = alert.get("severity") or "info"
    pri = FALCO_PRIORITY.get(sev, "Informational")
    ts = alert.get("ts") or time.time()
    fields: dict[str, Any] = {
        "agent.episode": alert.get("episode"),
        "agent.action": alert.get("action"),
        "agent.enforced": alert.get("enforced"),
        "agent.would": alert.get("would"),
        "agent.policy_version": alert.get("policy_version"),
        "evt.type": alert.get("event"),
        "proc.pid": alert.get("pid"),
        "proc.exepath": alert.get("exe"),
        "proc.cmdline": _cmdline(alert.get("argv")),
    }
    if alert.get("addr") is not None:
        fields["fd.sip"] = alert.get("addr")
        fields["fd.sport"] = alert.get("port")
    if alert.get("sni"):
        fields["agent.sni"] = alert["sni"]
    if alert.get("protocol"):
        fields["agent.protocol"] = alert["protocol"]
    out = (f"{_dt.datetime.fromtimestamp(ts).strftime('%H:%M:%S.%f')}: {pri} {alert.get('rule')}: "
           f"{alert.get('description') or ''} (episode={alert.get('episode')} action={alert.get('action')} "
           f"enforced={str(bool(alert.get('enforced'))).lower()} pid={alert.get('pid')} exe={alert.get('exe')} "
           f"cmdline={_cmdline(alert.get('argv'))})")
    tags = list(alert.get("tags") or [])
    for t in ("agent-tracer", sev):
        if t not in tags:
            tags.append(t)
    return {"output": out, "priority": pri, "rule": alert.get("rule"), "time": _falco_time(ts),
            "output_fields": fields, "source": "agent-tracer", "hostname": hostname, "tags": tags}


def _sd_escape(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(alert: dict[str, Any], hostname: str, app_name: str = "agent-tracer",
                   facility: str = "daemon", procid: int | None = None) -> bytes:
    """RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] BOM MSG;
    MSG is the alert record as JSON."""
    sev = SYSLOG_SEVERITY.get(alert.get("severity") or "info", 6)
    pri = SYSLOG_FACILITY.get(facility, 3) * 8 + sev
    sd_params = {"rule": alert.get("rule"), "severity": alert.get("severity"), "action": alert.get("action"),
                 "enforced": str(bool(alert.get("enforced"))).lower(), "episode": alert.get("episode") or "-",
                 "pid": alert.get("pid")}
    sd = "[" + SD_ID + "".join(f' {k}="{_sd_escape(v)}"' for k, v in sd_params.items()) + "]"
    head = (f"<{pri}>1 {_rfc3339(alert.get('ts') or time.time())} {hostname[:255] or '-'} {app_name[:48]} "
            f"{procid if procid is not None else '-'} alert {sd} ")
    return head.encode() + b"\xef\xbb\xbf" + orjson.dumps(alert, default=str)


class Output:
    """A queue and a delivery thread. Subclasses implement send(alert)."""

    kind = "output"

    def __init__(self, name: str, queue_size: int = 10_000, retries: int = 5, backoff: float = 0.5,
                 timeout: float = 5.0, min_severity: str = "info", hostname: str | None = None, **_: Any):
        self.name = name
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.min_rank = SEVERITY_RANK.get(min_severity, 0)
        self.hostname = hostname or socket.gethostname()
        self.sent = 0
        self.dropped = 0  # queue full + failed after retries
        self.dropped_full = 0
        self.dropped_failed = 0
        self.last_error = ""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"output-{name}", daemon=True)

    def start(self) -> "Output":
        self.thread.start()
        return self

    # loop thread: never blocks
    def offer(self, alert: dict[str, Any]) -> None:
        if SEVERITY_RANK.get(alert.get("severity") or "info", 0) < self.min_rank:
            return
        try:
            self.q.put_nowait(alert)
        except queue.Full:
            self.dropped_full += 1
            self.dropped += 1

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped": self.dropped, "dropped_queue_full": self.dropped_full,
                "dropped_failed": self.dropped_failed, "queued": self.q.qsize()}

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            delay = self.backoff
            for attempt in range(self.retries + 1):
                try:
                    self.send(item)
                    self.sent += 1
                    break
                except Exception as e:  # noqa: BLE001 - any delivery failure is retried, then counted
                    self.last_error = f"{type(e).__name__}: {e}"
                    if attempt == self.retries or self._stop.wait(delay):
                        self.dropped_failed += 1
                        self.dropped += 1
                        log.warning("output %s: dropped an alert after %d attempt(s): %s", self.name, attempt + 1,
                                    self.last_error)
                        break
                    delay = min(delay * 2, 60.0)

    def send(self, alert: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self, drain_s: float = 2.0) -> None:
        """Deliver what is queued for up to drain_s, then stop (what is left
        is counted as dropped)."""
        deadline = time.monotonic() + drain_s
        while not self.q.empty() and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        left = 0
        while True:
            try:
                self.q.get_nowait()
                left += 1
            except queue.Empty:
                break
        if left:
            self.dropped += left
            self.dropped_failed += left
        try:
            self.q.put_nowait(_STOP)
        except queue.Full:  # pragma: no cover - emptied just above
            pass
        self.thread.join(timeout=self.timeout + 1)


class HttpOutput(Output):
    kind = "webhook"

    def __init__(self, name: str, url: str, headers: dict[str, str] | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.url = url
        self.headers = {"Content-Type": "application/json", "User-Agent": "agent-tracer", **(headers or {})}

    def body(self, alert: dict[str, Any]) -> bytes:
        return orjson.dumps({**alert, "node": alert.get("node") or self.hostname}, default=str)

    def send(self, alert: dict[str, Any]) -> None:
        req = urllib.request.Request(self.url, data=self.body(alert), headers=self.headers, method="POST")
        with _OPENER.open(req, timeout=self.timeout) as resp:
            resp.read()
            if not 200 <= resp.status < 300:
                raise urllib.error.HTTPError(self.url, resp.status, "unexpected status", resp.headers, None)


class FalcoOutput(HttpOutput):
    kind = "falco"

    def body(self, alert: dict[str, Any]) -> bytes:
        return orjson.dumps(falco_event(alert, self.hostname), default=str)


class SyslogOutput(Output):
    kind = "syslog"

    def __init__(self, name: str, socket_path: str = "/dev/log", facility: str = "daemon",
                 app_name: str = "agent-tracer", **kw: Any):
        super().__init__(name, **kw)
        self.path = socket_path
        self.facility = facility
        self.app_name = app_name
        self._sock: socket.socket | None = None
        self._stream = False

    def _connect(self) -> socket.socket:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.connect(self.path)
            self._stream = False
        except OSError as e:
            s.close()
            if e.errno != 91:  # EPROTOTYPE: the socket is a stream one (some syslog daemons)
                raise
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.path)
            self._stream = True
        s.settimeout(self.timeout)
        return s

    def send(self, alert: dict[str, Any]) -> None:
        msg = syslog_message(alert, self.hostname, self.app_name, self.facility, procid=_pid())
        if self._sock is None:
            self._sock = self._connect()
        try:
            if self._stream:
                self._sock.sendall(f"{len(msg)} ".encode() + msg)  # RFC 6587 octet counting
            else:
                self._sock.send(msg)
        except OSError:
            self._sock.close()
            self._sock = None
            raise

    def close(self, drain_s: float = 2.0) -> None:
        super().close(drain_s)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _pid() -> int:
    import os

    return os.getpid()


def build_outputs(configs: list[dict[str, Any]]) -> list[Output]:
    """Outputs from validated config tables (episode_tracer.config: [[outputs]])."""
    out: list[Output] = []
    for c in configs:
        common = dict(queue_size=c["queue"], retries=c["retries"], backoff=c["backoff"], timeout=c["timeout"],
                      min_severity=c["min_severity"])
        t = c["type"]
        if t == "falco":
            out.append(FalcoOutput(c["name"], c["url"], headers=c.get("headers"), **common))
        elif t == "webhook":
            out.append(HttpOutput(c["name"], c["url"], headers=c.get("headers"), **common))
        elif t == "syslog":
            out.append(SyslogOutput(c["name"], socket_path=c["socket"], facility=c["facility"],
                                    app_name=c["app_name"], **common))
        else:  # pragma: no cover - config validated the type
            raise ValueError(f"unknown output type {t!r}")
    return out
