"""Per-episode detail kept from records, for `agent-tracer top`'s detail view.

:class:`EpisodeDetail` is fed the records of one episode (docs/events.md) by
:class:`episode_tracer.state.State` under its lock and answers :meth:`EpisodeDetail.view`
with a JSON-serialisable dict. Like State it does no I/O and reads no clock.
Everything it keeps is bounded (per episode):

* processes: every live member (fork/exec/exit, ``gpu`` samples), plus the
  :data:`EXITED_KEEP` most recent exited ones; at most :data:`PROC_MAX` in all
  (the oldest exited go first, then the oldest live ones, counted in
  ``procs_dropped``);
* connections: the :data:`CONN_KEEP` most recently opened outbound connects (and
  ``deny`` records), with the protocol seen on them (``protocol`` records);
* listeners: the live ones (a listener leaves with its process), at most
  :data:`LISTEN_KEEP`;
* alerts: the :data:`ALERT_KEEP` most recent;
* tail: the :data:`TAIL_KEEP` most recent records (references: nothing is
  copied on the hot path);
* held: what the exec gate or the wire hold stopped and is still waiting for
  its verdict (:meth:`State.set_held` says which pids are held right now).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

__all__ = ["EpisodeDetail", "PROC_MAX", "EXITED_KEEP", "CONN_KEEP", "LISTEN_KEEP", "ALERT_KEEP", "TAIL_KEEP",
           "record_summary", "process_tree"]

PROC_MAX = 512
EXITED_KEEP = 64
CONN_KEEP = 64
LISTEN_KEEP = 64
ALERT_KEEP = 32
TAIL_KEEP = 64


class _Proc:
    __slots__ = ("pid", "ppid", "exe", "argv", "comm", "started", "ended", "code", "signal", "gpu", "hold")

    def __init__(self, pid: int, ts: float) -> None:
        self.pid = pid
        self.ppid: int | None = None
        self.exe: str | None = None
        self.argv: list[str] | None = None
        self.comm: str | None = None
        self.started = ts
        self.ended: float | None = None
        self.code: int | None = None
        self.signal: int | None = None
        # gpu_index -> (used_mib, sm_util, ts)
        self.gpu: dict[Any, tuple[float | None, float | None, float]] = {}
        self.hold: dict[str, Any] | None = None    # what this pid was last stopped for


class EpisodeDetail:
    """Bounded detail of one episode; fed by State, read by :meth:`view`."""

    __slots__ = ("procs", "exited", "conns", "listeners", "alerts", "tail", "events", "procs_dropped",
                 "labels", "cgroup_path", "root_pid", "held_pids", "exes")

    def __init__(self) -> None:
        self.procs: dict[int, _Proc] = {}           # insertion ordered: the oldest first
        self.exited: deque[int] = deque()           # pids in the order they exited (trimmed in O(1))
        self.conns: dict[tuple[Any, ...], list[Any]] = {}        # insertion ordered: the oldest first
        self.listeners: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self.alerts: deque[dict[str, Any]] = deque(maxlen=ALERT_KEEP)
        self.tail: deque[dict[str, Any]] = deque(maxlen=TAIL_KEEP)
        self.events = 0
        self.procs_dropped = 0
        self.labels: dict[str, Any] | None = None
        self.cgroup_path: str | None = None
        self.root_pid: int | None = None
        self.held_pids: dict[int, float] = {}      # pid -> since (wall clock), from State.set_held
        self.exes: dict[str, None] = {}            # distinct exe basenames seen (filter), at most 16

    # ------------------------------------------------------------------ feeding
    def observe(self, rec: dict[str, Any], kind: Any, ts: float, is_event: bool) -> None:
        self.tail.append(rec)
        if is_event:
            self.events += 1
        fn = _HANDLERS.get(kind)
        if fn is not None:
            fn(self, rec, ts)

    def _proc(self, pid: Any, ts: float) -> _Proc | None:
        procs = self.procs
        p = procs.get(pid)
        if p is not None and p.ended is None:      # the common case: a live member
            return p
        if not isinstance(pid, int) or isinstance(pid, bool):
            return None
        if p is None or ts > p.ended:              # new, or the pid reused after an exit
            if p is not None:
                del procs[pid]
            p = procs[pid] = _Proc(pid, ts)
            if len(procs) > PROC_MAX:              # exited ones are at most EXITED_KEEP: drop the oldest
                oldest = next(iter(procs))
                del procs[oldest]
                self.procs_dropped += 1
        return p

    def _trim_exited(self) -> None:
        exited, procs = self.exited, self.procs
        while len(exited) > EXITED_KEEP:
            pid = exited.popleft()
            p = procs.get(pid)
            if p is not None and p.ended is not None:
                del procs[pid]

    def _on_start(self, rec: dict[str, Any], ts: float) -> None:
        if rec.get("cgroup_path"):
            self.cgroup_path = str(rec["cgroup_path"])
        if isinstance(rec.get("labels"), dict):
            self.labels = dict(rec["labels"])
        root = rec.get("root_pid")
        if isinstance(root, int) and not isinstance(root, bool):
            self.root_pid = root
            self._proc(root, ts)

    def _on_fork(self, rec: dict[str, Any], ts: float) -> None:
        parent = self._proc(rec.get("pid"), ts)
        child = self._proc(rec.get("child_pid"), ts)
        if child is not None and parent is not None:
            child.ppid = parent.pid
            if child.exe is None:
                child.exe, child.argv, child.comm = parent.exe, parent.argv, parent.comm

    def _on_exec(self, rec: dict[str, Any], ts: float) -> None:
        p = self._proc(rec.get("pid"), ts)
        if p is None:
            return
        if isinstance(rec.get("ppid"), int) and p.ppid is None:
            p.ppid = rec["ppid"]
        exe = rec.get("exe") or rec.get("filename")
        if exe and exe != p.exe:
            p.exe = exe
            if len(self.exes) < 16:
                self.exes[str(exe).rsplit("/", 1)[-1]] = None
        argv = rec.get("argv")
        if argv is not None:
            p.argv = argv                          # the record's own list: records are not changed after emit
        comm = rec.get("comm")
        if comm:
            p.comm = comm
        if rec.get("gated") and not rec.get("killed_in_kernel"):
            p.hold = {"kind": "exec", "what": f"gated exec {p.exe or '?'}", "ts": ts}

    def _on_exit(self, rec: dict[str, Any], ts: float) -> None:
        pid, tid = rec.get("pid"), rec.get("tid")
        if tid is not None and tid != pid:
            return
        p = self.procs.get(pid) if isinstance(pid, int) else None
        if p is None:
            return
        if p.ended is not None:
            return
        p.ended = ts
        p.code = rec.get("code")
        p.signal = rec.get("signal")
        if p.gpu:
            p.gpu.clear()
        if self.held_pids:
            self.held_pids.pop(pid, None)
        if self.listeners:
            for key in [k for k, v in self.listeners.items() if v.get("pid") == pid]:
                del self.listeners[key]
        self.exited.append(pid)
        self._trim_exited()

    def _on_end(self, rec: dict[str, Any], ts: float) -> None:
        for p in self.procs.values():
            if p.ended is None:
                p.ended = ts
                self.exited.append(p.pid)
            p.gpu.clear()
        self.listeners.clear()
        self.held_pids.clear()
        self._trim_exited()

    # a connection is kept as [the record that opened it, what later records added (or None)]:
    # nothing is copied on the hot path; view() builds the dicts
    def _conn_entry(self, rec: dict[str, Any], fd: Any) -> list[Any]:
        g = rec.get
        key = (g("pid"), fd, g("addr"), g("port"), g("path"))
        conns = self.conns
        entry = conns.get(key)
        if entry is None:
            entry = conns[key] = [rec, None]
            if len(conns) > CONN_KEEP:
                del conns[next(iter(conns))]
        return entry

    def _on_connect(self, rec: dict[str, Any], ts: float) -> None:
        g = rec.get
        key = (g("pid"), g("fd"), g("addr"), g("port"), g("path"))
        conns = self.conns
        entry = conns.get(key)
        if entry is None:
            conns[key] = [rec, None]
            if len(conns) > CONN_KEEP:
                del conns[next(iter(conns))]
        else:
            entry[0] = rec

    def _on_deny(self, rec: dict[str, Any], ts: float) -> None:
        entry = self._conn_entry(rec, None)
        extra = entry[1] = entry[1] or {}
        extra["denied"] = not rec.get("would")
        extra["call"] = rec.get("call")

    def _on_protocol(self, rec: dict[str, Any], ts: float) -> None:
        # the protocol record names the connection by pid, fd and destination
        entry = self._conn_entry(rec, rec.get("fd"))
        extra = entry[1] = entry[1] or {}
        extra["protocol"] = rec.get("protocol")
        extra["sni"] = rec.get("sni")
        if rec.get("held"):
            extra["held"] = True
            p = self._proc(rec.get("pid"), ts)
            if p is not None:
                dest = f"{rec.get('addr')}:{rec.get('port')}"
                p.hold = {"kind": "flow", "what": f"held flow to {dest} ({rec.get('protocol') or '?'})", "ts": ts}

    def _on_listen(self, rec: dict[str, Any], ts: float) -> None:
        self._proc(rec.get("pid"), ts)
        if isinstance(rec.get("result"), int) and rec["result"] < 0:
            return
        key = (rec.get("pid"), rec.get("fd"))
        self.listeners[key] = {"ts": ts, "pid": rec.get("pid"), "fd": rec.get("fd"), "family": rec.get("family"),
                               "addr": rec.get("addr"), "port": rec.get("port"), "exe": rec.get("exe"),
                               "preexisting": bool(rec.get("preexisting"))}
        self.listeners.move_to_end(key)
        while len(self.listeners) > LISTEN_KEEP:
            self.listeners.popitem(last=False)

    def _on_alert(self, rec: dict[str, Any], ts: float) -> None:
        self.alerts.append(rec)

    def _on_gpu(self, rec: dict[str, Any], ts: float) -> None:
        p = self._proc(rec.get("pid"), ts)
        if p is None:
            return
        if p.exe is None and rec.get("exe"):
            p.exe = str(rec["exe"])
        if p.argv is None and isinstance(rec.get("argv"), list):
            p.argv = [str(a) for a in rec["argv"]]
        used, util = rec.get("used_mib"), rec.get("sm_util")
        p.gpu[rec.get("gpu_index")] = (used if isinstance(used, (int, float)) else None,
                                       util if isinstance(util, (int, float)) else None, ts)

    # ------------------------------------------------------------------ held right now
    def set_held(self, pids: dict[int, float]) -> None:
        """The pids of this episode the kernel holds right now (pid -> since)."""
        self.held_pids = pids

    def held(self, now: float) -> list[dict[str, Any]]:
        out = []
        for pid, since in sorted(self.held_pids.items()):
            p = self.procs.get(pid)
            hold = p.hold if p is not None else None
            out.append({
                "pid": pid,
                "kind": hold["kind"] if hold else "held",
                "what": hold["what"] if hold else "stopped by the exec gate or the wire hold",
                "exe": p.exe if p is not None else None,
                "since": since,
                "for_s": max(0.0, now - since),
            })
        return out

    # ------------------------------------------------------------------ reading
    def view(self, now: float, gpu_fresh: float = float("-inf")) -> dict[str, Any]:
        procs = []
        for p in self.procs.values():
            gpu = [{"gpu_index": g, "used_mib": u, "sm_util": s} for g, (u, s, ts) in p.gpu.items() if ts >= gpu_fresh]
            procs.append({
                "pid": p.pid, "ppid": p.ppid, "exe": p.exe,
                "argv": [str(a) for a in p.argv] if isinstance(p.argv, list) else None, "comm": p.comm,
                "state": "exited" if p.ended is not None else ("held" if p.pid in self.held_pids else "running"),
                "started": p.started, "ended": p.ended, "code": p.code, "signal": p.signal, "gpu": gpu,
            })
        return {
            "processes": process_tree(procs),
            "procs_dropped": self.procs_dropped,
            "connections": [_conn_view(rec, extra) for rec, extra in reversed(self.conns.values())],
            "listeners": [dict(v) for v in reversed(self.listeners.values())],
            "alerts": [dict(a) for a in reversed(self.alerts)],
            "tail": [dict(r) for r in reversed(self.tail)],
            "events": self.events,
            "labels": dict(self.labels) if self.labels else {},
            "cgroup_path": self.cgroup_path,
            "root_pid": self.root_pid,
            "held": self.held(now),
        }


def _conn_view(rec: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    g = rec.get
    out = {"ts": g("ts"), "pid": g("pid"), "fd": g("fd"), "family": g("family"), "addr": g("addr"),
           "port": g("port"), "path": g("path"), "result": g("result") if g("type") == "connect" else None,
           "protocol": None, "sni": None, "held": False, "denied": False,
           "preexisting": bool(g("preexisting")), "exe": g("exe")}
    if extra:
        out.update(extra)
    return out


def process_tree(procs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`procs` in tree order (parents before their children, by pid), each with a `depth`."""
    by_pid = {p["pid"]: p for p in procs}
    children: dict[Any, list[dict[str, Any]]] = {}
    roots = []
    for p in procs:
        parent = p.get("ppid")
        if parent in by_pid and parent != p["pid"]:
            children.setdefault(parent, []).append(p)
        else:
            roots.append(p)
    out: list[dict[str, Any]] = []
    seen: set[Any] = set()
    stack = [(p, 0) for p in sorted(roots, key=lambda p: p["pid"], reverse=True)]
    while stack:
        p, depth = stack.pop()
        if p["pid"] in seen:
            continue
        seen.add(p["pid"])
        out.append(dict(p, depth=depth))
        for c in sorted(children.get(p["pid"], []), key=lambda c: c["pid"], reverse=True):
            stack.append((c, depth + 1))
    for p in procs:                                # cycles (pid reuse): still listed
        if p["pid"] not in seen:
            out.append(dict(p, depth=0))
    return out


def record_summary(rec: dict[str, Any]) -> str:
    """One line for a record in the detail view's tail."""
    t = rec.get("type")
    g = rec.get

    def dest() -> str:
        if g("path"):
            return str(g("path"))
        return f"{g('addr')}:{g('port')}" if g("port") is not None else str(g("addr") or "?")

    if t == "exec":
        argv = g("argv")
        s = " ".join(str(a) for a in argv) if isinstance(argv, list) and argv else str(g("exe") or g("filename") or "")
        flags = [f for f, on in (("gated", g("gated")), ("killed-in-kernel", g("killed_in_kernel")),
                                 ("fileless", g("fileless"))) if on]
        return s + (f"  [{', '.join(flags)}]" if flags else "")
    if t == "fork":
        return f"child {g('child_pid')}"
    if t == "exit":
        return f"signal {g('signal')}" if g("signal") else f"code {g('code')}"
    if t == "connect":
        res = g("result")
        return f"{g('family') or ''} {dest()}" + (f"  result {res}" if res not in (0, None, -115) else "")
    if t in ("bind", "listen"):
        return f"{g('family') or ''} {dest()}"
    if t == "protocol":
        return f"{g('protocol')} to {dest()}" + (f" sni {g('sni')}" if g("sni") else "") + (" [held]" if g("held") else "")
    if t == "deny":
        return f"{g('call')} {dest()} {'would deny' if g('would') else 'denied'}"
    if t == "alert":
        return f"{str(g('severity') or '').upper()} {g('rule')} {g('action')}" + (" enforced" if g("enforced") else "")
    if t == "gpu":
        return f"GPU{g('gpu_index')} {g('used_mib')} MiB sm {g('sm_util')}%"
    if t == "socket":
        return f"{g('family')} {g('sock_type')}"
    if t == "memfd":
        return f"name {g('name')}"
    if t == "gpu_open":
        return str(g("path") or "")
    if t == "episode_start":
        return f"source {g('source')} {g('cgroup_path') or ''}"
    if t == "episode_end":
        return f"reason {g('reason')} exit {g('exit_code')}"
    if t == "relay":
        return f"relay {g('addr')}:{g('port')} <-> {g('local_addr')}:{g('local_port')}"
    if t == "episode_command":
        return f"{g('cmd')} by {g('by')}"
    return ""


_HANDLERS = {
    "episode_start": EpisodeDetail._on_start,
    "fork": EpisodeDetail._on_fork,
    "exec": EpisodeDetail._on_exec,
    "exit": EpisodeDetail._on_exit,
    "episode_end": EpisodeDetail._on_end,
    "connect": EpisodeDetail._on_connect,
    "deny": EpisodeDetail._on_deny,
    "protocol": EpisodeDetail._on_protocol,
    "listen": EpisodeDetail._on_listen,
    "alert": EpisodeDetail._on_alert,
    "gpu": EpisodeDetail._on_gpu,
}
