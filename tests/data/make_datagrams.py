"""Regenerates tests/data/datagrams.jsonl: DNS queries as the tools of each
class put them on the wire (built with dnslib), QUIC long headers, other
UDP. Each line: note, addr, port, payload (hex), and for sequences `repeat`
(name with {i} and qtype, sent N times) with the rules the last
datagram must fire. Deterministic (seeded)."""
import base64
import json
import random
import sys
from pathlib import Path

from dnslib import DNSRecord

rnd = random.Random(11)
NODE = "10.255.255.53"
OUT = "198.51.100.7"


def q(name, qtype="A"):
    return DNSRecord.question(name, qtype).pack().hex()


def b32(n):
    return base64.b32encode(bytes(rnd.getrandbits(8) for _ in range(n))).decode().rstrip("=").lower()


cases = [
    {"note": "benign A to the node resolver", "addr": NODE, "port": 53, "payload": q("pypi.org"), "rules": []},
    {"note": "benign AAAA below a CDN", "addr": NODE, "port": 53, "payload": q("files.pythonhosted.org", "AAAA"), "rules": []},
    {"note": "benign cluster service name", "addr": NODE, "port": 53,
     "payload": q("my-service.my-namespace.svc.cluster.local"), "rules": []},
    {"note": "benign CloudFront name", "addr": NODE, "port": 53, "payload": q("d3c33hcgiwev3.cloudfront.net"), "rules": []},
    {"note": "benign S3 bucket name", "addr": NODE, "port": 53,
     "payload": q("training-data-2024.s3.us-east-1.amazonaws.com"), "rules": []},
    {"note": "query to a resolver that is not the node's", "addr": OUT, "port": 53, "payload": q("pypi.org"),
     "rules": ["dns-foreign-resolver"]},
    {"note": "dnstt-like base32 label (TXT) via the node resolver", "addr": NODE, "port": 53,
     "payload": q(b32(36) + ".t.exfil.example", "TXT"), "rules": ["dns-tunnel-labels", "dns-tunnel-entropy"]},
    {"note": "base32 labels to an outside host's port 53", "addr": OUT, "port": 53,
     "payload": q(b32(36) + ".t.exfil.example", "TXT"),
     "rules": ["dns-foreign-resolver", "dns-tunnel-labels", "dns-tunnel-entropy"]},
    {"note": "iodine-like: three 20-char labels, high entropy", "addr": NODE, "port": 53,
     "payload": q(b32(12)[:20] + "." + b32(12)[:20] + "." + b32(12)[:20] + ".i.exfil.example", "NULL"),
     "rules": ["dns-tunnel-entropy"]},
    {"note": "hex-encoded 32-char label", "addr": NODE, "port": 53,
     "payload": q(bytes(rnd.getrandbits(8) for _ in range(16)).hex() + ".x.exfil.example"),
     "rules": [],
     "gap": "32 hex characters stay under both thresholds (k8s pod names look alike); volume rules catch a tunnel"},
    {"note": "TXT flood with short names", "addr": NODE, "port": 53, "name": "k{i}.notes.example", "qtype": "TXT",
     "repeat": 25, "rules": ["dns-txt-flood"]},
    {"note": "many distinct names below one domain", "addr": NODE, "port": 53, "name": "n{i}.data.example", "qtype": "A",
     "repeat": 120, "rules": ["dns-subdomain-flood"]},
    {"note": "QUIC v1 Initial on a non-standard port", "addr": OUT, "port": 4433,
     "payload": (bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + bytes(8) + bytes([0]) + bytes(40)).hex(),
     "rules": ["quic-nonstandard-port"]},
    {"note": "QUIC v1 Initial to 443 (HTTP/3)", "addr": OUT, "port": 443,
     "payload": (bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + bytes(8) + bytes([0]) + bytes(40)).hex(),
     "rules": []},
    {"note": "WireGuard-like UDP to an outside host", "addr": OUT, "port": 51820,
     "payload": (bytes([1, 0, 0, 0]) + bytes(144)).hex(), "rules": ["udp-outside-host"]},
    {"note": "UDP to a private address", "addr": "10.0.0.5", "port": 5000, "payload": "68656c6c6f", "rules": []},
    {"note": "NTP to an outside host", "addr": OUT, "port": 123, "payload": ("1b" + "00" * 47), "rules": []},
]
Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("datagrams.jsonl")).write_text(
    "".join(json.dumps(c) + "\n" for c in cases))
