"""Where the tracer finds its BPF sources and default policies.

The package is installed editable (scripts/install.sh), so bpf/ and
policies/ live at the repository root beside tracer/.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = ROOT / "bpf"
POLICY_DIR = ROOT / "policies"
RUN_DIR = Path("/run/agent-tracer")
# AGENT_TRACER_SOCKET moves the control socket for every command at once
# (run, top, episode list|freeze|thaw|kill), e.g. a DaemonSet's host mount.
CONTROL_SOCKET = Path(os.environ.get("AGENT_TRACER_SOCKET") or RUN_DIR / "control.sock")
