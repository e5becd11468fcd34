"""`agent-tracer policy ...` commands. The main CLI mounts :data:`policy`."""
from __future__ import annotations

from pathlib import Path

import click

from .. import paths
from .kernel import KernelPlan
from .loader import load_policy


@click.group("policy")
def policy() -> None:
    """Check and inspect policies (TOML files, see docs/policies.md)."""


def _names(names: frozenset[str]) -> str:
    return ", ".join(sorted(names)) or "-"


def format_plan(plan: KernelPlan) -> list[str]:
    lines = [
        "kernel plan:",
        f"  kill at exec (episodes): {_names(plan.kill_comms)}",
        f"  kill at exec (everyone): {_names(plan.kill_comms_all)}",
        f"  gate at exec (episodes): {_names(plan.gate_comms)}" + (" + every exec" if plan.gate_all else ""),
        f"  gate at exec (everyone): {_names(plan.gate_comms_all)}" + (" + every exec" if plan.gate_all_global else ""),
        f"  connect deny rules: {len(plan.deny)}",
    ]
    for d in plan.deny:
        where = "everyone" if d.scope.value == "all" else f"episodes {d.episode_glob or '*'}"
        cidrs = ", ".join(map(str, d.cidrs)) or "any address"
        ports = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in d.ports) or "any port"
        protos = "/".join(sorted(d.protocols)) or "tcp/udp"
        lines.append(f"    [{d.index}] {d.name}: {protos} to {cidrs} port {ports} ({where})")
    lines.append(f"  unix connect deny rules: {len(plan.unix_deny)}")
    for u in plan.unix_deny:
        shown = list(u.paths) + [f"{p}*" for p in u.prefixes]
        lines.append(f"    [{u.index}] {u.name}: {', '.join(shown)} (episodes; not sockets the episode bound)")
    return lines


@policy.command("check")
@click.argument("paths_", metavar="[PATHS]...", nargs=-1, type=click.Path(path_type=Path))
@click.option("--strict", is_flag=True, help="Treat warnings as errors (exit 1).")
@click.option("--plan", "show_plan", is_flag=True, help="Also print what the kernel will enforce.")
@click.option("--lists", "show_lists", is_flag=True, help="Also print each list and the rules that read it.")
def check(paths_: tuple[Path, ...], strict: bool, show_plan: bool, show_lists: bool = False) -> None:
    """Validate policy files without loading anything into the kernel.

    PATHS are TOML files or directories (every *.toml in them); the default
    is the packaged episode_tracer/policies/ directory. Files load in sorted path order;
    overrides apply after all of them. Prints errors, then warnings, one a
    line, then a summary; exits 1 on any error.

    \b
    Examples:
      agent-tracer policy check
      agent-tracer policy check /etc/agent-tracer/policies/
      agent-tracer policy check episode_tracer/policies/ site.toml --plan
      agent-tracer policy check --strict episode_tracer/policies/   # CI: warnings fail too
    """
    targets = list(paths_) or [paths.POLICY_DIR]
    result = load_policy(targets)
    for d in result.errors:
        click.echo(f"error: {d}")
    warnings = list(result.warnings)
    if result.policy is not None:
        from .egress import posture_warnings

        warnings += posture_warnings(result.policy)  # egress mode (docs/policies.md)
    for d in warnings:
        click.echo(f"warning: {d}")
    if result.policy is not None and show_plan:
        for line in format_plan(result.policy.kernel_plan()):
            click.echo(line)
    if result.policy is not None and show_lists:
        click.echo("lists (read by):")
        for name, rules in result.list_readers.items():
            click.echo(f"  {name}: {', '.join(rules) or '-'}")
    if result.policy is not None:
        click.echo(f"policy version: {result.policy.version}")
    click.echo(
        f"{result.rule_count} rules in {len(result.files)} files, "
        f"{len(result.errors)} errors, {len(warnings)} warnings"
    )
    if result.errors or (strict and warnings):
        raise SystemExit(1)
