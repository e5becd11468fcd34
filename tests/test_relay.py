"""The reverse-tunnel shape (episode_tracer/relay.py) on recorded connection
snapshots: the pure find_relays and the Scanner's first-seen ages and
once-per-connection reporting, without root (fakes for sock_diag and
/proc/<pid>/fd)."""
from __future__ import annotations

from types import SimpleNamespace

from episode_tracer.relay import TCP_ESTABLISHED as EST, TCP_LISTEN as LST, Scanner, Sock, find_relays, is_local

NODE = frozenset({"10.0.0.5", "fd00::5"})
OUT = "203.0.113.9"


def est(ino, dst, dport, src="10.0.0.5", sport=40000, fam="inet"):
    return Sock(ino, fam, EST, src, sport, dst, dport)


def lst(ino, addr, port, fam="inet"):
    return Sock(ino, fam, LST, addr, port, "0.0.0.0" if fam == "inet" else "::", 0)


JUPYTER = lst(900, "127.0.0.1", 8888)


def relays(members, fds, socks, seen=None, now=100.0, min_age=5.0):
    seen = seen if seen is not None else {s.inode: 0.0 for s in socks}
    return find_relays(members, fds, socks, NODE, seen, now, min_age)


def fd(socks=(), pipes=()):
    return {"socket": set(socks), "pipe": set(pipes)}


def test_both_legs_in_one_process():
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 8888, src="127.0.0.1"), JUPYTER]
    [r] = relays({"ep": [10]}, {10: fd([1, 2])}, socks)
    assert (r.episode, r.out_pid, r.local_pid, r.out.dst, r.out.dport, r.local.dport, r.listener_inode) == \
        ("ep", 10, 10, OUT, 443, 8888, 900)
    assert r.age_s == 100.0


def test_outbound_only_and_local_only():
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 8888), JUPYTER]
    assert relays({"ep": [10]}, {10: fd([1])}, socks) == []
    assert relays({"ep": [10]}, {10: fd([2])}, socks) == []


def test_too_young():
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 8888), JUPYTER]
    assert relays({"ep": [10]}, {10: fd([1, 2])}, socks, seen={1: 0.0, 2: 96.0}) == []
    [r] = relays({"ep": [10]}, {10: fd([1, 2])}, socks, seen={1: 0.0, 2: 95.0})
    assert r.age_s == 5.0


def test_two_processes_of_one_episode():
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 8888), JUPYTER]
    # unrelated processes (an agent's API keep-alive and a test client): no relay
    assert relays({"ep": [10, 11]}, {10: fd([1]), 11: fd([2])}, socks) == []
    # nc OUT 443 | nc localhost 8888: a shared pipe links them
    [r] = relays({"ep": [10, 11]}, {10: fd([1], [77]), 11: fd([2], [77])}, socks)
    assert (r.out_pid, r.local_pid) == (10, 11)
    # the legs in two different episodes: nothing
    assert relays({"a": [10], "b": [11]}, {10: fd([1], [77]), 11: fd([2], [77])}, socks) == []


def test_listener_owned_by_the_same_process():
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 8888), JUPYTER]
    assert relays({"ep": [10]}, {10: fd([1, 2, 900])}, socks) == []


def test_not_a_listener_or_accepted_connection():
    # the local peer port is no listener (e.g. the accepted end of a local client)
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 50123)]
    assert relays({"ep": [10]}, {10: fd([1, 2])}, socks) == []
    # the "outbound" leg was accepted on a listening port: inbound, not dialed
    socks = [est(1, OUT, 51000, sport=8080), lst(901, "0.0.0.0", 8080), est(2, "127.0.0.1", 8888), JUPYTER]
    assert relays({"ep": [10]}, {10: fd([1, 2])}, socks) == []


def test_v6_and_loopback_variants():
    v6 = [est(1, "2001:db8::1", 443, src="fd00::5", fam="inet6"), est(2, "::1", 7000, src="::1", fam="inet6"),
          lst(902, "::", 7000, fam="inet6")]
    [r] = relays({"ep": [10]}, {10: fd([1, 2])}, v6)
    assert r.out.family == "inet6" and r.local.dport == 7000
    # 127.0.0.2, the node's own address, v4-mapped loopback: all local legs
    for dst, ln in (("127.0.0.2", lst(903, "0.0.0.0", 7001)), ("10.0.0.5", lst(903, "10.0.0.5", 7001)),
                    ("::ffff:127.0.0.1", lst(903, "::", 7001, fam="inet6"))):
        fam = "inet6" if ":" in dst else "inet"
        socks = [est(1, OUT, 443), est(2, dst, 7001, fam=fam), ln]
        assert len(relays({"ep": [10]}, {10: fd([1, 2])}, socks)) == 1, dst
    # a listener on another address of the same port is not reached
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 7001), lst(903, "10.0.0.5", 7001)]
    assert relays({"ep": [10]}, {10: fd([1, 2])}, socks) == []
    # outside addresses (also v4-mapped) are never local
    assert not is_local("::ffff:203.0.113.9", NODE) and is_local("::ffff:127.0.0.1", NODE)


def test_scanner_ages_and_reports_once():
    p = SimpleNamespace(pid=10, episode="ep", exe="/usr/bin/python3", argv=["python3", "r.py"], comm="python3", uid=0)
    tracker = SimpleNamespace(table=SimpleNamespace(live=lambda: [p], get=lambda pid: p if pid == 10 else None),
                              episodes={"ep": SimpleNamespace(ended=False)})
    socks = [est(1, OUT, 443), est(2, "127.0.0.1", 8888), Sock(0, "inet", LST, "127.0.0.1", 8888, "0.0.0.0", 0)]
    sc = Scanner(tracker, min_age_s=5.0, socks=lambda: socks, addrs=lambda: NODE, fds=lambda pids: {10: fd([1, 2])})
    assert sc.scan(now=100.0) == []  # first seen now
    assert sc.scan(now=104.0) == []
    [rec] = sc.scan(now=105.5)
    assert {k: rec[k] for k in ("type", "episode", "pid", "exe", "family", "addr", "port", "local_addr", "local_port",
                                "age_s", "same_process")} == \
        {"type": "relay", "episode": "ep", "pid": 10, "exe": "/usr/bin/python3", "family": "inet", "addr": OUT,
         "port": 443, "local_addr": "127.0.0.1", "local_port": 8888, "age_s": 5.5, "same_process": True}
    assert sc.scan(now=110.0) == []  # once per (episode, outbound connection)
    # the local leg closes: its age starts over when a new one comes
    socks[1] = est(3, "127.0.0.1", 8888)
    sc._fds = lambda pids: {10: fd([1, 3])}
    assert sc.scan(now=111.0) == []
    assert sc.first_seen == {1: 100.0, 3: 111.0}
