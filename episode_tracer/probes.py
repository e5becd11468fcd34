"""Probe loader: the only module that imports bcc.

Compiles episode_tracer/bpf/tracer.c with settings passed as -D flags, attaches the
tracepoints and the cgroup sock_addr programs, drains the ring buffer, and
gives the rest of the tracer a narrow API over the kernel maps.
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import events, pins
from .cgroups import cgroup2_mount, cgroup_id
from .events import SLOT_INDEX_MASK, Config, Counter, Kind
from .paths import BPF_DIR

log = logging.getLogger(__name__)

SOCK_ADDR_PROGS = {
    "at_connect4": "CGROUP_INET4_CONNECT",
    "at_connect6": "CGROUP_INET6_CONNECT",
    "at_sendmsg4": "CGROUP_UDP4_SENDMSG",
    "at_sendmsg6": "CGROUP_UDP6_SENDMSG",
}
# the wire programs (episode_tracer/bpf/wire.h): first bytes of episode TCP flows in the
# packet path, and the forgetting of a flow at socket release
WIRE_PROGS = {
    "at_wire_egress": ("CGROUP_SKB", "CGROUP_INET_EGRESS"),
    "at_wire_release": ("CGROUP_SOCK", "CGROUP_INET_SOCK_RELEASE"),
}
# egress mode and datagram inspection (episode_tracer/bpf/egress.h, episode_tracer/bpf/udp.h): program ->
# (bcc program type attribute, attach type), attached like the sock_addr ones
EGRESS_PROGS = {
    "at_recvmsg4": ("CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG"),
    "at_recvmsg6": ("CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG"),
    "at_post_bind4": ("CGROUP_SOCK", "CGROUP_INET4_POST_BIND"),
    "at_post_bind6": ("CGROUP_SOCK", "CGROUP_INET6_POST_BIND"),
    "at_udp_egress": ("CGROUP_SKB", "CGROUP_INET_EGRESS"),
}
# enum bpf_attach_type BPF_CGROUP_UNIX_CONNECT (kernel 6.7+); bcc 0.26 has no
# name for it, the kernel takes the number
UNIX_CONNECT_ATTACH = 49
UNIX_CONNECT_PROG = "at_connect_unix"
DRAIN_BUDGET = 4096  # records handled per ring-buffer poll before the loop's other work runs
DEFAULT_GPU_PREFIXES = ("/dev/nvidia", "/dev/dri/", "/dev/kfd")
EPISODE_DIR = "agent-tracer"


class ProbeError(RuntimeError):
    pass


def _malloc_trim() -> None:
    """Return free heap pages to the kernel (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


def _link_create(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE of a cgroup program (kernel >= 5.7): the link fd."""
    return pins.link_create(prog_fd, cgroup_fd, attach_type)


def ensure_tracefs() -> None:
    if Path("/sys/kernel/tracing/events").exists() or Path("/sys/kernel/debug/tracing/events").exists():
        return
    rc = os.system("mount -t tracefs nodev /sys/kernel/tracing >/dev/null 2>&1")
    if rc != 0 or not Path("/sys/kernel/tracing/events").exists():
        raise ProbeError("tracefs is not mounted and could not be mounted at /sys/kernel/tracing")


@dataclass
class ProbeConfig:
    scope_all: bool = False
    ringbuf_pages: int = 2048  # 8 MiB
    env_marker: bool = True
    gpu_prefixes: tuple[str, ...] = DEFAULT_GPU_PREFIXES
    attach_sock_addr: bool = True
    attach_unix_connect: bool = True  # the cgroup unix-connect program (episode_tracer/bpf/nodesvc.h), where the kernel has it
    drain_budget: int = DRAIN_BUDGET  # records per poll (0: no bound)
    extra_cflags: list[str] = field(default_factory=list)
    # pinned state (episode_tracer/pins.py, docs/faults.md): maps and links in bpffs,
    # adopted by the next start of the same layout; None: nothing pinned
    # (the programs die with the process, as for doctor and most tests)
    pin_base: Path | None = None
    keep_pins: bool = False  # a clean stop leaves the pins (the kernel keeps enforcing)


def episode_root() -> Path:
    return cgroup2_mount() / EPISODE_DIR


def episode_level(root: Path | None = None) -> int:
    """cgroup level of <cgroup2>/agent-tracer/<ID> (the cgroup2 root is 0)."""
    root = root or episode_root()
    return len(root.relative_to(cgroup2_mount()).parts) + 1


def episode_prefix(root: Path | None = None) -> str:
    """The episode root as the cgroup tracepoints name it (its path below
    the cgroup2 root, with a trailing slash), e.g. "/agent-tracer/"."""
    root = root or episode_root()
    return "/" + str(root.relative_to(cgroup2_mount())).strip("/") + "/"


def tracepoint_has_field(group: str, name: str, field_name: str) -> bool:
    """Whether this kernel's tracepoint group:name has a field (its format
    file in tracefs): e.g. sched_process_exit's group_dead (6.16+)."""
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        try:
            text = Path(f"{base}/events/{group}/{name}/format").read_text()
        except OSError:
            continue
        return re.search(rf"\bfield:[^;]*\b{re.escape(field_name)};", text) is not None
    return False


_LOCAL_INCLUDE = re.compile(r'^#include "([a-z_]+\.h)"$', re.M)


def bpf_source() -> str:
    """episode_tracer/bpf/tracer.c with its topic headers inlined (events.h stays an
    include): bcc generates the TRACEPOINT_PROBE argument structs from the
    main file's text only, so the programs must all be in the text it is
    given. One compilation unit, as before."""
    def inline(m: re.Match) -> str:
        name = m.group(1)
        if name == "events.h":
            return m.group(0)
        return f"/* ---- episode_tracer/bpf/{name} ---- */\n" + _LOCAL_INCLUDE.sub(inline, (BPF_DIR / name).read_text())
    return _LOCAL_INCLUDE.sub(inline, (BPF_DIR / "tracer.c").read_text())


class Probes:
    def __init__(self, cfg: ProbeConfig, on_record: Callable[[memoryview], None]):
        ensure_tracefs()
        try:
            from bcc import BPF, BPFAttachType  # noqa: WPS433 (the one bcc import)
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ProbeError(f"cannot import bcc ({e}): run scripts/install.sh") from e
        self._BPF = BPF
        self.cfg = cfg
        root = episode_root()
        root.mkdir(exist_ok=True)
        self.episode_root = root
        self.episode_root_id = cgroup_id(root)
        cflags = [
            f"-I{BPF_DIR}",
            f"-DAT_SCOPE_ALL={int(cfg.scope_all)}",
            f"-DAT_EPISODE_LEVEL={episode_level(root)}",
            f"-DAT_RINGBUF_PAGES={cfg.ringbuf_pages}",
            f"-DAT_ENV_MARKER={int(cfg.env_marker)}",
            f'-DAT_EPISODE_PREFIX="{episode_prefix(root)}"',
            f"-DAT_HAVE_GROUP_DEAD={int(tracepoint_has_field('sched', 'sched_process_exit', 'group_dead'))}",
            *cfg.extra_cflags,
        ]
        source = bpf_source()
        # pinned state: this layout's directory, adopted when a previous
        # instance left it; other layouts' directories are replaced at commit()
        self.pin_dir: Path | None = None
        self.layout_version: str | None = None
        self.adopted = False  # a previous instance's maps and links were taken over
        self._old_links: dict[str, Path] = {}  # same layout, previous instance: prog key -> pin
        self._stale_dirs: list[Path] = []  # other layouts' pin directories
        self._links: dict[str, int] = {}  # prog key -> our link fd (pinned when pin_dir)
        self._committed = True
        if cfg.pin_base is not None:
            try:
                pins.ensure_bpffs()
            except OSError as e:
                raise ProbeError(str(e)) from e
            self.layout_version = pins.layout_version(source, cflags)
            base = Path(cfg.pin_base)
            self.pin_dir = base / self.layout_version
            self._old_links = pins.link_pins(self.pin_dir)
            self.adopted = (self.pin_dir / "maps" / "config").exists()
            if base.is_dir():
                self._stale_dirs = [d for d in sorted(base.iterdir()) if d != self.pin_dir]
            (self.pin_dir / "links").mkdir(parents=True, exist_ok=True)
            cflags.append(f'-DAT_PIN_DIR="{self.pin_dir / "maps"}"')
            # a new layout over an older running set: its cgroup links are
            # switched to ours once our maps hold the policy and episodes
            self._committed = not any(pins.link_pins(d) for d in self._stale_dirs)
        t0 = time.monotonic()
        links = self._links

        class _LinkedBPF(BPF):
            """bcc with its tracepoints attached through BPF links
            (BPF_PERF_EVENT), which can be pinned; bcc's own attachment is a
            perf event ioctl that ends with the process."""

            def attach_tracepoint(self, tp=b"", tp_re=b"", fn_name=b""):
                if tp_re or not tp:
                    return super().attach_tracepoint(tp=tp, tp_re=tp_re, fn_name=fn_name)
                fn = self.load_func(fn_name, BPF.TRACEPOINT)
                cat, name = (tp.decode() if isinstance(tp, bytes) else tp).split(":")
                pfd = pins.tracepoint_perf_fd(cat, name)
                try:
                    links[f"tp:{cat}:{name}"] = pins.link_create(fn.fd, pfd, pins.BPF_PERF_EVENT)
                finally:
                    os.close(pfd)  # the link holds the perf event
                return self

        try:
            self.bpf = _LinkedBPF(text=source.encode(), cflags=cflags)
        except Exception as e:
            self._close_links()
            raise ProbeError(f"compiling/loading episode_tracer/bpf/tracer.c failed: {e}") from e
        self._pin_tracepoint_links()
        self.compile_s = time.monotonic() - t0
        _malloc_trim()  # give back the compiler's heap (about 37 MB stays mapped otherwise)
        self.programs: list[str] = sorted(
            p.decode() if isinstance(p, bytes) else str(p) for p in self.bpf.tracepoint_fnname_map()
        ) if hasattr(self.bpf, "tracepoint_fnname_map") else []
        self._sock_attached: list[tuple[object, int, int]] = []
        self.wire_attached: list[str] = []
        self.wire_error: str | None = None
        self._wire_links: list[int] = []
        # which optional kernel hooks this kernel has: name -> "ok" | "absent: why"
        self.hooks: dict[str, str] = {}
        self._unix_attached = False
        self._cg_root_fd = -1
        self.config_map = self.bpf["config"]
        self._set_cfg(Config.EPISODE_ROOT, self.episode_root_id)
        if self.adopted:  # the previous instance's tree is gone (its pids may be reused)
            t = self.bpf["self_tree"]
            t.clear()
        # the tracer's own process tree is never gated outside episodes
        self.bpf["self_tree"][ctypes.c_uint(os.getpid())] = ctypes.c_ubyte(1)
        for i, prefix in enumerate(cfg.gpu_prefixes[: events.GPU_PREFIX_MAX]):
            self._set_gpu_prefix(i, prefix)
        self.drained = 0  # records handled by the last poll/consume
        self._rb_cb = self._make_callback(on_record, cfg.drain_budget)
        self._open_ring_buffer(self.bpf["events"], self._rb_cb)
        if cfg.attach_sock_addr:
            self._attach_sock_addr(BPFAttachType)
            self._attach_unix_connect()
        else:
            self.hooks["unix_connect"] = "absent: sock_addr programs not attached"
        self.attach_s = time.monotonic() - t0

    # ---------------------------------------------------------------- setup
    def _make_callback(self, on_record: Callable[[memoryview], None], budget: int = 0):
        """The ring-buffer callback: on_record gets a memoryview of the
        record in the ring buffer itself (no copy). It is valid only during
        the call: decode copies what it keeps.

        budget > 0 bounds one poll: after that many records the callback
        returns -1, which makes libbpf stop (the record is consumed) and the
        poll return, so the loop's gate, GPU, relay and stats work runs
        between batches however fast records come; the rest stays in the
        ring buffer (epoll is level-triggered: the next poll returns at once)."""
        arrays: dict[int, type] = {}  # c_char * size, per record size (a few kinds)
        probes = self

        def cb(_ctx, data, size):
            t = arrays.get(size)
            if t is None:
                t = arrays[size] = ctypes.c_char * size
            on_record(memoryview(t.from_address(data)))
            n = probes.drained = probes.drained + 1
            if budget and n >= budget:
                return -1
            return 0

        return cb

    def _open_ring_buffer(self, table, cb) -> None:
        """table.open_ring_buffer(cb) without bcc's Python wrapper around
        every call (one frame per event less); falls back to it when this
        bcc's internals differ."""
        try:
            from bcc.libbcc import _RINGBUF_CB_TYPE  # noqa: WPS433

            fn = _RINGBUF_CB_TYPE(cb)
            opener, map_fd, cbs = self.bpf._open_ring_buffer, table.map_fd, table._cbs
        except (ImportError, AttributeError) as e:  # pragma: no cover - other bcc versions
            log.debug("bcc ring buffer internals differ (%s): using open_ring_buffer", e)
            table.open_ring_buffer(cb)
            return
        opener(map_fd, fn, None)
        cbs[0] = fn  # keep the C callback alive as long as the table
        self._rb_fn = fn

    def _attach_sock_addr(self, attach_types) -> None:
        BPF = self._BPF
        self._cg_root_fd = os.open(str(cgroup2_mount()), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for fn_name, type_name in SOCK_ADDR_PROGS.items():
                at = getattr(attach_types, type_name)
                fn = self.bpf.load_func(fn_name, BPF.CGROUP_SOCK_ADDR, attach_type=at)
                self._sock_attached.append((fn, fn_name, int(at)))
            for fn_name, (prog_type, type_name) in EGRESS_PROGS.items():
                at = getattr(attach_types, type_name)
                fn = self.bpf.load_func(fn_name, getattr(BPF, prog_type), attach_type=at)
                self._sock_attached.append((fn, fn_name, int(at)))
            if self._committed:
                self._link_cgroup_progs()
        except Exception as e:
            self._detach_sock_addr()
            raise ProbeError(f"attaching cgroup sock_addr programs failed: {e}") from e
        # at the cgroup2 root, not <cgroup2>/agent-tracer: processes in an
        # episode by env marker or lineage make their sockets outside it.
        # As bpf links: the attachment ends with this process, so a tracer
        # that died cannot leave a packet path that holds flows nobody judges
        try:
            for fn_name, (prog_type, type_name) in WIRE_PROGS.items():
                at = getattr(attach_types, type_name)
                fn = self.bpf.load_func(fn_name, getattr(BPF, prog_type), attach_type=at)
                self._wire_links.append(_link_create(fn.fd, self._cg_root_fd, int(at)))
                self.wire_attached.append(fn_name)
        except Exception as e:
            # the rest of the tracer still works: say so (ready record, doctor)
            self._close_wire_links()
            self.wire_error = f"attaching the cgroup_skb wire programs failed: {e}"
            log.error("%s: wire inspection is off", self.wire_error)

    def _close_wire_links(self) -> None:
        for fd in self._wire_links:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
        self._wire_links.clear()
        self.wire_attached.clear()

    def _attach_unix_connect(self) -> None:
        """The cgroup unix-connect program (BPF_CGROUP_UNIX_CONNECT, kernel
        6.7+), attached by number. Where the kernel lacks it the tracer runs
        without it: unix deny rules then only alert (from the connect
        record), and `hooks` / `doctor` say so."""
        if not self.cfg.attach_unix_connect:
            self.hooks["unix_connect"] = "absent: turned off (ProbeConfig.attach_unix_connect)"
            return
        BPF = self._BPF
        try:
            fn = self.bpf.load_func(UNIX_CONNECT_PROG, BPF.CGROUP_SOCK_ADDR, attach_type=UNIX_CONNECT_ATTACH)
            if self._committed:
                self._link_cgroup_prog(fn, UNIX_CONNECT_PROG, UNIX_CONNECT_ATTACH)
        except Exception as e:  # an older kernel: EINVAL on load or attach
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            self.hooks["unix_connect"] = f"absent: {why} (kernel {os.uname().release}; needs 6.7+)"
            log.warning("cgroup unix-connect hook unavailable: %s; unix deny rules only alert", e)
            return
        self._sock_attached.append((fn, UNIX_CONNECT_PROG, UNIX_CONNECT_ATTACH))
        self._unix_attached = True
        self.hooks["unix_connect"] = "ok"

    @property
    def unix_connect(self) -> bool:
        return self._unix_attached

    # ------------------------------------------------------- links and pins
    def _link_path(self, key: str) -> Path | None:
        return None if self.pin_dir is None else self.pin_dir / "links" / f"{key}@{os.getpid()}"

    def _link_cgroup_prog(self, fn, fn_name: str, attach_type: int) -> None:
        """Attach one cgroup program through a BPF link at the cgroup2 root
        (pinned when pinning): a previous instance's link of the same
        program is switched to ours in place (BPF_LINK_UPDATE: no moment
        without one, and still one link), else a new link is made."""
        key = f"cg:{fn_name}"
        if key in self._links:
            return
        old = self._old_links.get(key) or next(
            (pins.link_pins(d)[key] for d in self._stale_dirs if key in pins.link_pins(d)), None)
        fd = -1
        if old is not None:
            try:
                fd = pins.obj_get(old)
                pins.link_update(fd, fn.fd)
            except OSError as e:
                log.warning("taking over link %s: %s; making a new one", old, e)
                if fd >= 0:
                    os.close(fd)
                fd = -1
        if fd < 0:
            fd = pins.link_create(fn.fd, self._cg_root_fd, attach_type)
        self._links[key] = fd
        path = self._link_path(key)
        if path is not None:
            pins.obj_pin(fd, path)
            if old is not None and old != path:
                try:
                    old.unlink()
                except OSError:
                    pass

    def _link_cgroup_progs(self) -> None:
        for fn, fn_name, at in self._sock_attached:
            self._link_cgroup_prog(fn, fn_name, at)

    def _pin_tracepoint_links(self) -> None:
        """Pin our tracepoint links, then drop a previous instance's of the
        same layout (for that moment both run: a record can come twice)."""
        if self.pin_dir is None:
            return
        for key, fd in self._links.items():
            if key.startswith("tp:"):
                pins.obj_pin(fd, self._link_path(key))
        for key, old in self._old_links.items():
            if key.startswith("tp:"):
                try:
                    old.unlink()
                except OSError:
                    pass

    def commit(self) -> dict[str, object]:
        """After the policy and the episodes are in our maps: take over the
        cgroup links of an older layout's instance, hand its held execs to
        our gate map, drop its pins and every legacy (non-link) attachment
        of our programs. Returns what was found (the ready record's
        `pinned`)."""
        out: dict[str, object] = {"adopted": self.adopted, "layout": self.layout_version}
        if self._cg_root_fd < 0:
            return out
        if not self._committed:
            self._link_cgroup_progs()
            self._committed = True
        handed = 0
        for d in self._stale_dirs:
            for pid in pins.pinned_map_keys(d / "maps" / "gated"):
                try:
                    self.bpf["gated"][ctypes.c_uint(pid)] = ctypes.c_uint(1)
                    handed += 1
                except Exception as e:  # pragma: no cover - map full
                    log.warning("gated: cannot take over held pid %d: %s", pid, e)
            pins.remove_tree(d)
        out["replaced"] = [d.name for d in self._stale_dirs]
        out["gated_handed_over"] = handed
        self._stale_dirs = []
        removed = []
        names = {fn_name: at for _fn, fn_name, at in self._sock_attached}
        for prog_id, _at, name in pins.legacy_attachments(cgroup2_mount(), set(names)):
            at = next((a for n, a in names.items() if n[:15] == name[:15]), None)
            if at is None:
                continue
            try:
                pins.prog_detach(self._cg_root_fd, prog_id, at)
                removed.append(name)
            except OSError as e:
                log.warning("detaching legacy %s (prog %d): %s", name, prog_id, e)
        out["legacy_detached"] = removed
        return out

    def _close_links(self) -> None:
        for fd in self._links.values():
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
        self._links.clear()

    def _detach_sock_addr(self) -> None:
        for key in [k for k in self._links if k.startswith("cg:")]:
            try:
                os.close(self._links.pop(key))
            except OSError:  # pragma: no cover
                pass
        self._sock_attached.clear()
        self._close_wire_links()
        if self._cg_root_fd >= 0:
            os.close(self._cg_root_fd)
            self._cg_root_fd = -1

    def attached_programs(self) -> list[str]:
        tps = [f"tracepoint:{k}" for k in sorted(self._tracepoints())]
        socks = [f"cgroup:{n}" for n in (*SOCK_ADDR_PROGS, *EGRESS_PROGS) if self._sock_attached]
        if not self._committed:  # an older layout's set runs until commit()
            socks = []
        if self._unix_attached:
            socks.append(f"cgroup:{UNIX_CONNECT_PROG}")
        return tps + socks + [f"cgroup:{n}" for n in self.wire_attached]

    def _tracepoints(self) -> list[str]:
        try:
            return [k[3:] for k in self._links if k.startswith("tp:")]
        except Exception:  # pragma: no cover
            return []

    def close(self) -> None:
        """Detach: our link fds are closed; the pins go too (every program
        then detaches) unless keep_pins, which leaves the kernel side
        enforcing with the last policy until the next start adopts it."""
        self._detach_sock_addr()
        self._close_links()
        if self.pin_dir is not None and not self.cfg.keep_pins:
            pins.remove_tree(self.pin_dir)
            try:
                self.pin_dir.parent.rmdir()  # the base, when no other layout is left
            except OSError:
                pass
        try:
            self.bpf.cleanup()
        except Exception as e:  # pragma: no cover
            log.warning("bcc cleanup: %s", e)

    # ----------------------------------------------------------------- drain
    def poll(self, timeout_ms: int = 100) -> int:
        """Handle at most drain_budget records (waiting up to timeout_ms for
        the first); returns how many were handled."""
        self.drained = 0
        self.bpf.ring_buffer_poll(timeout_ms)
        return self.drained

    def consume(self) -> None:
        """Everything in the ring buffer now, batch after batch."""
        budget = self.cfg.drain_budget
        while True:
            self.drained = 0
            self.bpf.ring_buffer_consume()
            if not budget or self.drained < budget:
                return

    # ------------------------------------------------------------------ maps
    def _u64(self, v: int):
        return ctypes.c_ulonglong(v)

    def _set_cfg(self, idx: Config, value: int) -> None:
        self.config_map[ctypes.c_int(int(idx))] = self._u64(value)

    def get_cfg(self, idx: Config) -> int:
        return self.config_map[ctypes.c_int(int(idx))].value

    def _set_gpu_prefix(self, i: int, prefix: str) -> None:
        t = self.bpf["gpu_prefixes"]
        raw = events.pack_gpu_prefix(prefix)
        leaf = t.Leaf.from_buffer_copy(raw)
        t[ctypes.c_int(i)] = leaf

    def set_gpu_prefixes(self, prefixes: Iterable[str]) -> None:
        prefixes = list(prefixes)[: events.GPU_PREFIX_MAX]
        t = self.bpf["gpu_prefixes"]
        for i in range(events.GPU_PREFIX_MAX):
            if i < len(prefixes):
                self._set_gpu_prefix(i, prefixes[i])
            else:
                t[ctypes.c_int(i)] = t.Leaf()

    def lost_counts(self) -> dict[str, int]:
        t = self.bpf["lost"]
        out = {}
        for kind in Kind:
            vals = t[ctypes.c_int(int(kind))]
            total = sum(int(v) for v in vals)
            out[kind.record_type] = total
        return out

    def counters(self) -> dict[str, int]:
        t = self.bpf["counters"]
        return {c.name.lower(): sum(int(v) for v in t[ctypes.c_int(int(c))]) for c in Counter}

    def add_episode_cgroup(self, cg_id: int, slot: int) -> bool:
        """Name cgroup cg_id as the episode of identity `slot`; False when
        the kernel refused (map full: the caller fails closed)."""
        try:
            self.bpf["episode_cgroups"][ctypes.c_ulonglong(cg_id)] = ctypes.c_uint(slot)
        except Exception as e:  # bcc raises on a failed update (E2BIG / ENOMEM when full)
            log.warning("episode_cgroups: cannot add cgroup %d: %s", cg_id, e)
            return False
        return True

    def remove_episode_cgroup(self, cg_id: int) -> None:
        try:
            del self.bpf["episode_cgroups"][ctypes.c_ulonglong(cg_id)]
        except KeyError:
            pass

    def track_pid(self, pid: int, source: int, slot: int = 0) -> bool:
        try:
            self.bpf["tracked"][ctypes.c_uint(pid)] = ctypes.c_uint(((slot & events.IDENT_MASK) << 8) | source)
        except Exception as e:  # map full: the caller fails closed
            log.warning("tracked: cannot add pid %d: %s", pid, e)
            return False
        return True

    def untrack_slot_index(self, index: int) -> int:
        """Forget every tracked process whose identity has slot index
        `index` (any generation): before an index's generation wraps, so no
        leftover entry can ever name a later episode. Returns how many."""
        t = self.bpf["tracked"]
        stale = [k for k, v in t.items() if (v.value >> 8) & events.SLOT_INDEX_MASK == index]
        for k in stale:
            try:
                del t[k]
            except KeyError:
                pass
        return len(stale)

    def tracked_pids(self) -> dict[int, int]:
        return {k.value: v.value for k, v in self.bpf["tracked"].items()}

    def untrack_pid(self, pid: int) -> None:
        try:
            del self.bpf["tracked"][ctypes.c_uint(pid)]
        except KeyError:
            pass

    # the GPU right (episode_tracer/bpf/maps.h gpu_right): inherited at fork, dropped at exec
    def gpu_grant(self, pid: int) -> None:
        self.bpf["gpu_right"][ctypes.c_uint(pid)] = ctypes.c_uint(events.GPU_RIGHT)

    def gpu_revoke(self, pid: int) -> None:
        try:
            del self.bpf["gpu_right"][ctypes.c_uint(pid)]
        except KeyError:
            pass

    def gpu_rights(self) -> set[int]:
        return {k.value for k in self.bpf["gpu_right"].keys()}
    # per-episode rate limit and loss (episode_tracer/bpf/nodesvc.h)
    def set_episode_rate(self, rate: int, burst: int) -> None:
        """Records per second and burst per episode; rate 0 turns it off."""
        if rate <= 0:
            self._set_cfg(Config.EPISODE_RATE, 0)
            return
        rate, burst = min(int(rate), 0xFFFFFFFF), min(max(int(burst), 1), 0xFFFFFFFF)
        self._set_cfg(Config.EPISODE_RATE, rate | (burst << 32))

    def episode_lost(self, slot: int) -> int:
        """Records of episode slot `slot` dropped by the rate limit."""
        return int(self.bpf["ep_lost"][ctypes.c_int(slot & SLOT_INDEX_MASK)].value)

    def reset_episode_slot(self, slot: int) -> None:
        """A slot given to a new episode starts with an empty loss count and
        a full bucket."""
        self.bpf["ep_lost"][ctypes.c_int(slot & SLOT_INDEX_MASK)] = ctypes.c_ulonglong(0)
        t = self.bpf["ep_rate"]
        t[ctypes.c_int(slot & SLOT_INDEX_MASK)] = t.Leaf()

    def forget_owned_unix(self, owners: Iterable[int]) -> int:
        """Drop the unix socket paths an ended episode bound (owner ids:
        its cgroup ids, 1<<63 | slot)."""
        owners = set(owners)
        t = self.bpf["unix_owned"]
        gone = [k for k, v in t.items() if v.value in owners]
        for k in gone:
            try:
                del t[k]
            except KeyError:
                pass
        return len(gone)

    def owned_unix_paths(self) -> dict[str, int]:
        return {bytes(k.path).rstrip(b"\0").decode("utf-8", "replace"): v.value
                for k, v in self.bpf["unix_owned"].items()}

    # unix gate (episode_tracer/bpf/nodesvc.h unix_verdicts): the loop thread writes verdicts
    def set_unix_verdict(self, tid: int, state: int, h: int, rules: int = 0) -> None:
        t = self.bpf["unix_verdicts"]
        v = t.Leaf()
        v.state, v.hash, v.rules = state, h & 0xFFFFFFFF, rules
        t[ctypes.c_uint(tid)] = v

    def unix_pending(self) -> dict[int, int]:
        """tid -> hash of the unix connects waiting for a verdict."""
        return {k.value: v.hash for k, v in self.bpf["unix_verdicts"].items() if v.state == events.UNIX_V_PENDING}

    def gate_ktime(self, pid: int) -> int | None:
        try:
            return int(self.bpf["gate_ktime"][ctypes.c_uint(pid)].value)
        except KeyError:
            return None

    # exec gate
    def gated(self) -> dict[int, int]:
        return {k.value: v.value for k, v in self.bpf["gated"].items()}

    def release_gated(self, pid: int) -> bool:
        """Remove pid from the gate map (before continuing or killing it)."""
        try:
            del self.bpf["gated"][ctypes.c_uint(pid)]
            return True
        except KeyError:
            return False

    # wire flows (episode_tracer/bpf/wire.h), by socket cookie ---------------------------------
    def set_flow_verdict(self, cookie: int, upto: int, flags: int) -> None:
        t = self.bpf["flow_verdict"]
        v = t.Leaf()
        v.upto, v.flags = min(upto, 0xFFFFFFFF), flags
        t[ctypes.c_ulonglong(cookie)] = v

    def held_flows(self) -> dict[int, int]:
        """cookie -> since when (CLOCK_MONOTONIC ns) its payload is held."""
        return {k.value: v.value for k, v in self.bpf["flow_held"].items()}

    def forget_held(self, cookie: int) -> None:
        try:
            del self.bpf["flow_held"][ctypes.c_ulonglong(cookie)]
        except KeyError:
            pass

    def flow_owner(self, cookie: int) -> dict[str, object] | None:
        try:
            f = self.bpf["flows"][ctypes.c_ulonglong(cookie)]
        except KeyError:
            return None
        return {"pid": f.tgid, "uid": f.uid, "comm": bytes(f.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
                "state": f.state, "cgroup": f.cgroup_id}

    @staticmethod
    def live_socket_cookies() -> set[int]:
        """Cookies of every TCP socket of this network namespace (sock_diag,
        orphans included)."""
        from pyroute2 import DiagSocket

        out: set[int] = set()
        with DiagSocket() as ds:
            ds.bind()
            for fam in (socket.AF_INET, socket.AF_INET6):
                for m in ds.get_sock_stats(family=fam, states=0xFFF):
                    out.add(int(m["idiag_cookie"]))
        return out

    def forget_flows_except(self, live: set[int]) -> int:
        """Drop the kernel entries of released flows whose socket is gone."""
        n = 0
        flows = self.bpf["flows"]
        for k, f in list(flows.items()):
            if k.value in live or not (f.flags & 1):  # AT_FLOW_RELEASED
                continue
            for name in ("flows", "flow_verdict", "flow_bufs", "flow_held"):
                try:
                    del self.bpf[name][ctypes.c_ulonglong(k.value)]
                except KeyError:
                    pass
            n += 1
        return n

    # policy generation flip -------------------------------------------------
    def active_gen(self) -> int:
        return self.get_cfg(Config.GEN) & 1

    def load_enforcement(self, plan: "KernelMaps") -> None:
        """Write a compiled plan into the inactive generation, then flip.

        The kernel reads the generation once per decision, so every decision
        sees either the whole old plan or the whole new one."""
        cur = self.active_gen()
        new = cur ^ 1
        self._clear_gen(new)
        self._write_gen(new, plan)
        self._set_cfg(Config.MONITOR, int(plan.monitor))
        self._set_cfg(Config.GEN, new)
        self._clear_gen(cur)

    def _clear_gen(self, gen: int) -> None:
        for name in ("kill_comms", "gate_comms", "deny4", "deny6", "exc4", "exc6"):
            t = self.bpf[name]
            for k in [k for k in t.keys() if k.gen == gen]:
                del t[k]
        t = self.bpf["unix_deny"]
        for k in [k for k in t.keys() if k.gen == gen]:
            del t[k]
        for name in ("deny_port", "exc_port"):
            t = self.bpf[name]
            for k in [k for k in t.keys() if (k.value >> 16) == gen]:
                del t[k]
        t = self.bpf["slot_mask"]
        for k in [k for k in t.keys() if (k.value >> 24) == gen]:
            del t[k]
        from .egress_maps import clear_gen as egress_clear_gen

        egress_clear_gen(self, gen)
        for word in (Config.GATE_ALL, Config.GATE_ALL_GLOBAL, Config.WIRE_HOLD, Config.GPU_OPEN_KILL,
                     Config.UNIX_DENY):
            self._set_cfg(word, self.get_cfg(word) & ~(1 << gen))
        for base in (Config.DENY_GLOBAL0, Config.ANYPORT0, Config.TCP0, Config.UDP0, Config.EXC_ANYPORT0):
            self._set_cfg(Config(base + gen), 0)

    def _write_gen(self, gen: int, plan: "KernelMaps") -> None:
        for name, entries in (("kill_comms", plan.kill_comms), ("gate_comms", plan.gate_comms)):
            t = self.bpf[name]
            for comm, scope in entries.items():
                k = t.Key()
                k.gen = gen
                k.comm = comm.encode()[: events.COMM_LEN - 1]
                t[k] = ctypes.c_ubyte(scope)
        if plan.gate_all:
            self._set_cfg(Config.GATE_ALL, self.get_cfg(Config.GATE_ALL) | (1 << gen))
        if plan.gate_all_global:
            self._set_cfg(Config.GATE_ALL_GLOBAL, self.get_cfg(Config.GATE_ALL_GLOBAL) | (1 << gen))
        if plan.wire_hold:
            self._set_cfg(Config.WIRE_HOLD, self.get_cfg(Config.WIRE_HOLD) | (1 << gen))
        if plan.gpu_open_kill:
            self._set_cfg(Config.GPU_OPEN_KILL, self.get_cfg(Config.GPU_OPEN_KILL) | (1 << gen))
        for name, entries in (("deny4", plan.deny4), ("deny6", plan.deny6), ("exc4", plan.exc4), ("exc6", plan.exc6)):
            t = self.bpf[name]
            for net, mask in entries.items():
                k = t.Key()
                k.prefixlen = 32 + net.prefixlen
                k.gen = gen
                packed = net.network_address.packed
                ctypes.memmove(ctypes.addressof(k.addr), packed, len(packed))
                t[k] = ctypes.c_ulonglong(mask)
        for name, entries in (("deny_port", plan.ports), ("exc_port", plan.exc_ports)):
            t = self.bpf[name]
            for port, mask in entries.items():
                t[ctypes.c_uint((gen << 16) | port)] = ctypes.c_ulonglong(mask)
        t = self.bpf["unix_deny"]
        for (path, prefix), mask in plan.unix_deny.items():
            k = t.Key()
            raw = path[: events.UNIX_KEY_LEN]
            k.prefixlen = 32 + 8 * (len(raw) + (0 if prefix or len(raw) == events.UNIX_KEY_LEN else 1))
            k.gen = gen
            ctypes.memmove(ctypes.addressof(k.path), raw, len(raw))
            t[k] = ctypes.c_ulonglong(mask)
        if plan.unix_deny:
            self._set_cfg(Config.UNIX_DENY, self.get_cfg(Config.UNIX_DENY) | (1 << gen))
        t = self.bpf["slot_mask"]
        for slot, mask in plan.slot_masks.items():
            t[ctypes.c_uint(slot_key(gen, slot))] = ctypes.c_ulonglong(mask)
        self._set_cfg(Config(Config.DENY_GLOBAL0 + gen), plan.global_mask)
        self._set_cfg(Config(Config.ANYPORT0 + gen), plan.anyport_mask)
        self._set_cfg(Config(Config.TCP0 + gen), plan.tcp_mask)
        self._set_cfg(Config(Config.UDP0 + gen), plan.udp_mask)
        self._set_cfg(Config(Config.EXC_ANYPORT0 + gen), plan.exc_anyport_mask)
        if plan.egress is not None:
            from .egress_maps import write_gen as egress_write_gen

            egress_write_gen(self, gen, plan.egress)

    def set_slot_mask(self, slot: int, mask: int) -> None:
        gen = self.active_gen()
        self.bpf["slot_mask"][ctypes.c_uint(slot_key(gen, slot))] = ctypes.c_ulonglong(mask)

    def clear_slot_mask(self, slot: int) -> None:
        """An ended episode's masks (both policy generations): a leftover
        process with its identity gets the rules of every episode."""
        t = self.bpf["slot_mask"]
        for gen in (0, 1):
            try:
                del t[ctypes.c_uint(slot_key(gen, slot))]
            except KeyError:
                pass

    def slot_masks(self) -> dict[int, int]:
        """identity -> mask of the active generation (tests, doctor)."""
        gen = self.active_gen()
        return {k.value & events.IDENT_MASK: v.value for k, v in self.bpf["slot_mask"].items()
                if k.value >> 24 == gen}


def slot_key(gen: int, slot: int) -> int:
    """slot_mask key: policy generation << 24 | episode identity (episode_tracer/bpf/deny.h)."""
    return (gen << 24) | (slot & events.IDENT_MASK)


@dataclass
class KernelMaps:
    """The kernel's view of a policy: what the enforcement maps hold.

    Built from a policy's kernel plan by episode_tracer.engine.build_kernel_maps.
    In monitor mode (`monitor`) nothing is killed or gated and the deny
    rules only match: the kernel allows and reports a matched sendmsg.
    Masks have one bit per deny rule (bit = rule index)."""

    monitor: bool = False

    kill_comms: dict[str, int] = field(default_factory=dict)  # comm -> 1 episodes / 2 all
    gate_comms: dict[str, int] = field(default_factory=dict)
    gate_all: bool = False
    gate_all_global: bool = False  # every exec on the node (but the tracer's own tree)
    wire_hold: bool = False  # drop undecided episode flows' payload until user space rules (episode_tracer/bpf/wire.h)
    gpu_open_kill: bool = False  # kill episode processes without the GPU right at a GPU device open
    deny4: dict[ipaddress.IPv4Network, int] = field(default_factory=dict)
    deny6: dict[ipaddress.IPv6Network, int] = field(default_factory=dict)
    exc4: dict[ipaddress.IPv4Network, int] = field(default_factory=dict)
    exc6: dict[ipaddress.IPv6Network, int] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    exc_ports: dict[int, int] = field(default_factory=dict)
    slot_masks: dict[int, int] = field(default_factory=dict)
    # unix deny (episode_tracer/bpf/nodesvc.h): (canonical path bytes, is a prefix) -> rule
    # mask, each entry already holding the bits of the prefixes containing it
    unix_deny: dict[tuple[bytes, bool], int] = field(default_factory=dict)
    global_mask: int = 0
    anyport_mask: int = 0
    tcp_mask: int = 0
    udp_mask: int = 0
    exc_anyport_mask: int = 0
    egress: "object | None" = None  # episode_tracer.egress_maps.EgressMaps (egress mode), None: none
