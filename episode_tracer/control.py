"""Local control socket of the tracer (used by ``agent-tracer top`` and ``episode ...``).

A unix stream socket, mode 0600 in a directory made 0700, speaking
newline-delimited JSON (one object per line, both directions).

Requests (client -> server)::

    {"op": "snapshot"}                              -> one snapshot object
    {"op": "subscribe", "interval": 1.0}            -> a stream of
          {"type": "snapshot", ...snapshot...}       every `interval` seconds (first one at once)
          {"type": "alert", ...alert record...}      as alerts happen (ControlServer.publish_alert)
          {"type": "dropped", "alerts": N}           when alerts had to be dropped for this
                                                     client (it read too slowly); N is the total
    {"op": "episode", "cmd": "freeze|thaw|kill|list|status", "id": "..."}
                                                    -> handle_command(cmd, request), with
                                                       "ok": true added when absent
    {"op": "ping"}                                  -> {"ok": true, "pong": true}
    {"op": "episode_open", "id": "...", "pid": N}   -> the trainer API (docs/episodes.md "Trainer API"):
    {"op": "episode_close", "id": "..."}               open puts the caller's blocked child N in a new
    {"op": "episode_verdicts", "id": "..."}            episode cgroup, close ends it, verdicts reads
    {"op": "episode_watch", "id": "..."}               its verdict file; handle_trainer(op, request);
                                                       watch: {"ok": true}, then {"type": "alert", ...}
                                                       as they happen and {"type": "end", ...} last
    {"op": "episode_detail", "id": "..."}           -> {"ok": true, "detail": {...}}: one episode's
                                                       process tree, connections, listeners,
                                                       alerts, GPU use, recent records, held
                                                       right now (State.detail; `top`'s detail view)

Any failure is answered ``{"ok": false, "error": "..."}`` (unknown op, bad JSON,
an exception in the snapshot or command callback). A peer whose uid is not
allowed (root and the tracer's own uid, checked with SO_PEERCRED) and is no
trainer (``trainer_uids``, ``trainer_gids``) gets
``{"ok": false, "code": "forbidden", "error": "..."}`` and is disconnected;
a trainer gets that reply for any op outside TRAINER_ALLOWED. The server
adds ``"peer": {"pid", "uid", "gid", "role"}`` (SO_PEERCRED) to a trainer's
episode requests and to every trainer op, replacing any the client sent
(an episode request without it is an admin's). A connection may carry any
number of requests; a subscription keeps streaming until the client closes.

The server runs one selector loop in a daemon thread. Every socket is
non-blocking; a client that reads slowly gets its pushed alerts dropped
(oldest first, counted) and only ever the latest snapshot, so neither the
tracer (``publish_alert`` never blocks and never does I/O beyond a wake-up
byte) nor other clients wait for it.
"""
from __future__ import annotations

import errno
import itertools
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

__all__ = [
    "ControlServer",
    "ControlClient",
    "ControlError",
    "TracerNotRunning",
    "ControlPermissionError",
    "ConnectionLost",
    "Subscription",
    "EPISODE_COMMANDS",
    "TRAINER_OPS",
]

EPISODE_COMMANDS = ("freeze", "thaw", "kill", "list", "status",
                    "attach", "detach")  # status: docs/scale.md; attach, detach: docs/episodes.md
ROOT_EPISODE_COMMANDS = ("attach", "detach")  # they name any cgroup of the node: root only
# the trainer API's operations (docs/episodes.md "Trainer API"), kept apart from the episode commands
TRAINER_OPS = ("episode_open", "episode_close", "episode_verdicts", "episode_watch")
TRAINER_ALLOWED = ("ping", "episode", *TRAINER_OPS)  # what a trainer (not root) may ask
ALERT_QUEUE = 1000            # pushed alerts buffered per subscriber before the oldest are dropped
MAX_REQUEST = 1 << 20         # longest request line accepted
MAX_REPLIES = 64              # pending replies per client before its requests stop being read
MIN_INTERVAL = 0.05
MAX_INTERVAL = 3600.0
_SNAPSHOT_REUSE_S = 0.02      # subscribers due together share one serialised snapshot

_TMP_COUNTER = itertools.count()

SnapshotFn = Callable[[], dict]
CommandFn = Callable[[str, dict], dict]
DetailFn = Callable[[str], "dict | None"]


# ---------------------------------------------------------------------- errors
class ControlError(Exception):
    """Base class of control-socket client errors."""


class TracerNotRunning(ControlError):
    """No tracer listens on the control socket (absent, or connection refused)."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "") -> None:
        self.path = str(path)
        self.detail = detail
        msg = f"tracer not running: no control socket at {self.path}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class ControlPermissionError(ControlError):
    """The socket exists but this user may not use it (it is root-only)."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "") -> None:
        self.path = str(path)
        super().__init__(
            f"permission denied on control socket {self.path}: run as root (sudo)"
            + (f" ({detail})" if detail else "")
        )


class ConnectionLost(ControlError):
    """The tracer closed the connection or stopped answering."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "connection closed") -> None:
        self.path = str(path)
        super().__init__(f"lost connection to the tracer at {self.path}: {detail}")


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def _error(msg: str) -> bytes:
    return _dumps({"ok": False, "error": msg})


# ---------------------------------------------------------------------- server
class _Conn:
    __slots__ = (
        "sock", "inbuf", "replies", "alerts", "snapshot", "partial", "subscribed",
        "interval", "next_due", "dropped", "dropped_sent", "want_alerts", "closing", "events",
        "peer", "role", "watch",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.replies: deque[bytes] = deque()
        self.alerts: deque[bytes] = deque(maxlen=ALERT_QUEUE)
        self.snapshot: bytes | None = None
        self.partial: memoryview | None = None
        self.subscribed = False
        self.interval = 1.0
        self.next_due = 0.0
        self.dropped = 0
        self.dropped_sent = 0
        self.want_alerts = True
        self.closing = False       # close once the pending output is written
        self.events = 0
        self.peer: dict[str, int] | None = None   # SO_PEERCRED: pid, uid, gid
        self.role = "admin"        # admin (root, our uid) or trainer (docs/episodes.md "Trainer API")
        self.watch: str | None = None  # episode_watch: the episode whose verdicts stream here

    def pending(self) -> bool:
        return bool(self.partial is not None or self.replies or self.alerts or self.snapshot
                    or self.dropped != self.dropped_sent)

    def next_chunk(self) -> bytes | None:
        if self.replies:
            return self.replies.popleft()
        if self.dropped != self.dropped_sent:
            self.dropped_sent = self.dropped
            return _dumps({"type": "dropped", "alerts": self.dropped})
        if self.alerts:
            try:
                return self.alerts.popleft()
            except IndexError:      # emptied concurrently (cannot happen: one consumer)
                return None
        if self.snapshot is not None:
            chunk, self.snapshot = self.snapshot, None
            return chunk
        return None


def _secure_dir(directory: Path, mode: int = 0o700) -> None:
    """Create `directory` with `mode` (0700; 0711 when trainers may reach the
    socket), or set it so when it is ours and not a shared dir."""
    if not directory.exists():
        directory.mkdir(parents=True, mode=mode, exist_ok=True)
        os.chmod(directory, mode)
        return
    st = directory.stat()
    shared = bool(st.st_mode & stat.S_ISVTX) or str(directory) in ("/", "/tmp", "/var/tmp", "/run", "/dev/shm")
    if st.st_uid == os.geteuid() and not shared and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(directory, mode)


class ControlServer:
    """The tracer's control socket. Start with :meth:`start` (or use as a context manager)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        get_snapshot: SnapshotFn,
        handle_command: CommandFn,
        *,
        allowed_uids: set[int] | None = None,
        get_detail: DetailFn | None = None,
        trainer_uids: set[int] | frozenset[int] = frozenset(),
        trainer_gids: set[int] | frozenset[int] = frozenset(),
        handle_trainer: CommandFn | None = None,
    ) -> None:
        self.path = Path(path)
        # trainers (SO_PEERCRED uid, or a member of one of these groups) may run,
        # list and end their own episodes and read their verdicts, nothing else
        self.trainer_uids = frozenset(trainer_uids)
        self.trainer_gids = frozenset(trainer_gids)
        self._handle_trainer = handle_trainer
        self._get_detail = get_detail
        self._get_snapshot = get_snapshot
        self._handle_command = handle_command
        # peers whose uid is not here are refused (SO_PEERCRED): root and our own uid
        self.allowed_uids = allowed_uids if allowed_uids is not None else {0, os.geteuid()}
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._conns: dict[int, _Conn] = {}
        self._subs: tuple[_Conn, ...] = ()
        self._watch: dict[str, tuple[_Conn, ...]] = {}  # episode -> its watchers (replaced, never changed)
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._wake_pending = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snap_cache: tuple[float, bytes] | None = None
        self.alerts_dropped = 0       # over all clients, for metrics
        self.clients_total = 0
        self.last_error: str | None = None

    # -- lifecycle
    def start(self) -> "ControlServer":
        """Bind the socket and start serving. Raises OSError when that is impossible
        (EADDRINUSE: another tracer listens there; EEXIST: the path is not a socket)."""
        if self._thread is not None:
            return self
        _secure_dir(self.path.parent, 0o711 if self._has_trainers else 0o700)
        self._clear_stale()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{next(_TMP_COUNTER)}")
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # bind under a temporary name, make it 0600, then move it into place:
            # the socket is never reachable with looser permissions
            listener.bind(str(tmp))
            # with trainers, anyone may connect and SO_PEERCRED decides (docs/episodes.md)
            os.chmod(tmp, 0o666 if self._has_trainers else 0o600)
            os.rename(tmp, self.path)
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        st = os.stat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="agent-tracer-control", daemon=True)
        self._thread.start()
        return self

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(self.path)       # stale socket of a dead tracer
            except FileNotFoundError:
                pass
            return
        except OSError:
            pass
        else:
            raise OSError(errno.EADDRINUSE, f"another tracer is already listening on {self.path}")
        finally:
            probe.close()

    def close(self) -> None:
        """Stop the loop, close every connection and remove the socket file."""
        self._stop.set()
        self._wake(force=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._subs = ()
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        self._listener = self._wake_r = self._wake_w = None
        if self._ino is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:   # still ours, not a newer tracer's
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._ino = None

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_clients(self) -> int:
        return len(self._conns)

    @property
    def n_subscribers(self) -> int:
        return len(self._subs)

    # -- called from other threads
    def publish_alert(self, record: dict) -> None:
        """Push an alert to every subscriber. Never blocks; cheap when nobody subscribes."""
        subs = self._subs
        if not subs and not self._watch:
            return
        line: bytes | None = None
        for conn in subs:
            if not conn.want_alerts or conn.closing:
                continue
            if line is None:
                msg = dict(record)
                msg["type"] = "alert"
                try:
                    line = _dumps(msg)
                except TypeError:
                    line = _dumps({"type": "alert", "error": "unserialisable alert", "rule": str(record.get("rule"))})
            q = conn.alerts
            if len(q) >= ALERT_QUEUE:
                conn.dropped += 1
                self.alerts_dropped += 1
            q.append(line)          # a full deque drops its oldest entry
        watchers = self._watch.get(record.get("episode") or "") if self._watch else None
        if watchers:
            if line is None:
                msg = dict(record)
                msg["type"] = "alert"
                line = _dumps(msg)
            for conn in watchers:
                if len(conn.alerts) >= ALERT_QUEUE:
                    conn.dropped += 1
                    self.alerts_dropped += 1
                conn.alerts.append(line)
        if line is not None:
            self._wake()

    def publish_end(self, record: dict) -> None:
        """An episode ended: its watchers get ``{"type": "end", ...the
        episode_end record}`` last, then their connection is closed."""
        watchers = self._watch.get(record.get("episode") or "") if self._watch else None
        if not watchers:
            return
        msg = dict(record)
        msg["type"] = "end"
        line = _dumps(msg)
        for conn in watchers:
            conn.alerts.append(line)
            conn.closing = True    # after what is queued is written
        self._wake()

    def _wake(self, force: bool = False) -> None:
        """Make the loop's select() return (at most one pending byte, unless forced)."""
        w = self._wake_w
        if w is None or (self._wake_pending and not force):
            return
        self._wake_pending = True
        try:
            w.send(b"\0")
        except OSError:        # full (the loop will wake anyway) or closed
            pass

    # -- the loop (server thread)
    def _loop(self) -> None:
        sel = self._sel
        assert sel is not None
        while not self._stop.is_set():
            timeout = None
            if self._subs:
                now = time.monotonic()
                timeout = max(0.0, min(c.next_due for c in self._subs) - now)
            try:
                events = sel.select(timeout)
            except OSError as exc:            # pragma: no cover - selector closed under us
                if self._stop.is_set():
                    break
                self.last_error = f"select: {exc}"
                time.sleep(0.1)
                continue
            for key, mask in events:
                obj = key.fileobj
                try:
                    if obj is self._listener:
                        self._accept()
                    elif obj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                        # reset only after draining: a wake-up byte sent after this point
                        # stays in the pipe; alerts queued before it are flushed below
                        self._wake_pending = False
                    else:
                        conn: _Conn = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(conn)
                        if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                            self._flush(conn)
                except Exception as exc:      # a bug must not kill the control socket
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if isinstance(key.data, _Conn):
                        self._drop(key.data)
            if self._stop.is_set():
                break
            self._tick()
            for conn in list(self._conns.values()):
                if conn.pending():
                    self._flush(conn)
                self._update_interest(conn)

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.last_error = f"accept: {exc}"
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self.clients_total += 1
            conn.peer = self._peer_cred(sock)
            uid = conn.peer["uid"] if conn.peer else None
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            conn.events = selectors.EVENT_READ
            if uid is not None and uid not in self.allowed_uids:
                if self._is_trainer(conn.peer):
                    conn.role = "trainer"
                else:
                    conn.replies.append(_dumps({"ok": False, "code": "forbidden",
                                                "error": f"permission denied for uid {uid}: the control socket is "
                                                         "root-only" + (" (and the trainers')" if self._has_trainers
                                                                        else "")}))
                    conn.closing = True

    @property
    def _has_trainers(self) -> bool:
        return bool(self.trainer_uids or self.trainer_gids)

    @staticmethod
    def _peer_cred(sock: socket.socket) -> dict[str, int] | None:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            return {"pid": pid, "uid": uid, "gid": gid}
        except (OSError, AttributeError, struct.error):
            return None

    def _is_trainer(self, peer: dict[str, int] | None) -> bool:
        """The peer's uid is a trainer's, or its primary or a supplementary
        group (read from /proc/PID/status of the connecting process) is."""
        if peer is None or not self._has_trainers:
            return False
        if peer["uid"] in self.trainer_uids or peer["gid"] in self.trainer_gids:
            return True
        if not self.trainer_gids:
            return False
        try:
            with open(f"/proc/{peer['pid']}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return bool({int(g) for g in line.split()[1:]} & self.trainer_gids)
        except (OSError, ValueError):
            pass
        return False

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        if conn.closing:
            return
        conn.inbuf += data
        self._process_requests(conn)
        if len(conn.inbuf) > MAX_REQUEST:
            conn.inbuf.clear()
            conn.replies.append(_error(f"request longer than {MAX_REQUEST} bytes"))
            conn.closing = True

    def _process_requests(self, conn: _Conn) -> None:
        while len(conn.replies) < MAX_REPLIES and not conn.closing:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                return
            line = bytes(conn.inbuf[:nl]).strip()
            del conn.inbuf[: nl + 1]
            if line:
                self._request(conn, line)

    def _request(self, conn: _Conn, line: bytes) -> None:
        try:
            req = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            conn.replies.append(_error(f"bad JSON: {exc}"))
            return
        if not isinstance(req, dict):
            conn.replies.append(_error("a request is a JSON object with an 'op'"))
            return
        op = req.get("op")
        if conn.role == "trainer" and op not in TRAINER_ALLOWED:
            conn.replies.append(_dumps({"ok": False, "code": "forbidden",
                                        "error": f"permission denied: {op!r} is for root; a trainer may use "
                                                 f"{', '.join(TRAINER_ALLOWED)}"}))
            return
        if op in TRAINER_OPS or (op == "episode" and conn.role != "admin"):
            # who asks, as the kernel says (never what the client wrote)
            req["peer"] = {**(conn.peer or {}), "role": conn.role}
        elif op == "episode":
            req.pop("peer", None)  # an admin's request: no caller to check
        if op == "episode_watch":
            self._start_watch(conn, req)
            return
        if op in TRAINER_OPS:
            conn.replies.append(self._trainer(op, req))
            return
        if op == "snapshot":
            try:
                conn.replies.append(self._snapshot_line(fresh=True))
            except Exception as exc:
                conn.replies.append(_error(f"snapshot failed: {type(exc).__name__}: {exc}"))
        elif op == "subscribe":
            interval = req.get("interval", 1.0)
            if not isinstance(interval, (int, float)) or isinstance(interval, bool):
                conn.replies.append(_error("subscribe: 'interval' must be a number of seconds"))
                return
            conn.interval = min(max(float(interval), MIN_INTERVAL), MAX_INTERVAL)
            conn.want_alerts = bool(req.get("alerts", True))
            conn.next_due = 0.0                  # first snapshot at once
            if not conn.subscribed:
                conn.subscribed = True
                self._subs = self._subs + (conn,)
        elif op == "episode":
            cmd = req.get("cmd")
            if cmd not in EPISODE_COMMANDS:
                conn.replies.append(_error(f"episode: unknown cmd {cmd!r}; expected one of {', '.join(EPISODE_COMMANDS)}"))
                return
            if cmd != "list" and not req.get("id"):
                conn.replies.append(_error(f"episode {cmd}: an 'id' is required"))
                return
            if cmd in ROOT_EPISODE_COMMANDS and conn.role == "trainer":
                conn.replies.append(_error(f"permission denied: episode {cmd} is for root"))
                return
            try:
                reply = self._handle_command(cmd, req)
            except Exception as exc:
                conn.replies.append(_error(f"{cmd} failed: {exc}" if str(exc) else f"{cmd} failed: {type(exc).__name__}"))
                return
            if not isinstance(reply, dict):
                reply = {"ok": True, "result": reply}
            else:
                reply = dict(reply)
                reply.setdefault("ok", True)
            try:
                conn.replies.append(_dumps(reply))
            except TypeError as exc:
                conn.replies.append(_error(f"{cmd}: reply not serialisable: {exc}"))
        elif op == "ping":
            conn.replies.append(_dumps({"ok": True, "pong": True}))
        elif op == "episode_detail":
            conn.replies.append(self._detail(req))
        else:
            conn.replies.append(_error(f"unknown op {op!r}; expected snapshot, subscribe, episode, "
                                       "episode_detail or ping"))

    def _start_watch(self, conn: _Conn, req: dict) -> None:
        """A live verdict stream of one episode: its alerts as they happen,
        then its end. Registered before the tracer checks the caller may
        watch it (the loop thread: owner, episode known), so nothing
        published in between is missed; removed again when refused."""
        ep = req.get("id")
        if not isinstance(ep, str) or not ep or conn.watch is not None:
            conn.replies.append(_error("episode_watch: an 'id' is required (one watch per connection)"))
            return
        conn.watch = ep
        self._watch = {**self._watch, ep: self._watch.get(ep, ()) + (conn,)}
        reply = self._trainer("episode_watch", req)
        if not orjson.loads(reply).get("ok"):
            self._unwatch(conn)
            conn.replies.append(reply)
            conn.closing = True
            return
        conn.replies.append(reply)

    def _unwatch(self, conn: _Conn) -> None:
        ep = conn.watch
        if ep is None:
            return
        conn.watch = None
        rest = tuple(c for c in self._watch.get(ep, ()) if c is not conn)
        w = dict(self._watch)
        if rest:
            w[ep] = rest
        else:
            w.pop(ep, None)
        self._watch = w

    def _trainer(self, op: str, req: dict) -> bytes:
        if self._handle_trainer is None:
            return _error(f"{op}: this tracer serves no trainer operations")
        try:
            reply = self._handle_trainer(op, req)
        except Exception as exc:
            return _error(f"{op} failed: {exc}" if str(exc) else f"{op} failed: {type(exc).__name__}")
        reply = dict(reply)
        reply.setdefault("ok", True)
        try:
            return _dumps(reply)
        except TypeError as exc:
            return _error(f"{op}: reply not serialisable: {exc}")

    def _detail(self, req: dict) -> bytes:
        ep = req.get("id")
        if not isinstance(ep, str) or not ep:
            return _error("episode_detail: an 'id' is required")
        if self._get_detail is None:
            return _error("episode_detail: this tracer serves no detail views")
        try:
            detail = self._get_detail(ep)
        except Exception as exc:
            return _error(f"episode_detail {ep} failed: {type(exc).__name__}: {exc}")
        if detail is None:
            return _dumps({"ok": False, "code": "unknown", "error": f"no episode {ep!r} known to the tracer"})
        try:
            return _dumps({"ok": True, "detail": detail})
        except TypeError as exc:
            return _error(f"episode_detail {ep}: not serialisable: {exc}")

    def _snapshot_line(self, fresh: bool, tag: bool = False) -> bytes:
        now = time.monotonic()
        if not fresh and self._snap_cache is not None and now - self._snap_cache[0] < _SNAPSHOT_REUSE_S:
            return self._snap_cache[1]
        snap = self._get_snapshot()
        if tag:
            snap = dict(snap)
            snap["type"] = "snapshot"
        line = _dumps(snap)
        if tag:
            self._snap_cache = (now, line)
        return line

    def _tick(self) -> None:
        """Queue a snapshot for every subscriber that is due."""
        if not self._subs:
            return
        now = time.monotonic()
        for conn in self._subs:
            if conn.next_due > now or conn.closing:
                continue
            try:
                conn.snapshot = self._snapshot_line(fresh=False, tag=True)   # replaces an unsent one
            except Exception as exc:
                conn.snapshot = _dumps({"type": "error", "ok": False, "error": f"snapshot failed: {type(exc).__name__}: {exc}"})
            # keep a steady cadence, but never try to catch up a backlog
            conn.next_due = max(conn.next_due + conn.interval, now + conn.interval * 0.5) if conn.next_due else now + conn.interval

    def _flush(self, conn: _Conn) -> None:
        sock = conn.sock
        while True:
            if conn.partial is None:
                chunk = conn.next_chunk()
                if chunk is None:
                    break
                conn.partial = memoryview(chunk)
            try:
                sent = sock.send(conn.partial)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            if sent < len(conn.partial):
                conn.partial = conn.partial[sent:]
                return
            conn.partial = None
        if conn.closing:
            self._drop(conn)
            return
        if conn.inbuf and len(conn.replies) < MAX_REPLIES:
            self._process_requests(conn)       # requests held back while replies were pending

    def _update_interest(self, conn: _Conn) -> None:
        if self._sel is None or conn.sock.fileno() < 0 or conn.sock.fileno() not in self._conns:
            return
        want = 0
        if len(conn.replies) < MAX_REPLIES:
            want |= selectors.EVENT_READ
        if conn.pending():
            want |= selectors.EVENT_WRITE
        if not want:
            want = selectors.EVENT_READ
        if want != conn.events:
            self._sel.modify(conn.sock, want, conn)
            conn.events = want

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self._conns.get(fd) is conn:
            del self._conns[fd]
            if self._sel is not None:
                try:
                    self._sel.unregister(conn.sock)
                except (KeyError, ValueError):
                    pass
        if conn.subscribed:
            conn.subscribed = False
            self._subs = tuple(c for c in self._subs if c is not conn)
        self._unwatch(conn)
        conn.closing = True
        try:
            conn.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------- client
class ControlClient:
    """Client of the control socket.

    >>> client = ControlClient("/run/agent-tracer/control.sock")
    >>> snap = client.snapshot()
    >>> for msg in client.subscribe(interval=1.0): ...
    >>> client.command("freeze", id="ep-42")
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            sock.close()
            raise TracerNotRunning(self.path, exc.strerror or type(exc).__name__) from None
        except PermissionError as exc:
            sock.close()
            raise ControlPermissionError(self.path, exc.strerror or "") from None
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise TracerNotRunning(self.path, exc.strerror or "") from None
            raise ConnectionLost(self.path, str(exc)) from None
        return sock

    def _lines(self, sock: socket.socket) -> Iterator[dict]:
        buf = bytearray()
        while True:
            nl = buf.find(b"\n")
            while nl < 0:
                try:
                    data = sock.recv(1 << 18)
                except socket.timeout:
                    raise ConnectionLost(self.path, f"no answer for {sock.gettimeout():g}s") from None
                except OSError as exc:
                    raise ConnectionLost(self.path, str(exc)) from None
                if not data:
                    raise ConnectionLost(self.path, "the tracer closed the connection")
                start = len(buf)
                buf += data
                nl = buf.find(b"\n", start)
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if not line.strip():
                continue
            msg = orjson.loads(line)
            if isinstance(msg, dict) and msg.get("code") == "forbidden" and msg.get("ok") is False:
                raise ControlPermissionError(self.path, str(msg.get("error")))
            yield msg

    def _send(self, sock: socket.socket, req: dict) -> None:
        try:
            sock.sendall(_dumps(req))
        except OSError as exc:
            # the server may have refused us (and closed) before reading: its reason is buffered
            try:
                sock.settimeout(0.5)
                next(self._lines(sock))
            except ControlPermissionError:
                raise
            except (ControlError, StopIteration, ValueError):
                pass
            raise ConnectionLost(self.path, str(exc)) from None

    def request(self, req: dict) -> dict:
        """Send one request and return the one reply."""
        sock = self._connect(self.timeout)
        try:
            self._send(sock, req)
            return next(self._lines(sock))
        finally:
            sock.close()

    def ping(self) -> bool:
        return bool(self.request({"op": "ping"}).get("pong"))

    def snapshot(self) -> dict:
        reply = self.request({"op": "snapshot"})
        if reply.get("ok") is False:
            raise ControlError(str(reply.get("error")))
        return reply

    def subscribe(self, interval: float = 1.0, alerts: bool = True, timeout: float | None = None) -> Iterator[dict]:
        """Yield ``{"type": "snapshot"|"alert"|"dropped", ...}`` messages until closed.

        Connects eagerly (raises :class:`TracerNotRunning` at the call, not at
        the first ``next``). Raises :class:`ConnectionLost` when the tracer
        goes away or sends nothing for `timeout` seconds (default: 3 intervals + 5 s).
        """
        return self._stream(self._subscribed(interval, alerts, timeout))

    def subscription(self, interval: float = 1.0, alerts: bool = True,
                     timeout: float | None = None) -> "Subscription":
        """Like :meth:`subscribe`, as an object another thread can :meth:`Subscription.close`
        to end a read that is waiting (``agent-tracer top`` reads it in a thread)."""
        return Subscription(self, self._subscribed(interval, alerts, timeout))

    def _subscribed(self, interval: float, alerts: bool, timeout: float | None) -> socket.socket:
        """A socket that has sent the subscribe op, with the read timeout set
        (default: 3 intervals + 5 s)."""
        if timeout is None:
            timeout = 3 * interval + 5.0
        sock = self._connect(self.timeout)
        try:
            self._send(sock, {"op": "subscribe", "interval": interval, "alerts": alerts})
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock

    def _stream(self, sock: socket.socket) -> Iterator[dict]:
        try:
            yield from self._lines(sock)
        finally:
            sock.close()

    def detail(self, episode_id: str) -> dict:
        """One episode's detail view; raises ControlError with the tracer's reason."""
        reply = self.request({"op": "episode_detail", "id": episode_id})
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error") or f"no detail for {episode_id}"))
        return reply["detail"]

    def command(self, cmd: str, id: str | None = None, **extra: Any) -> dict:
        """Run an episode command (freeze, thaw, kill, list); returns the reply (``ok`` false on error)."""
        req: dict[str, Any] = {"op": "episode", "cmd": cmd}
        if id is not None:
            req["id"] = id
        req.update(extra)
        return self.request(req)


class Subscription:
    """An open subscription: iterate for messages; close() (from any thread) ends it."""

    def __init__(self, client: ControlClient, sock: socket.socket) -> None:
        self._client = client
        self._sock = sock

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._client._lines(self._sock)
        finally:
            self._sock.close()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)      # wakes a reader blocked in recv
        except OSError:
            pass
