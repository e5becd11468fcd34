"""Precision next to detection, for the benchmark report (issue 19).

* false positives: the benign corpus's recording (tests/data/benign/
  recording.jsonl, a live run of >= 200 command lines and scripts agents
  really run, refreshed by scripts/record-benign.py) replayed through the
  default packs plus the documented site file (docs/site-example.toml):
  the enforcing alerts it raises (target 0) and the alert-level ones;
* detection: the attack cases the pack tests replay (tests/data/packs/
  *.jsonl, each naming the rules that must fire): how many of those that
  expect an enforcing rule get an enforcing verdict.

Pure replays of recorded data: no root, nothing loaded into the kernel.
The live tests (tests/test_*_live.py) run the same attacks with real tools.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "benign"
PACK_CASES = ROOT / "tests" / "data" / "packs"
SITE_FILE = ROOT / "docs" / "site-example.toml"
ENFORCING = frozenset({"deny", "kill", "kill-episode", "freeze-episode"})


def _load(paths: list[Path]):
    from .policy import load_policy

    res = load_policy(paths)
    if res.errors or res.policy is None:
        raise ValueError("; ".join(map(str, res.errors)))
    return res.policy


def corpus_false_positives(policy_dir: Path, recording: Path = CORPUS / "recording.jsonl",
                           site: Path = SITE_FILE) -> dict[str, Any]:
    from .replay import replay_records
    from .sinks import read_jsonl

    if not recording.exists():
        return {"error": f"no recording at {recording} (scripts/record-benign.py makes it)"}
    policy = _load([policy_dir, site])
    records = list(read_jsonl(recording))
    episodes = {r.get("episode") for r in records if r.get("type") == "exec" and r.get("episode")}
    enforcing: list[dict[str, Any]] = []
    alerts = 0
    for a in replay_records(records, policy):
        alerts += 1
        if (a.get("would") or a.get("action")) in ENFORCING:
            enforcing.append({"rule": a["rule"], "episode": a.get("episode"), "argv": a.get("argv")})
    return {"entries": len(episodes), "records": len(records), "alerts": alerts,
            "enforcing_false_positives": len(enforcing), "examples": enforcing[:5],
            "policy_version": policy.version}


def red_team_detection(policy_dir: Path, cases: Path = PACK_CASES) -> dict[str, Any]:
    from .policy import record_context

    policy = _load([policy_dir])
    total = caught = 0
    missed: list[str] = []
    for f in sorted(cases.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            c = json.loads(line)
            want = [r for r in c.get("rules", []) if (rule := policy.rule(r)) is not None and rule.action.enforces]
            if not want:
                continue
            total += 1
            got = {v.rule for v in policy.evaluate(c["event"], record_context(c["event"])) if v.action.enforces}
            if got:
                caught += 1
            else:
                missed.append(f"{f.stem}: {c.get('note')}")
    return {"cases": total, "stopped": caught, "missed": missed}


def precision_summary(policy_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        out["corpus"] = corpus_false_positives(policy_dir)
    except Exception as e:  # noqa: BLE001 - a report line, never a crash
        out["corpus"] = {"error": str(e)}
    try:
        out["red_team"] = red_team_detection(policy_dir)
    except Exception as e:  # noqa: BLE001
        out["red_team"] = {"error": str(e)}
    return out


def precision_rows(p: dict[str, Any]) -> list[list[Any]]:
    c, r = p.get("corpus") or {}, p.get("red_team") or {}
    rows = []
    if "error" in c:
        rows.append(["enforcing false positives, benign corpus", "n/a", c["error"]])
    else:
        rows.append(["enforcing false positives, benign corpus (target 0)", c["enforcing_false_positives"],
                     f"{c['entries']} entries, {c['records']} records replayed; {c['alerts']} log/alert-level hits "
                     "(tests/test_benign_corpus.py checks each is justified)"])
    if "error" in r:
        rows.append(["attack cases stopped (pack tests)", "n/a", r["error"]])
    else:
        rows.append(["attack cases stopped (pack tests)", f"{r['stopped']}/{r['cases']}",
                     "recorded attack events the pack tests expect an enforcing rule for"
                     + (f"; missed: {', '.join(r['missed'][:3])}" if r["missed"] else "")])
    return rows
