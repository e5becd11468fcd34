"""Record sinks: JSONL (orjson), per-episode verdict files, memory (tests)."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

import orjson

_OPTS = orjson.OPT_SERIALIZE_NUMPY if hasattr(orjson, "OPT_SERIALIZE_NUMPY") else 0


_NL = orjson.OPT_APPEND_NEWLINE


def dumps(rec: dict[str, Any]) -> bytes:
    return orjson.dumps(rec, default=str, option=_NL)


# records a reader waits for: written through at once
_FLUSH_NOW = frozenset({"alert", "ready", "lost", "episode_end"})


class JsonlSink:
    """One JSON object per line. `-` is standard output.

    Flushed every `flush_every` records and at once for alerts, ready, lost
    and episode_end records, so a reader never waits for those.

    Every line carries `node` (this host's name). Lifecycle, all on the
    loop thread so no record is lost or split: `max_bytes` > 0 rotates the
    file when it grows past that size (PATH -> PATH.1 -> ... PATH.`keep`,
    the oldest removed); `request_reopen()` (SIGUSR1, logrotate's postrotate)
    makes the next write or flush reopen PATH, so records written after
    logrotate renamed the file and before the signal stay in the renamed one."""

    def __init__(self, target: str | Path, flush_every: int = 256, max_bytes: int = 0, keep: int = 5,
                 node: str | None = None):
        self.target = str(target)
        self.max_bytes = max_bytes if self.target != "-" else 0
        self.keep = max(1, keep)
        self.rotations = 0
        self.reopens = 0
        self._reopen = False
        node = node if node is not None else socket.gethostname()
        self._prefix = b'{"node":' + orjson.dumps(node) + b","
        self._n = 0
        self._flush_every = flush_every
        self._open()

    def _open(self) -> None:
        if self.target == "-":
            self._f: IO[bytes] = sys.stdout.buffer
            self._own = False
            self._size = 0
        else:
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.target, "ab", buffering=1 << 16)
            self._own = True
            try:
                self._size = self._f.tell()
            except OSError:  # a FIFO or a character device: no size, never rotated
                self._size = 0
                self.max_bytes = 0
        self._write = self._f.write

    def write(self, rec: dict[str, Any]) -> None:
        # hot path: one orjson call (newline included), the node spliced in
        # front (no copy of the record), one buffered write
        line = orjson.dumps(rec, default=str, option=_NL)
        if "node" not in rec and line != b"{}\n":
            line = self._prefix + line[1:]
        if self._reopen:
            self._do_reopen()
        self._write(line)
        if self.max_bytes:
            self._size += len(line)
            if self._size >= self.max_bytes:
                self.rotate()
                return
        self._n += 1
        if self._n >= self._flush_every or rec["type"] in _FLUSH_NOW:
            self._n = 0
            self.flush()

    def request_reopen(self) -> None:
        """Safe from a signal handler: only sets a flag."""
        self._reopen = True

    def _do_reopen(self) -> None:
        self._reopen = False
        if not self._own:
            return
        self.flush()
        self._f.close()
        self._open()
        self.reopens += 1

    def rotate(self) -> None:
        """PATH -> PATH.1 (PATH.1 -> PATH.2 ...), then a new PATH."""
        if not self._own:
            return
        self._n = 0
        self.flush()
        self._f.close()
        base = self.target
        try:
            os.unlink(f"{base}.{self.keep}")
        except FileNotFoundError:
            pass
        for i in range(self.keep - 1, 0, -1):
            try:
                os.replace(f"{base}.{i}", f"{base}.{i + 1}")
            except FileNotFoundError:
                pass
        os.replace(base, f"{base}.1")
        self.rotations += 1
        self._open()

    def flush(self) -> None:
        if self._reopen:
            self._do_reopen()
        try:
            self._f.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._own:
            self._f.close()


class MemorySink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class VerdictSink:
    """Appends each alert (the episode's GPU totals, `gpu_total`, and an
    operator's kill, `episode_command` with cmd "kill") to
    <dir>/<episode>.jsonl so `agent-tracer episode run` and the Python API
    can read an episode's verdicts without parsing the main log.

    `prune()` (from the loop's tick) removes the files of episodes that are
    not running and were last written more than `retention` seconds ago."""

    def __init__(self, directory: Path, retention: float = 0.0):
        self.dir = directory
        self.retention = retention
        self.pruned = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)

    def write(self, rec: dict[str, Any]) -> None:
        t = rec.get("type")
        if not rec.get("episode") or not (t in ("alert", "gpu_total")
                                           or (t == "episode_command" and rec.get("cmd") == "kill")):
            return
        path = self.dir / f"{rec['episode']}.jsonl"
        with open(path, "ab") as f:
            f.write(dumps(rec))

    def prune(self, running: set[str] | frozenset[str] = frozenset(), now: float | None = None) -> list[str]:
        if self.retention <= 0:
            return []
        now = time.time() if now is None else now
        removed = []
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return []
        for e in entries:
            if not e.name.endswith(".jsonl") or e.name[:-6] in running:
                continue
            try:
                if now - e.stat().st_mtime > self.retention:
                    os.unlink(e.path)
                    removed.append(e.name[:-6])
            except OSError:
                continue
        self.pruned += len(removed)
        return removed

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: str | Path):
    """Yield records of a JSONL file (`-` is standard input); blank lines are
    skipped, a bad line raises ValueError naming the file and line."""
    f = sys.stdin.buffer if str(path) == "-" else open(path, "rb")
    try:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
