"""`agent-tracer service install`: the systemd unit shipped in the package
(episode_tracer/data/agent-tracer.service), with ExecStart pointing at this
installation, plus a default config and the site policy directory."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .paths import data_file

UNIT_NAME = "agent-tracer.service"


def exec_start() -> str:
    """The command that runs this installation: the venv's console script
    when it is beside the interpreter, else `python -m`."""
    script = Path(sys.executable).parent / "agent-tracer"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m {__package__}"


def render_unit(exec_cmd: str | None = None) -> str:
    return data_file("agent-tracer.service").read_text().replace("@EXEC@", exec_cmd or exec_start())


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def install(root: Path = Path("/"), unit_dir: str = "etc/systemd/system", daemon_reload: bool = True) -> list[str]:
    out = []
    unit = root / unit_dir / UNIT_NAME
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(render_unit())
    out.append(f"wrote {unit}")
    conf_dir = root / "etc/agent-tracer"
    (conf_dir / "config.d").mkdir(parents=True, exist_ok=True)
    (conf_dir / "policies.d").mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "config.toml"
    if conf.exists():
        out.append(f"kept {conf}")
    else:
        shutil.copyfile(data_file("config.toml"), conf)
        out.append(f"wrote {conf} (edit it, then: systemctl reload agent-tracer)")
    out.append(f"site policies: {conf_dir / 'policies.d'} (loaded after the packaged packs)")
    if daemon_reload and root == Path("/") and systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        out.append("systemctl daemon-reload: done")
        out.append("next: systemctl enable --now agent-tracer")
    elif daemon_reload and root == Path("/"):
        out.append("systemd is not running on this machine (PID 1 is not systemd): start the tracer another way, "
                   "e.g. agent-tracer run --no-dashboard")
    return out
