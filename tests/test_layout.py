"""episode_tracer/bpf/events.h is the one definition of every record: prove that the Python
layouts in episode_tracer/events.py agree with it, field by field, as the C compiler
lays it out."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from episode_tracer import events
from episode_tracer.paths import BPF_DIR

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to compile episode_tracer/bpf/events.h")


def _c_layout(tmp_path, layouts):
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "events.h"', "int main(void) {"]
    for lay in layouts:
        lines.append(f'printf("{lay.c_name} sizeof %zu\\n", sizeof(struct {lay.c_name}));')
        for name, _ in lay.fields:
            lines.append(f'printf("{lay.c_name} {name} %zu\\n", offsetof(struct {lay.c_name}, {name}));')
    lines += ["return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(BPF_DIR), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():
        struct_name, field, value = line.split()
        got[(struct_name, field)] = int(value)
    return got


def test_every_layout_matches_events_h(tmp_path):
    layouts = list({l.c_name: l for l in events.LAYOUTS.values()}.values()) + list(events.MAP_LAYOUTS.values())
    got = _c_layout(tmp_path, layouts)
    for lay in layouts:
        # a flow report is its head plus data[2 * AT_WIRE_CAP], sent cut to data[0:captured]
        tail = 2 * events.WIRE_CAP if lay.c_name == "wire_event" else 0
        assert got[(lay.c_name, "sizeof")] == lay.size + tail, lay.c_name
        for name, off in lay.offsets().items():
            assert got[(lay.c_name, name)] == off, f"{lay.c_name}.{name}"


def _header_text():
    return (BPF_DIR / "events.h").read_text()


def test_constants_match_events_h():
    text = _header_text()
    defines = dict(re.findall(r"#define (AT_\w+) (\d+)", text))
    assert int(defines["AT_COMM_LEN"]) == events.COMM_LEN
    assert int(defines["AT_FILENAME_LEN"]) == events.FILENAME_LEN
    assert int(defines["AT_ARGV_BUF"]) == events.ARGV_BUF
    assert int(defines["AT_ARG_LEN"]) == events.ARG_LEN
    assert int(defines["AT_EPISODE_LEN"]) == events.EPISODE_LEN
    assert int(defines["AT_SOCKADDR_LEN"]) == events.SOCKADDR_LEN
    assert int(defines["AT_GPU_PREFIX_MAX"]) == events.GPU_PREFIX_MAX
    assert int(defines["AT_WIRE_CAP"]) == events.WIRE_CAP
    assert int(defines["AT_CGROUP_PATH_LEN"]) == events.CGROUP_PATH_LEN
    assert int(defines["AT_WIRE_HEAD"]) == events.WIRE_HEAD == events.LAYOUTS[events.Kind.PROTOCOL].size
    wflags = dict(re.findall(r"#define (AT_(?:WIRE|VERDICT)_\w+) \(1u << (\d+)\)", text))
    for name in ("WIRE_HELD", "WIRE_SYN_DATA", "WIRE_FULL", "WIRE_V6", "VERDICT_DENY", "VERDICT_DONE"):
        assert 1 << int(wflags["AT_" + name]) == getattr(events, name), name
    flags = dict(re.findall(r"#define (AT_EXEC_\w+) \(1u << (\d+)\)", text))
    assert 1 << int(flags["AT_EXEC_ARGV_TRUNCATED"]) == events.EXEC_ARGV_TRUNCATED
    assert 1 << int(flags["AT_EXEC_ENV_MARKER"]) == events.EXEC_ENV_MARKER
    assert 1 << int(flags["AT_EXEC_KILLED"]) == events.EXEC_KILLED
    assert 1 << int(flags["AT_EXEC_GATED"]) == events.EXEC_GATED
    assert 1 << int(flags["AT_EXEC_KILL_WOULD"]) == events.EXEC_KILL_WOULD
    assert 1 << int(flags["AT_EXEC_NO_ARGV"]) == events.EXEC_NO_ARGV
    assert int(defines["AT_SLOT_CANARY"]) == events.SLOT_CANARY
    assert int(defines["AT_SLOT_BITS"]) == events.SLOT_BITS
    assert int(defines["AT_SLOT_INDEX_MASK"]) == events.SLOT_INDEX_MASK
    assert int(defines["AT_IDENT_MASK"]) == events.IDENT_MASK
    assert int(defines["AT_EPISODES_MAX"]) == events.EPISODES_MAX
    # the canary's index is above every index an episode can get
    assert events.SLOT_CANARY & events.SLOT_INDEX_MASK > events.EPISODES_MAX
    fflags = dict(re.findall(r"#define (AT_FORK_\w+) \(1u << (\d+)\)", text))
    assert 1 << int(fflags["AT_FORK_UNTRACKED"]) == events.FORK_UNTRACKED
    assert int(defines["AT_RULE_CANARY"]) == events.RULE_CANARY
    dflags = dict(re.findall(r"#define (AT_DENY_\w+) \(1u << (\d+)\)", text))
    assert 1 << int(dflags["AT_DENY_SENDMSG"]) == events.DENY_SENDMSG
    assert 1 << int(dflags["AT_DENY_WOULD"]) == events.DENY_WOULD


@pytest.mark.parametrize(
    "enum_cls,prefix,max_name,max_value",
    [
        (events.Kind, "AT_EV_", "AT_EV_KIND_MAX", events.KIND_MAX),
        (events.Counter, "AT_CNT_", "AT_CNT_MAX", events.COUNTER_MAX),
        (events.Config, "AT_CFG_", "AT_CFG_MAX", events.CONFIG_MAX),
    ],
)
def test_enums_match_events_h(enum_cls, prefix, max_name, max_value):
    c_enum = {k: int(v) for k, v in re.findall(rf"({prefix}\w+) = (\d+)", _header_text())}
    assert c_enum.pop(max_name) == max_value
    assert c_enum == {prefix + m.name: m.value for m in enum_cls}
