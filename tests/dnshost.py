""""The internet" of the egress-mode tests, run inside a NetHost namespace:
an authoritative DNS server (dnslib, UDP and TCP port 53 on every address
of the namespace) whose zone is a JSON file the test rewrites, logging every
query it receives (the DNS sink), and an HTTP server logging every request
with the address it was reached at.

    python dnshost.py dns ZONE.json LOG.jsonl
    python dnshost.py http PORT LOG.jsonl

ZONE.json: {"name": [["A" | "AAAA", "address", ttl], ...], ...}; a name not
in the zone gets NXDOMAIN. Re-read on every query.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time


def _log(log_file: str, lock: threading.Lock, **kw) -> None:
    with lock, open(log_file, "a") as f:
        f.write(json.dumps(kw) + "\n")


def serve_dns(zone_path: str, log_path: str) -> None:
    from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

    lock = threading.Lock()

    def answer(data: bytes, transport: str, peer) -> bytes | None:
        try:
            q = DNSRecord.parse(data)
        except Exception:
            _log(log_path, lock, event="garbage", transport=transport, peer=peer[0], len=len(data))
            return None
        qname = str(q.q.qname).rstrip(".").lower()
        _log(log_path, lock, event="query", transport=transport, peer=peer[0], qname=qname,
             qtype=QTYPE.get(q.q.qtype))
        with open(zone_path) as f:
            zone = json.load(f)
        r = q.reply()
        if qname not in zone:
            r.header.rcode = RCODE.NXDOMAIN
            return r.pack()
        for rtype, addr, ttl in zone[qname]:
            if QTYPE.get(q.q.qtype) != rtype:
                continue
            rdata = A(addr) if rtype == "A" else AAAA(addr)
            r.add_answer(RR(q.q.qname, getattr(QTYPE, rtype), rdata=rdata, ttl=int(ttl)))
        return r.pack()

    def udp_loop(s: socket.socket) -> None:
        while True:
            data, peer = s.recvfrom(4096)
            out = answer(data, "udp", peer)
            if out:
                s.sendto(out, peer)

    def tcp_conn(c: socket.socket, peer) -> None:
        with c:
            while True:
                head = c.recv(2)
                if len(head) < 2:
                    return
                n = int.from_bytes(head, "big")
                data = b""
                while len(data) < n:
                    chunk = c.recv(n - len(data))
                    if not chunk:
                        return
                    data += chunk
                out = answer(data, "tcp", peer)
                if not out:
                    return
                c.sendall(len(out).to_bytes(2, "big") + out)

    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 53))
    u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    u6.bind(("::", 53))
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", 53))
    t.listen(16)
    for s in (u, u6):
        threading.Thread(target=udp_loop, args=(s,), daemon=True).start()
    _log(log_path, lock, event="ready")
    while True:
        c, peer = t.accept()
        threading.Thread(target=tcp_conn, args=(c, peer), daemon=True).start()


def serve_http(port: int, log_path: str) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            _log(log_path, lock, event="request", local=self.connection.getsockname()[0], path=self.path,
                 ts=time.time())
            body = b"egress-ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    class S(ThreadingHTTPServer):
        address_family = socket.AF_INET6

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    S(("::", port), H).serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "dns":
        serve_dns(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "http":
        serve_http(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} dns ZONE LOG | http PORT LOG")
