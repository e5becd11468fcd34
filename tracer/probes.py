"""Probe loader: the only module that imports bcc.

Compiles bpf/tracer.c with settings passed as -D flags, attaches the
tracepoints and the cgroup sock_addr programs, drains the ring buffer, and
gives the rest of the tracer a narrow API over the kernel maps.
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import events
from .cgroups import cgroup2_mount, cgroup_id
from .events import Config, Counter, Kind
from .paths import BPF_DIR

log = logging.getLogger(__name__)

SOCK_ADDR_PROGS = {
    "at_connect4": "CGROUP_INET4_CONNECT",
    "at_connect6": "CGROUP_INET6_CONNECT",
    "at_sendmsg4": "CGROUP_UDP4_SENDMSG",
    "at_sendmsg6": "CGROUP_UDP6_SENDMSG",
}
# egress mode and datagram inspection (bpf/egress.h, bpf/udp.h): program ->
# (bcc program type attribute, attach type), attached like the sock_addr ones
EGRESS_PROGS = {
    "at_recvmsg4": ("CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG"),
    "at_recvmsg6": ("CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG"),
    "at_post_bind4": ("CGROUP_SOCK", "CGROUP_INET4_POST_BIND"),
    "at_post_bind6": ("CGROUP_SOCK", "CGROUP_INET6_POST_BIND"),
    "at_udp_egress": ("CGROUP_SKB", "CGROUP_INET_EGRESS"),
}
BPF_F_ALLOW_MULTI = 2
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
    extra_cflags: list[str] = field(default_factory=list)


def episode_root() -> Path:
    return cgroup2_mount() / EPISODE_DIR


def episode_level(root: Path | None = None) -> int:
    """cgroup level of <cgroup2>/agent-tracer/<ID> (the cgroup2 root is 0)."""
    root = root or episode_root()
    return len(root.relative_to(cgroup2_mount()).parts) + 1


_LOCAL_INCLUDE = re.compile(r'^#include "([a-z_]+\.h)"$', re.M)


def bpf_source() -> str:
    """bpf/tracer.c with its topic headers inlined (events.h stays an
    include): bcc generates the TRACEPOINT_PROBE argument structs from the
    main file's text only, so the programs must all be in the text it is
    given. One compilation unit, as before."""
    def inline(m: re.Match) -> str:
        name = m.group(1)
        if name == "events.h":
            return m.group(0)
        return f"/* ---- bpf/{name} ---- */\n" + _LOCAL_INCLUDE.sub(inline, (BPF_DIR / name).read_text())
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
            *cfg.extra_cflags,
        ]
        t0 = time.monotonic()
        try:
            self.bpf = BPF(text=bpf_source().encode(), cflags=cflags)
        except Exception as e:
            raise ProbeError(f"compiling/loading bpf/tracer.c failed: {e}") from e
        self.compile_s = time.monotonic() - t0
        _malloc_trim()  # give back the compiler's heap (about 37 MB stays mapped otherwise)
        self.programs: list[str] = sorted(
            p.decode() if isinstance(p, bytes) else str(p) for p in self.bpf.tracepoint_fnname_map()
        ) if hasattr(self.bpf, "tracepoint_fnname_map") else []
        self._sock_attached: list[tuple[object, int, int]] = []
        self._cg_root_fd = -1
        self.config_map = self.bpf["config"]
        self._set_cfg(Config.EPISODE_ROOT, self.episode_root_id)
        # the tracer's own process tree is never gated outside episodes
        self.bpf["self_tree"][ctypes.c_uint(os.getpid())] = ctypes.c_ubyte(1)
        for i, prefix in enumerate(cfg.gpu_prefixes[: events.GPU_PREFIX_MAX]):
            self._set_gpu_prefix(i, prefix)
        self._rb_cb = self._make_callback(on_record)
        self._open_ring_buffer(self.bpf["events"], self._rb_cb)
        if cfg.attach_sock_addr:
            self._attach_sock_addr(BPFAttachType)
        self.attach_s = time.monotonic() - t0

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _make_callback(on_record: Callable[[memoryview], None]):
        """The ring-buffer callback: on_record gets a memoryview of the
        record in the ring buffer itself (no copy). It is valid only during
        the call: decode copies what it keeps."""
        arrays: dict[int, type] = {}  # c_char * size, per record size (a few kinds)

        def cb(_ctx, data, size):
            t = arrays.get(size)
            if t is None:
                t = arrays[size] = ctypes.c_char * size
            on_record(memoryview(t.from_address(data)))
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
                BPF.attach_func(fn, self._cg_root_fd, at, BPF_F_ALLOW_MULTI)
                self._sock_attached.append((fn, self._cg_root_fd, at))
            for fn_name, (prog_type, type_name) in EGRESS_PROGS.items():
                at = getattr(attach_types, type_name)
                fn = self.bpf.load_func(fn_name, getattr(BPF, prog_type), attach_type=at)
                BPF.attach_func(fn, self._cg_root_fd, at, BPF_F_ALLOW_MULTI)
                self._sock_attached.append((fn, self._cg_root_fd, at))
        except Exception as e:
            self._detach_sock_addr()
            raise ProbeError(f"attaching cgroup sock_addr programs failed: {e}") from e

    def _detach_sock_addr(self) -> None:
        BPF = self._BPF
        for fn, fd, at in reversed(self._sock_attached):
            try:
                BPF.detach_func(fn, fd, at)
            except Exception as e:  # pragma: no cover
                log.warning("detaching %s: %s", fn, e)
        self._sock_attached.clear()
        if self._cg_root_fd >= 0:
            os.close(self._cg_root_fd)
            self._cg_root_fd = -1

    def attached_programs(self) -> list[str]:
        tps = [f"tracepoint:{k}" for k in sorted(self._tracepoints())]
        socks = [f"cgroup:{n}" for n in (*SOCK_ADDR_PROGS, *EGRESS_PROGS) if self._sock_attached]
        return tps + socks

    def _tracepoints(self) -> list[str]:
        try:
            return [
                (tp.decode() if isinstance(tp, bytes) else str(tp)) for tp in self.bpf.tracepoint_fds
            ]
        except Exception:  # pragma: no cover
            return []

    def close(self) -> None:
        self._detach_sock_addr()
        try:
            self.bpf.cleanup()
        except Exception as e:  # pragma: no cover
            log.warning("bcc cleanup: %s", e)

    # ----------------------------------------------------------------- drain
    def poll(self, timeout_ms: int = 100) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def consume(self) -> None:
        self.bpf.ring_buffer_consume()

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

    def add_episode_cgroup(self, cg_id: int, slot: int) -> None:
        self.bpf["episode_cgroups"][ctypes.c_ulonglong(cg_id)] = ctypes.c_uint(slot)

    def remove_episode_cgroup(self, cg_id: int) -> None:
        try:
            del self.bpf["episode_cgroups"][ctypes.c_ulonglong(cg_id)]
        except KeyError:
            pass

    def track_pid(self, pid: int, source: int, slot: int = 0) -> None:
        self.bpf["tracked"][ctypes.c_uint(pid)] = ctypes.c_uint((slot << 8) | source)

    def tracked_pids(self) -> dict[int, int]:
        return {k.value: v.value for k, v in self.bpf["tracked"].items()}

    def untrack_pid(self, pid: int) -> None:
        try:
            del self.bpf["tracked"][ctypes.c_uint(pid)]
        except KeyError:
            pass

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
        for name in ("slot_mask", "deny_port", "exc_port"):
            t = self.bpf[name]
            for k in [k for k in t.keys() if (k.value >> 16) == gen]:
                del t[k]
        from .egress_maps import clear_gen as egress_clear_gen

        egress_clear_gen(self, gen)
        for word in (Config.GATE_ALL, Config.GATE_ALL_GLOBAL, Config.WIRE_HOLD):
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
        t = self.bpf["slot_mask"]
        for slot, mask in plan.slot_masks.items():
            t[ctypes.c_uint((gen << 16) | slot)] = ctypes.c_ulonglong(mask)
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
        self.bpf["slot_mask"][ctypes.c_uint((gen << 16) | slot)] = ctypes.c_ulonglong(mask)


@dataclass
class KernelMaps:
    """The kernel's view of a policy: what the enforcement maps hold.

    Built from a policy's kernel plan by tracer.engine.build_kernel_maps.
    In monitor mode (`monitor`) nothing is killed or gated and the deny
    rules only match: the kernel allows and reports a matched sendmsg.
    Masks have one bit per deny rule (bit = rule index)."""

    monitor: bool = False

    kill_comms: dict[str, int] = field(default_factory=dict)  # comm -> 1 episodes / 2 all
    gate_comms: dict[str, int] = field(default_factory=dict)
    gate_all: bool = False
    gate_all_global: bool = False  # every exec on the node (but the tracer's own tree)
    wire_hold: bool = False  # stop the writer after a candidate first write until user space rules
    deny4: dict[ipaddress.IPv4Network, int] = field(default_factory=dict)
    deny6: dict[ipaddress.IPv6Network, int] = field(default_factory=dict)
    exc4: dict[ipaddress.IPv4Network, int] = field(default_factory=dict)
    exc6: dict[ipaddress.IPv6Network, int] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    exc_ports: dict[int, int] = field(default_factory=dict)
    slot_masks: dict[int, int] = field(default_factory=dict)
    global_mask: int = 0
    anyport_mask: int = 0
    tcp_mask: int = 0
    udp_mask: int = 0
    exc_anyport_mask: int = 0
    egress: "object | None" = None  # tracer.egress_maps.EgressMaps (egress mode), None: none
