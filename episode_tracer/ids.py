"""Episode ids: the one rule for what an id may be (no other imports, so the
episode start path stays light)."""
from __future__ import annotations

import re

EPISODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$")


def check_episode_id(ep: str) -> str:
    if not isinstance(ep, str) or not EPISODE_ID_RE.match(ep):
        raise ValueError(
            f"invalid episode id {ep!r}: 1-63 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return ep
