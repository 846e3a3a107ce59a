"""Crash-safe file writes: a reader sees the old content or the new, never a torn file.

The sequence is the one every durable store uses: write a temp file in the same directory,
fsync it, rename over the target, fsync the directory so the rename itself survives a power
loss. kill -9 at any point leaves either the old file or the new one (plus at most a stray
``.tmp-*`` file, which :func:`write_atomic` never reads and start-up may remove).

The atomicity comes from the rename alone: a killed process's writes are already in the page
cache, which outlives it. The two fsyncs only make the new file survive a power loss or a kernel
crash, and cost more than everything else in the write (milliseconds on a busy disk). Callers
whose files mean nothing after a reboot pass ``durable=False`` and keep the atomicity.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` also makes it survive a power loss."""
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fchmod(tmp.fileno(), mode)
            if durable:
                os.fsync(tmp.fileno())
        Path(tmp_name).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp_name).unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def remove_durable(path: Path, *, durable: bool = True) -> bool:
    """Delete ``path`` (if present), durably unless ``durable`` is False; return whether it existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    if durable:
        fsync_dir(path.parent)
    return True
