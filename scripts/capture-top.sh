#!/usr/bin/env bash
# Refresh docs/top-capture.txt: screens of `agent-tracer top` in a real tmux
# pane (132x40) from the end-to-end test (tests/test_top_tmux.py): a real
# tracer, two episodes, one tripped a rule; the main view, the detail view of
# that episode, and the main view filtered after the operator killed it. Root.
set -euo pipefail
cd "$(dirname "$0")/.."
: > docs/top-capture.txt
AT_TOP_CAPTURE="$PWD/docs/top-capture.txt" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_top_tmux.py
sed -i -e 's/[[:space:]]*$//' docs/top-capture.txt
echo "wrote docs/top-capture.txt"
