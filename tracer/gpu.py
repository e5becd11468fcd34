"""GPU access through NVML (pynvml, package nvidia-ml-py).

Every NVML call goes through `nvml()`, which turns NVML errors into None
("unknown") instead of exceptions, so a node without a GPU, a driver or
NVML runs the tracer normally.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)
_state: dict[str, Any] = {"init": None, "error": None}


def _pynvml():
    import pynvml  # from nvidia-ml-py

    return pynvml


def nvml(fn_name: str, *args: Any) -> Any:
    """Call pynvml.<fn_name>(*args); None when NVML fails."""
    try:
        nv = _pynvml()
        if _state["init"] is None:
            try:
                nv.nvmlInit()
                _state["init"] = True
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded...
                _state["init"], _state["error"] = False, str(e) or type(e).__name__
        if not _state["init"]:
            return None
        fn: Callable[..., Any] = getattr(nv, fn_name)
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - NVML errors become "unknown"
        log.debug("NVML %s failed: %s", fn_name, e)
        return None


def nvml_status() -> tuple[bool, str]:
    try:
        _pynvml()
    except ImportError:
        return False, "nvidia-ml-py is not installed: GPU watching off"
    n = nvml("nvmlDeviceGetCount")
    if n is None:
        return False, f"NVML unavailable ({_state['error'] or 'no driver'}): GPU watching off"
    drv = nvml("nvmlSystemGetDriverVersion")
    return True, f"{n} GPU(s), driver {drv}"
