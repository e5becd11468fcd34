"""The precision line of the benchmark report (no root): the benign
corpus's recording replayed through the default packs plus the site file
gives zero enforcing false positives, next to the attack cases of the pack
tests that are stopped; both land in the report's tables and targets."""
from __future__ import annotations

from episode_tracer.bench import check_targets, render_text
from episode_tracer.paths import POLICY_DIR
from episode_tracer.precision import precision_rows, precision_summary


def test_precision_summary_on_the_shipped_data():
    p = precision_summary(POLICY_DIR)
    c, r = p["corpus"], p["red_team"]
    assert "error" not in c and "error" not in r, p
    assert c["entries"] >= 200 and c["enforcing_false_positives"] == 0, c["examples"]
    assert r["cases"] >= 50 and r["stopped"] == r["cases"], r["missed"]


def test_precision_in_the_report_and_targets():
    p = {"corpus": {"entries": 221, "records": 4000, "alerts": 40, "enforcing_false_positives": 2,
                    "examples": []}, "red_team": {"cases": 86, "stopped": 85, "missed": ["tunnels: x"]}}
    rows = precision_rows(p)
    assert rows[0][1] == 2 and rows[1][1] == "85/86" and "tunnels: x" in rows[1][2]
    t = [x for x in check_targets({"precision": p}) if x["name"].startswith("enforcing false positives")]
    assert t and t[0]["met"] is False and t[0]["measured"] == 2
    text = render_text({"meta": {}, "precision": p, "targets": check_targets({"precision": p})})
    assert "Precision" in text and "85/86" in text
