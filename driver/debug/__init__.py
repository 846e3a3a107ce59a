"""Read-only debug commands of ``gpu-dra``: explain, simulate, devices, slices, claims, cdi, mig,
doctor, probe.

``driver/cli.py`` calls :func:`register_debug_commands` to add them to its parser. Importing this
package is cheap: the commands import their dependencies when they run.
"""

from __future__ import annotations

import argparse


def register_debug_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every debug subcommand to the ``gpu-dra`` parser."""
    from driver.debug.commands import register

    register(subparsers)
