#!/usr/bin/env python3
"""Refresh the "Lists of the default packs" table in docs/policies.md from
policies/: which file holds each list and which rules read it (as
`agent-tracer policy check --lists` computes it). The "what" column keeps
the text already in the table; a new list gets the comment written above
it in its pack. tests/policy/test_precision.py checks the table.

    .venv/bin/python scripts/doc-lists.py
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from episode_tracer.policy import load_policy  # noqa: E402

DOC = ROOT / "docs" / "policies.md"
HEAD = "| list | file | what | read by |"
ROW = re.compile(r"\| `([a-z0-9_]+)` \| ([a-z0-9_-]+) \| (.*) \| (.*) \|$")


def comment_above(path: Path, name: str) -> str:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s*(\[lists\.)?{re.escape(name)}\]?\s*(=|$)", line):
            got = []
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#"):
                got.insert(0, lines[j].lstrip("# ").strip())
                j -= 1
            return " ".join(got) or "(undocumented: write a comment above the list in its pack)"
    return "(undocumented)"


def main() -> int:
    res = load_policy([ROOT / "policies"])
    if res.errors:
        print("\n".join(map(str, res.errors)), file=sys.stderr)
        return 1
    where: dict[str, Path] = {}
    for f in sorted((ROOT / "policies").glob("*.toml")):
        for k in tomllib.loads(f.read_text()).get("lists", {}):
            where[k] = f
    text = DOC.read_text()
    a = text.index(HEAD)
    b = text.index("\n\n", a)
    old = {m.group(1): m.group(3) for m in map(ROW.match, text[a:b].splitlines()) if m}
    rows = [HEAD, "| --- | --- | --- | --- |"]
    for name, rules in res.list_readers.items():
        what = old.get(name) or comment_above(where[name], name).replace("|", "\\|")
        rows.append(f"| `{name}` | {where[name].stem} | {what} | {', '.join(f'`{r}`' for r in rules) or '-'} |")
    DOC.write_text(text[:a] + "\n".join(rows) + text[b:])
    print(f"{DOC}: {len(rows) - 2} lists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
