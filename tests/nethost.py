"""The "external host" of the real-tool tests: a network namespace joined
by a veth pair, with addresses outside the node's private ranges
(198.18.N.0/24 and 2001:db8:213:N::/64, both reserved for tests), running a
real OpenSSH server and a fake Stratum mining pool.

    with NetHost(tmp_path) as h:
        h.start_sshd()                       # key auth, v4 + v6, port 22 and 2022
        h.start_pool([3333, 443])            # Stratum JSON-RPC, records submits
        h.ssh_argv("-N", "-R", "2222:localhost:22")   # ssh with the test key
        h.listening(2222)                    # is the port open inside the netns?
        h.pool_events()                      # what the pool saw

Everything (processes in the namespace, the namespace, the veth) is torn
down by `close()`, also when a test fails. Run as a script, the module is
also the pool (`pool PORT...`) and a small Stratum client (`miner HOST PORT
[--stratum-url URL]`) that tests copy under innocent names.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

PY = "/usr/bin/python3"
HERE = Path(__file__).resolve()


class NetHost:
    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        n = (os.getpid() + int(uuid.uuid4().hex[:4], 16)) % 250 + 1
        tag = uuid.uuid4().hex[:6]
        self.name = f"at-ext-{tag}"
        self.host_if, self.ns_if = f"axh{tag}", f"axn{tag}"
        self.host, self.addr, self.addr_b = f"198.18.{n}.1", f"198.18.{n}.2", f"198.18.{n}.3"
        self.host6, self.addr6, self.addr6_b = f"2001:db8:213:{n}::1", f"2001:db8:213:{n}::2", f"2001:db8:213:{n}::3"
        self.exec = ["ip", "netns", "exec", self.name]
        self.procs: list[subprocess.Popen] = []
        self.key = self.tmp / "id_ed25519"
        self.pool_log = self.tmp / "pool.jsonl"
        self.sshd_log = self.tmp / "sshd.log"
        self._up = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "NetHost":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sh(self, *cmd: str) -> None:
        subprocess.run(list(cmd), check=True, capture_output=True, timeout=20)

    def start(self) -> None:
        self._sh("ip", "netns", "add", self.name)
        self._up = True
        self._sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._sh("ip", "link", "set", self.ns_if, "netns", self.name)
        self._sh("ip", "addr", "add", f"{self.host}/24", "dev", self.host_if)
        self._sh("ip", "-6", "addr", "add", f"{self.host6}/64", "dev", self.host_if, "nodad")
        self._sh("ip", "link", "set", self.host_if, "up")
        for a in (self.addr, self.addr_b):
            self._sh(*self.exec, "ip", "addr", "add", f"{a}/24", "dev", self.ns_if)
        for a in (self.addr6, self.addr6_b):
            self._sh(*self.exec, "ip", "-6", "addr", "add", f"{a}/64", "dev", self.ns_if, "nodad")
        self._sh(*self.exec, "ip", "link", "set", self.ns_if, "up")
        self._sh(*self.exec, "ip", "link", "set", "lo", "up")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        if not self._up:
            return
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        self._up = False

    # ----------------------------------------------------------------- sshd
    def start_sshd(self, ports=(22, 2022), also_b: bool = False) -> None:
        """Real /usr/sbin/sshd in the namespace: generated host key, key auth
        only (the client key is self.key), listening on v4 and v6 (also on
        the second addresses with also_b), with the sftp subsystem (scp and
        sftp use it)."""
        d = self.tmp
        for k in ("host_ed25519", "id_ed25519"):
            if not (d / k).exists():
                self._sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / k))
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep chroot
        listen = [self.addr, self.addr6] + ([self.addr_b, self.addr6_b] if also_b else [])
        lines = [f"Port {p}" for p in ports] + [f"ListenAddress {a}" for a in listen] + [
            "Subsystem sftp internal-sftp",
            f"HostKey {d / 'host_ed25519'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
            f"PidFile {d / 'sshd.pid'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
            "AllowTcpForwarding yes", "GatewayPorts no", "PermitTunnel no", "LogLevel VERBOSE",
        ]
        (d / "sshd_config").write_text("\n".join(lines) + "\n")
        self._sh("/usr/sbin/sshd", "-t", "-f", str(d / "sshd_config"))
        log = open(self.sshd_log, "ab")
        self.procs.append(subprocess.Popen(self.exec + ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                                           stdout=log, stderr=log))
        log.close()
        for p in ports:
            self.wait_listening(p, timeout=10)

    def ssh_opts(self) -> list[str]:
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]

    def ssh_argv(self, *extra: str, addr: str | None = None, port: int = 22) -> list[str]:
        return ["ssh", *self.ssh_opts(), "-p", str(port), *extra, f"root@{addr or self.addr}"]

    def sshd_connections(self) -> int:
        """Connections sshd has seen (its own log)."""
        try:
            return self.sshd_log.read_text(errors="replace").count("Connection from ")
        except FileNotFoundError:
            return 0

    # ----------------------------------------------------------------- pool
    def start_pool(self, ports=(3333, 443)) -> None:
        self.procs.append(subprocess.Popen(
            self.exec + [PY, "-S", str(HERE), "pool", str(self.pool_log), *map(str, ports)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in ports:
            self.wait_listening(p, timeout=10)

    def pool_events(self) -> list[dict]:
        try:
            return [json.loads(x) for x in self.pool_log.read_text().splitlines() if x.strip()]
        except FileNotFoundError:
            return []

    def shares(self) -> list[dict]:
        return [e for e in self.pool_events() if e.get("method") in ("mining.submit", "submit")]

    def miner_script(self, name: str) -> Path:
        """The Stratum client saved under `name` (an innocent one), executable."""
        dst = self.tmp / name
        dst.write_text(f"#!{PY} -S\n" + HERE.read_text())
        dst.chmod(0o755)
        return dst

    # ------------------------------------------------------------ listeners
    def listening(self, port: int, ns: bool = True) -> bool:
        cmd = (self.exec if ns else []) + ["ss", "-Hltn", f"sport = :{port}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        return bool(out.strip())

    def wait_listening(self, port: int, timeout: float = 5.0, ns: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening(port, ns):
                return True
            time.sleep(0.05)
        raise TimeoutError(f"port {port} not listening in {'netns ' + self.name if ns else 'the host'}")

    def never_listening(self, port: int, for_s: float, ns: bool = True) -> bool:
        """True when `port` stayed closed for `for_s` seconds (polled)."""
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            if self.listening(port, ns):
                return False
            time.sleep(0.05)
        return True

    def spawn_ns(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.exec + argv, **kw)
        self.procs.append(p)
        return p


# ---------------------------------------------------------------------------
# the pool and the miner (run as a script)

def _pool(log_path: str, ports: list[int]) -> None:
    import selectors
    import threading

    lock = threading.Lock()

    def log(**kw):
        with lock, open(log_path, "a") as f:
            f.write(json.dumps(kw) + "\n")

    def serve(conn, port):
        buf = b""
        log(port=port, event="connect", local=conn.getsockname()[0])
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                        assert isinstance(msg, dict)
                    except (ValueError, AssertionError):
                        log(port=port, event="garbage", head=line[:40].decode("latin-1"))
                        continue
                    m, i = msg.get("method"), msg.get("id")
                    log(port=port, event="rpc", method=m, params=msg.get("params"))
                    out = []
                    if m == "mining.subscribe":
                        out.append({"id": i, "result": [[["mining.notify", "ae6812eb4cd7735a"]], "08000002", 4],
                                    "error": None})
                    elif m == "mining.authorize":
                        out.append({"id": i, "result": True, "error": None})
                        out.append({"id": None, "method": "mining.notify",
                                    "params": ["job1", "00" * 32, "01", "02", [], "20000000", "1d00ffff",
                                               "504e86b9", True]})
                    elif m == "login":
                        out.append({"id": i, "jsonrpc": "2.0", "error": None,
                                    "result": {"id": "w1", "status": "OK",
                                               "job": {"blob": "07" * 38, "job_id": "job1", "target": "b88d0600"}}})
                    elif m in ("mining.submit", "submit"):
                        out.append({"id": i, "result": True if m == "mining.submit" else {"status": "OK"},
                                    "error": None})
                    for o in out:
                        conn.sendall(json.dumps(o).encode() + b"\n")

    sel = selectors.DefaultSelector()
    for p in ports:
        for fam, a in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((a, p))
            s.listen(16)
            sel.register(s, selectors.EVENT_READ, p)
    while True:
        for key, _ in sel.select():
            c, _ = key.fileobj.accept()
            threading.Thread(target=serve, args=(c, key.data), daemon=True).start()


def _miner(host: str, port: int) -> int:
    """Subscribe, authorize, wait for a job, submit one share. Prints what
    happened; exit 0 only when the pool accepted the share."""
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile("rwb")

    def send(o):
        f.write(json.dumps(o).encode() + b"\n")
        f.flush()

    send({"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]})
    send({"id": 2, "method": "mining.authorize", "params": ["48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetWzYGz", "x"]})
    job = None
    while job is None:
        line = f.readline()
        if not line:
            print("pool closed", flush=True)
            return 3
        msg = json.loads(line)
        if msg.get("method") == "mining.notify":
            job = msg["params"][0]
    send({"id": 4, "method": "mining.submit", "params": ["48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetWzYGz", job,
                                                         "00000000", "504e86b9", "b2957c02"]})
    while True:
        msg = json.loads(f.readline())
        if msg.get("id") == 4:
            print("share accepted" if msg.get("result") else "share rejected", flush=True)
            return 0 if msg.get("result") else 4


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "pool":
        _pool(sys.argv[2], [int(p) for p in sys.argv[3:]])
    else:
        # the miner: `NAME HOST PORT [anything else, e.g. a stratum URL]`
        args = [a for a in sys.argv[1:] if "://" not in a]
        sys.exit(_miner(args[0], int(args[1])))


def protocol_detection_landed() -> bool:
    """Whether the tracer decodes first-bytes `protocol` records from the
    kernel (issue 4 part A). Tests that only those records can pass skip
    until it lands."""
    try:
        from episode_tracer import events
    except ImportError:
        return False
    kind = getattr(getattr(events, "Kind", None), "PROTOCOL", None)
    return kind is not None and kind in getattr(events, "_DECODERS", {})
