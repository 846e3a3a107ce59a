"""``gpu-dra <command>``: the one executable of the project.

``gpu-dra plugin`` runs the node daemon. Debug commands (read-only inspection of a node) are
added by ``driver.debug`` through :func:`driver.debug.register_debug_commands` when that package
provides it; each registers a sub-parser whose ``func`` default takes the parsed arguments and
returns an exit code.

This module only parses arguments and dispatches; it imports nothing heavy until a command runs.
A usage error is one line naming the problem and where help is, as kubectl does, not the usage
text of every flag.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from driver.errors import ConfigError

Command = Callable[[argparse.Namespace], int]

EPILOG = """\
exit codes (debug commands):
  0  ok
  1  a negative answer: the claim does not fit, a check failed, slices differ
  2  bad usage or bad input: a flag, a file, a claim name
  3  the environment: no NVML, API server unreachable, no credentials

Kubernetes credentials, in kubectl's order: --kubeconfig, $KUBECONFIG, ~/.kube/config, then the
pod's service account; --context picks a context. Run `gpu-dra <command> --help` for a command's
flags and examples."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`\n")


def _run_plugin(args: argparse.Namespace) -> int:
    from driver import config, daemon

    try:
        cfg = config.load(args)
    except ConfigError as exc:
        print(f"gpu-dra plugin: {exc}", file=sys.stderr)
        return 2
    return daemon.run(cfg)


class _Version(argparse.Action):
    """``--version`` that reads the installed version only when asked (no import-time cost)."""

    def __init__(
        self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from driver import version

        print(f"gpu-dra {version()}")
        parser.exit(0)


def build_parser(*, debug_commands: bool = True) -> argparse.ArgumentParser:
    """The full argument parser: ``plugin`` plus whatever debug commands are registered.

    ``debug_commands=False`` leaves the debug commands out: ``gpu-dra plugin`` parses its flags
    without importing them (their CEL, YAML and rendering code is no part of the daemon).
    """
    from driver.config import add_plugin_flags

    parser = Parser(
        prog="gpu-dra",
        description="Kubernetes DRA node driver for NVIDIA GPUs (gpu.nvidia.com).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    plugin = subparsers.add_parser(
        "plugin",
        help="run the kubelet plugin daemon",
        description="Run the DRA kubelet plugin. Every flag has an environment twin (shown in its help).",
    )
    add_plugin_flags(plugin)
    plugin.set_defaults(func=_run_plugin)
    if debug_commands:
        register_extra_commands(subparsers)  # type: ignore[arg-type]  # Parser is an ArgumentParser
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
