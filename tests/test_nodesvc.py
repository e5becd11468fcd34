"""Node services (services.toml) without root: unix deny rules compile to
the kernel's path trie, bad rules are refused with file, rule and key, the
unix_deny record decodes, and which rule a refusal names."""
from __future__ import annotations

import os
import struct

import pytest

from episode_tracer import events
from episode_tracer.engine import CANARY_UNIX, build_kernel_maps
from episode_tracer.nodesvc import path_bytes, reached_nothing, unix_deny_entries, unix_deny_rules
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy


@pytest.fixture(scope="module")
def plan():
    res = load_policy([POLICY_DIR])
    assert not res.errors, [str(e) for e in res.errors]
    return res.policy.kernel_plan()


def test_services_pack_compiles_to_unix_and_port_denies(plan):
    names = [u.name for u in plan.unix_deny]
    assert names == ["container-engine-socket", "service-manager-socket", "terminal-multiplexer-socket",
                     "cluster-job-socket"]
    engine = plan.unix_deny[0]
    assert "/var/run/docker.sock" in engine.paths and "/run/containerd/" in engine.prefixes
    assert "@/containerd-shim/" in engine.prefixes
    ports = next(d for d in plan.deny if d.name == "node-control-port")
    assert (8265, 8265) in ports.ports and (6817, 6820) in ports.ports and ports.protocols == {"tcp"}
    assert {"at", "batch", "crontab", "systemd-run", "sbatch", "srun"} <= plan.kill_comms
    assert {"docker", "podman", "kubectl", "ray", "systemctl", "busctl"} <= plan.gate_comms


def test_entries_carry_the_bits_of_their_prefixes(plan):
    class R:
        def __init__(self, name, index, paths=(), prefixes=()):
            self.name, self.index, self.paths, self.prefixes = name, index, paths, prefixes

    e = unix_deny_entries([R("a", 0, prefixes=("/srv/x/",)), R("b", 1, paths=("/srv/x/api.sock",))])
    assert e[(b"/srv/x/", True)] == 0b01
    assert e[(b"/srv/x/api.sock", False)] == 0b11  # the trie returns only the longest match
    assert path_bytes("@name") == b"\0name"


def test_symlinked_directory_spelling_added(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)

    class R:
        name, index, paths, prefixes = "r", 0, (f"{tmp_path}/link/d.sock",), (f"{tmp_path}/link/",)

    e = unix_deny_entries([R()])
    assert (f"{real}/d.sock".encode(), False) in e and (f"{real}/".encode(), True) in e


def test_kernel_maps_hold_the_unix_entries_and_the_canary(plan):
    km = build_kernel_maps(plan, {}, canary=True)
    assert km.unix_deny[(b"/var/run/docker.sock", False)] == 1 << 0
    assert km.unix_deny[(CANARY_UNIX.encode(), False)] == 1 << events.RULE_CANARY
    assert all(len(p) <= events.UNIX_PATH_LEN for p, _ in km.unix_deny)


@pytest.mark.parametrize("match,expect", [
    ('{ family = "unix", path = { regex = "docker" } }', "match.path: the kernel matches unix paths exactly or by prefix ('prefix*'); no regex"),
    ('{ family = "unix", path = { glob = "/run/*/docker.sock" } }', "only a single trailing '*' is allowed"),
    ('{ family = "unix", basename = "docker" }', "can test only 'path'; cannot evaluate 'basename'"),
    ('{ family = "unix" }', "a unix deny rule needs a 'path' condition"),
])
def test_bad_unix_deny_rules_refused(tmp_path, match, expect):
    f = tmp_path / "p.toml"
    f.write_text(f'[[rule]]\nname = "r"\nseverity = "high"\non = "connect"\naction = "deny"\nmatch = {match}\n')
    res = load_policy([f])
    msgs = [str(e) for e in res.errors]
    assert res.policy is None and any(m.startswith(f"{f}: rule 'r'") and expect in m for m in msgs), msgs


def test_unix_deny_with_except_refused(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[rule]]\nname = "r"\nseverity = "high"\non = "connect"\naction = "deny"\n'
                 'match = { family = "unix", path = "/run/x.sock" }\nexcept = [ { uid = 0 } ]\n')
    msgs = [str(e) for e in load_policy([f]).errors]
    assert any("r'" in m and "except" in m and "takes no except" in m for m in msgs), msgs


def test_site_override_shrinks_a_list(tmp_path):
    site = tmp_path / "90-site.toml"
    site.write_text('[[override]]\nlist = "node_control_ports"\nremove = ["8888-8899"]\n'
                    '[[override]]\nlist = "multiplexer_sockets"\nremove = ["/tmp/tmux-*"]\n')
    res = load_policy([POLICY_DIR, site])
    assert not res.errors, [str(e) for e in res.errors]
    plan = res.policy.kernel_plan()
    ports = next(d for d in plan.deny if d.name == "node-control-port").ports
    assert (8888, 8899) not in ports
    mux = next(u for u in plan.unix_deny if u.name == "terminal-multiplexer-socket")
    assert "/tmp/tmux-" not in mux.prefixes


def _unix_record(path: bytes, flags: int, rules: int, h: int = 0) -> bytes:
    lay = events.LAYOUTS[events.Kind.UNIX_DENY]
    return struct.pack(lay.fmt, 1, 2, int(events.Kind.UNIX_DENY), 10, 11, 0, b"python3", rules, flags,
                       len(path), h, 0, path)


def test_unix_deny_record_decodes():
    r = events.decode(_unix_record(b"/run/docker.sock", 0, 0b1))
    assert (r["type"], r["path"], r["rules_mask"], r["unverified"], r["would"]) == \
        ("unix_deny", "/run/docker.sock", 1, None, False)
    r = events.decode(_unix_record(b"\0/tmp/dbus-x", events.UNIX_ABSTRACT | events.UNIX_WOULD, 2))
    assert r["path"] == "@/tmp/dbus-x" and r["would"]
    r = events.decode(_unix_record(b"", events.UNIX_NO_ARGS, 0))
    assert r["path"] is None and r["unverified"] == "arguments not seen"
    r = events.decode(_unix_record(b"docker.sock", events.UNIX_RELATIVE, 0))
    assert r["path"] == "docker.sock" and r["unverified"] == "relative path or '..'"
    # a gate record: the thread waits for user space's verdict on the target
    r = events.decode(_unix_record(b"s.sock", events.UNIX_GATE | events.UNIX_RELATIVE, 0, h=0xDEADBEEF))
    assert (r["type"], r["path"], r["hash"], r["relative"], r["tid"]) == ("unix_gate", "s.sock", 0xDEADBEEF, True, 11)


def test_refusal_names_its_rules(plan):
    assert unix_deny_rules(plan, 0b101, None) == ["container-engine-socket", "terminal-multiplexer-socket"]
    # refused because the path could not be judged: the first unix deny rule
    assert unix_deny_rules(plan, 0, "relative path or '..'") == ["container-engine-socket"]


def test_probe_of_a_missing_path_reached_nothing(tmp_path):
    me = os.getpid()
    assert reached_nothing({"path": str(tmp_path / "nope.sock"), "pid": me})
    (tmp_path / "there.sock").write_text("")
    assert not reached_nothing({"path": str(tmp_path / "there.sock"), "pid": me})
    assert not reached_nothing({"path": "@abstract", "pid": me})
    assert not reached_nothing({"path": str(tmp_path / "nope.sock"), "pid": me, "unverified": "relative path or '..'"})
    assert not reached_nothing({"path": str(tmp_path / "nope.sock"), "pid": 2 ** 22 + 7})  # gone: alert


def test_unix_deny_constants_match_events_h():
    import re

    from episode_tracer.paths import BPF_DIR

    text = (BPF_DIR / "events.h").read_text()
    flags = dict(re.findall(r"#define (AT_UNIX_[A-Z_]+) \(1u << (\d+)\)", text))
    assert 1 << int(flags["AT_UNIX_WOULD"]) == events.UNIX_WOULD
    assert 1 << int(flags["AT_UNIX_NO_ARGS"]) == events.UNIX_NO_ARGS
    assert 1 << int(flags["AT_UNIX_RELATIVE"]) == events.UNIX_RELATIVE
    assert 1 << int(flags["AT_UNIX_ABSTRACT"]) == events.UNIX_ABSTRACT
    sizes = dict(re.findall(r"#define (AT_UNIX_\w+_LEN) (\d+)", text))
    assert int(sizes["AT_UNIX_PATH_LEN"]) == events.UNIX_PATH_LEN
    assert int(sizes["AT_UNIX_KEY_LEN"]) == events.UNIX_KEY_LEN
