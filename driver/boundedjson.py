"""Bounded JSON: decoding that a hostile or broken document cannot turn into a crash.

Why it exists: a ResourceClaim's opaque parameters are user JSON the API server stores as it is
(inside its request size limit). Python's decoder gives up on them in unhelpful ways: an integer
of more than 4,300 digits raises "Exceeds the limit (4300 digits) ... sys.set_int_max_str_digits()",
and nesting about 1,000 deep raises RecursionError, which once surfaced as an "internal error"
with a 363 KB traceback per kubelet retry. Here the first becomes a :class:`HugeNumber` the
config decoder refuses by name, and the second a :class:`JsonTooDeepError` that says what to fix;
:func:`check_depth` refuses documents deeper than a limit, naming the path where they go deep.

It does not know any schema: ``sharing.config`` checks the config's own fields and limits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

#: Integers with more digits than this are kept as text (:class:`HugeNumber`), never converted.
MAX_INT_DIGITS = 1000
#: Deepest nesting :func:`loads` decodes. Below Python's default recursion limit, and not tied to
#: it (a test runner or library may raise that limit, and then the decoder's stack is at risk).
MAX_DECODE_DEPTH = 500

# A JSON string (skipped whole, escapes included) or one bracket.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class HugeNumber(str):
    """A JSON integer too long to convert safely, kept as its digits."""

    __slots__ = ()


class JsonTooDeepError(ValueError):
    """The document nests deeper than allowed; ``path`` is where it does (empty if unknown)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def _parse_int(text: str) -> int | HugeNumber:
    return HugeNumber(text) if len(text) > MAX_INT_DIGITS else int(text)


def loads(data: str | bytes) -> Any:
    """``json.loads`` without the integer-digit and recursion failures.

    Raises:
        JsonTooDeepError: the document nests deeper than the decoder's recursion allows.
        ValueError: it is not JSON.
    """
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") > MAX_DECODE_DEPTH and _max_depth(raw) > MAX_DECODE_DEPTH:
        raise JsonTooDeepError(f"the JSON document nests deeper than {MAX_DECODE_DEPTH} levels")
    try:
        return json.loads(data, parse_int=_parse_int)
    except RecursionError:
        raise JsonTooDeepError(
            f"the JSON document nests deeper than the decoder can follow (limit {MAX_DECODE_DEPTH})"
        ) from None


def _max_depth(raw: bytes) -> int:
    """How deep brackets nest in ``raw``, strings skipped (only run on bracket-heavy documents)."""
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def check_depth(document: Any, limit: int, root: str = "") -> None:
    """Refuse ``document`` if objects and arrays nest more than ``limit`` deep (iteratively, so the
    check itself never recurses).

    Raises:
        JsonTooDeepError: naming the first path that goes deeper than ``limit`` (its first
            segments only, so the message stays short).
    """
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(document, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, Mapping):
            children: list[tuple[Any, str]] = [(v, str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(v, f"[{i}]") for i, v in enumerate(value)]
        else:
            continue
        if depth >= limit:
            shown = _path(root, path)
            raise JsonTooDeepError(f"{shown or 'the document'} nests deeper than {limit} levels", shown)
        stack.extend((child, depth + 1, (*path, key)) for child, key in children)


def _path(root: str, parts: tuple[str, ...], keep: int = 12) -> str:
    shown = list(parts[:keep])
    text = root
    for raw in shown:
        part = raw if len(raw) <= 40 else raw[:40] + "..."
        text = f"{text}{part}" if part.startswith("[") or not text else f"{text}.{part}"
    if len(parts) > keep:
        text += f"... ({len(parts) - keep} more levels)"
    return text
