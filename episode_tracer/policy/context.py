"""Evaluation context: what a rule may need beyond the event record itself.

The live tracer builds an :class:`EvalContext` from its process table (the
exe paths of a process's ancestors) and a hash cache. Replay and tests use
:func:`record_context`, which reads the same facts from optional fields of
the record (`ancestors`, `sha256`), so recorded JSONL can carry them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .argv import Opt, OptSpec, scan_options
from .sshconfig import ssh_config_directives


def _no_ancestors(pid: int) -> list[str]:
    return []


def _no_hash(path: str, pid: int) -> str | None:
    return None


def _unknown(pid: int) -> bool | None:
    return None


def _no_stdio(pid: int) -> list[dict[str, Any]] | None:
    return None


@dataclass(frozen=True)
class EvalContext:
    """Lazy facts about the process of an event.

    ancestors_exe(pid): exe paths of the ancestors of pid, nearest (the
        parent) first. Called at most once per evaluated event, and only when
        a rule uses parent_exe or ancestor_exe.
    sha256(path, pid): lowercase hex sha256 of the executable image, or None
        when unknown. Called at most once per evaluated event, and only when
        a rule's cheaper conditions already hold.
    gpu_allowed(pid): whether the process may use GPUs (it is, or descends
        by design from, a GPU process its episode registered; docs/gpu.md),
        None when unknown. Asked only when the record does not carry
        `gpu_allowed` itself.
    stdio_sockets(pid): the inet sockets on fds 0, 1 and 2 of the process,
        each {"fd", "proto" (tcp/udp), "peer", "peer_port", "local" (the peer
        is this node: loopback or one of its addresses)}; [] when none, None
        when unknown. Asked only for rules on `stdio_remote`, and only when
        the record does not carry `stdio` itself (episode_tracer/stdio.py reads it
        live, from /proc while the exec gate holds the process).
    """

    ancestors_exe: Callable[[int], Sequence[str]] = _no_ancestors
    sha256: Callable[[str, int], str | None] = _no_hash
    gpu_allowed: Callable[[int], bool | None] = _unknown
    stdio_sockets: Callable[[int], list[dict[str, Any]] | None] = _no_stdio
    # ssh_config(event): the directives of the OpenSSH config files an ssh
    # exec will read (episode_tracer/policy/sshconfig.py), asked only when the record
    # does not carry `ssh_config` itself. The default reads the files from
    # here (/proc/<pid>/root while the process lives, else the record's cwd).
    ssh_config: Callable[[Mapping[str, Any]], list[str] | None] = ssh_config_directives


def record_context(record: Mapping[str, Any]) -> EvalContext:
    """A context answering from the record: `ancestors` (list of exe paths,
    nearest first) and `sha256` (hex of the exe), both optional."""
    ancestors = record.get("ancestors")
    anc: list[str] = [a for a in ancestors if isinstance(a, str)] if isinstance(ancestors, list) else []
    digest = record.get("sha256")
    digest = digest.lower() if isinstance(digest, str) else None
    return EvalContext(ancestors_exe=lambda pid: anc, sha256=lambda path, pid: digest)


class Subject:
    """One event under evaluation, with per-event caches of the lazy facts."""

    __slots__ = ("event", "ctx", "_ancestors", "_sha256", "_scans", "_gpu_allowed", "_stdio", "_ssh_config")

    def __init__(self, event: Mapping[str, Any], ctx: EvalContext) -> None:
        self.event = event
        self.ctx = ctx
        self._ancestors: Sequence[str] | None = None
        self._sha256: str | None | bool = False  # False: not asked yet
        self._scans: dict[OptSpec, tuple[Opt, ...]] = {}
        self._gpu_allowed: bool | None | str = "?"
        self._stdio: list[str] | None | bool = False  # False: not asked yet
        self._ssh_config: list[str] | None | bool = False

    def ssh_config(self) -> list[str] | None:
        if self._ssh_config is False:
            given = self.event.get("ssh_config")
            if isinstance(given, list):
                self._ssh_config = [x for x in given if isinstance(x, str)]
            else:
                self._ssh_config = self.ctx.ssh_config(self.event)
        return self._ssh_config  # type: ignore[return-value]

    def stdio_remote(self) -> list[str] | None:
        """Peers, not on this node, of the inet sockets on fds 0-2: from the
        record's `stdio` (replay), else asked of the context (live)."""
        if self._stdio is False:
            socks = self.event.get("stdio")
            if not isinstance(socks, list):
                socks = self.ctx.stdio_sockets(self._pid())
            if socks is None:
                self._stdio = None
            else:
                self._stdio = [s["peer"] for s in socks
                               if isinstance(s, dict) and isinstance(s.get("peer"), str) and s.get("local") is False]
        return self._stdio  # type: ignore[return-value]

    def gpu_allowed(self) -> bool | None:
        if self._gpu_allowed == "?":
            self._gpu_allowed = self.ctx.gpu_allowed(self._pid())
        return self._gpu_allowed  # type: ignore[return-value]

    def ancestors(self) -> Sequence[str]:
        if self._ancestors is None:
            self._ancestors = list(self.ctx.ancestors_exe(self._pid()))
        return self._ancestors

    def sha256(self) -> str | None:
        if self._sha256 is False:
            exe = self.event.get("exe")
            digest = self.ctx.sha256(exe, self._pid()) if isinstance(exe, str) else None
            self._sha256 = digest.lower() if isinstance(digest, str) else None
        return self._sha256  # type: ignore[return-value]

    def _pid(self) -> int:
        pid = self.event.get("pid")
        return pid if isinstance(pid, int) else -1

    def args(self) -> list[str] | None:
        argv = self.event.get("argv")
        return argv[1:] if isinstance(argv, list) else None

    def scan(self, spec: OptSpec) -> tuple[Opt, ...]:
        opts = self._scans.get(spec)
        if opts is None:
            opts = scan_options(self.args() or (), spec)
            self._scans[spec] = opts
        return opts
