"""Where the tracer finds its BPF sources and default policies.

The package is installed editable (scripts/install.sh), so bpf/ and
policies/ live at the repository root beside tracer/.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = ROOT / "bpf"
POLICY_DIR = ROOT / "policies"
RUN_DIR = Path("/run/agent-tracer")
CONTROL_SOCKET = RUN_DIR / "control.sock"
