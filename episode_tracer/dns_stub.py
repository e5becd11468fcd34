"""The tracer's DNS stub resolver for episodes in egress mode.

The sock_addr programs (episode_tracer/bpf/egress.h) send every DNS query of an egress-mode
episode to the node's resolvers (UDP or TCP port 53) to this stub instead:
to 127.53.(index >> 8).(index & 255):PORT, so the address a query arrives at
names the episode's slot index (the low bits of its 24-bit identity,
episode_tracer/slots.py); the view says which identity holds the index now. The stub

1. answers REFUSED for a name its episode's profile does not allow, for
   NULL/ANY/zone-transfer queries and for tunnel-shaped names below an
   allowed wildcard (long or high-entropy labels);
2. forwards allowed queries to the upstream resolvers (the node's, from
   /etc/resolv.conf, unless configured) unchanged;
3. writes each A/AAAA address of the answer into the episode slot's
   `egress_dyn` map entry, valid for the answer's TTL (plus a small grace),
   BEFORE the answer is sent back: when the client has the address, the
   kernel already allows it. No race.

Threads: one listener thread (UDP and TCP accept) and a small pool that
handles queries (upstream waits). These threads are the only writers of
`egress_dyn` (episode_tracer.egress_maps.DynAllow, under a lock). They hand `dns`
records to the loop thread through a queue (`drain()`), and read the
identity -> (episode, profile) view the loop thread swaps in whole (`set_view`).
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .events import DNS_STUB_NET, SLOT_INDEX_MASK

log = logging.getLogger(__name__)

IP_PKTINFO = 8
REFUSED_TYPES = frozenset({"NULL", "ANY", "AXFR", "IXFR"})
UPSTREAM_TIMEOUT_S = 2.0
TTL_GRACE_S = 2.0
MAX_TCP = 64  # TCP clients served at once
MAX_TTL_S = 86400.0


def node_resolvers(path: str | Path = "/etc/resolv.conf") -> list[str]:
    """The nameserver addresses of resolv.conf (IPv4 and IPv6)."""
    out = []
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(str(ipaddress.ip_address(parts[1].split("%", 1)[0])))
            except ValueError:
                continue
    return out


def slot_of(dst: str) -> int | None:
    """Episode slot index from the stub address a query arrived at."""
    try:
        n = int(ipaddress.IPv4Address(dst))
    except ValueError:
        return None
    if n & 0xFFFF0000 != DNS_STUB_NET:
        return None
    return n & SLOT_INDEX_MASK


def tunnel_shape(labels: list[str]) -> str | None:
    """Why a name looks like data carried in DNS (None: it does not)."""
    from .datagram import entropy

    sub = "".join(labels[:-2])
    if max((len(x) for x in labels), default=0) >= 40:
        return "label of 40+ characters"
    if len(sub) >= 24 and entropy(sub) >= 4.0:
        return "high-entropy name"
    return None


@dataclass(frozen=True)
class SlotView:
    episode: str | None
    profile: Any  # episode_tracer.policy.egress.EgressProfile


class DnsStub:
    def __init__(self, dyn: Any, upstreams: Iterable[str], monitor: bool = False,
                 ttl_grace_s: float = TTL_GRACE_S, default_profile: Callable[[], Any] | None = None):
        self.dyn = dyn  # episode_tracer.egress_maps.DynAllow
        self.upstreams = [u for u in upstreams]
        self.monitor = monitor
        self.ttl_grace_s = ttl_grace_s
        self._view: dict[int, tuple[int, SlotView]] = {}  # slot index -> (identity, view)
        self._default = default_profile or (lambda: None)
        self._records: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # DynAllow writes
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="at-dns")
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.udp.bind(("0.0.0.0", 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", self.port))
        self.tcp.listen(64)
        self.queries = 0
        self.refused = 0
        self.installed = 0
        self.install_failed = 0
        self._tcp_active = 0
        self._thread = threading.Thread(target=self._serve, name="at-dns-stub", daemon=True)

    # ------------------------------------------------------- loop thread API
    def start(self) -> "DnsStub":
        self._thread.start()
        return self

    def set_view(self, view: dict[int, SlotView]) -> None:
        """view: episode identity -> SlotView. Swapped whole: the stub
        threads read one or the other. Queries arrive by slot index."""
        self._view = {ident & SLOT_INDEX_MASK: (ident, v) for ident, v in view.items()}

    def forget_slot(self, slot: int) -> None:
        self._pool.submit(self._forget, slot)

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self._records.get_nowait())
            except queue.Empty:
                return out

    def stats(self) -> dict[str, int]:
        return {"dns_queries": self.queries, "dns_refused": self.refused, "dns_installed": self.installed,
                "dns_install_failed": self.install_failed}

    def close(self) -> None:
        self._stop.set()
        for s in (self.udp, self.tcp):
            try:
                s.close()
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -------------------------------------------------------- stub threads
    def _forget(self, slot: int) -> None:
        with self._lock:
            self.dyn.forget_slot(slot)

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.udp, selectors.EVENT_READ, "udp")
        sel.register(self.tcp, selectors.EVENT_READ, "tcp")
        last_expire = time.monotonic()
        while not self._stop.is_set():
            try:
                ready = sel.select(timeout=0.5)
            except (OSError, ValueError):
                break
            for key, _ in ready:
                try:
                    if key.data == "udp":
                        self._on_udp()
                    else:
                        conn, peer = self.tcp.accept()
                        self._tcp_conn(conn, peer)
                except OSError as e:
                    if self._stop.is_set():
                        return
                    log.debug("dns stub: %s", e)
            now = time.monotonic()
            if now - last_expire >= 1.0:
                last_expire = now
                with self._lock:
                    self.dyn.expire()

    def _on_udp(self) -> None:
        data, anc, _flags, peer = self.udp.recvmsg(4096, socket.CMSG_SPACE(12))
        dst = None
        for level, typ, cdata in anc:
            if level == socket.IPPROTO_IP and typ == IP_PKTINFO and len(cdata) >= 12:
                dst = socket.inet_ntoa(cdata[8:12])
        slot = slot_of(dst) if dst else None
        if slot is None:
            return  # not sent through the redirect (or from outside the node): no answer
        self._pool.submit(self._answer_udp, data, peer, dst, slot)

    def _answer_udp(self, data: bytes, peer, dst: str, slot: int) -> None:
        reply = self.resolve(data, slot, "udp")
        if reply is None:
            return
        # from the address the client asked: a connected UDP client accepts only that
        pktinfo = struct.pack("=I4s4s", 0, socket.inet_aton(dst), b"\0" * 4)
        try:
            self.udp.sendmsg([reply], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, peer)
        except OSError as e:
            log.debug("dns stub: reply to %s: %s", peer, e)

    def _tcp_conn(self, conn: socket.socket, peer) -> None:
        """A thread per TCP client (idle clients must not hold the UDP
        pool); at most MAX_TCP at once, the rest are closed."""
        with self._lock:
            if self._tcp_active >= MAX_TCP:
                conn.close()
                return
            self._tcp_active += 1

        def run() -> None:
            try:
                self._on_tcp(conn, peer)
            finally:
                with self._lock:
                    self._tcp_active -= 1

        threading.Thread(target=run, name="at-dns-tcp", daemon=True).start()

    def _on_tcp(self, conn: socket.socket, peer) -> None:
        with conn:
            conn.settimeout(5)
            slot = slot_of(conn.getsockname()[0])
            if slot is None:
                return
            try:
                while True:
                    head = _recv_exact(conn, 2)
                    if not head:
                        return
                    (n,) = struct.unpack("!H", head)
                    data = _recv_exact(conn, n)
                    if data is None:
                        return
                    reply = self.resolve(data, slot, "tcp")
                    if reply is None:
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return

    # ---------------------------------------------------------------- judge
    def _profile(self, index: int) -> tuple[int, str | None, Any]:
        """(identity, episode, profile) of the slot index a query came to."""
        got = self._view.get(index)
        if got is not None:
            ident, v = got
            return ident, v.episode, v.profile
        # index 0: an episode not registered yet, which only a "*" profile covers
        return index, None, self._default() if index == 0 else None

    def resolve(self, data: bytes, index: int, transport: str) -> bytes | None:
        """The reply to send for query `data` that came to slot index
        `index` (None: none). Installs the answer's addresses, for the
        identity that holds the index, before returning."""
        from dnslib import QTYPE, RCODE, DNSError, DNSRecord

        self.queries += 1
        try:
            q = DNSRecord.parse(data)
        except (DNSError, Exception):  # garbage: no answer
            return None
        if not q.questions:
            return None
        slot, episode, profile = self._profile(index)
        question = q.questions[0]
        labels = [x.decode("latin-1").lower() for x in question.qname.label]
        qname = ".".join(labels)
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        rec: dict[str, Any] = {"type": "dns", "ts": time.time(), "episode": episode, "slot": slot,
                               "qname": qname, "qtype": qtype, "transport": transport,
                               "profile": getattr(profile, "name", None)}
        why = None
        if profile is None:
            why = "episode not registered yet" if slot == 0 else "episode not in egress mode"
        elif not profile.name_allowed(qname):
            why = "name not allowed"
        elif qtype in REFUSED_TYPES:
            why = f"query type {qtype} not served"
        else:
            why = tunnel_shape(labels)
        if why is not None:
            rec.update(verdict="refused", reason=why, would=self.monitor)
            if not self.monitor or profile is None:
                self.refused += 1
                self._records.put(rec)
                reply = q.reply()
                reply.header.rcode = RCODE.REFUSED
                return reply.pack()
        raw = self._forward(data, transport)
        if raw is None:
            rec.update(verdict=rec.get("verdict", "failed"), reason=rec.get("reason", "upstream did not answer"))
            self._records.put(rec)
            reply = q.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        answers, ttl = [], None
        try:
            ans = DNSRecord.parse(raw)
        except (DNSError, Exception):
            ans = None
        if ans is not None:
            try:
                with self._lock:
                    for rr in ans.rr:
                        if rr.rtype in (QTYPE.A, QTYPE.AAAA):
                            t = min(float(rr.ttl), MAX_TTL_S)
                            self.dyn.put(slot, str(rr.rdata), t + self.ttl_grace_s)
                            self.installed += 1
                            answers.append(str(rr.rdata))
                            ttl = t if ttl is None else min(ttl, t)
            except Exception as e:  # the allow map is full (or gone): no answer the kernel would refuse
                self.install_failed += 1
                rec.update(verdict="failed", reason=f"allow map write failed: {e}", answers=answers)
                self._records.put(rec)
                reply = q.reply()
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
            rec["rcode"] = RCODE.get(ans.header.rcode)
        rec.setdefault("verdict", "allowed")
        rec.update(answers=answers, ttl=ttl)
        self._records.put(rec)
        return raw

    def _forward(self, data: bytes, transport: str) -> bytes | None:
        for up in self.upstreams:
            fam = socket.AF_INET6 if ":" in up else socket.AF_INET
            try:
                if transport == "udp":
                    with socket.socket(fam, socket.SOCK_DGRAM) as s:
                        s.settimeout(UPSTREAM_TIMEOUT_S)
                        s.connect((up, 53))
                        s.send(data)
                        while True:
                            raw = s.recv(65535)
                            if raw[:2] == data[:2]:
                                return raw
                with socket.create_connection((up, 53), timeout=UPSTREAM_TIMEOUT_S) as s:
                    s.sendall(struct.pack("!H", len(data)) + data)
                    head = _recv_exact(s, 2)
                    if head:
                        got = _recv_exact(s, struct.unpack("!H", head)[0])
                        if got is not None:
                            return got
            except OSError as e:
                log.debug("dns stub: upstream %s: %s", up, e)
        return None


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
