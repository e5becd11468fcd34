"""GPU access through NVML (pynvml, package nvidia-ml-py).

Every NVML call goes through `nvml()`, which turns NVML errors into None
("unknown") instead of exceptions, so a node without a GPU, a driver or
NVML runs the tracer normally. `use_backend()` swaps the pynvml module for
another object with the same functions: the tests' fake NVML
(tests/gpu_fake.py) sits exactly here, behind the same helper.

`sample()` reads one sample of every GPU and of every process on them;
episode_tracer.gpu_watch turns samples into records.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)
_state: dict[str, Any] = {"init": None, "error": None, "backend": None}
_lock = threading.Lock()
MIB = 1024 * 1024


def _pynvml():
    if _state["backend"] is not None:
        return _state["backend"]
    import pynvml  # from nvidia-ml-py

    return pynvml


def use_backend(backend: Any | None) -> None:
    """Use `backend` (an object with pynvml's functions) instead of pynvml;
    None goes back to pynvml. NVML is initialised again on the next call."""
    with _lock:
        _state.update(init=None, error=None, backend=backend)


def _init(nv: Any) -> bool:
    with _lock:
        if _state["init"] is None:
            try:
                nv.nvmlInit()
                _state["init"] = True
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded...
                _state["init"], _state["error"] = False, str(e) or type(e).__name__
        return bool(_state["init"])


def nvml(fn_name: str, *args: Any) -> Any:
    """Call pynvml.<fn_name>(*args); None when NVML fails."""
    try:
        nv = _pynvml()
        if not _init(nv):
            return None
        fn: Callable[..., Any] = getattr(nv, fn_name)
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - NVML errors become "unknown"
        log.debug("NVML %s failed: %s", fn_name, e)
        return None


def nvml_error() -> str | None:
    """Why NVML could not be initialised (None when it was, or not tried)."""
    return _state["error"]


def nvml_status() -> tuple[bool, str]:
    try:
        _pynvml()
    except ImportError:
        return False, "nvidia-ml-py is not installed: GPU watching off"
    n = nvml("nvmlDeviceGetCount")
    if n is None:
        return False, f"NVML unavailable ({_state['error'] or 'no driver'}): GPU watching off"
    if n == 0:
        return False, "NVML reports no GPU: GPU watching off"
    drv = _text(nvml("nvmlSystemGetDriverVersion"))
    return True, f"{n} GPU(s), driver {drv}"


# --------------------------------------------------------------- sampling
@dataclass
class DeviceSample:
    index: int
    uuid: str | None
    name: str | None
    util: float | None  # % of time a kernel ran (NVML utilization.gpu)
    mem_util: float | None  # % of time memory was read or written
    mem_used_mib: float | None
    mem_total_mib: float | None
    power_w: float | None


@dataclass
class ProcSample:
    pid: int
    gpu_index: int
    gpu_uuid: str | None
    used_mib: float | None  # None: listed, memory not reported (NVML_VALUE_NOT_AVAILABLE)
    sm_util: float | None  # mean of the process's utilisation samples since the last sample
    mem_util: float | None


@dataclass
class Sample:
    ts: float
    status: str  # "ok" or why there is nothing to sample
    devices: list[DeviceSample] = field(default_factory=list)
    procs: list[ProcSample] = field(default_factory=list)


def _text(v: Any) -> str | None:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v if isinstance(v, str) else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v


def _mib(v: Any) -> float | None:
    v = _num(v)
    return None if v is None else round(v / MIB, 1)


class Sampler:
    """Reads samples through `nvml()`. Keeps, per GPU, the timestamp of the
    last process-utilisation sample seen, so that each sample covers the
    time since the previous one."""

    def __init__(self, call: Callable[..., Any] = nvml, clock: Callable[[], float] = time.time):
        self.call = call
        self.clock = clock
        self._last_util_ts: dict[int, int] = {}
        self._handles: dict[int, Any] = {}
        self._static: dict[int, tuple[str | None, str | None]] = {}

    def status(self) -> str:
        try:
            _pynvml()
        except ImportError:
            return "nvidia-ml-py is not installed"
        return "ok"

    def sample(self) -> Sample:
        ts = self.clock()
        why = self.status()
        if why != "ok":
            return Sample(ts, why)
        n = self.call("nvmlDeviceGetCount")
        if n is None:
            if _state["init"] is False:
                return Sample(ts, f"NVML unavailable ({nvml_error() or 'no driver'})")
            return Sample(ts, "NVML error: cannot count GPUs")  # mid-run: keep trying
        if n == 0:
            return Sample(ts, "no GPU")
        s = Sample(ts, "ok")
        for i in range(n):
            h = self._handles.get(i)
            if h is None:
                h = self.call("nvmlDeviceGetHandleByIndex", i)
                if h is None:
                    continue
                self._handles[i] = h
            self._device(s, i, h)
        return s

    def _device(self, s: Sample, i: int, h: Any) -> None:
        call = self.call
        if i not in self._static:
            uuid, name = _text(call("nvmlDeviceGetUUID", h)), _text(call("nvmlDeviceGetName", h))
            if uuid is not None:
                self._static[i] = (uuid, name)
        else:
            uuid, name = self._static[i]
        util = call("nvmlDeviceGetUtilizationRates", h)
        mem = call("nvmlDeviceGetMemoryInfo", h)
        power = _num(call("nvmlDeviceGetPowerUsage", h))
        s.devices.append(DeviceSample(
            index=i, uuid=uuid, name=name,
            util=_num(getattr(util, "gpu", None)), mem_util=_num(getattr(util, "memory", None)),
            mem_used_mib=_mib(getattr(mem, "used", None)), mem_total_mib=_mib(getattr(mem, "total", None)),
            power_w=None if power is None else round(power / 1000.0, 1),
        ))
        used: dict[int, float | None] = {}
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for p in call(fn, h) or ():
                pid = getattr(p, "pid", None)
                if not isinstance(pid, int):
                    continue
                mib = _mib(getattr(p, "usedGpuMemory", None))
                if pid in used and used[pid] is not None:
                    mib = (used[pid] or 0.0) + (mib or 0.0)  # compute and graphics contexts
                used[pid] = mib
        sm: dict[int, list[float]] = {}
        mu: dict[int, list[float]] = {}
        last = self._last_util_ts.get(i, 0)
        newest = last
        for u in call("nvmlDeviceGetProcessUtilization", h, last) or ():
            pid, t = getattr(u, "pid", None), getattr(u, "timeStamp", 0)
            if not isinstance(pid, int) or not isinstance(t, int) or t <= last:
                continue
            newest = max(newest, t)
            if _num(getattr(u, "smUtil", None)) is not None:
                sm.setdefault(pid, []).append(u.smUtil)
            if _num(getattr(u, "memUtil", None)) is not None:
                mu.setdefault(pid, []).append(u.memUtil)
        self._last_util_ts[i] = newest
        for pid in sorted(set(used) | set(sm) | set(mu)):
            s.procs.append(ProcSample(
                pid=pid, gpu_index=i, gpu_uuid=uuid, used_mib=used.get(pid),
                sm_util=_mean(sm.get(pid)), mem_util=_mean(mu.get(pid)),
            ))


def _mean(v: list[float] | None) -> float | None:
    return round(sum(v) / len(v), 1) if v else None
