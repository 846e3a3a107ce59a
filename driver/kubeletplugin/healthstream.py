"""The kubelet's device-health stream: ``DRAResourceHealth.NodeWatchResources``, v1 and v1alpha1.

A 1.34-1.36 kubelet opens ``v1alpha1`` (1.36 probes every plugin; it has the gate on), a 1.37+
kubelet prefers ``v1`` when the plugin advertises it. Both carry the same messages, so one
core (:class:`HealthStream`) produces version-neutral snapshots and two thin servicers encode
them.

Each message is the *complete* device list of the pool with ``last_updated_time`` = now: the
kubelet marks any device it has not heard about for its health timeout (30 s by default) as
Unknown. So the list is re-sent every ``heartbeat_s`` as well as at once on a change.

This module does not decide health (``driver.health`` does) and does not advertise anything
itself: the daemon passes :data:`HEALTH_SERVICES` to the registration answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc
import structlog

from driver.errors import ConfigError
from driver.health import Snapshot
from driver.kubeletapi import (
    health_v1_pb2,
    health_v1_pb2_grpc,
    health_v1alpha1_pb2,
    health_v1alpha1_pb2_grpc,
)

log = structlog.get_logger(__name__)

#: Advertised after the DRA services, newest first (the kubelet picks the newest it knows).
HEALTH_SERVICES: tuple[str, ...] = ("v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth")
DEFAULT_HEARTBEAT_S = 10.0
#: The kubelet's default health timeout; a heartbeat must come well inside it.
KUBELET_HEALTH_TIMEOUT_S = 30.0


class HealthFeed(Protocol):
    """What a stream needs of the health monitor (``driver.health.HealthMonitor`` or a stand-in
    that waits for it while the plugin starts)."""

    @property
    def stopped(self) -> bool:
        """True once no more snapshots will come."""
        ...

    def snapshot(self) -> Snapshot | None:
        """The current snapshot (None: the plugin stops before it had one)."""
        ...

    def wait_for_change(
        self, version: int, timeout_s: float, cancelled: Callable[[], bool] = ...
    ) -> Snapshot | None:
        """The snapshot once newer than ``version`` or after ``timeout_s``; None once stopped."""
        ...

    def wake(self) -> None:
        """Make waiters re-check whether their stream was cancelled."""
        ...


class HealthStream:
    """Turns the monitor's snapshots into a paced sequence for one watching kubelet."""

    def __init__(
        self,
        monitor: HealthFeed,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Args:
        monitor: the source of snapshots.
        heartbeat_s: how often the full list is re-sent without a change.
        clock: Unix time for ``last_updated_time``.

        Raises:
            ConfigError: the heartbeat is not in (0, 30) seconds.
        """
        if not 0 < heartbeat_s < KUBELET_HEALTH_TIMEOUT_S:
            raise ConfigError(
                f"health heartbeat {heartbeat_s}s must be above 0 and below the kubelet's "
                f"{KUBELET_HEALTH_TIMEOUT_S:.0f}s health timeout; pick e.g. {DEFAULT_HEARTBEAT_S:.0f}"
            )
        self.monitor = monitor
        self.heartbeat_s = heartbeat_s
        self.clock = clock

    def watch(self, context: grpc.ServicerContext) -> Iterator[tuple[Snapshot, int]]:
        """Yield (snapshot, unix seconds) now, on every change and every heartbeat, until the RPC ends."""
        monitor = self.monitor
        # Woken when the kubelet goes away, so the worker thread is freed at once.
        context.add_callback(monitor.wake)
        snapshot: Snapshot | None = monitor.snapshot()
        log.info("health stream opened", devices=len(snapshot.devices) if snapshot else 0)
        sent = 0
        while snapshot is not None and context.is_active() and not monitor.stopped:
            yield snapshot, int(self.clock())
            sent += 1
            snapshot = monitor.wait_for_change(
                snapshot.version, self.heartbeat_s, cancelled=lambda: not context.is_active()
            )
        log.info("health stream closed", messages=sent, plugin_stopping=monitor.stopped)


def _encode(pb: Any, snapshot: Snapshot, now: int) -> Any:
    """One ``NodeWatchResourcesResponse`` of module ``pb`` (both versions share the schema)."""
    return pb.NodeWatchResourcesResponse(
        devices=[
            pb.DeviceHealth(
                device=pb.DeviceIdentifier(pool_name=snapshot.pool, device_name=d.device),
                health=int(d.status),
                last_updated_time=now,
                message=d.message,
            )
            for d in snapshot.devices
        ]
    )


class V1HealthServicer(health_v1_pb2_grpc.DRAResourceHealthServicer):
    """``v1.DRAResourceHealth`` (kubelet 1.37+)."""

    def __init__(self, stream: HealthStream) -> None:
        self._stream = stream

    def NodeWatchResources(
        self, request: health_v1_pb2.NodeWatchResourcesRequest, context: grpc.ServicerContext
    ) -> Iterator[health_v1_pb2.NodeWatchResourcesResponse]:
        """Stream the pool's device health."""
        for snapshot, now in self._stream.watch(context):
            yield _encode(health_v1_pb2, snapshot, now)


class V1Alpha1HealthServicer(health_v1alpha1_pb2_grpc.DRAResourceHealthServicer):
    """``v1alpha1.DRAResourceHealth`` (kubelet 1.34-1.39)."""

    def __init__(self, stream: HealthStream) -> None:
        self._stream = stream

    def NodeWatchResources(
        self, request: health_v1alpha1_pb2.NodeWatchResourcesRequest, context: grpc.ServicerContext
    ) -> Iterator[health_v1alpha1_pb2.NodeWatchResourcesResponse]:
        """Stream the pool's device health."""
        for snapshot, now in self._stream.watch(context):
            yield _encode(health_v1alpha1_pb2, snapshot, now)


def health_handlers(
    monitor: HealthFeed, heartbeat_s: float = DEFAULT_HEARTBEAT_S
) -> list[Callable[[grpc.Server], None]]:
    """The callbacks that add both health servicers to the DRA socket's server.

    Raises:
        ConfigError: the heartbeat is out of range.
    """
    stream = HealthStream(monitor, heartbeat_s)
    v1 = V1HealthServicer(stream)
    v1alpha1 = V1Alpha1HealthServicer(stream)
    return [
        lambda s: health_v1_pb2_grpc.add_DRAResourceHealthServicer_to_server(v1, s),
        lambda s: health_v1alpha1_pb2_grpc.add_DRAResourceHealthServicer_to_server(v1alpha1, s),
    ]
