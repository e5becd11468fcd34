"""The node service with the real BPF programs (root): /metrics and /healthz,
the JSON Schema of a live recording, JSONL rotation under load, and
configuration + site policy reload through ConfigMap symlink swaps."""
from __future__ import annotations

import json
import os
import re
import time
import shutil
import urllib.request
from pathlib import Path

import pytest

from at_testlib import LiveTracer, run_in_episode, wait_for
from test_config import swap_configmap
from episode_tracer import config
from episode_tracer.paths import POLICY_DIR

pytestmark = pytest.mark.root

DOCS = Path(__file__).resolve().parent.parent / "docs"


def get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def killed_name(tmp_path: Path, name: str = "xmrig") -> Path:
    """/bin/sleep under a miner's name: the default packs kill it at exec."""
    link = tmp_path / name
    link.symlink_to("/bin/sleep")
    return link


def metric_lines(text: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(name + "{") or ln.startswith(name + " ")]


def test_metrics_and_healthz_with_the_default_packs(tmp_path, episode_id):
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], metrics_listen=("127.0.0.1", 0), stats_interval=0.2)
    t.start()
    try:
        base = f"http://{t.ready['metrics']}"
        code, body = get(base + "/healthz")
        assert (code, body.strip()) == (200, "ok")
        code, body = get(base + "/healthz?format=json")
        assert code == 200 and json.loads(body) == {"ok": True, "reason": "ok"}
        res = run_in_episode(episode_id, ["/bin/sh", "-c", f"/bin/true; exec {killed_name(tmp_path)} 5"], timeout=20)
        assert res.killed_by_policy or res.exit_code != 0
        a = t.expect_alert(episode_id, "miner-by-name", timeout=10)
        assert a["enforced"] is True

        def scraped():
            _, text = get(base + "/metrics")
            ok = [ln for ln in metric_lines(text, "agent_tracer_alerts_total")
                  if 'rule="miner-by-name"' in ln and 'enforced="true"' in ln and not ln.endswith(" 0.0")]
            return text if ok and metric_lines(text, "agent_tracer_events_total") else None

        text = wait_for(scraped, timeout=15)
        assert text, get(base + "/metrics")[1]
        sev, act = a["severity"], a["action"]
        assert f'agent_tracer_alerts_total{{action="{act}",enforced="true",rule="miner-by-name",severity="{sev}"}} 1.0' \
            in text
        # every rule of the loaded policy starts at 0 (so Prometheus sees the first increase)
        assert len(metric_lines(text, "agent_tracer_alerts_total")) >= 2 * 10
        assert re.search(r'agent_tracer_events_total\{kind="exec"\} [1-9]', text)
        assert 'agent_tracer_events_lost_total{kind="exec"} 0.0' in text
        assert 'agent_tracer_selftest_ok{path="exec_gate"} 1.0' in text
        assert re.search(r'agent_tracer_build_info\{policy_version="[0-9a-f:sha256]+",version="[^"]+"\} 1.0', text)
        assert 'agent_tracer_episodes{state="running"}' in text
        # the episode's execs were gated (the packs gate every exec in an episode) and released
        assert re.search(r'agent_tracer_gate_hold_seconds_count\{kind="exec"\} [1-9]', text), \
            metric_lines(text, "agent_tracer_gate_hold_seconds_count")
        assert episode_id not in text  # no episode id label, ever
        code, _ = get(base + "/nothing")
        assert code == 404
    finally:
        t.stop()


def test_healthz_503_names_the_failed_selftest():
    from episode_tracer.metrics import Metrics, health_from_ready

    rec = {"programs": ["tracepoint:x"], "policy_version": "v", "selftest": {
        "connect_deny": "ok", "exec_gate": "failed: gated exec was not stopped"}}
    assert health_from_ready(rec) == (False, "self-test failed: exec_gate: failed: gated exec was not stopped")
    assert health_from_ready({**rec, "programs": []}) == (False, "no BPF programs attached")
    assert health_from_ready({**rec, "selftest": {"a": "ok (monitor mode: not enforced)"}}) == (True, "ok")
    m = Metrics()
    assert m.healthz()[0] is False and "starting" in m.healthz()[1]
    m.observe({"type": "ready", **rec})
    assert m.healthz() == health_from_ready(rec)
    assert 'agent_tracer_selftest_ok{path="exec_gate"} 0.0' in m.render().decode()


def test_live_recording_validates_against_the_schema(tmp_path, episode_id):
    import jsonschema

    schema = json.loads((DOCS / "record-schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    log = tmp_path / "rec.jsonl"
    t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR], log=str(log), stats_interval=0.2).start()
    try:
        script = tmp_path / "agent.sh"
        script.write_text(f"#!/bin/sh\n/bin/true\n(sleep 0.1 &)\n{killed_name(tmp_path)} 1\n"
                          "python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen()'\n")
        script.chmod(0o755)
        run_in_episode(episode_id, [str(script)], timeout=30)
        t.wait(type="episode_end", episode=episode_id, timeout=10)
        t.expect_alert(episode_id, "miner-by-name", timeout=10)
        assert wait_for(lambda: t.find(type="stats"), timeout=10)
    finally:
        t.stop()
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    kinds = {r["type"] for r in recs}
    assert {"ready", "exec", "fork", "exit", "alert", "episode_start", "episode_end", "stats", "listen"} <= kinds, kinds
    v = jsonschema.Draft202012Validator(schema)
    errors = [(r["type"], e.message) for r in recs for e in v.iter_errors(r)]
    assert not errors, errors[:10]
    assert recs[[r["type"] for r in recs].index("ready")]["schema"] == 1
    assert {r["node"] for r in recs} == {os.uname().nodename}
    # and the schema can fail: a record without node, an alert without rule
    assert list(v.iter_errors({k: x for k, x in recs[0].items() if k != "node"}))
    a = next(r for r in recs if r["type"] == "alert")
    assert list(v.iter_errors({k: x for k, x in a.items() if k != "rule"}))


def test_rotation_under_load_loses_no_record(tmp_path, episode_id):
    log = tmp_path / "events.jsonl"
    t = LiveTracer(log=str(log), log_max_bytes=64 * 1024, log_keep=10_000, stats_interval=0.1).start()
    try:
        # about 4000 exec/fork/exit records from the episode while the log rotates
        res = run_in_episode(episode_id, ["/bin/sh", "-c", "i=0; while [ $i -lt 1500 ]; do /bin/true; i=$((i+1)); done"],
                             timeout=240)
        assert res.exit_code == 0
        t.wait(type="episode_end", episode=episode_id, timeout=30)
    finally:
        t.stop()
    files = sorted(tmp_path.glob("events.jsonl*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert len(files) > 5, files  # it did rotate, many times
    lines = [json.loads(ln) for f in files for ln in f.read_text().splitlines()]
    mem = t.records
    lost = sum(r["count"] for r in mem if r["type"] == "lost")
    assert lost == 0, "ring-buffer loss: the comparison below would still hold, but the load was too high"
    assert len(lines) == len(mem)
    assert [(r["type"], r.get("pid"), r.get("ts")) for r in lines] == [(r["type"], r.get("pid"), r.get("ts")) for r in mem]
    assert sum(1 for r in lines if r["type"] == "exec" and r.get("episode") == episode_id) >= 1500


def _configmap(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True)
    swap_configmap(d, "..2026_01_01_00_00_00.000000001", files)
    return d


SITE_RULE = """
[[rule]]
name = "site-marker-exec"
severity = "medium"
on = "exec"
action = "alert"
match = { basename = "site-marker-{n}" }
"""


def test_configmap_swaps_reload_config_and_site_policies(tmp_path, episode_id, second_episode_id):
    cm = _configmap(tmp_path / "etc", {"config.toml": "gate_timeout = 3.0\nstats_interval = 0.2\n"})
    pd = _configmap(tmp_path / "policies.d", {"site.toml": SITE_RULE.replace("{n}", "1")})
    main_f = cm / "config.toml"
    flags = {"site_policy_dir": str(pd)}
    cfg = config.load(main_f, flags)
    t = LiveTracer(policy=True, policy_dirs=config.policy_paths(cfg), gate_timeout=cfg["gate_timeout"],
                   stats_interval=cfg["stats_interval"], config=cfg,
                   config_loader=lambda: config.load(main_f, flags)).start()
    try:
        eng = t.rt.pipeline.engine
        assert eng.gate_timeout == 3.0 and pd in eng.policy_paths
        old_version = eng.policy.version
        # the config ConfigMap changes
        swap_configmap(cm, "..2026_01_01_00_01_00.000000001", {"config.toml": "gate_timeout = 4.5\nstats_interval = 0.2\n"})
        r = t.wait(type="config_reload", timeout=15)
        assert r and r[0]["applied"] == ["gate_timeout"], t.find(type="config_reload")
        assert eng.gate_timeout == 4.5
        # the site policy ConfigMap changes: the new rule is live
        # a config reload reloads the policy too (same version): wait for that one first
        assert t.wait(type="policy_reload", ts=lambda ts: ts >= r[0]["ts"], timeout=15)
        n = len(t.find(type="policy_reload"))
        swap_configmap(pd, "..2026_01_01_00_02_00.000000001", {"site.toml": SITE_RULE.replace("{n}", "2")})
        r = t.wait(type="policy_reload", n=n + 1, timeout=15)
        assert len(r) == n + 1 and r[-1]["policy_version"] != old_version
        marker = tmp_path / "site-marker-2"
        shutil.copy("/bin/true", marker)  # a copy: the rule matches the executable's own name
        run_in_episode(episode_id, [str(marker)], timeout=20)
        t.expect_alert(episode_id, "site-marker-exec", timeout=10)
        # a bad config keeps the running one
        n_reload = len(t.find(type="config_reload"))
        swap_configmap(cm, "..2026_01_01_00_03_00.000000001", {"config.toml": "gate_timeout = 999\n"})
        e = t.wait(type="config_error", timeout=15)
        assert e and "gate_timeout: 999 is outside" in e[0]["errors"][0] and str(main_f) in e[0]["errors"][0]
        assert eng.gate_timeout == 4.5 and len(t.find(type="config_reload")) == n_reload
        # a bad site policy keeps the running policy (the one the last reload loaded)
        seen = lambda: [(x["type"], x.get("policy_version") or x.get("kept_version"))
                        for x in t.records if x["type"] in ("policy_reload", "policy_error")]
        running = t.find(type="policy_reload")[-1]["policy_version"]
        swap_configmap(pd, "..2026_01_01_00_04_00.000000001", {"site.toml": "[[rule]]\nname = 3\n"})
        pe = t.wait(type="policy_error", timeout=15)
        assert pe and any("name: expected a string" in m for m in pe[0]["errors"]), pe
        assert pe[0]["kept_version"] == running, seen()
        run_in_episode(second_episode_id, [str(marker)], timeout=20)
        t.expect_alert(second_episode_id, "site-marker-exec", timeout=10)
    finally:
        t.stop()
