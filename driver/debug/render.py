"""Output of the debug commands: JSON and YAML for scripts, aligned text tables for people.

Every command builds plain data (dicts, lists, strings, numbers) and hands it here with the
output format; only the table formats need a command-specific text (a table or lines). The
conventions are kubectl's: ``-o wide`` adds the columns marked wide, ``--no-headers`` drops the
header line, and a table with no rows says "No resources found." instead of a bare header.
It does not decide what to show.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

FORMATS = ("table", "wide", "json", "yaml")
EMPTY = "No resources found."


@dataclass(frozen=True, slots=True)
class Style:
    """How tables are drawn: with the wide columns, with the header line."""

    wide: bool = False
    headers: bool = True


@dataclass(frozen=True, slots=True)
class Table:
    """Rows under a header, columns padded to the widest cell."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    headers: bool = True

    def text(self) -> str:
        if not self.rows:
            return EMPTY
        cells = [self.header, *self.rows] if self.headers else list(self.rows)
        widths = [max(len(row[i]) if i < len(row) else 0 for row in cells) for i in range(len(self.header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
        return "\n".join(lines)


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    style: Style | None = None,
    wide_from: int | None = None,
) -> str:
    """The text of a :class:`Table`; columns from ``wide_from`` on show only with ``-o wide``."""
    style = style or Style()
    keep = len(header) if style.wide or wide_from is None else wide_from
    return Table(
        tuple(header[:keep]), tuple(tuple(_cell(c) for c in row[:keep]) for row in rows), style.headers
    ).text()


def quantity(value: int | None) -> str:
    """Bytes as a Kubernetes quantity people read (``40Gi``); ``-`` when unknown."""
    if value is None:
        return "-"
    from driver.resourceslices import canonical_quantity

    return canonical_quantity(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def emit(data: Any, fmt: str, text: str, out: TextIO) -> None:
    """Write ``data`` as JSON/YAML, or ``text`` for the table formats."""
    if fmt == "json":
        out.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    elif fmt == "yaml":
        out.write(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
    else:
        out.write(text.rstrip("\n") + "\n")
