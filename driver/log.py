"""structlog set-up: JSON lines in a pod, readable console output on a terminal.

Per-call context (``claim="ns/name:uid"``, ``rpc``) travels in contextvars, so every log line
written while a claim is handled carries it without passing a logger around.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def claim_ref(namespace: str, name: str, uid: str) -> str:
    """The one way a claim is named in logs: ``ns/name:uid``."""
    return f"{namespace}/{name}:{uid}"


@contextlib.contextmanager
def bound(**values: object) -> Iterator[None]:
    """Bind ``values`` into the log context for the duration of the block."""
    with structlog.contextvars.bound_contextvars(**values):
        yield
