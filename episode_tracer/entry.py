"""The `agent-tracer` console script.

`agent-tracer episode run ...` starts an episode on every rollout of a
training run, so it must cost little more than the Python interpreter's own
start: its arguments are parsed here, without importing click (about a third
of the CLI's start-up) or anything but the episode API. Every other command,
and any `episode run` this parser does not take exactly (help, a global
option, an unknown or malformed option), goes to the click CLI in
episode_tracer/cli.py, which defines the same options and says what is wrong.
"""
from __future__ import annotations

import sys

EXIT_ERROR = 1  # click's exit code for a ClickException


def parse_episode_run(args: list[str]) -> dict | None:
    """The options of `episode run` (as episode_tracer/cli.py defines them) and the
    command, or None when click should parse these arguments."""
    opts: dict = {"episode_id": None, "verdict_file": None, "keep_stragglers": False, "timeout": None,
                  "gpu": False}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-"):
            break
        name, eq, val = a.partition("=")
        if name in ("--id", "--verdict-file", "--timeout"):
            if not eq:
                if i + 1 >= len(args):
                    return None
                i += 1
                val = args[i]
            if name == "--id":
                opts["episode_id"] = val
            elif name == "--verdict-file":
                opts["verdict_file"] = val
            else:
                try:
                    opts["timeout"] = float(val)
                except ValueError:
                    return None
        elif a == "--keep-stragglers":
            opts["keep_stragglers"] = True
        elif a == "--gpu":
            opts["gpu"] = True
        else:
            return None  # -h, --help, unknown: click's message
        i += 1
    command = args[i:]
    if opts["episode_id"] is None or not command:
        return None
    opts["command"] = command
    return opts


def episode_run_fast(opts: dict) -> int:
    from pathlib import Path

    from .api import EpisodeError, run_episode

    ep = opts["episode_id"]
    try:
        res = run_episode(ep, list(opts["command"]),
                          verdict_file=Path(opts["verdict_file"]) if opts["verdict_file"] else None,
                          keep_stragglers=opts["keep_stragglers"], timeout=opts["timeout"], gpu=opts["gpu"])
    except (EpisodeError, ValueError) as e:
        sys.stderr.write(f"Error: {e}\n")
        return EXIT_ERROR
    except PermissionError as e:
        sys.stderr.write(f"Error: {e} (episode run needs root to create cgroups)\n")
        return EXIT_ERROR
    if res.killed_by_policy:
        sys.stderr.write(f"agent-tracer: episode {ep} was killed by policy\n")
    return res.cli_exit_code


def main() -> None:
    args = sys.argv[1:]
    if len(args) >= 2 and args[0] == "episode" and args[1] == "run":
        opts = parse_episode_run(args[2:])
        if opts is not None:
            sys.exit(episode_run_fast(opts))
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
