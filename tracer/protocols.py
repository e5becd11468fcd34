"""Name-independent protocol identification from the first bytes a process
writes on a new outbound TCP connection (captured by the kernel, see
bpf/wire.h `on_wire_write`).

Pure functions over bytes: no I/O, and never a DNS lookup (destinations are
known by the TLS server name the client itself sent).

    identify(data) -> Wire(protocol, sni, offset, matched)

protocol is one of:
  ssh      an SSH identification string "SSH-<protoversion>-" (RFC 4253 4.2)
  stratum  Stratum JSON-RPC: a "mining.*" method (subscribe, authorize,
           configure, hello ...), EthProxy "eth_submitLogin", or a "login"
           whose params carry a miner agent (XMRig-style Monero pools)
  tls      a TLS handshake record holding a ClientHello; sni is its
           server_name when present within the captured bytes
  http     an HTTP/1.x request line
  json     JSON-RPC or other JSON that is not Stratum
  unknown  anything else (also empty or partial prefixes)

`matched` is the part of the data that decided (the SSH line, the JSON-RPC
request, the server_name bytes), `offset` where it starts.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

SSH_ID_RE = re.compile(rb"SSH-(2\.0|1\.99|1\.[0-9]+)-[\x21-\x7e]*")
SSH_ID_MAX = 255  # RFC 4253: the identification line is at most 255 bytes
HTTP_RE = re.compile(rb"(GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH|CONNECT|TRACE) \S+ HTTP/1\.[01]\r?\n")
MINER_AGENT_RE = re.compile(
    r"(?i)(xmrig|xmr-stak|xmr-node-proxy|cpuminer|miner|srbminer|t-rex|wildrig|rigel|excavator|claymore|"
    r"ccminer|cgminer|bfgminer|kawpow|randomx)"
)
# raw-byte fallback for JSON cut by the capture bound or split across writes
STRATUM_BYTES_RE = re.compile(rb'"method"\s*:\s*"(mining\.[a-z_.]+|eth_submitLogin)"')
LOGIN_BYTES_RE = re.compile(rb'"method"\s*:\s*"login"')
AGENT_BYTES_RE = re.compile(rb'"agent"\s*:\s*"([^"]{0,200})')  # closing quote may be cut
MATCHED_MAX = 160  # bytes of the matched part kept in a record


@dataclass(frozen=True)
class Wire:
    protocol: str
    sni: str | None = None
    offset: int = 0
    matched: bytes = b""


def escape(data: bytes, limit: int = MATCHED_MAX) -> str:
    """Printable ASCII as is, the rest escaped (\\r, \\n, \\t, \\\\, \\xNN);
    at most `limit` source bytes, with '...' when cut."""
    out = []
    for b in data[:limit]:
        if b == 0x5C:
            out.append("\\\\")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        elif b == 0x0D:
            out.append("\\r")
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x09:
            out.append("\\t")
        else:
            out.append(f"\\x{b:02x}")
    s = "".join(out)
    return s + "..." if len(data) > limit else s


def identify(data: bytes) -> Wire:
    if not data:
        return Wire("unknown")
    if data.startswith(b"SSH-"):
        m = SSH_ID_RE.match(data)
        if m:
            end = data.find(b"\n", 0, SSH_ID_MAX + 1)
            line = data[: end + 1] if end >= 0 else data[:SSH_ID_MAX]
            return Wire("ssh", offset=0, matched=line)
    if data[0] == 0x16:
        return _tls(data)
    stripped = data.lstrip(b" \t\r\n")
    if stripped[:1] in (b"{", b"["):
        return _json(data, len(data) - len(stripped))
    m = HTTP_RE.match(data)
    if m:
        return Wire("http", offset=0, matched=m.group(0))
    return Wire("unknown", matched=data[:32])


# ------------------------------------------------------------------ stratum
def _json(data: bytes, off: int) -> Wire:
    line_end = data.find(b"\n", off)
    line = data[off:] if line_end < 0 else data[off:line_end]
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        obj = None
    reqs = obj if isinstance(obj, list) else [obj] if obj is not None else []
    for req in reqs:
        if isinstance(req, dict) and _is_stratum(req):
            return Wire("stratum", offset=off, matched=line)
    if obj is None:
        # cut or split JSON: look at the bytes themselves
        if STRATUM_BYTES_RE.search(line):
            return Wire("stratum", offset=off, matched=line)
        if LOGIN_BYTES_RE.search(line):
            agent = AGENT_BYTES_RE.search(line)
            if agent and MINER_AGENT_RE.search(agent.group(1).decode("utf-8", "replace")):
                return Wire("stratum", offset=off, matched=line)
    return Wire("json", offset=off, matched=line)


def _is_stratum(req: dict) -> bool:
    method = req.get("method")
    if not isinstance(method, str):
        return False
    if method.startswith("mining.") or method == "eth_submitLogin":
        return True
    if method == "login":
        params = req.get("params")
        if isinstance(params, dict):
            agent = params.get("agent")
            return isinstance(agent, str) and MINER_AGENT_RE.search(agent) is not None
    return False


# ---------------------------------------------------------------------- tls
class _Short(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int) -> bytes:
        if self.pos + n > min(self.end, len(self.data)):
            raise _Short
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")


def _tls(data: bytes) -> Wire:
    # TLSPlaintext: type 22 (handshake), legacy version 3.x, length
    if len(data) < 6 or data[1] != 3 or data[2] > 4:
        return Wire("unknown", matched=data[:32])
    if data[5] != 1:  # not a ClientHello
        return Wire("tls")
    rec_end = 5 + int.from_bytes(data[3:5], "big")
    r = _Reader(data, 5, rec_end)
    try:
        r.u8()  # handshake type
        hs_len = r.u24()
        r.end = min(rec_end, r.pos + hs_len)
        r.take(2 + 32)  # client version, random
        r.take(r.u8())  # session id
        r.take(r.u16())  # cipher suites
        r.take(r.u8())  # compression methods
        ext_end = r.u16() + r.pos
        r.end = min(r.end, ext_end)
        while True:
            etype, elen = r.u16(), r.u16()
            if etype != 0:
                r.take(elen)
                continue
            body = _Reader(data, r.pos, r.pos + elen)
            list_end = body.u16() + body.pos
            body.end = min(body.end, list_end)
            while True:
                ntype, nlen = body.u8(), body.u16()
                name = body.take(nlen)
                if ntype == 0:  # host_name
                    off = body.pos - nlen
                    host = name.decode("ascii", "replace").rstrip(".").lower()
                    return Wire("tls", sni=host, offset=off, matched=name)
    except _Short:
        pass
    return Wire("tls")
