"""Record sinks: JSONL (orjson), per-episode verdict files, memory (tests)."""
from __future__ import annotations

import os
import sys
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
    and episode_end records, so a reader never waits for those."""

    def __init__(self, target: str | Path, flush_every: int = 256):
        self.target = str(target)
        if self.target == "-":
            self._f: IO[bytes] = sys.stdout.buffer
            self._own = False
        else:
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.target, "ab", buffering=1 << 16)
            self._own = True
        self._n = 0
        self._flush_every = flush_every
        self._write = self._f.write

    def write(self, rec: dict[str, Any]) -> None:
        # hot path: one orjson call (newline included) and one buffered write
        self._write(orjson.dumps(rec, default=str, option=_NL))
        self._n += 1
        if self._n >= self._flush_every or rec["type"] in _FLUSH_NOW:
            self._n = 0
            self.flush()

    def flush(self) -> None:
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
    can read an episode's verdicts without parsing the main log."""

    def __init__(self, directory: Path):
        self.dir = directory
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
