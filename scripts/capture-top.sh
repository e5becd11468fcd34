#!/usr/bin/env bash
# Refresh docs/top-capture.txt: the screen of `agent-tracer top` in a real
# tmux pane (132x40) at the end of the end-to-end test (tests/test_top_tmux.py):
# a real tracer, an episode that tripped a rule, then was frozen and killed
# through the control socket. Root.
set -euo pipefail
cd "$(dirname "$0")/.."
AT_TOP_CAPTURE="$PWD/docs/top-capture.txt" .venv/bin/python -m pytest -q tests/test_top_tmux.py
sed -i -e 's/[[:space:]]*$//' docs/top-capture.txt
echo "wrote docs/top-capture.txt"
