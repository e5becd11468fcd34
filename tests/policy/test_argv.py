"""The option scanner behind argv_flag and argv_option."""
from __future__ import annotations

import pytest

from episode_tracer.policy.argv import Opt, OptSpec, flag_matches, parse_getopt, scan_options
from episode_tracer.policy.model import OptionsEnd

SSH_GETOPT = "46AaCfGgKkMNnqsTtVvXxYyB:b:c:D:E:e:F:I:i:J:L:l:m:O:o:p:Q:R:S:W:w:"
_, SSH_VALUES = parse_getopt(SSH_GETOPT)
SSH = OptSpec(value_letters=SSH_VALUES, clusters=True, end=OptionsEnd.SECOND_POSITIONAL)


def names(args: list[str], spec: OptSpec) -> list[tuple[str, str | None]]:
    return [(o.name, o.value) for o in scan_options(args, spec)]


def test_parse_getopt() -> None:
    letters, values = parse_getopt("+ab:c::d")
    assert letters == frozenset("abcd")
    assert values == frozenset("bc")
    with pytest.raises(ValueError, match="bad option character ' ' at position 1 \\(letters and digits only\\)"):
        parse_getopt("a b")


@pytest.mark.parametrize(
    "args,expected",
    [
        (["-NR", "8080:localhost:22", "host"], [("-N", None), ("-R", "8080:localhost:22")]),
        (["-R8080:x:22", "host"], [("-R", "8080:x:22")]),
        (["-NfR8080:x:22", "host"], [("-N", None), ("-f", None), ("-R", "8080:x:22")]),
        (["-oRemoteForward=x", "host"], [("-o", "RemoteForward=x")]),
        (["-p", "22", "host"], [("-p", "22")]),
        (["host", "-R", "1:x:2"], [("-R", "1:x:2")]),
        (["host", "ls", "-R"], []),
        (["-v", "host", "-v", "cmd", "-v"], [("-v", None), ("-v", None)]),
        (["--", "host", "-R", "x"], []),
        (["-R"], [("-R", None)]),  # a value-taking option at the end has no value
        (["-", "-v"], [("-v", None)]),  # "-" is an operand (the first one)
    ],
)
def test_ssh_scan(args: list[str], expected: list[tuple[str, str | None]]) -> None:
    assert names(args, SSH) == expected


def test_without_getopt_no_clusters() -> None:
    spec = OptSpec()
    assert names(["-NR", "x", "-R8080", "--long=v", "--flag", "v"], spec) == [
        ("-N", "R"),
        ("-R", "8080"),
        ("--long", "v"),
        ("--flag", None),
    ]


def test_options_end_modes() -> None:
    args = ["a", "-x", "--", "-y"]
    assert names(args, OptSpec(end=OptionsEnd.DOUBLE_DASH)) == [("-x", None)]
    assert names(args, OptSpec(end=OptionsEnd.NONE)) == [("-x", None), ("-y", None)]
    first = OptSpec(clusters=True, end=OptionsEnd.FIRST_POSITIONAL)
    assert names(args, first) == []
    assert names(["-x", "a", "-y"], first) == [("-x", None)]


def test_value_flags_for_options() -> None:
    spec = OptSpec(value_letters=frozenset("o"), value_longs=frozenset({"--set"}))
    assert names(["-o", "K=V", "--set", "a=b", "--set=c=d"], spec) == [
        ("-o", "K=V"),
        ("--set", "a=b"),
        ("--set", "c=d"),
    ]


def test_flag_matches() -> None:
    assert flag_matches(Opt("-R", None, "-NR"), "-R")
    assert not flag_matches(Opt("-R", None, "-R"), "-L")
    assert flag_matches(Opt("-j", "ar", "-jar"), "-jar")
    assert flag_matches(Opt("-j", "ar=x", "-jar=x"), "-jar")
    assert not flag_matches(Opt("-j", "arx", "-jarx"), "-jar")
    assert flag_matches(Opt("--listen", "x", "--listen=x"), "--listen")


def test_non_string_arguments_are_skipped() -> None:
    assert names(["-a", 5, "-b"], OptSpec()) == [("-a", None), ("-b", None)]  # type: ignore[list-item]
