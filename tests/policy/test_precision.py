"""Issue 19 (no root): one list per concept, look-alike lists warned about,
the `domain` operator, ssh options judged by value, and the stdio socket
reader behind `stdio_remote`."""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from episode_tracer.paths import POLICY_DIR
from episode_tracer.policy import load_policy, record_context
from episode_tracer.policy.conditions import domain_matches, hosts_in
from episode_tracer.policy.sshconfig import ssh_option_directives
from episode_tracer.stdio import parse_table, peer_is_local, stdio_sockets

DOC = Path(__file__).resolve().parents[2] / "docs" / "policies.md"


def _load(tmp_path: Path, text: str):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return load_policy([p])


# ------------------------------------------------------------ one concept

def test_default_packs_have_no_look_alike_lists():
    res = load_policy([POLICY_DIR])
    assert res.errors == [] and res.warnings == [], [str(d) for d in res.errors + res.warnings]


def test_ssh_destinations_are_one_list_for_exec_connect_kernel_and_wire():
    res = load_policy([POLICY_DIR])
    readers = res.list_readers["ssh_allowed_hosts"]
    assert {"outbound-ssh", "ssh-port-egress", "ssh-on-the-wire"} <= set(readers)
    # the kernel's exception for port 22 comes from the same list
    plan = res.policy.kernel_plan()
    deny = next(d for d in plan.deny if d.name == "ssh-port-egress")
    assert {str(n) for n in deny.except_cidrs} == {"127.0.0.0/8", "::1/128"}
    assert "ssh_wire_allowed" not in res.list_readers and "internal_cidrs" not in res.list_readers
    assert set(res.list_readers["mining_pool_domains"]) == {"mining-pool-in-argv", "mining-pool-sni"}


def test_a_site_extends_ssh_allowed_hosts_once_for_every_rule(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('[[override]]\nlist = "ssh_allowed_hosts"\nappend = ["198.18.7.2"]\n')
    res = load_policy([POLICY_DIR, site])
    assert not res.errors and not res.warnings
    pol = res.policy
    wire = {"type": "protocol", "episode": "e", "pid": 1, "protocol": "ssh", "family": "inet",
            "addr": "198.18.7.2", "port": 22}
    conn = {"type": "connect", "episode": "e", "pid": 1, "family": "inet", "addr": "198.18.7.2", "port": 22,
            "exe": "/usr/bin/ssh", "sock_type": "stream", "result": -115}
    assert pol.evaluate(wire, record_context({})) == []
    assert [v.rule for v in pol.evaluate(conn, record_context({}))] == ["external-destination"]  # log only
    deny = next(d for d in pol.kernel_plan().deny if d.name == "ssh-port-egress")
    assert "198.18.7.2/32" in {str(n) for n in deny.except_cidrs}
    other = {**wire, "addr": "198.18.7.3"}
    assert [v.rule for v in pol.evaluate(other, record_context({}))] == ["ssh-on-the-wire"]


RULE = """
[[rule]]
name = "r1"
severity = "low"
on = "connect"
action = "log"
match = { addr = "$%s" }

[[rule]]
name = "r2"
severity = "low"
on = "protocol"
action = "log"
match = { addr = "$%s" }
"""


def test_check_warns_on_two_lists_with_the_same_entries(tmp_path):
    res = _load(tmp_path, '[lists]\nloopback = ["127.0.0.0/8", "::1"]\ninternal = ["::1", "127.0.0.0/8"]\n'
                + RULE % ("loopback", "internal"))
    msgs = [str(w) for w in res.warnings]
    assert len(msgs) == 1 and "list 'loopback'" in msgs[0] and "looks like the same concept as list 'internal'" in msgs[0]
    assert "the same entries" in msgs[0]


def test_check_warns_on_look_alike_names_with_shared_entries(tmp_path):
    res = _load(tmp_path, '[lists]\nssh_allowed_hosts = ["127.0.0.0/8", "10.1.0.0/16"]\n'
                'ssh_wire_allowed = ["127.0.0.0/8"]\n' + RULE % ("ssh_allowed_hosts", "ssh_wire_allowed"))
    msgs = [str(w) for w in res.warnings]
    assert len(msgs) == 1 and "list 'ssh_wire_allowed'" in msgs[0] and "share ['allowed', 'ssh']" in msgs[0], msgs


def test_no_warning_when_one_list_includes_the_other_or_types_differ(tmp_path):
    res = _load(tmp_path, '[lists]\nloopback = ["127.0.0.0/8"]\nssh_ok = ["$loopback"]\n'
                + RULE % ("loopback", "ssh_ok"))
    assert res.warnings == []
    res = _load(tmp_path, """
[lists]
relay_allowed_ports = ["22"]
relay_allowed_names = ["22"]

[[rule]]
name = "a"
severity = "low"
on = "connect"
action = "log"
match = { port = "$relay_allowed_ports", exe = "$relay_allowed_names" }
""")
    assert res.warnings == [], [str(w) for w in res.warnings]


def test_list_readers_follow_macros_and_nested_lists(tmp_path):
    res = _load(tmp_path, """
[lists]
base = ["ssh"]
clients = ["$base", "dbclient"]

[macros.client]
basename = "$clients"

[[rule]]
name = "a"
severity = "low"
on = "exec"
action = "log"
match = { macro = "client" }

[[rule]]
name = "b"
severity = "low"
on = "exec"
action = "log"
match = { macro = "client", arg = "-R" }
""")
    assert res.errors == []
    assert res.list_readers == {"base": ("a", "b"), "clients": ("a", "b")}


def test_docs_list_table_names_the_rules_that_read_each_list():
    res = load_policy([POLICY_DIR])
    text = DOC.read_text()
    section = text[text.index("### Lists of the default packs"):]
    section = section[:section.index("\n## ") if "\n## " in section else len(section)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z0-9_]+)` \| [a-z0-9_-]+ \| .* \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = tuple(sorted(re.findall(r"`([a-z0-9-]+)`", m.group(2))))
    assert rows == {k: v for k, v in res.list_readers.items()}, "run scripts/doc-lists.py"


# ------------------------------------------------------------ domain

def test_domain_operator_matches_hosts_and_subdomains_only():
    d = frozenset({"supportxmr.com", "mine.bz"})
    assert domain_matches("stratum+tcp://pool.SupportXMR.com:3333", d)
    assert domain_matches("--url=supportxmr.com:443", d)
    assert domain_matches("wallet@x.mine.bz", d)
    assert not domain_matches("examine.bz2", d)
    assert not domain_matches("https://notsupportxmr.com/", d)
    assert not domain_matches("supportxmr.company", d)
    assert hosts_in("git@github.com:org/repo.git") == ["github.com", "repo.git"]  # candidates, judged against the list


def test_domain_operator_refuses_what_is_not_a_domain(tmp_path):
    res = _load(tmp_path, '[[rule]]\nname = "r"\nseverity = "low"\non = "exec"\naction = "log"\n'
                'match = { arg = { domain = ["*.pool.com"] } }\n')
    assert [str(e) for e in res.errors] == [
        f"{tmp_path / 'p.toml'}: rule 'r': match.arg.domain[0]: '*.pool.com' is not a domain name "
        "(dotted labels: letters, digits, -)"]


# ------------------------------------------------------------ ssh options

@pytest.fixture(scope="module")
def packs():
    return load_policy([POLICY_DIR]).policy


def _exec(argv):
    return {"type": "exec", "episode": "e", "pid": -5, "uid": 0, "argv": argv, "exe": "/usr/bin/ssh",
            "comm": "ssh", "ssh_config": []}


@pytest.mark.parametrize("argv", [
    # what OpenSSH's scp, sftp, rsync and git run
    ["ssh", "-x", "-oPermitLocalCommand=no", "-oClearAllForwardings=yes", "-oRemoteCommand=none",
     "-oRequestTTY=no", "-oForwardAgent=no", "-l", "root", "-s", "--", "198.18.7.2", "sftp"],
    ["ssh", "-oForwardX11 no", "-oPermitLocalCommand no", "-oClearAllForwardings yes", "-oForwardAgent no",
     "-l", "root", "-s", "--", "198.18.7.2", "sftp"],
    ["ssh", "-l", "root", "198.18.7.2", "rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "/tmp/dst"],
    ["ssh", "-o", "SendEnv=GIT_PROTOCOL", "root@198.18.7.2", "git-upload-pack '/srv/repo.git'"],
    ["ssh", "-oPermitLocalCommand=no", "root@198.18.7.2", "true"],
    ["ssh", "-T", "-x", "-o", "ExitOnForwardFailure=yes", "-o", "PermitLocalCommand=NO", "host"],
    ["ssh", "-o", "Tunnel=no", "-o", "ProxyCommand=none", "host"],
    ["ssh", "host", "echo", "-o", "RemoteForward=1 x:1"],  # the remote command's arguments are not ssh's
])
def test_restricting_ssh_options_are_no_forwards(packs, argv):
    assert packs.evaluate(_exec(argv), record_context({})) == []


@pytest.mark.parametrize("argv,rule", [
    (["ssh", "-oRemoteForward=2222 localhost:22", "host"], "ssh-forward-option"),
    (["ssh", "-o", "LocalForward 8080 db:5432", "host"], "ssh-forward-option"),
    (["ssh", "-o", "dynamicforward=1080", "host"], "ssh-forward-option"),
    (["ssh", "-oTunnel=point-to-point", "host"], "ssh-forward-option"),
    (["ssh", "-oProxyCommand=nc %h %p", "host"], "ssh-forward-option"),
    (["ssh", "-oPermitLocalCommand=yes", "host"], "ssh-forward-option"),
    (["ssh", "-x", "-oClearAllForwardings=yes", "-R", "2222:localhost:22", "host"], "ssh-port-forward"),
])
def test_forwarding_ssh_options_still_count(packs, argv, rule):
    assert rule in {v.rule for v in packs.evaluate(_exec(argv), record_context({}))}


def test_ssh_option_field_normalises_like_ssh_config():
    ev = {"argv": ["ssh", "-oRemoteForward=2222  localhost:22", "-o", "Tunnel   yes", "-4", "h", "-oX=1"]}
    assert ssh_option_directives(ev) == ["remoteforward 2222 localhost:22", "tunnel yes", "x 1"]


# ------------------------------------------------------------ stdio sockets

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0
   1: 0501000A:9C40 0902000A:115C 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 20 4 30 10 -1
"""


def test_parse_table_and_locality():
    rows = parse_table(TCP, "inet", {111, 222})
    assert rows == [(111, "127.0.0.1", 8080, "0.0.0.0", 0), (222, "10.0.1.5", 40000, "10.0.2.9", 4444)]
    assert peer_is_local("127.0.0.5", "10.0.1.5", frozenset())
    assert peer_is_local("10.0.1.5", "10.0.1.5", frozenset())
    assert peer_is_local("::ffff:10.9.9.9", "10.0.1.5", frozenset({"10.9.9.9"}))
    assert not peer_is_local("10.0.2.9", "10.0.1.5", frozenset({"10.0.1.5"}))


def test_stdio_sockets_of_a_real_process_on_loopback():
    """This process's stdin becomes a TCP connection to a loopback listener:
    reported, and local."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname())
    saved = os.dup(0)
    try:
        os.dup2(c.fileno(), 0)
        got = stdio_sockets(os.getpid(), lambda: frozenset())
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        c.close()
        srv.close()
    assert got and got[0]["fd"] == 0 and got[0]["proto"] == "tcp" and got[0]["peer"] == "127.0.0.1"
    assert got[0]["local"] is True
    assert stdio_sockets(2 ** 22 + 17, lambda: frozenset()) is None  # no such process


def test_stdio_remote_from_a_recorded_exec(packs):
    ev = {"type": "exec", "episode": "e", "pid": 5, "argv": ["/tmp/x"], "exe": "/tmp/x", "comm": "x",
          "stdio": [{"fd": 0, "proto": "tcp", "peer": "203.0.113.9", "peer_port": 4444, "local": False}]}
    vs = packs.evaluate(ev, record_context(ev))
    assert [(v.rule, v.matched) for v in vs] == [("reverse-shell", {"stdio_remote": "203.0.113.9"})]
    ev["episode"] = None
    assert packs.evaluate(ev, record_context(ev)) == []
