"""The `ssh_config` exec field: the directives of the OpenSSH client
configuration files an ssh command line will read.

An agent can open a reverse tunnel with no forwarding flag on argv at all:
it writes `RemoteForward 2222 localhost:22` into a file and runs
`ssh -F file host` (or into `~/.ssh/config` and runs `ssh host`). Killing
every `ssh -F` is too blunt; instead the exec (held by the exec gate, so
ssh has not read anything yet) is judged by the files ssh would read:

* the `-F` files on argv (options as OpenSSH scans them; `-F none` reads
  nothing), else `~/.ssh/config` of the process's uid and
  `/etc/ssh/ssh_config`;
* `Include` directives are followed the way ssh does (globs, `~`, relative
  to `~/.ssh` for user files and `/etc/ssh` for the system file), 16 deep.

Each directive becomes one entry `"keyword value"`: the keyword in lower
case, then the rest of the line with runs of blanks made single spaces
(`RemoteForward=2222 localhost:22` -> `"remoteforward 2222 localhost:22"`).
Every line counts, whatever `Host`/`Match` block it is in.

`/dev/null` (`ssh -F /dev/null`, a common way to ignore every config) is
empty. A file ssh would read that exists but cannot be judged (not a regular file,
e.g. a FIFO the agent writes into after the check; larger than 256 KiB;
unreadable) and an `-F` file that does not exist give an entry
`"#unreadable <path>: <why>"`, so a rule can refuse what it cannot see.

Paths are resolved in the process's own root and cwd (`/proc/PID/root`,
`/proc/PID/cwd`) while it is alive; a recorded event is judged from its
`cwd` field, and an event that carries `ssh_config` (a list of strings, as
replayed records may) is taken as it is. Files are opened non-blocking and
never followed into anything but regular files, so nothing the agent names
can stall the tracer.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import stat
from typing import Any, Mapping

from .argv import OptSpec, scan_options
from .model import OptionsEnd

SSH_GETOPT_VALUES = frozenset("BbcDEeFIiJLlmOopQRSWw")
SSH_SPEC = OptSpec(value_letters=SSH_GETOPT_VALUES, clusters=True, end=OptionsEnd.SECOND_POSITIONAL)
MAX_BYTES = 256 * 1024
MAX_DEPTH = 16
MAX_FILES = 64
_LINE = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(?:=\s*|\s+|$)(.*)")


class _Reader:
    def __init__(self, event: Mapping[str, Any]) -> None:
        pid = event.get("pid")
        self.proc = f"/proc/{pid}" if isinstance(pid, int) and pid > 0 and os.path.isdir(f"/proc/{pid}") else None
        cwd = event.get("cwd")
        self.cwd = cwd if isinstance(cwd, str) and cwd.startswith("/") else None
        uid = event.get("uid")
        self.home: str | None = None
        if isinstance(uid, int):
            try:
                self.home = pwd.getpwuid(uid).pw_dir
            except KeyError:
                pass
        self.out: list[str] = []
        self.files = 0

    # ------------------------------------------------------------ paths
    def host_path(self, path: str) -> str | None:
        """Where `path`, as the process names it, is seen from here."""
        if path.startswith("/"):
            return f"{self.proc}/root{path}" if self.proc else path
        if self.proc:
            return f"{self.proc}/cwd/{path}"
        return os.path.join(self.cwd, path) if self.cwd else None

    def tilde(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return (self.home or "/nonexistent") + path[1:]
        return path

    # ------------------------------------------------------------ files
    def read(self, path: str, user: bool, depth: int, must_exist: bool) -> None:
        if self.files >= MAX_FILES:
            self.out.append(f"#unreadable {path}: more than {MAX_FILES} files")
            return
        self.files += 1
        where = self.host_path(path)
        if where is None:
            self.out.append(f"#unreadable {path}: relative path and no cwd")
            return
        try:
            fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            if must_exist:
                self.out.append(f"#unreadable {path}: does not exist")
            return
        except OSError as e:
            self.out.append(f"#unreadable {path}: {e.strerror}")
            return
        try:
            st = os.fstat(fd)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
                return  # /dev/null: `ssh -F /dev/null` reads no config at all
            if not stat.S_ISREG(st.st_mode):
                self.out.append(f"#unreadable {path}: not a regular file")
                return
            if st.st_size > MAX_BYTES:
                self.out.append(f"#unreadable {path}: larger than {MAX_BYTES} bytes")
                return
            data = os.read(fd, MAX_BYTES + 1)
        except OSError as e:
            self.out.append(f"#unreadable {path}: {e.strerror}")
            return
        finally:
            os.close(fd)
        self.lines(data.decode("utf-8", "replace"), user, depth)

    def lines(self, text: str, user: bool, depth: int) -> None:
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if not m:
                continue
            key, value = m.group(1).lower(), " ".join(m.group(2).split())
            self.out.append(f"{key} {value}".rstrip())
            if key == "include":
                self.include(value, user, depth)

    def include(self, value: str, user: bool, depth: int) -> None:
        if depth >= MAX_DEPTH:
            self.out.append(f"#unreadable include {value}: nested more than {MAX_DEPTH} deep")
            return
        for pattern in value.split():
            pattern = self.tilde(pattern.strip('"'))
            if not pattern.startswith("/"):
                pattern = ((self.home or "/nonexistent") + "/.ssh/" if user else "/etc/ssh/") + pattern
            host_pattern = self.host_path(pattern)
            if host_pattern is None:
                continue
            prefix = host_pattern[: len(host_pattern) - len(pattern)]
            for match in sorted(glob.glob(host_pattern)):
                self.read(match[len(prefix):], user, depth + 1, must_exist=False)


def ssh_config_directives(event: Mapping[str, Any]) -> list[str] | None:
    """The `ssh_config` field of an exec event (see the module doc)."""
    given = event.get("ssh_config")
    if isinstance(given, list):
        return [x for x in given if isinstance(x, str)]
    argv = event.get("argv")
    if not isinstance(argv, list):
        return None
    args = [a for a in argv[1:] if isinstance(a, str)]
    files = [o.value for o in scan_options(args, SSH_SPEC) if o.name == "-F" and o.value is not None]
    r = _Reader(event)
    if files:
        for f in files:
            if f != "none":
                r.read(f, True, 0, must_exist=True)
    else:
        if r.home:
            r.read(r.home + "/.ssh/config", True, 0, must_exist=False)
        r.read("/etc/ssh/ssh_config", False, 0, must_exist=False)
    return r.out


def ssh_option_directives(event: Mapping[str, Any]) -> list[str] | None:
    """The `ssh_option` field of an exec event: every `-o` option of the
    command line (options scanned as OpenSSH does), in the same form as
    `ssh_config` entries: `-oRemoteForward=2222 localhost:22` and
    `-o "RemoteForward 2222 localhost:22"` are both
    `"remoteforward 2222 localhost:22"`. So one list of patterns judges a
    directive wherever it is written (a config file or argv), by what it
    does: `permitlocalcommand no` or `clearallforwardings yes` open nothing."""
    argv = event.get("argv")
    if not isinstance(argv, list):
        return None
    args = [a for a in argv[1:] if isinstance(a, str)]
    out: list[str] = []
    for o in scan_options(args, SSH_SPEC):
        if o.name != "-o" or o.value is None:
            continue
        m = _LINE.match(o.value.strip())
        if m:
            out.append(f"{m.group(1).lower()} {' '.join(m.group(2).split())}".rstrip())
        else:
            out.append("#unparsed " + o.value)
    return out
