#!/usr/bin/env python3
"""Refresh tests/data/benign/recording.jsonl (root): run the benign corpus
live in episodes, the way tests/test_benign_corpus.py does, and keep the
tracer's records of those episodes, for `agent-tracer replay` without root.

    sudo .venv/bin/python scripts/record-benign.py
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import benign  # noqa: E402
from at_testlib import LiveTracer  # noqa: E402
from nethost import NetHost  # noqa: E402
from episode_tracer.paths import POLICY_DIR  # noqa: E402


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (loads the BPF programs, makes cgroups and a network namespace)", file=sys.stderr)
        return 2
    entries = benign.load_corpus()
    with tempfile.TemporaryDirectory(prefix="at-benign-") as d:
        tmp = Path(d)
        with NetHost(tmp / "ext") as h:
            h.start_sshd()
            services = benign.Services(tmp, ext=h).start()
            t = LiveTracer(policy=True, policy_dirs=[POLICY_DIR, benign.SITE_FILE], monitor=False,
                       gate_timeout=benign.GATE_TIMEOUT_S).start()
            try:
                run = benign.run_live(t, services, tmp / "work", entries)
            finally:
                t.stop()
                services.close()
    problems = run.problems()
    for p in problems:
        print(p, file=sys.stderr)
    n = benign.write_recording(run)
    print(f"{benign.RECORDING}: {n} records of {len(entries)} entries; {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
