"""Where the tracer finds its BPF sources, default policies and the files it
ships (systemd unit, default config, record schema): the one place.

Package data through importlib.resources: the directories inside the
package when it is installed from a wheel; in a git checkout installed
editable they are found the same way once they live in the package, and at
the repository root beside it until then.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

_PKG = Path(str(resources.files(__package__)))
ROOT = _PKG.parent


def _find(name: str) -> Path:
    inside = _PKG / name
    return inside if inside.is_dir() else ROOT / name


BPF_DIR = _find("bpf")
POLICY_DIR = _find("policies")
DATA_DIR = _PKG / "data"
RUN_DIR = Path("/run/agent-tracer")
# AGENT_TRACER_SOCKET moves the control socket for every command at once
# (run, top, episode list|freeze|thaw|kill), e.g. a DaemonSet's host mount.
CONTROL_SOCKET = Path(os.environ.get("AGENT_TRACER_SOCKET") or RUN_DIR / "control.sock")


def data_file(name: str) -> Path:
    """A file shipped in the package's data/ (agent-tracer.service, config.toml)."""
    return DATA_DIR / name
