"""An exclusive file lock with a timeout, shared between processes and threads.

Two plugin processes can run on a node at once (a rolling update starts the new pod before the
old one is gone), so state they both write - the checkpoint, GPU settings - is guarded by a
``flock(2)`` on a file, not only by in-process locks. ``flock`` belongs to the open file, so two
:class:`FileLock` objects on the same path exclude each other even inside one process.

The lock is polled with ``LOCK_NB`` rather than blocking, so a hung holder turns into a
:class:`LockTimeoutError` naming the holder's pid instead of a hung kubelet call. The kernel drops
the lock when its holder dies, kill -9 included; nothing has to clean up after a crash.

What it does not do: re-entrancy (taking the same path twice in one thread deadlocks until the
timeout) or shared/read locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

import structlog

from driver.errors import DriverError

log = structlog.get_logger(__name__)

DEFAULT_POLL_S = 0.01


class LockTimeoutError(DriverError, TimeoutError):
    """The lock stayed held by someone else for the whole timeout."""


class FileLock:
    """``with FileLock(path, timeout_s):`` - hold an exclusive flock on ``path`` for the block."""

    def __init__(self, path: Path, timeout_s: float = 10.0, poll_s: float = DEFAULT_POLL_S) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, polling until ``timeout_s`` has passed; raise :class:`LockTimeoutError` then."""
        if self._fd is not None:
            raise RuntimeError(f"FileLock on {self.path} is already held by this object; release it first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._timeout_error() from None
                    time.sleep(self.poll_s)
            # The pid is for people reading the file while debugging a stuck lock; it is not
            # what makes the lock work.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _timeout_error(self) -> LockTimeoutError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = self.path.read_text().strip()
        who = f"process {holder}" if holder else "another process"
        log.warning("file lock timeout", path=str(self.path), timeout_s=self.timeout_s, holder=holder or None)
        return LockTimeoutError(
            f"could not lock {self.path} within {self.timeout_s:g}s: {who} holds it (another plugin "
            "instance during a rolling update, or an operation that hangs); the kubelet retries - if this "
            f"persists, find the holder with `fuser {self.path}` and check its logs"
        )

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
