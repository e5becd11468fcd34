"""Command-line option scanning for `argv_flag` and `argv_option`.

The scanner turns `argv[1:]` into a sequence of :class:`Opt` tokens the way a
getopt-style program would see them. Exactly what it does (also in
docs/policies.md, "Flags"):

* `--name` and `--name=value` are long options (name `--name`). A long option
  takes the next argument as its value only when it is listed as
  value-taking (argv_option's own flag).
* Without a getopt string, `-Xrest` is the short option `-X` with the
  attached value `rest` (clusters such as `-NfR` are *not* split, because
  without knowing which letters take a value `-oRemoteForward` would look
  like it contains `-R`).
* With a getopt string (`"46AaB:b:..."`, letters followed by `:` take a value)
  arguments are split the way getopt(3) does: `-NfR 8080:x:22` gives `-N`,
  `-f`, `-R` with value `8080:x:22`; `-R8080:x:22` gives `-R` with the
  attached value; `-oRemoteForward=x` gives `-o` with value
  `RemoteForward=x` and no `-R`. Letters not in the string are treated as
  options without a value.
* `-` alone is an operand (a positional argument).
* Where scanning stops is :class:`OptionsEnd`: `none` scans everything,
  `double_dash` stops at `--` (GNU getopt, which otherwise permutes
  operands and options), `first_positional` stops at `--` or the first
  operand (POSIX getopt), `second_positional` stops at `--` or the second
  operand (OpenSSH: `ssh [options] destination [options] [command ...]`;
  ssh parses options again after the destination, and the first operand
  after that is the remote command, whose arguments are not ssh's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .model import OptionsEnd


@dataclass(frozen=True)
class OptSpec:
    """How to scan argv. Hashable: the evaluator caches scans per spec."""

    value_letters: frozenset[str] = frozenset()
    value_longs: frozenset[str] = frozenset()
    clusters: bool = False
    end: OptionsEnd = OptionsEnd.DOUBLE_DASH


@dataclass(frozen=True)
class Opt:
    name: str  # "-R" or "--remote"
    value: str | None  # attached or following value; None when it takes none
    raw: str  # the argument the option came from


def parse_getopt(optstring: str) -> tuple[frozenset[str], frozenset[str]]:
    """(all letters, value-taking letters) of a getopt(3) string.

    A leading `+`, `-` or `:` (GNU modes) is ignored; `x::` (optional value,
    attached only) counts as value-taking. Option characters are ASCII
    letters and digits; anything else raises ValueError.
    """
    s = optstring.lstrip("+-:")
    letters: set[str] = set()
    values: set[str] = set()
    i = 0
    while i < len(s):
        c = s[i]
        if not (c.isascii() and c.isalnum()):
            raise ValueError(f"bad option character {c!r} at position {i} (letters and digits only)")
        letters.add(c)
        if s[i + 1 : i + 2] == ":":
            values.add(c)
            i += 1
            if s[i + 1 : i + 2] == ":":
                i += 1
        i += 1
    return frozenset(letters), frozenset(values)


def _stop_after(end: OptionsEnd) -> float:
    """How many operands may be passed before scanning stops."""
    if end is OptionsEnd.FIRST_POSITIONAL:
        return 0
    if end is OptionsEnd.SECOND_POSITIONAL:
        return 1
    return float("inf")


def scan_options(args: Sequence[str], spec: OptSpec) -> tuple[Opt, ...]:
    """The options in `args` (argv without argv[0]) per `spec`."""
    out: list[Opt] = []
    operands = 0
    limit = _stop_after(spec.end)
    i = 0
    n = len(args)
    while i < n:
        a = args[i]
        if not isinstance(a, str):
            i += 1
            continue
        if a == "--" and spec.end is not OptionsEnd.NONE:
            break
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a.partition("=")
            if eq:
                out.append(Opt(name, value, a))
            elif name in spec.value_longs and i + 1 < n:
                i += 1
                out.append(Opt(name, args[i], a))
            else:
                out.append(Opt(name, None, a))
            i += 1
            continue
        if a.startswith("-") and len(a) > 1 and a != "--":
            i = _short(args, i, spec, out)
            continue
        operands += 1
        if operands > limit:
            break
        i += 1
    return tuple(out)


def _short(args: Sequence[str], i: int, spec: OptSpec, out: list[Opt]) -> int:
    """Scan the short-option argument args[i]; return the next index."""
    a = args[i]
    letters = a[1:] if spec.clusters else a[1]
    for j, c in enumerate(letters):
        if c in spec.value_letters:
            rest = a[j + 2 :]
            if rest:
                out.append(Opt("-" + c, rest, a))
                return i + 1
            if i + 1 < len(args):
                out.append(Opt("-" + c, args[i + 1], a))
                return i + 2
            out.append(Opt("-" + c, None, a))
            return i + 1
        if not spec.clusters:
            rest = a[2:]
            out.append(Opt("-" + c, rest or None, a))
            return i + 1
        out.append(Opt("-" + c, None, a))
    return i + 1


def flag_matches(opt: Opt, flag: str) -> bool:
    """Whether the scanned option `opt` is `flag` (`-R`, `--remote`, `-jar`)."""
    if opt.name == flag:
        return True
    if len(flag) > 2 and flag[1] != "-":  # single-dash long option: -jar, -version
        return opt.raw == flag or opt.raw.startswith(flag + "=")
    return False
