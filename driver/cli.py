"""``gpu-dra <command>``: the one executable of the project.

``gpu-dra plugin`` runs the node daemon. Debug commands (read-only inspection of a node) are
added by ``driver.debug`` through :func:`driver.debug.register_debug_commands` when that package
provides it; each registers a sub-parser whose ``func`` default takes the parsed arguments and
returns an exit code.

This module only parses arguments and dispatches; it imports nothing heavy until a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from driver.errors import ConfigError

Command = Callable[[argparse.Namespace], int]


def _run_plugin(args: argparse.Namespace) -> int:
    from driver import config, daemon

    try:
        cfg = config.load(args)
    except ConfigError as exc:
        print(f"gpu-dra plugin: {exc}", file=sys.stderr)
        return 2
    return daemon.run(cfg)


def build_parser(*, debug_commands: bool = True) -> argparse.ArgumentParser:
    """The full argument parser: ``plugin`` plus whatever debug commands are registered.

    ``debug_commands=False`` leaves the debug commands out: ``gpu-dra plugin`` parses its flags
    without importing them (their CEL, YAML and rendering code is no part of the daemon).
    """
    from driver.config import add_plugin_flags

    parser = argparse.ArgumentParser(
        prog="gpu-dra", description="Kubernetes DRA node driver for NVIDIA GPUs (gpu.nvidia.com)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    plugin = subparsers.add_parser(
        "plugin",
        help="run the kubelet plugin daemon",
        description="Run the DRA kubelet plugin. Every flag has an environment twin (shown in its help).",
    )
    add_plugin_flags(plugin)
    plugin.set_defaults(func=_run_plugin)
    if debug_commands:
        register_extra_commands(subparsers)
    return parser


def register_extra_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Let ``driver.debug`` add its commands, when it exists and offers the hook."""
    try:
        debug = importlib.import_module("driver.debug")
    except ImportError:
        return
    register = getattr(debug, "register_debug_commands", None)
    if callable(register):
        register(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; return its exit code."""
    arguments = list(argv) if argv is not None else sys.argv[1:]
    parser = build_parser(debug_commands=arguments[:1] != ["plugin"])
    args = parser.parse_args(arguments)
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
