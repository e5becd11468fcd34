"""Name-independent protocol identification from the first bytes of a new
outbound TCP flow (accumulated by the kernel in the packet path, by socket
cookie, see episode_tracer/bpf/wire.h).

Pure functions over bytes: no I/O, and never a DNS lookup (destinations are
known by the TLS server name the client itself sent).

    judge(data, full=False) -> [Message, ...]   every complete application
        message from the start of the flow; [] while the first one is still
        incomplete (the kernel keeps holding it). `full`: no more bytes will
        come (the capture bound), judge what is there.
    identify(data) -> Wire(protocol, sni, offset, matched)   the first one

protocol is one of:
  ssh      an SSH identification string "SSH-<protoversion>-" (RFC 4253 4.2)
  stratum  Stratum by its protocol: JSON-RPC that speaks mining (a "mining.*"
           method, "login" with a pass or a miner agent, "submit", "job",
           "getjob", "keepalived", EthProxy eth_submitLogin/eth_submitWork/
           eth_getWork/eth_submitHashrate), or a Stratum V2 SetupConnection
           frame in the clear
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
# JSON-RPC methods only mining speaks (Stratum V1, XMRig/Monero pools, EthProxy)
MINING_METHODS = frozenset({"submit", "job", "getjob", "keepalived", "eth_submitLogin", "eth_submitWork",
                            "eth_getWork", "eth_submitHashrate"})
# raw-byte fallback for JSON cut by the capture bound
STRATUM_BYTES_RE = re.compile(
    rb'"method"\s*:\s*"(mining\.[A-Za-z_.]+|submit|job|getjob|keepalived|eth_submitLogin|eth_submitWork|'
    rb'eth_getWork|eth_submitHashrate)"')
PASS_BYTES_RE = re.compile(rb'"pass"\s*:')
LOGIN_BYTES_RE = re.compile(rb'"method"\s*:\s*"login"')
AGENT_BYTES_RE = re.compile(rb'"agent"\s*:\s*"([^"]{0,200})')  # closing quote may be cut
MATCHED_MAX = 160  # bytes of the matched part kept in a record


@dataclass(frozen=True)
class Wire:
    protocol: str
    sni: str | None = None
    offset: int = 0
    matched: bytes = b""
    alpn: tuple[str, ...] = ()


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
            if PASS_BYTES_RE.search(line):
                return Wire("stratum", offset=off, matched=line)
    return Wire("json", offset=off, matched=line)


def _is_stratum(req: dict) -> bool:
    method = req.get("method")
    if not isinstance(method, str):
        return False
    if method.startswith("mining.") or method in MINING_METHODS:
        return True
    if method == "login":
        params = req.get("params")
        if isinstance(params, dict):
            if "pass" in params:
                return True
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
    sni, sni_off, sni_raw, alpn = None, 0, b"", []
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
            body = _Reader(data, r.pos, r.pos + elen)
            r.take(elen)
            if etype == 0 and sni is None:  # server_name
                list_end = body.u16() + body.pos
                body.end = min(body.end, list_end)
                while True:
                    ntype, nlen = body.u8(), body.u16()
                    name = body.take(nlen)
                    if ntype == 0:  # host_name
                        sni_off, sni_raw = body.pos - nlen, name
                        sni = name.decode("ascii", "replace").rstrip(".").lower()
                        break
            elif etype == 16:  # application_layer_protocol_negotiation
                list_end = body.u16() + body.pos
                body.end = min(body.end, list_end)
                while body.pos < body.end:
                    alpn.append(body.take(body.u8()).decode("ascii", "replace"))
    except _Short:
        pass
    return Wire("tls", sni=sni, offset=sni_off, matched=sni_raw, alpn=tuple(alpn))


# ----------------------------------------------------------- the judge
@dataclass(frozen=True)
class Message:
    """One application message of a flow: bytes [start, end) of it.

    final: the flow is decided after this message (its protocol carries no
    further message worth judging: TLS is encrypted from here, SSH and
    Stratum are denied anyway, an HTTP request's body is the application's);
    the kernel then lets the flow pass without looking. Otherwise the next
    message is held until it is judged too (JSON-RPC lines, the tunnelled
    stream after an HTTP CONNECT)."""

    protocol: str
    start: int
    end: int
    final: bool
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    method: str | None = None  # JSON-RPC method, HTTP method
    proxy_host: str | None = None  # HTTP CONNECT / absolute-URI target
    proxy_port: int | None = None
    offset: int = 0  # where `matched` starts in the flow
    matched: bytes = b""
    truncated: bool = False  # judged on a cut message (the capture bound)


SSH_ANY_RE = re.compile(rb"SSH-(2\.0|1\.99|1\.[0-9]+)-[\x21-\x7e]*")
HTTP_LINE_RE = re.compile(rb"([A-Z]{3,10}) (\S+) HTTP/[0-9.]+\r?\n")
HTTP_PREFIX_RE = re.compile(rb"[A-Z]{1,10}( [^\r\n]*)?\r?$")
HTTP_METHODS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"})
HTTP_HOST_PORT_RE = re.compile(r"^\[?([^\]/@]*?)\]?(?::([0-9]{1,5}))?$")
URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(?:[^/@]*@)?(\[[^\]]+\]|[^/:?#]+)(?::([0-9]{1,5}))?")
SCHEME_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
SSH_PREFIX = b"SSH-"


def judge(data: bytes, full: bool = False) -> list[Message]:
    """Every complete message from the start of the flow (pure, re-run on
    the whole prefix each time: the bytes are at most the capture bound)."""
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        m = _one(data, pos, full)
        if m is None:
            break
        out.append(m)
        if m.final or m.end <= pos:
            break
        pos = m.end
    return out


def _one(data: bytes, pos: int, full: bool) -> Message | None:
    rest = data[pos:]
    n = len(data)
    if rest[0] == 0x16:
        return _tls_message(data, pos, full)
    ssh = SSH_ANY_RE.search(data, pos)
    if ssh:  # an SSH identification string anywhere in the first bytes
        nl = data.find(b"\n", ssh.start(), ssh.start() + SSH_ID_MAX + 1)
        if nl < 0 and not full and n - ssh.start() < SSH_ID_MAX:
            return None
        end = nl + 1 if nl >= 0 else min(n, ssh.start() + SSH_ID_MAX)
        return Message("ssh", pos, max(end, pos + 1), True, offset=ssh.start(), matched=data[ssh.start():end])
    stripped = rest.lstrip(b" \t\r\n")
    if not stripped:
        return None if not full else Message("unknown", pos, n, True, matched=rest[:32])
    if stripped[:1] in (b"{", b"["):
        return _json_message(data, pos, len(rest) - len(stripped), full)
    if rest[:3] in (b"\x00\x00\x00", b"\x00\x00", b"\x00") and len(rest) < 6 and not full:
        return None  # maybe a Stratum V2 frame header
    sv2 = _sv2(data, pos)
    if sv2 is not None:
        return sv2
    m = HTTP_LINE_RE.match(data, pos)
    if m and m.group(1) in HTTP_METHODS:
        return _http_message(data, pos, m, full)
    if not full and (HTTP_PREFIX_RE.fullmatch(rest[:2048]) or SSH_PREFIX.startswith(rest[:4])):
        return None  # a request line or an SSH banner still being written
    return Message("unknown", pos, n, True, matched=rest[:32])


def _tls_message(data: bytes, pos: int, full: bool) -> Message | None:
    rest = data[pos:]
    if len(rest) < 5:
        return None if not full else Message("unknown", pos, len(data), True, matched=rest[:32])
    end = pos + 5 + int.from_bytes(rest[3:5], "big")
    if end > len(data) and not full:
        return None
    w = _tls(rest)
    if w.protocol != "tls":
        return Message("unknown", pos, len(data), True, matched=rest[:32])
    return Message("tls", pos, min(end, len(data)), True, sni=w.sni, alpn=w.alpn, offset=pos + w.offset,
                   matched=w.matched, truncated=end > len(data))


def _json_message(data: bytes, pos: int, off: int, full: bool) -> Message | None:
    start = pos + off
    nl = data.find(b"\n", start)
    if nl < 0 and not full:
        return None
    end = nl + 1 if nl >= 0 else len(data)
    line = data[start:nl if nl >= 0 else len(data)]
    w = _json(line, 0)
    method = _json_method(line)
    final = nl < 0  # cut by the bound: nothing after it is seen
    return Message(w.protocol, pos, end, final, method=method, offset=start, matched=line, truncated=nl < 0)


def _json_method(line: bytes) -> str | None:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        m = re.search(rb'"method"\s*:\s*"([^"]{0,64})"', line)
        return m.group(1).decode("utf-8", "replace") if m else None
    reqs = obj if isinstance(obj, list) else [obj]
    for r in reqs:
        if isinstance(r, dict) and isinstance(r.get("method"), str):
            return r["method"][:64]
    return None


def _http_message(data: bytes, pos: int, m: re.Match, full: bool) -> Message | None:
    hdr_end = data.find(b"\r\n\r\n", pos)
    sep = 4
    alt = data.find(b"\n\n", pos)
    if alt >= 0 and (hdr_end < 0 or alt < hdr_end):
        hdr_end, sep = alt, 2
    if hdr_end < 0 and not full:
        return None
    end = hdr_end + sep if hdr_end >= 0 else len(data)
    method, target = m.group(1).decode(), m.group(2).decode("latin-1")
    host, port = None, None
    if method == "CONNECT":
        hp = HTTP_HOST_PORT_RE.match(target)
        if hp:
            host = hp.group(1).lower() or None
            port = int(hp.group(2)) if hp.group(2) else 443
    else:
        u = URI_RE.match(target)
        if u:
            host = u.group(2).strip("[]").lower()
            port = int(u.group(3)) if u.group(3) else SCHEME_PORTS.get(u.group(1).lower())
    if port is not None and not 0 < port < 65536:
        port = None
    # a CONNECT opens a tunnel: the stream after it is judged from its start
    final = method != "CONNECT" or hdr_end < 0
    return Message("http", pos, end, final, method=method, proxy_host=host, proxy_port=port, offset=pos,
                   matched=m.group(0), truncated=hdr_end < 0)


def _sv2(data: bytes, pos: int) -> Message | None:
    """A Stratum V2 SetupConnection frame in the clear: extension_type 0,
    msg_type 0x00, u24 length, then protocol (0 mining, 1 job declaration,
    2 template distribution), min_version and max_version 2. (SV2 over its
    Noise handshake is encrypted from the first byte: not seen here.)"""
    rest = data[pos:]
    if len(rest) < 11 or rest[0:3] != b"\x00\x00\x00":
        return None
    length = int.from_bytes(rest[3:6], "little")
    proto, vmin, vmax = rest[6], int.from_bytes(rest[7:9], "little"), int.from_bytes(rest[9:11], "little")
    if not 13 <= length <= 2048 or proto > 2 or vmin != 2 or vmax < 2:
        return None
    end = pos + 6 + length
    return Message("stratum", pos, min(end, len(data)), True, method="SetupConnection", offset=pos,
                   matched=rest[:min(len(rest), 6 + length)])
