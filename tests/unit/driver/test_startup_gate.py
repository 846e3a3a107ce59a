"""The daemon's start-up gate and the health monitor stand-in: what early kubelet calls meet."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from driver.daemon import LateHealthMonitor, StartupGate
from driver.errors import TemporaryClaimError


def test_a_call_that_waits_too_long_gets_a_temporary_error_naming_the_step() -> None:
    gate = StartupGate(wait_s=0.05)
    gate.phase = "discovering GPUs"
    with pytest.raises(TemporaryClaimError, match=r"still starting \(discovering GPUs\).*kubelet retries"):
        gate.state()


def test_waiting_calls_go_through_once_the_gate_opens() -> None:
    gate = StartupGate(wait_s=30.0)
    state: Any = object()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(gate.state()))
    waiter.start()
    gate.open(state)
    waiter.join(10)
    assert got == [state]
    assert gate.state() is state


def test_stopping_releases_waiting_calls_with_an_error() -> None:
    gate = StartupGate(wait_s=30.0)
    errors: list[str] = []

    def call() -> None:
        try:
            gate.state()
        except TemporaryClaimError as exc:
            errors.append(str(exc))

    waiter = threading.Thread(target=call)
    waiter.start()
    gate.close()
    waiter.join(10)
    assert len(errors) == 1
    assert "stopping" in errors[0]


class _Monitor:
    stopped = False

    def __init__(self) -> None:
        self.stops: list[float | None] = []

    def snapshot(self) -> str:
        return "snapshot-1"

    def stop(self, join_s: float | None = None) -> bool:
        self.stops.append(join_s)
        return True


def test_an_early_stream_waits_for_the_real_monitor() -> None:
    late = LateHealthMonitor(wait_s=30.0)
    seen: list[Any] = []
    stream = threading.Thread(target=lambda: seen.append(late.snapshot()))
    stream.start()
    monitor: Any = _Monitor()
    late.attach(monitor)
    stream.join(10)
    assert seen == ["snapshot-1"]
    assert late.close() is True
    assert monitor.stops == [0.0]  # shutdown never waits on the monitor's source
    assert late.stopped


def test_a_stream_opened_by_a_plugin_that_stops_before_discovery_ends_at_once() -> None:
    late = LateHealthMonitor(wait_s=30.0)
    seen: list[Any] = []
    stream = threading.Thread(target=lambda: seen.append(late.snapshot()))
    stream.start()
    assert late.close() is True
    stream.join(10)
    assert seen == [None]
    assert late.stopped
