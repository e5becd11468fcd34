"""The trainer API: an episode as an object, its verdicts live, blocking or asyncio.

    import episode_tracer as tracer

    async with tracer.episode("exp7-s3-r0", ["python", "agent.py"]) as ep:
        async for v in ep.verdicts():          # alerts as they happen, then {"type": "end", ...}
            if v["type"] == "alert" and v.get("enforced"):
                await ep.kill()                # end the rollout at the first enforced alert
        res = await ep.wait()                  # EpisodeResult (episode_tracer/api.py)

    with tracer.episode_sync("exp7-s3-r1", ["python", "agent.py"]) as ep:   # the same, blocking
        for v in ep.verdicts(): ...
        res = ep.wait()

Root or not (a trainer the tracer lets in, docs/episodes.md "Trainer API"),
the episode goes through the running tracer: the exec helper's child waits
on a pipe; `episode_open` puts it in the episode's cgroup; after the start
handshake the verdict stream (`episode_watch`) is opened, and only then the
child is released to exec argv, so no verdict precedes the stream. A thread
reaps the child and closes the episode (`episode_close`: leftovers killed,
cgroup removed), which ends the stream with the episode's end record.
No preexec_fn: safe from any thread.
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

from .api import REGISTER_TIMEOUT_S, EpisodeError, EpisodeResult, _helper_argv, _result, await_registration
from .control import ControlClient, ControlError
from .ids import check_episode_id
from .paths import CONTROL_SOCKET


class Episode:
    """One episode run through the tracer (blocking calls; see AsyncEpisode)."""

    def __init__(self, episode: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, control_socket: str | os.PathLike[str] = CONTROL_SOCKET,
                 register_timeout: float = REGISTER_TIMEOUT_S, verdict_file: Path | None = None) -> None:
        if not argv:
            raise EpisodeError("no command given")
        self.id = check_episode_id(episode)
        self.argv = list(argv)
        self.env, self.cwd = env, cwd
        self.control_socket = os.fspath(control_socket)
        self.register_timeout = register_timeout
        self.verdict_file = verdict_file
        self._client = ControlClient(self.control_socket, timeout=max(register_timeout, 10.0))
        self.proc: subprocess.Popen | None = None
        self._watch: socket.socket | None = None
        self._reaper: threading.Thread | None = None
        self._rc: int | None = None
        self._t0 = 0.0
        self._close_error: BaseException | None = None
        self.result: EpisodeResult | None = None

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = self._client.request(req)
        except ControlError as e:
            raise EpisodeError(str(e)) from None
        if not reply.get("ok"):
            raise EpisodeError(str(reply.get("error") or f"{req['op']} {self.id} failed"))
        return reply

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Episode":
        import shutil

        if shutil.which(self.argv[0], path=(self.env or os.environ).get("PATH")) is None and "/" not in self.argv[0]:
            raise EpisodeError(f"command not found: {self.argv[0]}")
        gate_r, gate_w = os.pipe()
        try:
            self.proc = subprocess.Popen(_helper_argv(self.argv, None, gate_r), env=self.env, cwd=self.cwd,
                                         pass_fds=(gate_r,))
        finally:
            os.close(gate_r)
        self._t0 = time.monotonic()
        opened = False
        try:
            self._ask({"op": "episode_open", "id": self.id, "pid": self.proc.pid})
            opened = True
            if await_registration(self.id, self.control_socket, self.register_timeout) != "registered":
                raise EpisodeError(f"the tracer on {self.control_socket} did not answer the start handshake")
            self._watch = self._open_watch()
            os.write(gate_w, b"go\n")  # now argv runs, inside the cgroup, watched
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            if opened:
                try:
                    self._ask({"op": "episode_close", "id": self.id})
                except EpisodeError:
                    pass
            if self._watch is not None:
                self._watch.close()
            raise
        finally:
            os.close(gate_w)
        self._reaper = threading.Thread(target=self._reap, name=f"episode-{self.id}", daemon=True)
        self._reaper.start()
        return self

    def _open_watch(self) -> socket.socket:
        c = self._client
        sock = c._connect(c.timeout)
        try:
            c._send(sock, {"op": "episode_watch", "id": self.id})
            sock.settimeout(c.timeout)
            first = next(c._lines(sock))
            if not first.get("ok"):
                raise EpisodeError(str(first.get("error") or f"episode_watch {self.id} refused"))
            sock.settimeout(None)  # the stream ends with the episode (or close())
            return sock
        except BaseException:
            sock.close()
            raise

    def _reap(self) -> None:
        assert self.proc is not None
        self._rc = self.proc.wait()
        try:
            self._ask({"op": "episode_close", "id": self.id})  # ends the verdict stream
        except BaseException as e:  # noqa: BLE001 - wait() raises it
            self._close_error = e

    # ------------------------------------------------------------ the trainer's calls
    def verdicts(self) -> Iterator[dict[str, Any]]:
        """The episode's alerts as they happen, then its end record
        (``{"type": "end", ...}``); ends there, or when the tracer goes away."""
        sock = self._watch
        if sock is None:
            return
        try:
            for msg in self._client._lines(sock):
                yield msg
                if msg.get("type") == "end":
                    return
        except ControlError:
            return  # the tracer closed the stream (it ended, or went away)

    def kill(self) -> None:
        """Kill the whole episode now (an operator command through the tracer)."""
        self._ask({"op": "episode", "cmd": "kill", "id": self.id})

    def wait(self, timeout: float | None = None) -> EpisodeResult:
        """Wait for the episode to end; its result (alerts from the verdict file)."""
        if self.result is not None:
            return self.result
        assert self._reaper is not None and self.proc is not None, "start() first"
        self._reaper.join(timeout)
        if self._reaper.is_alive():
            raise TimeoutError(f"episode {self.id} still running after {timeout:g} s")
        if self._close_error is not None:
            raise self._close_error
        assert self._rc is not None
        self.result = _result(self.id, self._rc, self.proc.pid,
                              lambda: self._ask({"op": "episode_verdicts", "id": self.id})["records"],
                              self._t0, self.verdict_file)
        return self.result

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.kill()
            except EpisodeError:
                self.proc.kill()
        if self._reaper is not None:
            self._reaper.join(30)
        if self._watch is not None:
            try:
                self._watch.close()
            except OSError:
                pass
            self._watch = None

    def __enter__(self) -> "Episode":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEpisode:
    """Episode for asyncio: the same calls, awaited (each blocking step in a thread)."""

    def __init__(self, episode: str, argv: Sequence[str], **kw: Any) -> None:
        self.sync = Episode(episode, argv, **kw)
        self.id = self.sync.id

    async def __aenter__(self) -> "AsyncEpisode":
        await asyncio.to_thread(self.sync.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.sync.close)

    async def wait(self) -> EpisodeResult:
        return await asyncio.to_thread(self.sync.wait)

    async def kill(self) -> None:
        await asyncio.to_thread(self.sync.kill)

    async def verdicts(self) -> AsyncIterator[dict[str, Any]]:
        it = self.sync.verdicts()
        end = object()
        while True:
            msg = await asyncio.to_thread(next, it, end)
            if msg is end:
                return
            yield msg


def episode(episode_id: str, argv: Sequence[str], **kw: Any) -> AsyncEpisode:
    """``async with tracer.episode(id, argv) as ep`` (see the module docstring)."""
    return AsyncEpisode(episode_id, argv, **kw)


def episode_sync(episode_id: str, argv: Sequence[str], **kw: Any) -> Episode:
    """``with tracer.episode_sync(id, argv) as ep``: the blocking form."""
    return Episode(episode_id, argv, **kw)
