"""agent-tracer command line. Thin: every command calls into the package.

Exit codes: 0 ok; 1 a check failed or invalid input (policy errors, doctor
failures); 2 usage error (click); 3 the tracer could not start (BPF, root);
86 `episode run`: the episode was killed by policy.
"""
from __future__ import annotations

import enum
import sys
from pathlib import Path

import click

from . import __version__
from .limits import EPISODE_BURST, EPISODE_RATE
from .paths import CONTROL_SOCKET, POLICY_DIR

EXIT_START_FAILED = 3


class Mode(str, enum.Enum):
    enforce = "enforce"
    monitor = "monitor"


# commands whose modules are imported only when the command runs: an episode
# start must not pay for the dashboard, the benchmark or the policy compiler
_LAZY_COMMANDS = {
    "policy": ("episode_tracer.policy.cli", "policy"),
    "top": ("episode_tracer.dashboard", "top_command"),
    "bench": ("episode_tracer.bench", "bench_command"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in _LAZY_COMMANDS:
            import importlib

            mod, attr = _LAZY_COMMANDS[name]
            cmd = getattr(importlib.import_module(mod), attr)
            self.add_command(cmd, name)
        return cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="agent-tracer")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """eBPF tracer and policy enforcer for autonomous AI agents.

    \b
    Examples:
      agent-tracer doctor                      # can this node run the tracer?
      agent-tracer run --log /var/log/agent-tracer.jsonl
      agent-tracer episode run --id ep-1 -- python agent.py
      agent-tracer top                         # live dashboard of a running tracer
      agent-tracer policy check episode_tracer/policies/
      agent-tracer replay old.jsonl --policy-dir episode_tracer/policies/
    """
    ctx = click.get_current_context()
    if ctx.invoked_subcommand == "episode" and not verbose:
        return  # the episode commands log nothing of their own: logging stays unimported
    import logging

    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="agent-tracer: %(levelname)s %(message)s")


# ---------------------------------------------------------------------- run
# every option's default is None: only the flags given override the config
# files (episode_tracer/config.py has the defaults and says where each value came from)
def _run_options(f):
    opts = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Config file (its directory's config.d/*.toml load after it). "
                          "Default: /etc/agent-tracer/config.toml when it exists."),
        click.option("--log", "log", default=None, metavar="PATH|-",
                     help="Write JSONL records here ('-' is stdout). Default: stdout when --no-dashboard "
                          "or stdout is not a terminal, else none."),
        click.option("--log-max-bytes", type=click.IntRange(0), default=None,
                     help="Rotate the log when it reaches this size (0: never). [default: 0]"),
        click.option("--log-keep", type=click.IntRange(1, 1000), default=None,
                     help="Rotated log files kept (PATH.1 .. PATH.N). [default: 5]"),
        click.option("--policy-dir", "policy_dirs", multiple=True,
                     type=click.Path(exists=True, path_type=Path),
                     help=f"Policy file or directory (repeatable). Default: {POLICY_DIR}"),
        click.option("--site-policy-dir", default=None, metavar="DIR",
                     help="Site policies loaded after the policy dirs when DIR exists ('' off). "
                          "[default: /etc/agent-tracer/policies.d]"),
        click.option("--all", "scope_all", is_flag=True, default=None,
                     help="Trace every process, not only episode processes (scope = all)."),
        click.option("--scope", type=click.Choice(["episodes", "all"]), default=None,
                     help="episodes: only episode processes emit; all: every process. [default: episodes]"),
        click.option("--monitor/--enforce", "monitor", default=None,
                     help="Monitor mode: deny or kill nothing; alerts say what would have been done."),
        click.option("--no-dashboard", is_flag=True, help="Do not show the live view in this terminal."),
        click.option("--pin-state/--no-pin-state", "pin_state", default=None,
                     help="Pin maps and links in /sys/fs/bpf/agent-tracer so the kernel keeps enforcing while the "
                          "tracer is down; a start adopts them. [default: on]"),
        click.option("--keep-enforcing/--no-keep-enforcing", "keep_enforcing", default=None,
                     help="A clean stop leaves the pins: the kernel keeps enforcing until the next start."),
        click.option("--orphan-episode", type=click.Choice(["kill", "freeze", "keep"]), default=None,
                     help="An episode whose `episode run` runner died (SIGKILL, OOM): kill it, freeze it or keep "
                          "it running. [default: kill]"),
        click.option("--orphan-grace", type=click.FloatRange(0, 3600), default=None,
                     help="Seconds after a runner's death before --orphan-episode applies. [default: 5.0]"),
        click.option("--ringbuf-pages", type=click.IntRange(1, 1 << 18), default=None,
                     help="Ring buffer size in 4 KiB pages (power of two). [default: 2048]"),
        click.option("--control-socket", default=None, metavar="PATH",
                     help=f"Control socket for top and episode commands ('' off). [default: {CONTROL_SOCKET}]"),
        click.option("--gate-timeout", type=click.FloatRange(0.05, 60), default=None,
                     help="Seconds a gated exec may wait for its verdict. [default: 2.0]"),
        click.option("--gate-default", type=click.Choice(["kill", "allow"]), default=None,
                     help="Verdict for an episode's gated exec whose decision timed out (outside episodes: "
                          "always allow). [default: kill]"),
        click.option("--gpu-interval", type=click.FloatRange(0, 3600), default=None,
                     help="Seconds between GPU watcher samples (NVML); 0 turns GPU watching off. [default: 1.0]"),
        click.option("--relay-interval", type=click.FloatRange(0, 3600), default=None,
                     help="Seconds between reverse-tunnel shape scans; 0: off. [default: 2.0]"),
        click.option("--relay-min-age", type=click.FloatRange(0, 3600), default=None,
                     help="Seconds both legs of a relay must have been seen. [default: 5.0]"),
        click.option("--stats-interval", type=click.FloatRange(0.1, 3600), default=None,
                     help="Seconds between stats records. [default: 1.0]"),
        click.option("--metrics-listen", default=None, metavar="HOST:PORT",
                     help="Serve Prometheus /metrics and /healthz here ('' off). [default: off]"),
        click.option("--verdict-dir", default=None, metavar="DIR",
                     help="Per-episode verdict files ('' off). [default: /run/agent-tracer/verdicts]"),
        click.option("--verdict-retention", type=click.FloatRange(0), default=None,
                     help="Seconds a finished episode's verdict file is kept (0: forever). [default: 86400]"),
        click.option("--gate-proc-grace", type=click.FloatRange(0, 60), default=None,
                     help="Seconds after which a held exec whose record has not come is judged from /proc "
                          "(0: off). [default: 0.5]"),
        click.option("--wire-timeout", type=click.FloatRange(0.1, 60), default=None,
                     help="Seconds an undecided episode flow may stay held before it is denied. [default: 3.0]"),
        click.option("--max-episodes", type=click.IntRange(1, 8190), default=None,
                     help="Concurrent episodes with a kernel identity; a new one beyond is refused "
                          "(docs/scale.md). [default: 4096]"),
        click.option("--ended-keep", type=click.IntRange(0, 1_000_000), default=None,
                     help="Ended episodes the live view (top, episode list) keeps. [default: 200]"),
        click.option("--ended-keep-s", type=click.FloatRange(0, 7 * 86400), default=None,
                     help="Seconds an ended episode stays in the live view. [default: 600]"),
        click.option("--slot-start-gen", default=0, type=click.IntRange(0, 2047), hidden=True,
                     help="First generation of every episode identity (tests and bench: cross the wrap quickly)."),
        click.option("--episode-rate", type=click.IntRange(0, 1 << 31), default=None,
                     help="Records per second one episode may send (a kernel token bucket per episode; excess "
                          f"records are dropped and counted as lost for that episode); 0: off. [default: {EPISODE_RATE}]"),
        click.option("--episode-burst", type=click.IntRange(1, 1 << 31), default=None,
                     help=f"Burst of the per-episode rate limit (records). [default: {EPISODE_BURST}]"),
        click.option("--dns-upstream", "dns_upstreams", multiple=True, metavar="ADDR",
                     help="Egress mode: resolver the DNS stub forwards allowed names to (repeatable). "
                          "[default: the nameservers of /etc/resolv.conf]"),
        click.option("--dns-ttl-grace", type=click.FloatRange(0, 300), default=None,
                     help="Egress mode: seconds an answered address stays allowed beyond its TTL. [default: 2.0]"),
        click.option("--trainer-group", default=None, metavar="GROUP",
                     help="Members of GROUP (name or gid) may run, list and end their own episodes and read their "
                          "verdicts on the control socket without root (docs/episodes.md). [default: none]"),
        click.option("--trainer-uid", "trainer_uids", multiple=True, type=click.IntRange(1), metavar="UID",
                     help="A uid with the trainer rights of --trainer-group (repeatable)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


_FLAG_KEYS = ("log", "log_max_bytes", "log_keep", "site_policy_dir", "monitor", "ringbuf_pages", "control_socket",
              "gate_timeout", "gate_default", "gpu_interval", "relay_interval", "relay_min_age", "stats_interval",
              "metrics_listen", "verdict_dir", "verdict_retention", "gate_proc_grace", "wire_timeout",
              "max_episodes", "ended_keep", "ended_keep_s", "episode_rate", "episode_burst", "dns_ttl_grace",
              "pin_state", "keep_enforcing", "orphan_episode", "orphan_grace", "trainer_group")


def _flags(kw: dict) -> dict:
    """The config keys the command line set (None: not given)."""
    flags = {k: kw[k] for k in _FLAG_KEYS if kw.get(k) is not None}
    if kw.get("policy_dirs"):
        flags["policy_dirs"] = [str(p) for p in kw["policy_dirs"]]
    if kw.get("dns_upstreams"):
        flags["dns_upstreams"] = list(kw["dns_upstreams"])
    if kw.get("trainer_uids"):
        flags["trainer_uids"] = list(kw["trainer_uids"])
    if kw.get("scope_all"):
        flags["scope"] = "all"
    elif kw.get("scope"):
        flags["scope"] = kw["scope"]
    return flags


def _load_config(config_path, flags):
    from .config import ConfigError, load

    try:
        return load(config_path, flags)
    except ConfigError as e:
        click.echo(f"agent-tracer: {e}", err=True)
        sys.exit(1)


@main.command()
@_run_options
def run(config_path, no_dashboard, **kw) -> None:
    """Run the tracer in the foreground until SIGINT/SIGTERM.

    Settings come from /etc/agent-tracer/config.toml and config.d/*.toml
    (or --config PATH), flags override them (`agent-tracer config show`).
    SIGHUP reloads configuration and policy (a bad one keeps the running
    one), SIGUSR1 reopens the log.

    \b
    Examples:
      agent-tracer run                              # default policies, live view
      agent-tracer run --no-dashboard --log -       # JSONL on stdout
      agent-tracer run --monitor --all --log /tmp/all.jsonl
      agent-tracer run --config /etc/agent-tracer/config.toml --metrics-listen 127.0.0.1:9464
    """
    from .config import DEFAULT, load, run_options
    from .runtime import Runtime, is_root

    if not is_root():
        raise click.ClickException("agent-tracer run needs root (it loads BPF programs)") from None
    flags = _flags(kw)
    cfg = _load_config(config_path, flags)
    interactive = sys.stdout.isatty() and not no_dashboard
    if cfg["log"] is None and cfg.sources["log"] == DEFAULT and not interactive:
        cfg.values["log"] = "-"
        flags = {**flags}  # a reload keeps stdout too
        flags["log"] = "-"
    opts = run_options(cfg, config=cfg, config_loader=lambda: load(config_path, flags),
                       slot_start_gen=kw.get("slot_start_gen") or 0)
    rt = Runtime(opts)
    try:
        rt.start()
    except Exception as e:  # policy errors, BPF load failure: say why, exit 3
        rt.close()
        click.echo(f"agent-tracer: cannot start: {e}", err=True)
        sys.exit(EXIT_START_FAILED)

    def stop(_sig, _frm):
        rt.stop_event.set()

    import signal

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: rt.request_reload())
        signal.signal(signal.SIGUSR1, lambda *_: rt.request_reopen())
    from .service import serve

    try:
        serve(rt, dashboard=interactive)
    finally:
        rt.close()


# ------------------------------------------------------------------ config
@main.group()
def config() -> None:
    """Inspect the node's configuration (/etc/agent-tracer/config.toml)."""


@config.command("show")
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON: key -> {value, source}.")
def config_show(config_path, no_dashboard, as_json, **kw) -> None:
    """Print the effective configuration and where each value came from.

    Takes the same options as `run`: a flag shows as its source. Exit 1 when
    a file is invalid (every error names the file and the key).

    \b
    Examples:
      agent-tracer config show
      agent-tracer config show --config ./config.toml --monitor --json
    """
    from .config import format_show

    cfg = _load_config(config_path, _flags(kw))
    if as_json:
        import orjson

        click.echo(orjson.dumps({"files": [str(f) for f in cfg.files], "config": cfg.as_dict()},
                                option=orjson.OPT_INDENT_2).decode())
        return
    click.echo("files: " + (", ".join(str(f) for f in cfg.files) or "none (defaults)"))
    for line in format_show(cfg):
        click.echo(line)


# ------------------------------------------------------------------ service
@main.group()
def service() -> None:
    """Install the tracer as a systemd service."""


@service.command("install")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"), show_default=True,
              help="Install below this directory (packaging, tests).")
@click.option("--unit-dir", default="etc/systemd/system", show_default=True, help="Unit directory below --root.")
@click.option("--no-reload", is_flag=True, help="Do not run `systemctl daemon-reload`.")
def service_install(root, unit_dir, no_reload) -> None:
    """Write agent-tracer.service (ExecStart: this installation), a default
    /etc/agent-tracer/config.toml when there is none, and the site policy
    directory; then `systemctl daemon-reload` when systemd runs.

    \b
    Then:
      systemctl enable --now agent-tracer
      systemctl reload agent-tracer     # SIGHUP: config and policy
    """
    from .unit import install

    for line in install(root, unit_dir, daemon_reload=not no_reload):
        click.echo(line)


# ------------------------------------------------------------------ episode
@main.group()
def episode() -> None:
    """Run and manage agent episodes."""


@episode.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--id", "episode_id", required=True, help="Episode id (letters, digits, . _ : -).")
@click.option("--verdict-file", type=click.Path(path_type=Path),
              help="Write the episode's verdict summary (JSON) here when it ends.")
@click.option("--keep-stragglers", is_flag=True,
              help="Leave processes the command left behind running (default: kill them).")
@click.option("--timeout", type=float, default=None, help="Kill the episode after this many seconds.")
@click.option("--gpu", is_flag=True,
              help="Register COMMAND as the episode's GPU process: it and the workers it forks (without exec) "
                   "may use GPUs (docs/gpu.md).")
@click.option("--gpu-exe", "gpu_exes", multiple=True, metavar="GLOB",
              help="With --gpu: an executable (glob) that keeps the GPU right when a process holding it execs "
                   "it, e.g. the trainer's Python for spawn/torchrun workers. Repeatable.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def episode_run(episode_id, verdict_file, keep_stragglers, timeout, gpu, gpu_exes, command) -> None:
    """Run COMMAND as episode ID in its own cgroup and exit with its code.

    Exits 86 when policy killed the episode, 128+N when it died of signal N.

    \b
    Examples:
      agent-tracer episode run --id rollout-17 -- python agent.py --task t1
      agent-tracer episode run --id ep-2 --verdict-file /tmp/ep-2.json -- bash task.sh
    """
    from .api import EpisodeError, run_episode

    try:
        res = run_episode(episode_id, list(command), verdict_file=verdict_file,
                          keep_stragglers=keep_stragglers, timeout=timeout, gpu=gpu or bool(gpu_exes),
                          gpu_exes=gpu_exes)
    except (EpisodeError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except PermissionError as e:
        raise click.ClickException(f"{e} (episode run needs root to create cgroups)") from None
    if res.killed_by_policy:
        click.echo(f"agent-tracer: episode {episode_id} was killed by policy", err=True)
    sys.exit(res.cli_exit_code)


def _control_client():
    from .control import ControlClient

    return ControlClient(CONTROL_SOCKET)


@episode.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def episode_list(as_json) -> None:
    """List episodes (from the running tracer, else from cgroups and /proc)."""
    from .episode_ops import list_episodes

    rows = list_episodes()
    dropped = _dropped_note()
    if dropped:
        click.echo(dropped, err=as_json)
    if as_json:
        import orjson

        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        click.echo("no episodes")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("episode", "state", "source", "processes", "alerts", "cgroup")
    for r in rows:
        t.add_row(r["id"], r["state"], r.get("source") or "", str(r.get("processes", "")),
                  str(r.get("alerts", "")), r.get("cgroup_path") or "")
    Console().print(t)


def _dropped_note() -> str | None:
    from .episode_ops import last_retention

    r = last_retention()
    if not r or not r.get("dropped"):
        return None
    return (f"{r['dropped']} ended episodes dropped from view (keeping the last {r.get('keep')} "
            f"for {r.get('keep_s'):g} s; their records are in the JSONL log and verdict files)")


def _episode_cmd(cmd: str):
    @click.argument("episode_id")
    def f(episode_id) -> None:
        from .episode_ops import EpisodeOpError, episode_command

        try:
            msg = episode_command(cmd, episode_id)
        except EpisodeOpError as e:
            raise click.ClickException(str(e)) from None
        click.echo(msg)

    f.__doc__ = {
        "freeze": "Freeze every process of episode ID (cgroup.freeze).",
        "thaw": "Thaw a frozen episode ID.",
        "kill": "Kill every process of episode ID (cgroup.kill).",
    }[cmd]
    return episode.command(cmd)(f)


for _cmd in ("freeze", "thaw", "kill"):
    _episode_cmd(_cmd)


@episode.command("attach")
@click.option("--id", "episode_id", required=True, help="Episode id (letters, digits, . _ : -).")
@click.option("--cgroup", "cgroup", default=None,
              help="An existing cgroup: absolute, or relative to the cgroup2 mount.")
@click.option("--pid", "pid", type=click.IntRange(1), default=None, help="The cgroup of this running process.")
def episode_attach(episode_id, cgroup, pid) -> None:
    """Make an existing cgroup (someone else's) episode ID, through the
    running tracer: what runs there now or starts later is a member; kill
    and freeze act on that cgroup. See docs/episodes.md.

    \b
    Examples:
      agent-tracer episode attach --id rollout-9 --cgroup /sys/fs/cgroup/sandbox/r9
      agent-tracer episode attach --id rollout-9 --pid 4242
    """
    from .episode_ops import EpisodeOpError, attach_command

    if (cgroup is None) == (pid is None):
        raise click.UsageError("give exactly one of --cgroup PATH or --pid PID")
    try:
        reply = attach_command(episode_id, cgroup=cgroup, pid=pid)
    except EpisodeOpError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"attach {episode_id}: {reply.get('cgroup_path')} ({reply.get('processes', 0)} processes)")


@episode.command("detach")
@click.argument("episode_id")
def episode_detach(episode_id) -> None:
    """End attached (or container) episode ID without killing anything."""
    from .episode_ops import EpisodeOpError, detach_command

    try:
        reply = detach_command(episode_id)
    except EpisodeOpError as e:
        raise click.ClickException(str(e)) from None
    click.echo(reply.get("message") or f"detach {episode_id}: ok")


# ------------------------------------------------------------------ replay
@main.command()
@click.argument("log_file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--policy-dir", "policy_dirs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help=f"Policy file or directory (repeatable). Default: {POLICY_DIR}")
@click.option("--json", "as_json", is_flag=True, help="Print alerts as JSONL instead of a table.")
def replay(log_file, policy_dirs, as_json) -> None:
    """Re-evaluate a recorded JSONL stream against policies; print the alerts.

    Exit code 0 with no alerts, 1 with alerts (handy in CI for a policy PR).

    \b
    Examples:
      agent-tracer replay /var/log/agent-tracer.jsonl --policy-dir episode_tracer/policies/
      agent-tracer replay recorded.jsonl --json | jq .rule
    """
    from .replay import replay_file

    n = replay_file(log_file, list(policy_dirs) or [POLICY_DIR], as_json=as_json)
    sys.exit(1 if n else 0)


# ------------------------------------------------------------------ doctor
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--no-selftest", is_flag=True, help="Skip loading the BPF programs and the enforcement self-test.")
def doctor(as_json, no_selftest) -> None:
    """Check that this node can run the tracer; print the fix for each failure.

    Exit code 1 when something required is missing.
    """
    from .doctor import print_report, run_checks

    checks = run_checks(selftest=not no_selftest)
    ok = print_report(checks, as_json=as_json)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
