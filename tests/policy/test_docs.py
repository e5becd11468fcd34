"""The examples in docs/policies.md load without errors.

Whole-file blocks (with [[rule]], [lists], [macros], [[override]]) are
loaded together with support definitions for names they use but do not
define; one-line condition snippets are compiled inside a rule of some
event kind.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from episode_tracer.policy import Kind, load_policy

DOC = Path(__file__).resolve().parents[2] / "docs" / "policies.md"

SUPPORT_LISTS = {
    "ssh_clients": '["ssh"]',
    "miner_names": '["xmrig"]',
    "mining_ports": "[3333]",
    "internal_cidrs": '["10.0.0.0/8"]',
    "private_cidrs": '["10.0.0.0/8"]',
    "miner_sha256": '["' + "ab" * 32 + '"]',
}
SUPPORT_MACROS = {"trusted_parent": '{ parent_exe = "/x" }'}
SUPPORT_RULES = {
    "exec-from-tmp": "exec",
    "ssh-reverse-tunnel": "exec",
    "mining-pool-ports": "connect",
}


def _blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)


def _is_file_block(block: str) -> bool:
    return bool(re.search(r"^\[", block, re.M))


def _support(block: str) -> str:
    data = tomllib.loads(block)
    lists = set(data.get("lists", {}))
    macros = set(data.get("macros", {}))
    rules = {r.get("name") for r in data.get("rule", [])}
    out = ["[lists]"]
    out += [f"{k} = {v}" for k, v in SUPPORT_LISTS.items() if k not in lists]
    out += ["[macros]"]
    out += [f"{k} = {v}" for k, v in SUPPORT_MACROS.items() if k not in macros]
    for name, kind in SUPPORT_RULES.items():
        if name not in rules:
            out += ["[[rule]]", f'name = "{name}"', 'severity = "low"', f'on = "{kind}"', 'action = "log"']
    return "\n".join(out) + "\n"


FILE_BLOCKS = [b for b in _blocks() if _is_file_block(b)]


def _snippets(block: str) -> list[str]:
    """A block that is valid TOML on its own is one snippet; otherwise each
    `key = value` line is (comments after two spaces stripped)."""
    try:
        tomllib.loads(block)
        return [block.strip()]
    except tomllib.TOMLDecodeError:
        pass
    lines = [ln.split("  #", 1)[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if "=" in ln and not ln.startswith("#")]


SNIPPETS = [s for b in _blocks() if not _is_file_block(b) for s in _snippets(b)]


def test_doc_has_examples() -> None:
    assert len(FILE_BLOCKS) >= 5 and len(SNIPPETS) >= 8


@pytest.mark.parametrize("block", FILE_BLOCKS, ids=lambda b: b.strip().splitlines()[0][:40])
def test_file_block_loads(block: str, tmp_path: Path) -> None:
    (tmp_path / "00-support.toml").write_text(_support(block))
    (tmp_path / "50-doc.toml").write_text(block)
    (tmp_path / "miner_sha256.txt").write_text("ab" * 32 + "\n")
    res = load_policy([tmp_path])
    assert res.errors == [], "\n".join(map(str, res.errors))


@pytest.mark.parametrize("line", SNIPPETS)
def test_snippet_compiles_for_some_kind(line: str, tmp_path: Path) -> None:
    key = line.split("=", 1)[0].strip()
    cond = line if key in ("match", "except") else f"match = {{ {line} }}"
    errors = {}
    for kind in Kind:
        path = tmp_path / f"{kind.value}.toml"
        support = "\n".join(f"{k} = {v}" for k, v in SUPPORT_LISTS.items())
        path.write_text(
            f'[lists]\n{support}\n[[rule]]\nname = "r"\nseverity = "low"\non = "{kind.value}"\naction = "log"\n{cond}\n'
        )
        res = load_policy([path])
        if not res.errors:
            return
        errors[kind.value] = [str(e) for e in res.errors]
    pytest.fail(f"{line!r} compiles for no kind: {errors}")
