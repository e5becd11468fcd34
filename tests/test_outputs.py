"""Alert outputs against real local receivers: an HTTP server that records
POSTs, one that is down (a closed port), one that is slow (blocks until the
test lets it go), and a unix datagram socket the test owns as syslog."""
from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time

import pytest

from at_testlib import wait_for
from episode_tracer.outputs import FalcoOutput, HttpOutput, SyslogOutput, build_outputs, falco_event, syslog_message

ALERT = {
    "type": "alert", "ts": 1764660000.123456, "rule": "ssh-reverse-tunnel", "severity": "high",
    "action": "kill-episode", "enforced": True, "would": None, "episode": "rollout-17", "pid": 4242,
    "exe": "/usr/bin/ssh", "argv": ["ssh", "-R", "8080:localhost:22", "x"], "event": "exec",
    "matched": {"argv": "-R"}, "description": "ssh remote forward", "policy_version": "abc123",
    "tags": ["tunnel", "mitre:T1572"], "node": "gpu-7",
}


class Receiver:
    """A real HTTP server on 127.0.0.1: records each POST (path, headers,
    JSON body); `gate` unset makes it block (a slow receiver)."""

    def __init__(self, status: int = 200):
        self.posts: list[dict] = []
        self.gate = threading.Event()
        self.gate.set()
        self.status = status
        rcv = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rcv.gate.wait(60)
                rcv.posts.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                self.send_response(rcv.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/post"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(**kw):
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def outputs():
    made = []

    def track(o):
        made.append(o)
        return o.start()

    yield track
    for o in made:
        o.close(drain_s=0)


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/"


def test_falco_format_reaches_the_receiver(receiver, outputs):
    r = receiver()
    o = outputs(FalcoOutput("falco", r.url, queue_size=10, retries=0, hostname="gpu-7"))
    o.offer(ALERT)
    assert wait_for(lambda: r.posts, timeout=10)
    body = r.posts[0]["body"]
    # the fields Falcosidekick reads from Falco's JSON output
    assert set(body) == {"output", "priority", "rule", "time", "output_fields", "source", "hostname", "tags"}
    assert body["priority"] == "Error" and body["rule"] == "ssh-reverse-tunnel"
    assert body["source"] == "agent-tracer" and body["hostname"] == "gpu-7"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", body["time"]), body["time"]
    assert body["time"].startswith("2025-12-02T07:20:00.123456")
    assert body["output_fields"]["agent.episode"] == "rollout-17"
    assert body["output_fields"]["proc.cmdline"] == "ssh -R 8080:localhost:22 x"
    assert body["output_fields"]["agent.enforced"] is True
    assert {"tunnel", "mitre:T1572", "agent-tracer", "high"} <= set(body["tags"])
    assert "ssh-reverse-tunnel" in body["output"] and "episode=rollout-17" in body["output"]
    assert r.posts[0]["headers"]["Content-Type"] == "application/json"
    assert o.stats()["sent"] == 1 and o.stats()["dropped"] == 0


def test_webhook_posts_our_alert_record_with_headers(receiver, outputs):
    r = receiver()
    o = outputs(HttpOutput("hook", r.url, headers={"Authorization": "Bearer t0k"}, retries=0))
    o.offer(ALERT)
    assert wait_for(lambda: r.posts, timeout=10)
    assert r.posts[0]["body"] == ALERT
    assert r.posts[0]["headers"]["Authorization"] == "Bearer t0k"


def test_min_severity_filters(receiver, outputs):
    r = receiver()
    o = outputs(HttpOutput("hook", r.url, min_severity="critical", retries=0))
    o.offer(ALERT)  # high < critical
    o.offer({**ALERT, "severity": "critical", "rule": "miner"})
    assert wait_for(lambda: r.posts, timeout=10)
    assert wait_for(lambda: o.stats()["queued"] == 0, timeout=10)
    assert [p["body"]["rule"] for p in r.posts] == ["miner"]


def test_receiver_down_retries_then_counts_the_drop(outputs):
    o = outputs(HttpOutput("down", closed_port_url(), retries=3, backoff=0.01, timeout=2))
    o.offer(ALERT)
    assert wait_for(lambda: o.dropped == 1, timeout=20), o.stats()
    assert o.dropped_failed == 1 and o.sent == 0
    assert "refused" in o.last_error.lower() or "URLError" in o.last_error


def test_receiver_error_status_is_retried_until_it_recovers(receiver, outputs):
    r = receiver(status=503)
    o = outputs(HttpOutput("flaky", r.url, retries=50, backoff=0.01))
    o.offer(ALERT)
    assert wait_for(lambda: len(r.posts) >= 2, timeout=20)  # refused and retried
    r.status = 200
    assert wait_for(lambda: o.sent == 1, timeout=20), o.stats()
    assert o.dropped == 0


def test_slow_receiver_never_blocks_the_offer_and_drops_are_counted(receiver, outputs):
    r = receiver()
    r.gate.clear()  # the receiver holds every request until the test lets go
    o = outputs(HttpOutput("slow", r.url, queue_size=5, retries=0, timeout=60))
    o.offer(ALERT)
    assert wait_for(lambda: o.q.qsize() == 0, timeout=10)  # the thread took it and is stuck in the POST
    t0 = time.monotonic()
    for i in range(50):
        o.offer({**ALERT, "pid": i})  # returns at once: 5 queue, 45 dropped
    spent = time.monotonic() - t0
    assert o.dropped_full == 45 and o.q.qsize() == 5, o.stats()
    r.gate.set()
    assert wait_for(lambda: o.sent == 6, timeout=30), o.stats()
    assert len(r.posts) == 6 and o.dropped == 45
    assert spent < 30  # the offers did not wait for the receiver (which was held for longer)


def test_syslog_rfc5424_over_a_unix_datagram_socket(tmp_path, outputs):
    path = str(tmp_path / "log.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(10)
    try:
        o = outputs(SyslogOutput("syslog", socket_path=path, facility="auth", hostname="gpu-7"))
        o.offer(ALERT)
        o.offer({**ALERT, "severity": "critical", "rule": 'we"ird]rule'})
        msgs = [srv.recv(65536), srv.recv(65536)]
    finally:
        srv.close()
    m = re.match(rb'<(\d+)>1 (\S+) (\S+) (\S+) (\d+) alert (\[agent-tracer@32473 [^\]]*(?:\\\][^\]]*)*\]) \xef\xbb\xbf(.*)$',
                 msgs[0], re.S)
    assert m, msgs[0]
    assert int(m.group(1)) == 4 * 8 + 3  # auth.err for a high alert
    assert m.group(2) == b"2025-12-02T07:20:00.123456Z" and m.group(3) == b"gpu-7" and m.group(4) == b"agent-tracer"
    assert b'rule="ssh-reverse-tunnel"' in m.group(6) and b'episode="rollout-17"' in m.group(6)
    assert json.loads(m.group(7)) == ALERT
    assert msgs[1].startswith(b"<34>1 ")  # auth.crit
    assert b'rule="we\\"ird\\]rule"' in msgs[1]


def test_syslog_socket_missing_counts_drops(tmp_path, outputs):
    o = outputs(SyslogOutput("syslog", socket_path=str(tmp_path / "nothing"), retries=1, backoff=0.01))
    o.offer(ALERT)
    assert wait_for(lambda: o.dropped == 1, timeout=10)


def test_build_outputs_from_config(tmp_path):
    from episode_tracer import config

    f = tmp_path / "config.toml"
    f.write_text('[[outputs]]\ntype = "falco"\nurl = "http://127.0.0.1:2801/"\nname = "sidekick"\n'
                 '[[outputs]]\ntype = "syslog"\n')
    outs = build_outputs(config.load(f)["outputs"])
    assert [(type(o).__name__, o.name) for o in outs] == [("FalcoOutput", "sidekick"), ("SyslogOutput", "syslog-1")]
    assert outs[1].path == "/dev/log"


def test_pure_formatters():
    ev = falco_event({**ALERT, "severity": "critical"}, "h")
    assert ev["priority"] == "Critical"
    assert syslog_message({**ALERT, "severity": "info"}, "h", facility="local0").startswith(b"<134>1 ")
