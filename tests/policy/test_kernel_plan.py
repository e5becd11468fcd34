"""Policy.kernel_plan(): what the kernel kills, gates and denies."""
from __future__ import annotations

import ipaddress
from pathlib import Path

from episode_tracer.policy import DenyRule, KernelPlan, Scope
from episode_tracer.policy.kernel import comm_of

from .helpers import DATA, load_ok, load_text


def plan() -> KernelPlan:
    return load_ok(DATA / "plan" / "plan.toml").kernel_plan()


def test_kill_comms() -> None:
    p = plan()
    assert p.kill_comms == {"xmrig", "minerd", "nc.traditional", "masscan"}
    assert p.kill_comms_all == {"masscan"}


def test_gate_comms() -> None:
    p = plan()
    assert p.gate_comms == {"averyveryverylo", "socat", "ssh", "perl", "nmap", "zmap"}
    assert p.gate_comms_all == frozenset()
    assert p.gate_all is True
    assert p.gate_all_global is False


def test_deny_rules() -> None:
    p = plan()
    assert [d.name for d in p.deny] == ["deny-pools", "deny-dns-udp", "deny-smtp-everyone", "deny-everything"]
    pools, dns, smtp, everything = p.deny
    assert pools == DenyRule(
        name="deny-pools",
        index=0,
        families=frozenset({"inet", "inet6"}),
        cidrs=(ipaddress.ip_network("1.2.3.0/24"), ipaddress.ip_network("2001:db8::/32")),
        ports=((3333, 3333), (14444, 14450)),
        protocols=frozenset({"tcp"}),
        except_cidrs=(ipaddress.ip_network("1.2.3.4/32"),),
        except_ports=((14445, 14445),),
        episode_glob="rl-*",
        scope=Scope.EPISODES,
    )
    assert dns.index == 1
    assert dns.families == {"inet6"}
    assert dns.protocols == {"udp"}  # from sock_type dgram
    assert dns.ports == ((53, 53),)
    assert dns.cidrs == ()
    assert dns.episode_glob == "ep[[]1]"  # an exact id, glob-escaped
    assert dns.scope is Scope.EPISODES
    assert (smtp.index, smtp.scope, smtp.episode_glob, smtp.ports) == (2, Scope.ALL, None, ((25, 25),))
    assert everything.index == 3
    assert (everything.cidrs, everything.ports, everything.protocols) == ((), (), frozenset())
    assert everything.episode_glob == "sandbox-7"


def test_plan_is_frozen_and_cached() -> None:
    policy = load_ok(DATA / "plan" / "plan.toml")
    assert policy.kernel_plan() is policy.kernel_plan()
    try:
        policy.kernel_plan().gate_all = False  # type: ignore[misc]
    except AttributeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("KernelPlan must be frozen")


def test_scope_all_gates(tmp_path: Path) -> None:
    res = load_text(
        tmp_path,
        """
        [[rule]]
        name = "ssh-everywhere"
        severity = "high"
        on = "exec"
        action = "kill-episode"
        scope = "all"
        match = { basename = "ssh", argv_flag = "-R" }

        [[rule]]
        name = "fileless-everywhere"
        severity = "high"
        on = "exec"
        action = "kill"
        scope = "all"
        match = { fileless = true }
        """,
    )
    p = res.policy.kernel_plan()
    assert p.gate_comms == {"ssh"} and p.gate_comms_all == {"ssh"}
    assert p.gate_all and p.gate_all_global
    assert p.kill_comms == frozenset()


def test_kill_wins_over_gate(tmp_path: Path) -> None:
    res = load_text(
        tmp_path,
        """
        [[rule]]
        name = "kill"
        severity = "high"
        on = "exec"
        action = "kill"
        match = { basename = "nc" }

        [[rule]]
        name = "gate"
        severity = "high"
        on = "exec"
        action = "kill"
        match = { basename = "nc", arg = "-e" }
        """,
    )
    p = res.policy.kernel_plan()
    assert p.kill_comms == {"nc"}
    assert p.gate_comms == frozenset()


def test_empty_policy_plan(tmp_path: Path) -> None:
    res = load_text(tmp_path, "")
    assert res.policy.kernel_plan() == KernelPlan()


def test_comm_of() -> None:
    assert comm_of("xmrig") == ("xmrig", False)
    assert comm_of("exactly15bytes!") == ("exactly15bytes!", False)
    assert comm_of("averyveryverylongname1") == ("averyveryverylo", True)
    name, truncated = comm_of("abcdefghijklmné")  # é is 2 bytes: cut in the middle
    assert truncated and name.encode("utf-8", "surrogateescape") == "abcdefghijklmné".encode()[:15]
