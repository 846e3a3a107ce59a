"""Long tests at two lengths: shortened in ``make test``, full with ``pytest --long``.

Why: the kill -9 matrix, the config fuzz and the soak find more the longer they run, but CI has
a 2-core machine and a time limit. Tests marked ``long`` size themselves with :func:`scaled`;
``--long`` (or ``GPU_DRA_LONG=1``) selects the full size. Both sizes assert the same things.
"""

from __future__ import annotations

import os

ENV = "GPU_DRA_LONG"


def full_length() -> bool:
    """Whether long tests run at full length in this session."""
    return os.environ.get(ENV, "") not in ("", "0")


def scaled(short: int, full: int) -> int:
    """``full`` with ``--long``, else ``short``."""
    return full if full_length() else short
