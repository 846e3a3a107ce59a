"""Output of the debug commands: JSON and YAML for scripts, aligned text tables for people.

Every command builds plain data (dicts, lists, strings, numbers) and hands it here with the
output format; only the ``table`` format needs a command-specific text (a ``Table`` or lines).
It does not decide what to show.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

FORMATS = ("table", "json", "yaml")


@dataclass(frozen=True, slots=True)
class Table:
    """Rows under a header, columns padded to the widest cell."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def text(self) -> str:
        cells = [self.header, *self.rows]
        widths = [max(len(row[i]) if i < len(row) else 0 for row in cells) for i in range(len(self.header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
        return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Shorthand: the text of a :class:`Table` with every cell turned into a string."""
    return Table(tuple(header), tuple(tuple(_cell(c) for c in row) for row in rows)).text()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def emit(data: Any, fmt: str, text: str, out: TextIO) -> None:
    """Write ``data`` as JSON/YAML, or ``text`` for the table format."""
    if fmt == "json":
        out.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    elif fmt == "yaml":
        out.write(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
    else:
        out.write(text.rstrip("\n") + "\n")
