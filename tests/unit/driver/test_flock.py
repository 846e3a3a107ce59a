"""FileLock: exclusive between processes and between lock objects, with a clear timeout."""

from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from driver.errors import DriverError
from driver.flock import FileLock, LockTimeoutError

CTX = mp.get_context("fork")


def _hold(path: str, locked: Event, release: Event) -> None:
    with FileLock(Path(path), timeout_s=5):
        locked.set()
        release.wait(30)


def test_lock_excludes_other_process_then_frees(tmp_path: Path) -> None:
    path = tmp_path / "pu.lock"
    locked, release = CTX.Event(), CTX.Event()
    child = CTX.Process(target=_hold, args=(str(path), locked, release))
    child.start()
    try:
        assert locked.wait(30)
        with pytest.raises(LockTimeoutError) as err:
            FileLock(path, timeout_s=0.05).acquire()
        msg = str(err.value)
        assert str(path) in msg
        assert f"process {child.pid}" in msg
        assert "fuser" in msg
        assert isinstance(err.value, TimeoutError)
        assert isinstance(err.value, DriverError)
    finally:
        release.set()
        child.join(30)
    with FileLock(path, timeout_s=5) as lock:
        assert lock.held
        assert path.read_text().strip() == str(os.getpid())
    assert not lock.held


def test_lock_dropped_when_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "cp.lock"
    locked, release = CTX.Event(), CTX.Event()
    child = CTX.Process(target=_hold, args=(str(path), locked, release))
    child.start()
    assert locked.wait(30)
    child.kill()
    child.join(30)
    with FileLock(path, timeout_s=5):
        pass


def test_two_lock_objects_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with FileLock(path, timeout_s=1), pytest.raises(LockTimeoutError):
        FileLock(path, timeout_s=0).acquire()


def test_waiter_gets_lock_after_release(tmp_path: Path) -> None:
    path = tmp_path / "w.lock"
    locked, release = CTX.Event(), CTX.Event()
    child = CTX.Process(target=_hold, args=(str(path), locked, release))
    child.start()
    assert locked.wait(30)
    release.set()
    # Generous timeout: the waiter polls until the child lets go.
    with FileLock(path, timeout_s=30, poll_s=0.005):
        pass
    child.join(30)


def test_double_acquire_same_object_is_a_bug(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "d.lock", timeout_s=0)
    lock.acquire()
    try:
        with pytest.raises(RuntimeError, match="already held"):
            lock.acquire()
    finally:
        lock.release()
    lock.release()  # releasing twice is harmless


def test_creates_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "l.lock"
    with FileLock(path, timeout_s=1):
        assert path.exists()
