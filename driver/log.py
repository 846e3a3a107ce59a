"""structlog set-up: JSON lines in a pod, readable console output on a terminal.

Per-call context (``claim="ns/name:uid"``, ``rpc``) travels in contextvars, so every log line
written while a claim is handled carries it without passing a logger around.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO, cast

import structlog


def configure(log_format: str = "console", level: str = "info") -> None:
    """Configure structlog and the stdlib root logger once, at process start."""
    renderer: structlog.typing.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            cap_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast("TextIO", _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (urllib3, grpc); send those records through
    # structlog's (locked) writer so they never interleave with, or tear, JSON lines.
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(max(numeric, logging.INFO))


#: Longest text one log field may carry (a traceback gets more); the rest is cut and counted.
MAX_FIELD_CHARS = 4096
MAX_EXCEPTION_CHARS = 16384


def cap_values(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Cut over-long text fields so one log line stays bounded whatever a claim carried.

    A user's config once produced a 363 KB traceback line per kubelet retry; the start and the
    length of such a field are what a reader needs.
    """
    for key, value in event_dict.items():
        if not isinstance(value, str):
            continue
        limit = MAX_EXCEPTION_CHARS if key == "exception" else MAX_FIELD_CHARS
        if len(value) > limit:
            event_dict[key] = _cut(value, limit)
    return event_dict


def _cut(text: str, limit: int) -> str:
    return f"{text[:limit]}... [cut: {len(text)} characters in all]"


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time (tests and embedders swap it; a captured stream
    that has since been closed must not break logging)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _ToStructlog(logging.Handler):
    """A stdlib handler that re-emits records as structlog events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), logger=record.name)
        except Exception:  # noqa: BLE001 - logging must never take the process down
            self.handleError(record)


def claim_ref(namespace: str, name: str, uid: str) -> str:
    """The one way a claim is named in logs: ``ns/name:uid``."""
    return f"{namespace}/{name}:{uid}"


@contextlib.contextmanager
def bound(**values: object) -> Iterator[None]:
    """Bind ``values`` into the log context for the duration of the block."""
    with structlog.contextvars.bound_contextvars(**values):
        yield
