"""The node's configuration: /etc/agent-tracer/config.toml, then
/etc/agent-tracer/config.d/*.toml in lexical order (later wins), then the
command line's flags. Strict like the policies: an unknown key or a bad
value is an error naming the file and the key.

Pure: `load()` reads files and returns a `Config` (values plus where each
came from) or raises `ConfigError` with every problem found; nothing here
touches the running tracer. `agent-tracer config show` prints a Config,
`agent-tracer run` turns one into `RunOptions`, and a reload (SIGHUP, or a
changed file) builds a new one and keeps the running one when it is bad.
"""
from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .limits import EPISODE_BURST, EPISODE_RATE
from .paths import CONTROL_SOCKET

CONFIG_DIR = Path("/etc/agent-tracer")
CONFIG_FILE = CONFIG_DIR / "config.toml"
SITE_POLICY_DIR = CONFIG_DIR / "policies.d"

DEFAULT = "default"


class ConfigError(ValueError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))


# ------------------------------------------------------------------ checks
# each returns the value to use or raises ValueError with what is wrong

def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo}..{hi}")
        return v
    return check


def _float(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"expected a number, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo}..{hi}")
        return float(v)
    return check


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
        return v
    return check


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def _path_or_none(v: Any) -> str | None:
    if v == "" or v is False:
        return None
    return _str(v)


def _ringbuf_pages(v: Any) -> int:
    v = _int(1, 1 << 18)(v)
    if v & (v - 1):
        raise ValueError(f"{v} is not a power of two")
    return v


def _paths(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"expected a list of paths, got {v!r}")
    return list(v)


def _uids(v: Any) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise ValueError(f"expected a list of non-root uids (integers > 0), got {v!r}")
    return list(v)


def _addrs(v: Any) -> list[str]:
    """A list of IP addresses (strings); [] means the default."""
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"expected a list of IP address strings, got {v!r}")
    out = []
    for x in v:
        try:
            out.append(str(ipaddress.ip_address(x)))
        except ValueError:
            raise ValueError(f"{x!r} is not an IP address") from None
    return out


def parse_listen(v: Any) -> tuple[str, int] | None:
    """'HOST:PORT' ('[::1]:9464' for IPv6; port 0 picks a free one) or '' for off."""
    if v in ("", None, False):
        return None
    v = _str(v)
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {v!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"expected HOST:PORT with a host (0.0.0.0 for every address), got {v!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(c.isalnum() or c in ".-" for c in host):
            raise ValueError(f"{host!r} is not an address or host name") from None
    return host, int(port)


def _listen(v: Any) -> str:
    parse_listen(v)
    return v or ""


_FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
               **{f"local{i}": 16 + i for i in range(8)}}
_SEVERITIES = ("info", "low", "medium", "high", "critical")

# output type -> key -> (check, default, required)
OUTPUT_KEYS: dict[str, dict[str, tuple[Callable[[Any], Any], Any, bool]]] = {
    "falco": {"url": (_str, None, True)},
    "webhook": {"url": (_str, None, True)},
    "syslog": {"socket": (_str, "/dev/log", False), "facility": (_choice(*_FACILITIES), "daemon", False),
               "app_name": (_str, "agent-tracer", False)},
}
OUTPUT_COMMON: dict[str, tuple[Callable[[Any], Any], Any, bool]] = {
    "type": (_choice(*OUTPUT_KEYS), None, True),
    "name": (_str, None, False),
    "min_severity": (_choice(*_SEVERITIES), "info", False),
    "queue": (_int(1, 1_000_000), 10_000, False),
    "timeout": (_float(0.1, 300), 5.0, False),
    "retries": (_int(0, 100), 5, False),
    "backoff": (_float(0.0, 60), 0.5, False),
    "headers": (lambda v: _headers(v), {}, False),
}


def _headers(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError(f"expected a table of strings, got {v!r}")
    return dict(v)


def _outputs(v: Any) -> list[dict[str, Any]]:
    """[[outputs]] tables; errors name the table's index and key."""
    if not isinstance(v, list):
        raise ValueError("expected [[outputs]] tables")
    out, errs = [], []
    for i, t in enumerate(v):
        if not isinstance(t, dict):
            errs.append(f"outputs[{i}]: expected a table")
            continue
        typ = t.get("type")
        if typ not in OUTPUT_KEYS:
            errs.append(f"outputs[{i}].type: expected one of {', '.join(OUTPUT_KEYS)}, got {typ!r}")
            continue
        keys = {**OUTPUT_COMMON, **OUTPUT_KEYS[typ]}
        o: dict[str, Any] = {}
        for k in t:
            if k not in keys:
                errs.append(f"outputs[{i}].{k}: unknown key for a {typ} output (known: {', '.join(sorted(keys))})")
        for k, (check, default, required) in keys.items():
            if k in t:
                try:
                    o[k] = check(t[k])
                except ValueError as e:
                    errs.append(f"outputs[{i}].{k}: {e}")
            elif required:
                errs.append(f"outputs[{i}].{k}: required for a {typ} output")
            else:
                o[k] = default
        if typ in ("falco", "webhook") and isinstance(o.get("url"), str) and not o["url"].startswith(("http://", "https://")):
            errs.append(f"outputs[{i}].url: expected an http:// or https:// URL, got {o['url']!r}")
        o.setdefault("name", None)
        o["name"] = o["name"] or f"{typ}-{i}"
        out.append(o)
    names = [o["name"] for o in out]
    for n in sorted({n for n in names if names.count(n) > 1}):
        errs.append(f"outputs: name {n!r} is used twice")
    if errs:
        raise ValueError("; ".join(errs))
    return out


def _containers(v: Any) -> dict[str, Any]:
    from .sources import check_config

    return check_config(v)


@dataclass(frozen=True)
class Key:
    name: str
    check: Callable[[Any], Any]
    default: Any
    help: str
    flag: str | None = None  # the `run` option that overrides it
    reload: bool = False  # applied by a reload (else: restart needed)


KEYS: dict[str, Key] = {k.name: k for k in [
    Key("log", _path_or_none, None, "JSONL records here ('-' is stdout, '' none)", "--log"),
    Key("log_max_bytes", _int(0, 1 << 50), 0, "rotate the log at this size in bytes (0: never; SIGUSR1 reopens)",
        "--log-max-bytes"),
    Key("log_keep", _int(1, 1000), 5, "rotated log files kept (PATH.1 newest .. PATH.N)", "--log-keep"),
    Key("policy_dirs", _paths, None, "policy files or directories (default: the packaged packs)", "--policy-dir",
        reload=True),
    Key("site_policy_dir", _path_or_none, str(SITE_POLICY_DIR),
        "site policies loaded after the policy_dirs when the directory exists ('' off)", "--site-policy-dir",
        reload=True),
    Key("scope", _choice("episodes", "all"), "episodes", "episodes: only episode processes emit; all: every process",
        "--all"),
    Key("monitor", _bool, False, "enforce nothing, alerts say what would have been done", "--monitor"),
    Key("ringbuf_pages", _ringbuf_pages, 2048, "ring buffer size in 4 KiB pages (power of two)", "--ringbuf-pages"),
    Key("control_socket", _path_or_none, str(CONTROL_SOCKET), "control socket for top and episode commands ('' off)",
        "--control-socket"),
    Key("trainer_group", _path_or_none, None,
        "group (name or gid) whose members may use the trainer API without root ('' none; docs/episodes.md)",
        "--trainer-group"),
    Key("trainer_uids", _uids, [], "uids with the trainer API's rights without root", "--trainer-uid"),
    Key("gate_timeout", _float(0.05, 60), 2.0, "seconds a gated exec may wait for its verdict", "--gate-timeout",
        reload=True),
    Key("gate_default", _choice("kill", "allow"), "kill", "verdict for an episode's gated exec that timed out",
        "--gate-default", reload=True),
    Key("gpu_interval", _float(0, 3600), 1.0, "seconds between GPU samples (0: off)", "--gpu-interval"),
    Key("relay_interval", _float(0, 3600), 2.0, "seconds between reverse-tunnel shape scans (0: off)",
        "--relay-interval", reload=True),
    Key("relay_min_age", _float(0, 3600), 5.0, "seconds both legs of a relay must have been seen",
        "--relay-min-age", reload=True),
    Key("stats_interval", _float(0.1, 3600), 1.0, "seconds between stats records", "--stats-interval", reload=True),
    Key("metrics_listen", _listen, "", "HOST:PORT for Prometheus /metrics and /healthz ('' off)", "--metrics-listen"),
    Key("verdict_dir", _path_or_none, "/run/agent-tracer/verdicts", "per-episode verdict files ('' off)",
        "--verdict-dir"),
    Key("verdict_retention", _float(0, 10 * 365 * 86400), 86400.0,
        "seconds a finished episode's verdict file is kept (0: forever)", "--verdict-retention", reload=True),
    Key("outputs", _outputs, [], "[[outputs]] alert outputs: falco (HTTP), webhook (HTTP), syslog"),
    Key("containers", _containers, {}, "[containers] episodes from container cgroups: label, [[containers.rules]], "
        "runtime sockets, state dirs (docs/episodes.md)"),
    Key("gate_proc_grace", _float(0, 60), 0.5,
        "seconds after which a held exec whose record has not come is judged from /proc (0: off)",
        "--gate-proc-grace"),
    Key("wire_timeout", _float(0.1, 60), 3.0, "seconds an undecided episode flow may stay held before it is denied",
        "--wire-timeout"),
    Key("max_episodes", _int(1, 8190), 4096,
        "concurrent episodes with a kernel identity; a new one beyond is refused (docs/scale.md)", "--max-episodes"),
    Key("ended_keep", _int(0, 1_000_000), 200, "ended episodes the live view (top, episode list) keeps",
        "--ended-keep"),
    Key("ended_keep_s", _float(0, 7 * 86400), 600.0, "seconds an ended episode stays in the live view",
        "--ended-keep-s"),
    Key("episode_rate", _int(0, 1 << 31), EPISODE_RATE,
        "records per second one episode may send (kernel token bucket; excess counted lost; 0: off)",
        "--episode-rate"),
    Key("episode_burst", _int(1, 1 << 31), EPISODE_BURST, "burst of the per-episode rate limit (records)",
        "--episode-burst"),
    Key("dns_upstreams", _addrs, [], "egress mode: resolvers the DNS stub forwards to ([]: /etc/resolv.conf)",
        "--dns-upstream"),
    Key("dns_ttl_grace", _float(0, 300), 2.0, "egress mode: seconds an answered address stays allowed past its TTL",
        "--dns-ttl-grace"),
    # pinned state (docs/faults.md)
    Key("pin_state", _bool, True, "pin maps and links in /sys/fs/bpf/agent-tracer: the kernel keeps enforcing "
        "while the tracer is down and the next start adopts it", "--pin-state"),
    Key("keep_enforcing", _bool, False, "a clean stop leaves the pins (kernel enforcement continues until the next "
        "start)", "--keep-enforcing"),
    Key("orphan_episode", _choice("kill", "freeze", "keep"), "kill",
        "an episode whose `episode run` runner died: kill (episode_end runner-died), freeze or keep",
        "--orphan-episode"),
    Key("orphan_grace", _float(0, 3600), 5.0, "seconds after a runner's death before orphan_episode applies",
        "--orphan-grace"),
]}


@dataclass
class Config:
    values: dict[str, Any]
    sources: dict[str, str]  # key -> "default" | "FILE" | "flag --x"
    files: list[Path] = field(default_factory=list)
    main: Path = CONFIG_FILE

    def __getitem__(self, k: str) -> Any:
        return self.values[k]

    def as_dict(self) -> dict[str, Any]:
        return {k: {"value": self.values[k], "source": self.sources[k]} for k in KEYS}

    def signature(self) -> tuple:
        """Changes when a config file is replaced or edited (ConfigMap
        symlink swaps included: the resolved target and its mtime)."""
        files, d = config_files(self.main)
        return files_signature([self.main, *files], [d])


def config_files(main: Path) -> tuple[list[Path], Path]:
    """main, then main's directory's config.d/*.toml in lexical order."""
    d = main.parent / "config.d"
    extra = sorted((p for p in d.glob("*.toml") if p.is_file()), key=lambda p: p.name) if d.is_dir() else []
    return ([main] if main.is_file() else []) + extra, d


def files_signature(files: list[Path], dirs: list[Path]) -> tuple:
    sig = []
    for d in dirs:
        try:
            names = sorted(p.name for p in d.glob("*.toml"))
        except OSError:
            names = []
        sig.append((str(d), tuple(names)))
    for f in files:
        try:
            st = os.stat(f)
            sig.append((str(f), os.path.realpath(f), st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((str(f), None))
    return tuple(sig)


def load(path: Path | str | None = None, flags: dict[str, Any] | None = None) -> Config:
    """Defaults, then the files, then `flags` (key -> value, only the flags
    given on the command line). path None: /etc/agent-tracer/config.toml if
    it exists (with its config.d); an explicit path must exist."""
    errors: list[str] = []
    main = Path(path) if path is not None else CONFIG_FILE
    if path is not None and not main.is_file():
        raise ConfigError([f"{main}: no such config file"])
    files, _ = config_files(main)
    values = {k: key.default for k, key in KEYS.items()}
    sources = {k: DEFAULT for k in KEYS}
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            errors.append(f"{f}: not valid TOML: {e}")
            continue
        except OSError as e:
            errors.append(f"{f}: cannot read: {e}")
            continue
        for k, v in data.items():
            key = KEYS.get(k)
            if key is None:
                errors.append(f"{f}: {k}: unknown key (known: {', '.join(KEYS)})")
                continue
            try:
                values[k] = key.check(v)
                sources[k] = str(f)
            except ValueError as e:
                errors.append(f"{f}: {k}: {e}")
    for k, v in (flags or {}).items():
        key = KEYS[k]
        try:
            values[k] = key.check(v)
            sources[k] = f"flag {key.flag}"
        except ValueError as e:
            errors.append(f"command line {key.flag}: {e}")
    if errors:
        raise ConfigError(errors)
    return Config(values, sources, files, main)


def policy_paths(cfg: Config) -> list[Path]:
    """The policy dirs (default: the packaged packs), then the site policy
    directory when it exists."""
    from .paths import POLICY_DIR

    dirs = [Path(p) for p in (cfg["policy_dirs"] or [POLICY_DIR])]
    site = cfg["site_policy_dir"]
    if site and Path(site).is_dir() and any(Path(site).glob("*.toml")):
        dirs.append(Path(site))
    return dirs


def missing_policy_paths(cfg: Config) -> list[str]:
    return [p for p in (cfg["policy_dirs"] or []) if not Path(p).exists()]


def run_options(cfg: Config, **extra: Any):
    """RunOptions from a Config (the runtime's dataclass; extra: not config)."""
    from .pins import PIN_BASE
    from .runtime import RunOptions

    v = cfg.values
    return RunOptions(
        log=v["log"], log_max_bytes=v["log_max_bytes"], log_keep=v["log_keep"],
        scope_all=v["scope"] == "all", monitor=v["monitor"], policy_dirs=policy_paths(cfg),
        ringbuf_pages=v["ringbuf_pages"],
        control_socket=Path(v["control_socket"]) if v["control_socket"] else None,
        verdict_dir=Path(v["verdict_dir"]) if v["verdict_dir"] else None,
        verdict_retention=v["verdict_retention"],
        stats_interval=v["stats_interval"], gpu_interval=v["gpu_interval"],
        gate_timeout=v["gate_timeout"], gate_default=v["gate_default"],
        relay_interval=v["relay_interval"], relay_min_age=v["relay_min_age"],
        metrics_listen=parse_listen(v["metrics_listen"]), outputs=list(v["outputs"]),
        gate_proc_grace=v["gate_proc_grace"], wire_timeout=v["wire_timeout"],
        max_episodes=v["max_episodes"], ended_keep=v["ended_keep"], ended_keep_s=v["ended_keep_s"],
        episode_rate=v["episode_rate"], episode_burst=v["episode_burst"],
        dns_upstreams=list(v["dns_upstreams"]) or None, dns_ttl_grace=v["dns_ttl_grace"],
        pin_dir=PIN_BASE if v["pin_state"] else None, keep_enforcing=v["keep_enforcing"],
        orphan_episode=v["orphan_episode"], orphan_grace=v["orphan_grace"],
        trainer_group=v["trainer_group"], trainer_uids=list(v["trainer_uids"]),
        containers=v["containers"],
        **extra,
    )


def format_show(cfg: Config) -> list[str]:
    width = max(len(k) for k in KEYS)
    lines = []
    for k in KEYS:
        v = cfg.values[k]
        if k == "outputs":
            shown = ", ".join(f"{o['name']} ({o['type']})" for o in v) or "none"
        elif v is None or v == "":
            shown = "(packaged packs)" if k == "policy_dirs" else "(off)"
        else:
            shown = str(v)
        lines.append(f"{k:<{width}}  {shown:<40}  # {cfg.sources[k]}")
    return lines
