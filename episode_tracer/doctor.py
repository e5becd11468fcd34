"""`agent-tracer doctor`: can this node run the tracer, and if not, why."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

TRACEPOINTS = (
    "sched/sched_process_fork", "sched/sched_process_exec", "sched/sched_process_exit",
    "task/task_newtask", "syscalls/sys_enter_execve", "syscalls/sys_enter_execveat",
    "syscalls/sys_exit_execve", "syscalls/sys_enter_connect", "syscalls/sys_exit_connect",
    "syscalls/sys_enter_socket", "syscalls/sys_enter_bind", "syscalls/sys_enter_listen",
    "syscalls/sys_enter_memfd_create", "syscalls/sys_enter_openat", "syscalls/sys_enter_exit_group",
    "signal/signal_deliver", "signal/signal_generate", "raw_syscalls/sys_enter",
)
FIX_INSTALL = "run scripts/install.sh as root (make install)"
HOOK_FIX = {
    "unix_connect": "kernel 6.7+ has the cgroup unix-connect hook; without it unix-socket deny rules "
                    "(episode_tracer/policies/services.toml) only alert, from the connect record, after the connect",
}


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""
    required: bool = True


def _kernel_tuple() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0])
    except (IndexError, ValueError):
        return (0, 0)


def _tracefs() -> Path | None:
    for p in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (p / "events").exists():
            return p
    return None


def run_checks(selftest: bool = True) -> list[Check]:
    out: list[Check] = []
    root = os.geteuid() == 0
    out.append(Check("root", "ok" if root else "fail", f"euid {os.geteuid()}", "run as root (sudo)"))
    kv = _kernel_tuple()
    out.append(Check("kernel", "ok" if kv >= (5, 14) else ("warn" if kv >= (5, 8) else "fail"),
                     platform.release(), "kernel >= 5.8 needed (ring buffer); >= 5.14 for cgroup.kill"))
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    out.append(Check("btf", "ok" if btf else "warn", "present" if btf else "absent (not needed: tracepoints only)",
                     "", required=False))
    tfs = _tracefs()
    if tfs is None:
        try:
            from .probes import ensure_tracefs

            ensure_tracefs()
            tfs = _tracefs()
        except Exception:
            pass
    if tfs is None:
        out.append(Check("tracepoints", "fail", "tracefs not mounted", "mount -t tracefs nodev /sys/kernel/tracing"))
    else:
        missing = [t for t in TRACEPOINTS if not (tfs / "events" / t).exists()]
        out.append(Check("tracepoints", "fail" if missing else "ok",
                         f"missing: {', '.join(missing)}" if missing else f"all {len(TRACEPOINTS)} present",
                         "a kernel with CONFIG_FTRACE_SYSCALLS and the sched/signal/task tracepoints"))
        out.extend(hook_checks(tfs))
    try:
        from .cgroups import cgroup2_mount

        m = cgroup2_mount()
        kill = (m / "cgroup.kill").exists() or any(p.name == "cgroup.kill" for p in m.glob("*/cgroup.kill"))
        out.append(Check("cgroup2", "ok", f"mounted at {m}" + ("" if kill else " (no cgroup.kill)")))
    except Exception as e:
        out.append(Check("cgroup2", "fail", str(e), "mount -t cgroup2 none /sys/fs/cgroup"))
    try:
        import bcc  # noqa: F401

        out.append(Check("bcc", "ok", f"bcc from {Path(bcc.__file__).parent}"))
    except ImportError as e:
        out.append(Check("bcc", "fail", f"cannot import bcc: {e}", FIX_INSTALL + " (python3-bpfcc, venv with --system-site-packages)"))
    build = Path(f"/lib/modules/{platform.release()}/build")
    if build.exists():
        target = os.path.realpath(build)
        generic = platform.release() not in target
        out.append(Check("headers", "ok", f"{build} -> {target}" + (" (generic distro headers)" if generic else "")))
    else:
        out.append(Check("headers", "fail", f"{build} missing", FIX_INSTALL))
    out.append(Check("ringbuf", "ok" if kv >= (5, 8) else "fail", "BPF ring buffer (kernel >= 5.8)",
                     "upgrade the kernel to >= 5.8"))
    out.append(_gpu_check())
    out.append(pins_check())
    out.append(_containers_check())
    if selftest and root and all(c.status != "fail" for c in out if c.required):
        out.extend(_selftest())
    return out


def pins_check() -> Check:
    """The pinned state (episode_tracer/pins.py): whose it is, and whether the next
    start adopts it (same layout) or replaces it."""
    from .pins import PIN_BASE

    if not PIN_BASE.exists() or not any(PIN_BASE.iterdir()):
        return Check("pinned-state", "ok", f"none in {PIN_BASE} (a start attaches a fresh set)", required=False)
    parts = []
    orphaned = False
    for d in sorted(PIN_BASE.iterdir()):
        links = sorted((d / "links").glob("*@*")) if (d / "links").is_dir() else []
        owners = sorted({int(p.name.rsplit("@", 1)[1]) for p in links})
        alive = [pid for pid in owners if Path(f"/proc/{pid}").exists()]
        orphaned |= not alive
        who = f"tracer pid {', '.join(map(str, alive))} running" if alive else \
            f"no tracer running (left by pid {', '.join(map(str, owners)) or '?'}): the kernel enforces alone"
        parts.append(f"layout {d.name}: {len(links)} links, {who}")
    return Check("pinned-state", "warn" if orphaned else "ok", "; ".join(parts),
                 "start the tracer: it adopts a pinned set of its own layout and replaces any other"
                 if orphaned else "", required=False)


# the hooks of membership, exec and GPU opens, and what each one gives
# (the programs need them: a missing one fails like a missing tracepoint)
HOOKS = (
    ("cgroup/cgroup_attach_task", "membership: a member moved out of its episode cgroup stays a member (escape records)"),
    ("cgroup/cgroup_mkdir", "episode cgroups named before anything runs in them"),
    ("sched/sched_process_exec", "exec decisions for every entry: 32-bit int 0x80, execve, execveat, fexecve "
                                 "(argv from /proc of the held task when no syscall record)"),
    ("syscalls/sys_enter_openat2", "GPU device opens through openat2"),
    ("syscalls/sys_enter_open", "GPU device opens through open(2)"),
)


def hook_checks(tfs: Path) -> list[Check]:
    from .probes import tracepoint_has_field

    out = []
    for tp, gives in HOOKS:
        have = (tfs / "events" / tp).exists()
        out.append(Check(f"hook:{tp.split('/')[1]}", "ok" if have else "fail", gives if have else f"missing: {gives}",
                         "a kernel with this tracepoint (cgroup tracepoints: 4.x; openat2: 5.6)"))
    gd = tracepoint_has_field("sched", "sched_process_exit", "group_dead")
    out.append(Check("hook:exit_group_dead", "ok" if gd else "warn",
                     "a thread-group leader that exits early does not end the tracking of its threads" if gd else
                     "no group_dead (kernel < 6.16): a process stops being tracked when its leader exits, "
                     "threads that outlive it leave the episode's scope",
                     "kernel >= 6.16", required=False))
    return out


def _gpu_check() -> Check:
    try:
        from .gpu import nvml_status

        ok, detail = nvml_status()
    except ImportError:
        ok, detail = False, "GPU watcher not available"
    return Check("gpu", "ok" if ok else "warn", detail, "install the NVIDIA driver (libnvidia-ml) to watch GPUs",
                 required=False)


def _selftest() -> list[Check]:
    """Load the programs for real and prove each enforcement path."""
    from .runtime import Runtime, RunOptions

    rt = Runtime(RunOptions(log=None, control_socket=None, verdict_dir=None, preexisting_sockets=False))
    out = []
    try:
        ready = rt.start()
        out.append(Check("bpf_load", "ok", f"{len(ready['programs'])} programs attached, compiled in {ready['compile_s']}s"))
        wire = rt.probes.wire_error if rt.probes is not None else None
        out.append(Check("cgroup_skb", "fail" if wire else "ok",
                         wire or "cgroup_skb egress + sock release programs attached at the cgroup2 root (bpf links)",
                         "a kernel with cgroup_skb programs and bpf links (>= 5.9 for sock release): without "
                         "them wire inspection (protocol rules) is off", required=False))
        for name, res in sorted(ready.get("hooks", {}).items()):
            out.append(Check(f"hook:{name}", "ok" if res == "ok" else "warn", res,
                             HOOK_FIX.get(name, "see the detail"), required=False))
        progs = set(ready["programs"])
        for name, what in (("cgroup:at_recvmsg4", "egress mode DNS redirect (recvmsg4/6 source rewrite)"),
                           ("cgroup:at_post_bind4", "egress mode local listener owners (post_bind4/6)"),
                           ("cgroup:at_udp_egress", "datagram inspection (cgroup_skb egress)")):
            have = name in progs
            out.append(Check(f"hook:{name.split(':', 1)[1]}", "ok" if have else "fail",
                             f"{what}: {'attached' if have else 'not attached'}", FIX_INSTALL))
        for path, res in sorted(ready.get("selftest", {}).items()):
            out.append(Check(f"enforce:{path}", "ok" if res.startswith("ok") else "fail", res,
                             "see the detail; enforcement on this path is not claimed"))
        lost = rt.lost_total()
        out.append(Check("lost_events", "ok" if lost == 0 else "warn", f"{lost} lost during the self-test", required=False))
    except Exception as e:
        out.append(Check("bpf_load", "fail", str(e).splitlines()[0][:300], FIX_INSTALL))
    finally:
        rt.close()
    return out


def _containers_check() -> Check:
    """Container episodes (docs/episodes.md): which runtime can say a
    container's labels; none reachable means path rules only."""
    from .sources import doctor_line, parse_config

    try:
        from . import config

        table = config.load().values.get("containers") if config.CONFIG_FILE.exists() else None
    except Exception:  # a bad config file is `config check`'s to report
        table = None
    try:
        ok, detail = doctor_line(parse_config(table or {}))
    except Exception as e:
        return Check("containers", "warn", f"cannot check container runtimes: {e}", required=False)
    status = "warn" if "no container runtime reachable" in detail else ("ok" if ok else "warn")
    return Check("containers", status, detail,
                 "start the runtime's API socket (podman system service, dockerd) or rely on "
                 "[[containers.rules]] path patterns (docs/episodes.md)", required=False)


def print_report(checks: list[Check], as_json: bool = False) -> bool:
    ok = all(c.status != "fail" for c in checks if c.required)
    if as_json:
        import orjson

        print(orjson.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, option=orjson.OPT_INDENT_2).decode())
        return ok
    from rich.console import Console
    from rich.table import Table

    t = Table("check", "status", "detail", "fix", title="agent-tracer doctor")
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for c in checks:
        t.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", c.detail, "" if c.status == "ok" else c.fix)
    con = Console()
    con.print(t)
    con.print("[green]ready[/]" if ok else "[bold red]not ready: fix the failed checks above[/]")
    return ok
