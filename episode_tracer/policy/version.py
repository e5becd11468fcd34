"""Policy version: the git commit of the policy files, or a content hash.

git runs with optional locks off (it never takes the index lock of a
checkout someone is working in) and with core.fsmonitor off (a repository's
config must not make a root daemon run a program). git's own
safe.directory check is left on: a checkout owned by another user gives the
content hash instead.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Sequence


def content_hash(files: Sequence[Path]) -> str:
    """First 12 hex digits of a sha256 over the files' names and contents."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: str(p)):
        h.update(path.name.encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"\0unreadable")
        h.update(b"\0")
    return h.hexdigest()[:12]


def _git(cwd: Path, *args: str) -> str | None:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        proc = subprocess.run(
            ["git", "-c", "core.fsmonitor=false", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def policy_version(files: Sequence[Path]) -> str:
    """`<commit>` when every file is committed and unmodified,
    `<commit>-dirty+<hash>` when some are modified or untracked, else
    `sha256:<hash>` (no git, not a checkout, no files)."""
    digest = content_hash(files)
    if not files:
        return f"sha256:{digest}"
    cwd = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    head = _git(cwd, "rev-parse", "HEAD")
    if head is None:
        return f"sha256:{digest}"
    status = _git(cwd, "status", "--porcelain", "--ignored", "--", *(str(p.resolve()) for p in files))
    if status is None:
        return f"sha256:{digest}"
    head = head.strip()
    return f"{head}-dirty+{digest}" if status.strip() else head
