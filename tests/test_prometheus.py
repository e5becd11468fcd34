"""The shipped Prometheus alerting rules: `promtool check rules`, `promtool
test rules`, and for real: Debian's prometheus scrapes a live tracer on
loopback, an episode trips an enforcing rule, and the Prometheus HTTP API
reports AgentTracerEnforcedAlert firing."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from at_testlib import LiveTracer, run_in_episode, wait_for
from episode_tracer.paths import POLICY_DIR

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
need_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt: prometheus)")


@need_promtool
def test_promtool_check_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES_DIR / "agent-tracer-rules.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, r.stdout + r.stderr


@need_promtool
def test_promtool_test_rules():
    r = subprocess.run([PROMTOOL, "test", "rules", "agent-tracer-rules.test.yml"], cwd=RULES_DIR,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@need_promtool
def test_promtool_test_can_fail(tmp_path):
    """A wrong expectation fails: the rule tests are not vacuous."""
    shutil.copy(RULES_DIR / "agent-tracer-rules.yml", tmp_path)
    t = (RULES_DIR / "agent-tracer-rules.test.yml").read_text()
    (tmp_path / "t.yml").write_text(t.replace("- eval_time: 1m\n        alertname: AgentTracerEnforcedAlert\n"
                                              "        exp_alerts: []",
                                              "- eval_time: 1m\n        alertname: AgentTracerEnforcedAlert\n"
                                              "        exp_alerts: [{exp_labels: {severity: critical}}]"))
    r = subprocess.run([PROMTOOL, "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def api(port: int, path: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt: prometheus)")
def test_prometheus_fires_the_enforced_alert(tmp_path, episode_id):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs")
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], metrics_listen=("127.0.0.1", 0), stats_interval=0.5)
    t.start()
    prom = None
    try:
        shutil.copy(RULES_DIR / "agent-tracer-rules.yml", tmp_path)
        (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [agent-tracer-rules.yml]
scrape_configs:
  - job_name: agent-tracer
    static_configs:
      - targets: ["{t.ready['metrics']}"]
""")
        port = free_port()
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
                                start_new_session=True)

        def up():
            try:
                res = api(port, "/api/v1/query?query=up%7Bjob%3D%22agent-tracer%22%7D")["data"]["result"]
                return res and res[0]["value"][1] == "1"
            except OSError:
                return False

        assert wait_for(up, timeout=120, interval=0.5), (tmp_path / "prometheus.log").read_text()[-3000:]
        # the zero-initialised counter has been scraped before the alert: the increase is visible
        assert wait_for(lambda: api(port, "/api/v1/query?query=agent_tracer_alerts_total%7Brule%3D%22miner-by-name%22%7D")
                        ["data"]["result"], timeout=60, interval=0.5)
        assert not [a for a in api(port, "/api/v1/alerts")["data"]["alerts"]
                    if a["labels"]["alertname"] == "AgentTracerEnforcedAlert"]
        link = tmp_path / "xmrig"
        link.symlink_to("/bin/sleep")
        run_in_episode(episode_id, [str(link), "5"], timeout=30)
        a = t.expect_alert(episode_id, "miner-by-name", timeout=10)
        assert a["enforced"] is True

        def firing():
            return [x for x in api(port, "/api/v1/alerts")["data"]["alerts"]
                    if x["labels"]["alertname"] == "AgentTracerEnforcedAlert" and x["state"] == "firing"]

        f = wait_for(firing, timeout=120, interval=0.5)
        assert f, api(port, "/api/v1/alerts")
        assert f[0]["labels"]["rule"] == "miner-by-name" and f[0]["labels"]["action"] == a["action"]
        assert episode_id not in json.dumps(f)  # no episode id in labels
        # and nothing claims the tracer is down or failing its self-test
        names = {x["labels"]["alertname"] for x in api(port, "/api/v1/alerts")["data"]["alerts"]}
        assert not names & {"AgentTracerDown", "AgentTracerSelftestFailing", "AgentTracerEventsLost"}, names
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(prom.pid, 9)
                prom.wait()
        t.stop()
