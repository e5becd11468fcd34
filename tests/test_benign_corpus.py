"""The benign corpus (tests/data/benign/, issue 19): at least 200 command
lines and small scripts of what coding and RL agents really run.

* live (root): every entry in its own episode under the default packs plus
  the documented site file (docs/site-example.toml), against local services
  and an outside host in a network namespace (real sshd, a web server):
  every entry succeeds, none raises an enforcing alert, and every other
  alert is one its entry allows (with the reason written next to it);
* replay (no root): the recording of such a run (tests/data/benign/
  recording.jsonl, refreshed by scripts/record-benign.py) through
  `agent-tracer replay` gives the same: zero enforcing alerts.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

import benign
from episode_tracer.paths import POLICY_DIR

ENTRIES = benign.load_corpus()


def test_corpus_is_large_and_every_allowance_is_justified():
    assert len(ENTRIES) >= 200
    cats = {e.file for e in ENTRIES}
    assert {"localnet.toml", "ssh.toml", "git.toml", "fetch.toml", "build.toml", "rl.toml"} <= cats
    for e in ENTRIES:
        for rule, why in e.allow.items():
            assert len(why) > 15, (e.id, rule)


def test_corpus_allowances_name_only_alert_level_rules():
    from episode_tracer.policy import load_policy

    pol = load_policy([POLICY_DIR, benign.SITE_FILE]).policy
    for e in ENTRIES:
        for rule in e.allow:
            r = pol.rule(rule)
            assert r is not None, (e.id, rule)
            assert not r.action.enforces, f"{e.id}: allows {rule}, whose action {r.action.value} enforces"


def test_judge_flags_enforcing_and_unjustified_alerts():
    e = ENTRIES[0]
    ok = {"type": "alert", "episode": e.episode, "rule": next(iter(e.allow), "x"), "action": "log"}
    bad = [{"type": "alert", "episode": e.episode, "rule": "anything", "action": "kill"},
           {"type": "alert", "episode": e.episode, "rule": "not-allowed-rule", "action": "alert"}]
    got = benign.judge([e], ([ok] if e.allow else []) + bad)
    assert len(got) == 2 and got[0].startswith("enforcing alert") and got[1].startswith("alert not justified")


def test_replay_of_the_recording_gives_no_enforcing_alert():
    from episode_tracer.cli import main

    assert benign.RECORDING.exists(), "run scripts/record-benign.py (root) to make the recording"
    recs = [json.loads(x) for x in benign.RECORDING.read_text().splitlines() if x.strip()]
    eps = {r.get("episode") for r in recs if r.get("type") == "exec"}
    covered = [e for e in ENTRIES if e.episode in eps]
    assert len(covered) >= 200, f"the recording covers {len(covered)} entries: refresh it"
    res = CliRunner().invoke(main, ["replay", str(benign.RECORDING), "--policy-dir", str(POLICY_DIR),
                                    "--policy-dir", str(benign.SITE_FILE), "--json"])
    alerts = [json.loads(x) for x in res.output.splitlines() if x.startswith("{")]
    problems = benign.judge(ENTRIES, alerts)
    assert problems == [], problems
    # the replay did judge something: the external destinations of the ssh/git/fetch entries are on record
    assert any(a["rule"] == "external-destination" for a in alerts)


def test_replay_without_the_site_file_stops_the_ssh_entries():
    """The same recording without the site file: ssh to the outside host is
    not allowed, so the corpus's ssh and git-over-ssh entries are judged
    (this is what the site file is for)."""
    from episode_tracer.cli import main

    res = CliRunner().invoke(main, ["replay", str(benign.RECORDING), "--policy-dir", str(POLICY_DIR), "--json"])
    alerts = [json.loads(x) for x in res.output.splitlines() if x.startswith("{")]
    rules = {a["rule"] for a in alerts if a.get("would") in benign.ENFORCING}
    assert {"outbound-ssh", "ssh-port-egress"} & rules, rules


@pytest.fixture(scope="module")
def corpus_env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and creates cgroups/netns")
    missing = benign.missing_tools()
    if missing:
        pytest.skip(f"tools missing: {missing} (scripts/install.sh installs them)")
    from at_testlib import LiveTracer
    from nethost import NetHost

    tmp = tmp_path_factory.mktemp("corpus")
    with NetHost(tmp / "ext") as h:
        h.start_sshd()
        services = benign.Services(tmp, ext=h).start()
        t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, benign.SITE_FILE], monitor=False,
                       gate_timeout=benign.GATE_TIMEOUT_S).start()
        try:
            yield t, services, tmp
        finally:
            t.stop()
            services.close()


@pytest.mark.root
@pytest.mark.timeout(1200)  # 221 episodes, every exec gated, on a shared 2-core machine
def test_corpus_live_in_episodes_zero_enforcing_alerts(corpus_env):
    t, services, tmp = corpus_env
    run = benign.run_live(t, services, tmp / "work", ENTRIES)
    problems = run.problems()
    assert problems == [], "\n".join(problems)
    assert len(run.entries) >= 200
    # the policy really judged these episodes: every exec was gated
    assert sum(1 for r in run.records if r.get("type") == "exec") > 600
    assert any(r.get("rule") == "external-destination" for r in run.alerts())
    if os.environ.get("AT_RECORD_BENIGN"):
        benign.write_recording(run)
