"""An exclusive file lock with a timeout, shared between processes and threads.

Two plugin processes can run on a node at once (a rolling update starts the new pod before the
old one is gone), so state they both write - the checkpoint, GPU settings - is guarded by a
``flock(2)`` on a file, not only by in-process locks.

Threads of one process first queue on an in-process lock per path, and only its holder polls
the ``flock``: threads wait without polling and in arrival order, and two :class:`FileLock`
objects on the same path exclude each other inside one process too. Between processes the lock
is polled with ``LOCK_NB`` rather than blocking, so a hung holder turns into a
:class:`LockTimeoutError` naming the holder's pid instead of a hung kubelet call. The kernel drops
the lock when its holder dies, kill -9 included; nothing has to clean up after a crash.

The holder's pid is written into the lock file for people debugging a stuck lock, in a fixed
width and only when the file does not already say it: no truncation, and in the steady state
(one plugin instance) no write at all, so taking the lock costs no file-system metadata change.

What it does not do: re-entrancy (taking the same path twice in one thread deadlocks until the
timeout) or shared/read locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from types import TracebackType

import structlog

from driver.errors import DriverError

log = structlog.get_logger(__name__)

DEFAULT_POLL_S = 0.01
# Wider than any Linux pid (pid_max <= 2^22), so a rewrite always covers the previous holder's.
_PID_WIDTH = 10


class _Registry:
    """The in-process lock of each lock-file path, for the process's lifetime."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}

    def reset(self) -> None:
        # A fork copies locks held by threads that do not exist in the child; start it with none.
        self.guard = threading.Lock()
        self.locks = {}

    def lock_for(self, path: Path) -> threading.Lock:
        key = str(path.absolute())
        with self.guard:
            lock = self.locks.get(key)
            if lock is None:
                lock = self.locks[key] = threading.Lock()
            return lock


_registry = _Registry()
os.register_at_fork(after_in_child=_registry.reset)


class LockTimeoutError(DriverError, TimeoutError):
    """The lock stayed held by someone else for the whole timeout."""


def _pid_record() -> bytes:
    return f"{os.getpid():<{_PID_WIDTH}}\n".encode()


class FileLock:
    """``with FileLock(path, timeout_s):`` - hold an exclusive flock on ``path`` for the block."""

    def __init__(self, path: Path, timeout_s: float = 10.0, poll_s: float = DEFAULT_POLL_S) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._fd: int | None = None
        self._local: threading.Lock | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, waiting until ``timeout_s`` has passed; raise :class:`LockTimeoutError` then."""
        if self._fd is not None:
            raise RuntimeError(f"FileLock on {self.path} is already held by this object; release it first")
        deadline = time.monotonic() + self.timeout_s
        local = _registry.lock_for(self.path)
        got = local.acquire(timeout=self.timeout_s) if self.timeout_s > 0 else local.acquire(blocking=False)
        if not got:
            raise self._timeout_error()
        try:
            self._fd = self._lock_file(deadline)
        except BaseException:
            local.release()
            raise
        self._local = local

    def _lock_file(self, deadline: float) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:  # the directory is made on first use, not checked on every acquire
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._timeout_error() from None
                    time.sleep(self.poll_s)
            record = _pid_record()
            if os.pread(fd, len(record), 0) != record:
                # The holder's pid only helps a person find it; a full disk must not stop locking.
                with contextlib.suppress(OSError):
                    os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        local, self._local = self._local, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            if local is not None:
                local.release()

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
