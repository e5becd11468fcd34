"""A fake NVML at the one boundary the tracer has (episode_tracer.gpu.use_backend):
an object with the pynvml functions the sampler calls, replaying a recorded
sequence of samples (tests/data/gpu/*.json). Everything above it (sampler,
watcher, attribution, policy, durations) is the real code.

A recording is {"gpus": [{"uuid", "name", "mem_total_mib"}], "steps": [step...]};
a step is {"t": seconds, "gpus": {index: {"util", "mem_util", "mem_used_mib",
"power_w"}}, "procs": [{"pid" | "pid_of", "gpu", "used_mib", "sm", "mem"}],
"errors": {"fn": "ErrorName"}, "repeat": n}. "pid_of" names a pid the test fills in
(a real process it started). A step's errors make those NVML functions
raise (an NVMLError, like the real library).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MIB = 1024 * 1024
DATA = Path(__file__).parent / "data" / "gpu"


class NVMLError(Exception):
    pass


class FakeNvml:
    def __init__(self, recording: dict[str, Any] | str, pids: dict[str, int] | None = None,
                 init_error: str | None = None):
        if isinstance(recording, str):
            recording = json.loads((DATA / recording).read_text())
        steps = []
        for st in recording["steps"]:  # {"repeat": n, ...}: the same sample n times
            steps.extend([st] * st.get("repeat", 1))
        self.rec = {**recording, "steps": steps}
        self.pids = pids or {}
        self.init_error = init_error
        self.step_i = 0
        self.calls: list[str] = []
        self.util_ts = 0

    # the test moves time forward
    def step(self, i: int | None = None) -> None:
        self.step_i = self.step_i + 1 if i is None else i

    @property
    def cur(self) -> dict[str, Any]:
        steps = self.rec["steps"]
        return steps[min(self.step_i, len(steps) - 1)]

    def _call(self, name: str) -> None:
        self.calls.append(name)
        err = self.cur.get("errors", {}).get(name) or self.cur.get("errors", {}).get("*")
        if err:
            raise NVMLError(err)

    def _pid(self, p: dict[str, Any]) -> int:
        return p["pid"] if "pid" in p else self.pids[p["pid_of"]]

    # ---- pynvml functions
    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return "580.00-fake"

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.rec["gpus"])

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._call("nvmlDeviceGetHandleByIndex")
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        self._call("nvmlDeviceGetUUID")
        return self.rec["gpus"][h]["uuid"]

    def nvmlDeviceGetName(self, h: int) -> str:
        self._call("nvmlDeviceGetName")
        return self.rec["gpus"][h]["name"]

    def _g(self, h: int) -> dict[str, Any]:
        return self.cur.get("gpus", {}).get(str(h), {})

    def nvmlDeviceGetUtilizationRates(self, h: int):
        self._call("nvmlDeviceGetUtilizationRates")
        g = self._g(h)
        return SimpleNamespace(gpu=g.get("util", 0), memory=g.get("mem_util", 0))

    def nvmlDeviceGetMemoryInfo(self, h: int):
        self._call("nvmlDeviceGetMemoryInfo")
        g = self._g(h)
        total = self.rec["gpus"][h]["mem_total_mib"] * MIB
        used = g.get("mem_used_mib", 0) * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._call("nvmlDeviceGetPowerUsage")
        return int(self._g(h).get("power_w", 60) * 1000)

    def _procs(self, h: int, graphics: bool) -> list[Any]:
        out = []
        for p in self.cur.get("procs", []):
            if p.get("gpu", 0) != h or bool(p.get("graphics")) != graphics or p.get("used_mib", 0) is False:
                continue
            used = p.get("used_mib")
            out.append(SimpleNamespace(pid=self._pid(p), usedGpuMemory=None if used is None else int(used * MIB)))
        return out

    def nvmlDeviceGetComputeRunningProcesses(self, h: int):
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return self._procs(h, False)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int):
        self._call("nvmlDeviceGetGraphicsRunningProcesses")
        return self._procs(h, True)

    def nvmlDeviceGetProcessUtilization(self, h: int, last_seen: int):
        self._call("nvmlDeviceGetProcessUtilization")
        self.util_ts += 1000
        out = []
        for p in self.cur.get("procs", []):
            if p.get("gpu", 0) != h or p.get("sm") is None:
                continue
            sms = p["sm"] if isinstance(p["sm"], list) else [p["sm"]]
            for k, sm in enumerate(sms):
                out.append(SimpleNamespace(pid=self._pid(p), timeStamp=self.util_ts + k, smUtil=sm,
                                           memUtil=p.get("mem", 0), encUtil=0, decUtil=0))
        if not out:
            raise NVMLError("Not Found")  # what NVML says when there is no new sample
        return out
