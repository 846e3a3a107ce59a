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
import errno
import os
import stat
import tempfile
from pathlib import Path

#: Errors a person fixes on the file system itself; their message then names the directory.
_FS_FULL = {errno.ENOSPC: "is full (no space left on the device)", errno.EDQUOT: "is over its disk quota"}
_FS_DENIED = {
    errno.EROFS: "is on a read-only file system",
    errno.EACCES: "is not writable",
    errno.EPERM: "is not writable",
}


def explained(exc: OSError, path: Path) -> OSError:
    """``exc`` with a message naming the directory of ``path`` and what to do, same type and errno."""
    directory = path.parent
    if exc.errno in _FS_FULL:
        text = f"cannot write {path.name}: directory {directory} {_FS_FULL[exc.errno]}; free space there"
    elif exc.errno in _FS_DENIED:
        text = f"cannot write {path.name}: directory {directory} {_FS_DENIED[exc.errno]}; mount it read-write"
    else:
        return exc
    out = type(exc)(exc.errno, text)
    out.filename = str(path)
    return out


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
    try:
        _write_atomic(path, payload, mode, durable=durable)
    except OSError as exc:
        raise explained(exc, path) from exc


def _write_atomic(path: Path, payload: bytes, mode: int, *, durable: bool) -> None:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    except FileNotFoundError:  # the directory is made on first use (or after someone removed it)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            # mkstemp asks for 0600 (less any umask bits); a change of mode is an inode update.
            if stat.S_IMODE(os.fstat(tmp.fileno()).st_mode) != mode:
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
    except OSError as exc:
        # A read-only file system refuses even to remove what is not there; absent is removed.
        if not os.path.lexists(path):
            return False
        raise explained(exc, path) from exc
    if durable:
        fsync_dir(path.parent)
    return True
