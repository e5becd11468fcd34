"""Wire inspection in user space: the kernel's flow reports (episode_tracer/bpf/wire.h)
judged into `protocol` records, one per complete application message, and
the verdicts written back to the kernel by socket cookie.

    kernel report (first bytes of a flow so far, by cookie)
      -> judge (episode_tracer.protocols, pure) -> a `protocol` record per new message
      -> tracker + policy (the engine) -> verdict(rec, enforcing):
           deny  : the flow is dropped in the kernel from now on
           final : the flow is decided; the kernel lets it pass unlooked-at
           else  : bytes up to the end of this message may leave; the next
                   message stays held until it is judged too

A held flow whose verdict does not come within `timeout_s` (its report was
not reserved, the message never completes, the tracer is behind) is denied
and a `wire_timeout` record says so. Owned by the loop thread.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from .events import VERDICT_DENY, VERDICT_DONE, WIRE_FULL, WIRE_HELD, WIRE_SYN_DATA
from .protocols import escape, judge

log = logging.getLogger(__name__)

MAX_FLOWS = 65536  # flows remembered (judged offsets); the oldest go first
GC_S = 30.0  # seconds between forgetting flows whose socket is gone


@dataclass
class _Flow:
    judged: int = 0  # bytes judged (records emitted for messages ending here)
    done: bool = False
    denied: bool = False
    first: float = 0.0
    pid: int = 0
    cgroup: int = 0
    addr: str | None = None
    port: int | None = None
    captured: int = 0


class FlowInspector:
    def __init__(self, probes, tracker=None, timeout_s: float = 3.0):
        self.probes = probes
        self.tracker = tracker
        self.timeout_s = timeout_s
        self.flows: dict[int, _Flow] = {}
        self.timeouts = 0
        self.reports = 0
        self.denied = 0
        self.kicks = 0
        self._last_gc = time.monotonic()

    # ------------------------------------------------------------- reports
    def feed(self, rep: dict[str, Any]) -> list[dict[str, Any]]:
        """The `protocol` records of the messages a report completes."""
        self.reports += 1
        cookie = rep["cookie"]
        st = self.flows.get(cookie)
        if st is None:
            if len(self.flows) >= MAX_FLOWS:
                self.flows.pop(next(iter(self.flows)))
            st = self.flows[cookie] = _Flow(first=time.monotonic())
        st.pid, st.cgroup, st.addr, st.port = rep["pid"], rep["cgroup"], rep["addr"], rep["port"]
        st.captured = rep["captured"]
        if st.done or st.denied:
            return []
        flags = rep["flags"]
        judged = max(st.judged, rep["upto"])
        out = []
        for m in judge(rep["data"], full=bool(flags & WIRE_FULL)):
            if m.end <= judged:
                continue
            st.judged = max(st.judged, m.end)
            out.append({
                "type": "protocol", "ktime": rep["ktime"], "cgroup": rep["cgroup"], "pid": rep["pid"] or None,
                "uid": rep["uid"], "comm": rep["comm"], "cookie": cookie, "family": rep["family"],
                "addr": rep["addr"], "port": rep["port"], "sport": rep["sport"], "protocol": m.protocol,
                "sni": m.sni, "alpn": list(m.alpn) or None, "method": m.method, "proxy_host": m.proxy_host,
                "proxy_port": m.proxy_port, "matched_bytes": escape(m.matched), "matched_offset": m.offset,
                "offset": m.start, "length": m.end - m.start, "final": m.final, "truncated": m.truncated,
                "captured": rep["captured"], "held": bool(flags & WIRE_HELD),
                "syn_data": bool(flags & WIRE_SYN_DATA),
            })
            if m.final:
                break
        return out

    # ------------------------------------------------------------- verdicts
    def deny(self, rec: dict[str, Any]) -> None:
        """Drop the flow in the kernel (before a rule's action runs, so that
        not even an orphaned socket sends the held bytes)."""
        cookie = rec.get("cookie")
        if cookie is None:
            return
        st = self.flows.get(cookie)
        if st is not None:
            if st.denied:
                return
            st.denied = True
        self.denied += 1
        self.probes.set_flow_verdict(cookie, 0, VERDICT_DENY)

    def verdict(self, rec: dict[str, Any], enforcing: bool, engine=None) -> list[dict[str, Any]]:
        """After the policy ran on a `protocol` record: deny, or let this
        message (and, when final, the rest of the flow) out. A proxy request's
        target is judged like a direct connect first (the connect rules:
        ports, CIDRs). Returns alerts of that judgement."""
        cookie = rec.get("cookie")
        if cookie is None:  # a recorded record (replay): no kernel flow
            return []
        out: list[dict[str, Any]] = []
        if not enforcing and rec.get("proxy_port") and engine is not None:
            out, enforcing = proxy_target_verdicts(engine, rec)
        if enforcing:
            self.deny(rec)
            return out
        st = self.flows.get(cookie)
        if st is not None and st.denied:
            return out
        end = int(rec.get("offset", 0)) + int(rec.get("length", 0))
        if rec.get("final"):
            if st is not None:
                st.done = True
            self.probes.set_flow_verdict(cookie, end, VERDICT_DONE)
        else:
            self.probes.set_flow_verdict(cookie, end, 0)
        if rec.get("held") and rec.get("pid"):
            # the dropped bytes would wait for TCP's retransmit timer (>= 200 ms):
            # have the socket push them now
            self.kicks += 1 if kick(rec["pid"], rec.get("sport"), rec.get("addr"), rec.get("port")) else 0
        return out

    # -------------------------------------------------------------- timeout
    def poll(self, now_ns: int | None = None) -> list[dict[str, Any]]:
        """Held flows past the timeout: denied, one `wire_timeout` each."""
        held = self.probes.held_flows()
        out = []
        if held:
            now_ns = now_ns if now_ns is not None else time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            for cookie, since in held.items():
                held_s = (now_ns - since) / 1e9
                if held_s < self.timeout_s:
                    continue
                self.timeouts += 1
                st = self.flows.get(cookie)
                owner = self.probes.flow_owner(cookie) or {}
                self.probes.set_flow_verdict(cookie, 0, VERDICT_DENY)
                self.probes.forget_held(cookie)
                if st is not None:
                    st.denied = True
                pid = owner.get("pid") or (st.pid if st else 0)
                p = self.tracker.process_of(pid) if (self.tracker is not None and pid) else None
                out.append({"type": "wire_timeout", "ts": time.time(), "episode": p.episode if p else None,
                            "pid": pid or None, "comm": owner.get("comm"), "cookie": cookie,
                            "addr": st.addr if st else None, "port": st.port if st else None,
                            "captured": st.captured if st else 0, "reported": st is not None,
                            "held_s": round(held_s, 3), "timeout_s": self.timeout_s, "verdict": "denied"})
                log.warning("wire: flow %x of pid %s held %.2fs without a verdict: denied", cookie, pid, held_s)
        if time.monotonic() - self._last_gc >= GC_S:
            self.gc()
        return out

    def gc(self) -> None:
        """Forget flows whose socket is gone (kernel entries of held or
        denied flows outlive the socket's release: an orphan still sends)."""
        self._last_gc = time.monotonic()
        try:
            live = self.probes.live_socket_cookies()
        except Exception as e:  # sock_diag unavailable: keep everything
            log.debug("wire gc: %s", e)
            return
        for cookie in [c for c in self.flows if c not in live]:
            del self.flows[cookie]
        self.probes.forget_flows_except(live)

    def close(self) -> int:
        """The tracer is going away and with it the packet path: a flow still
        held cannot stay held, so its episode process is killed (the default
        verdict for episodes; a process outside every episode is left)."""
        import os
        import signal

        killed = 0
        try:
            held = self.probes.held_flows()
        except Exception:  # pragma: no cover - maps gone
            return 0
        for cookie in held:
            pid = (self.probes.flow_owner(cookie) or {}).get("pid")
            p = self.tracker.process_of(pid) if (self.tracker is not None and pid) else None
            if not pid or p is None or not p.episode:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
                log.warning("wire: closing with flow %x of pid %d held: killed", cookie, pid)
            except ProcessLookupError:
                pass
        return killed

    def stats(self) -> dict[str, int]:
        return {"wire_reports": self.reports, "wire_timeouts": self.timeouts, "wire_denied": self.denied,
                "wire_kicks": self.kicks}


_TCP_CORK = 3
_SYS_PIDFD_GETFD = 438


def kick(pid: int, sport: int | None, addr: str | None, port: int | None) -> bool:
    """Make the connecting process's socket send what the kernel held, now,
    instead of at TCP's next retransmit: find the socket among the process's
    fds (pidfd_getfd, matched by its ports and peer address) and uncork it
    (TCP_CORK 0 pushes the pending frames; a socket the application itself
    corked is left alone). False when it cannot (the process is gone, the fd
    was passed on): TCP's timer then sends it, later."""
    import ctypes
    import os
    import socket

    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                local, peer = s.getsockname(), s.getpeername()
                peer_addr = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
                if local[1] != sport or peer[1] != port or peer_addr != addr:
                    continue
                if not s.getsockopt(socket.IPPROTO_TCP, _TCP_CORK):
                    s.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)
                return True
            except OSError:
                continue
            finally:
                s.close()  # our duplicate only
    except OSError:
        return False
    finally:
        os.close(pidfd)
    return False


def proxy_target_verdicts(engine, rec: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """An HTTP CONNECT / absolute-URI request's target judged like a direct
    connect of the same process: the connect rules (deny lists of ports and
    CIDRs, the egress allowlist) see a `connect` record for it."""
    from .enforce import ENFORCING_ACTIONS
    from .engine import make_alert

    host, port = rec.get("proxy_host"), rec.get("proxy_port")
    addr, family = None, None
    try:
        ip = ipaddress.ip_address(host or "")
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        addr, family = str(ip), "inet" if ip.version == 4 else "inet6"
    except ValueError:
        pass
    sub = {k: rec.get(k) for k in ("ts", "pid", "uid", "comm", "cgroup", "episode", "membership", "ppid", "exe",
                                   "argv")}
    sub.update({"type": "connect", "addr": addr, "port": port, "family": family, "protocol": "tcp",
                "sock_type": "stream", "result": None, "via_proxy": True, "proxy_host": host})
    out, enforcing = [], False
    for v in engine.policy.evaluate(sub, engine.ctx, None):
        action = getattr(v.action, "value", v.action)
        if action in ENFORCING_ACTIONS and not engine.monitor:
            engine.flows.deny(rec)
        # a deny is the flow dropped in the kernel; other actions run as for any record
        o = engine.enforcer.apply(action, rec, already=action == "deny")
        if o.enforced and action == "deny":
            o.detail = f"proxied connect to {host}:{port} dropped in kernel"
        enforcing = enforcing or (action in ENFORCING_ACTIONS and o.enforced)
        a = make_alert(rec, v, o, engine.policy.version)
        a["proxy_host"], a["proxy_port"] = host, port
        out.append(a)
    return out, enforcing


def canary_wire(probes, enter_cgroup, timeout_s: float = 5.0) -> str:
    """Prove the packet-path hold live: a forked child in the canary cgroup
    connects to a listener of ours and writes; its bytes must not arrive
    while the flow is held (the kernel has it in flow_held), and must arrive
    once the flow is let out. 'ok' | 'failed: why'."""
    import os
    import signal
    import socket

    if getattr(probes, "wire_error", None):
        return f"failed: {probes.wire_error}"
    token = b"AT-CANARY-WIRE\n"
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            enter_cgroup()
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
            s.sendall(token)
            time.sleep(timeout_s)
        except OSError:
            code = 1
        finally:
            os._exit(code)
    conn = None
    try:
        lsock.settimeout(timeout_s)
        conn, _ = lsock.accept()
        deadline = time.monotonic() + timeout_s
        cookie = None
        while cookie is None and time.monotonic() < deadline:
            for c in probes.held_flows():
                if (probes.flow_owner(c) or {}).get("pid") == pid:
                    cookie = c
            time.sleep(0.005)
        if cookie is None:
            return "failed: the canary flow was not held in the kernel"
        conn.settimeout(0.05)
        try:
            if conn.recv(100):
                return "failed: held bytes reached the peer"
        except socket.timeout:
            pass
        probes.set_flow_verdict(cookie, len(token), VERDICT_DONE)
        conn.settimeout(timeout_s)
        got = b""
        while len(got) < len(token):
            b = conn.recv(100)
            if not b:
                break
            got += b
        return "ok" if got == token else f"failed: after the verdict the peer got {got!r}"
    except OSError as e:
        return f"failed: {e}"
    finally:
        if conn is not None:
            conn.close()
        lsock.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
