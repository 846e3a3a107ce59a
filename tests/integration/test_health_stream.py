"""The kubelet's view of device health: NodeWatchResources over a real Unix socket, v1 and v1alpha1.

In-process plugin with the file-backed fake health source (fast heartbeat), plus the daemon as a
process on a MIG topology to check the wiring end to end.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from driver.health import FakeHealthSource, Health, HealthMonitor
from driver.inventory import AllocatableDevice, Inventory
from driver.kubeletapi import (
    health_v1_pb2,
    health_v1_pb2_grpc,
    health_v1alpha1_pb2,
    health_v1alpha1_pb2_grpc,
    registration_pb2,
    registration_pb2_grpc,
)
from driver.kubeletplugin import KubeletPlugin, SocketPaths
from driver.kubeletplugin.claims import StaticClaimSource
from driver.kubeletplugin.draservice import DraService
from driver.kubeletplugin.healthstream import HEALTH_SERVICES, health_handlers
from driver.nvml.fakestate import FakeState
from mig.spec import MigLive, MigSpec
from tests.integration.test_daemon import Layout, start, stop, temp_layout, wait_for_socket
from tests.integration.test_state import DRIVER, NODE, gpu_inventory, gpu_uuid, make_node

API = {
    "v1": (health_v1_pb2, health_v1_pb2_grpc),
    "v1alpha1": (health_v1alpha1_pb2, health_v1alpha1_pb2_grpc),
}
RPC_TIMEOUT_S = 60  # a safety net only: every wait below ends on a message, not on time


def inject(state: Path, uuid: str, **entry: Any) -> None:
    """Fault injection: give the fake GPU ``uuid`` a health entry (e.g. ``xid=79``)."""
    with FakeState(state).edit() as doc:
        doc.setdefault("health", {})[uuid] = entry


def mig_devices(minor: int) -> list[AllocatableDevice]:
    """One dynamic placement and one existing (static) instance on GPU ``minor``."""
    dynamic = MigSpec(minor, gpu_uuid(minor), "1g.5gb", 19, 0, 1)
    static = MigSpec(minor, gpu_uuid(minor), "3g.20gb", 9, 4, 4)
    live = MigLive(minor, gpu_uuid(minor), 2, 0, f"MIG-{minor}", 9, 4)
    return [
        AllocatableDevice(dynamic.name, "mig-dynamic", gpu_uuid(minor), minor, {}, {}, mig_spec=dynamic),
        AllocatableDevice(
            static.name, "mig-static", gpu_uuid(minor), minor, {}, {}, mig_spec=static, mig_live=live
        ),
    ]


@dataclass
class Plugin:
    plugin: KubeletPlugin
    monitor: HealthMonitor
    state: Path
    inventory: Inventory

    def watch(self, version: str) -> Any:
        pb, pb_grpc = API[version]
        channel = grpc.insecure_channel(f"unix://{self.plugin.paths.dra}")
        stub = pb_grpc.DRAResourceHealthStub(channel)
        return stub.NodeWatchResources(pb.NodeWatchResourcesRequest(), timeout=RPC_TIMEOUT_S)


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    sockets = Path(tempfile.mkdtemp(prefix="gh-", dir="/tmp"))  # short: Unix socket path limit
    inventory = gpu_inventory(extra=mig_devices(2))
    node = make_node(tmp_path, inventory=inventory)
    state = tmp_path / "fake-nvml.json"
    monitor = HealthMonitor(
        NODE, lambda: node.state.inventory.devices, FakeHealthSource(state, poll_s=0.05), wait_s=0.05
    )
    monitor.start()
    paths = SocketPaths.for_driver(sockets / "registry", sockets / "plugins", DRIVER, None)
    kp = KubeletPlugin(
        DRIVER,
        paths,
        DraService(node.state, StaticClaimSource()),
        extra_handlers=health_handlers(monitor, heartbeat_s=0.2),
        extra_services=HEALTH_SERVICES,
    )
    kp.start()
    yield Plugin(kp, monitor, state, inventory)
    monitor.stop()
    kp.stop(grace_s=0.5)
    shutil.rmtree(sockets, ignore_errors=True)


def health_of(message: Any) -> dict[str, tuple[int, str]]:
    return {d.device.device_name: (d.health, d.message) for d in message.devices}


def next_where(stream: Any, predicate: Any, limit: int = 200) -> Any:
    """The first message satisfying ``predicate`` (at most ``limit`` messages read)."""
    for _, message in zip(range(limit), stream, strict=False):
        if predicate(message):
            return message
    pytest.fail(f"no matching health message within {limit} messages")


@pytest.mark.parametrize("version", ["v1", "v1alpha1"])
def test_first_message_lists_every_device_healthy(plugin: Plugin, version: str) -> None:
    before = int(time.time())
    stream = plugin.watch(version)
    try:
        first = next(stream)
    finally:
        stream.cancel()
    names = [d.device.device_name for d in first.devices]
    assert names == [d.name for d in plugin.inventory.devices]
    assert len(names) == 10  # 8 GPUs + 2 MIG devices on gpu-2
    assert {d.device.pool_name for d in first.devices} == {NODE}
    assert {d.health for d in first.devices} == {Health.HEALTHY}
    assert all(d.last_updated_time >= before for d in first.devices)


@pytest.mark.parametrize("version", ["v1", "v1alpha1"])
def test_xid_79_makes_the_gpu_and_its_mig_devices_unhealthy(plugin: Plugin, version: str) -> None:
    stream = plugin.watch(version)
    try:
        assert {d.health for d in next(stream).devices} == {Health.HEALTHY}
        inject(plugin.state, gpu_uuid(2), xid=79, message="GPU has fallen off the bus")
        changed = next_where(stream, lambda m: any(d.health == Health.UNHEALTHY for d in m.devices))
    finally:
        stream.cancel()
    health = health_of(changed)
    mig_names = {d.name for d in mig_devices(2)}
    unhealthy = {name for name, (h, _) in health.items() if h == Health.UNHEALTHY}
    assert unhealthy == {"gpu-2", *mig_names}
    for name in unhealthy:
        assert "XID 79" in health[name][1]
    assert len(health) == 10  # still the complete list
    assert health["gpu-1"] == (Health.HEALTHY, "healthy")


def test_instance_xid_hits_only_that_mig_device(plugin: Plugin) -> None:
    dynamic, static = mig_devices(2)
    stream = plugin.watch("v1")
    try:
        next(stream)
        inject(plugin.state, gpu_uuid(2), xid=94, gi=2)
        changed = health_of(
            next_where(stream, lambda m: any(d.health == Health.UNHEALTHY for d in m.devices))
        )
    finally:
        stream.cancel()
    assert {n for n, (h, _) in changed.items() if h == Health.UNHEALTHY} == {static.name}
    assert changed[dynamic.name][0] == changed["gpu-2"][0] == Health.HEALTHY


def test_ignored_xid_leaves_the_gpu_healthy(plugin: Plugin) -> None:
    stream = plugin.watch("v1")
    try:
        next(stream)
        inject(plugin.state, gpu_uuid(2), xid=13)
        noted = next_where(stream, lambda m: "XID 13" in health_of(m)["gpu-2"][1])
    finally:
        stream.cancel()
    assert {d.health for d in noted.devices} == {Health.HEALTHY}


def test_lost_and_unmonitored_gpus(plugin: Plugin) -> None:
    stream = plugin.watch("v1alpha1")
    try:
        next(stream)
        inject(plugin.state, gpu_uuid(0), gpuLost=True)
        inject(plugin.state, gpu_uuid(5), unmonitored=True)
        both = next_where(
            stream, lambda m: health_of(m)["gpu-0"][0] != Health.HEALTHY and health_of(m)["gpu-5"][0] != 1
        )
    finally:
        stream.cancel()
    health = health_of(both)
    assert health["gpu-0"][0] == Health.UNHEALTHY
    assert "lost" in health["gpu-0"][1]
    assert health["gpu-5"][0] == Health.UNKNOWN
    assert "not monitored" in health["gpu-5"][1]


def test_heartbeat_resends_the_full_list_without_changes(plugin: Plugin) -> None:
    stream = plugin.watch("v1")
    try:
        messages = [next(stream) for _ in range(4)]
    finally:
        stream.cancel()
    assert [len(m.devices) for m in messages] == [10, 10, 10, 10]
    assert all(health_of(m) == health_of(messages[0]) for m in messages)
    times = [m.devices[0].last_updated_time for m in messages]
    assert times == sorted(times)


def test_both_versions_stream_at_once_and_end_when_the_monitor_stops(plugin: Plugin) -> None:
    v1 = plugin.watch("v1")
    v1alpha1 = plugin.watch("v1alpha1")
    assert len(next(v1).devices) == len(next(v1alpha1).devices) == 10
    plugin.monitor.stop()
    # The streams finish normally (status OK) instead of hanging until the RPC deadline.
    rest = list(v1) + list(v1alpha1)
    assert len(rest) <= 2
    assert v1.code() == grpc.StatusCode.OK
    assert v1alpha1.code() == grpc.StatusCode.OK


def test_getinfo_advertises_health_after_the_dra_services(plugin: Plugin) -> None:
    with grpc.insecure_channel(f"unix://{plugin.plugin.paths.registration}") as channel:
        info = registration_pb2_grpc.RegistrationStub(channel).GetInfo(
            registration_pb2.InfoRequest(), timeout=10
        )
    assert list(info.supported_versions) == [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1.DRAResourceHealth",
        "v1alpha1.DRAResourceHealth",
    ]


# --- the daemon as a process -------------------------------------------------------------------


@pytest.fixture
def mig_layout() -> Iterator[Layout]:
    with temp_layout("ghd-", gpus=1) as lay:
        yield lay


def test_daemon_streams_health_of_mig_devices(mig_layout: Layout) -> None:
    """--nvml-backend fake on a MIG GPU: the stream covers the GPU's MIG devices; an injected XID
    reaches all of them; GetInfo lists the health services after the DRA ones."""
    argv_topology = ["--fake-topology", "a100-40gb-x1-mig"]
    proc = start(mig_layout, *argv_topology)
    wait_for_socket(proc, mig_layout.reg_socket)
    try:
        with grpc.insecure_channel(f"unix://{mig_layout.reg_socket}") as channel:
            info = registration_pb2_grpc.RegistrationStub(channel).GetInfo(
                registration_pb2.InfoRequest(), timeout=10
            )
        assert list(info.supported_versions)[2:] == list(HEALTH_SERVICES)
        state = mig_layout.state / "fake-nvml.json"
        # Opened right after registration, as a kubelet does: the stream waits for discovery
        # instead of sending an empty device list.
        channel = grpc.insecure_channel(f"unix://{mig_layout.dra_socket}")
        stream: Any = health_v1alpha1_pb2_grpc.DRAResourceHealthStub(channel).NodeWatchResources(
            health_v1alpha1_pb2.NodeWatchResourcesRequest(), timeout=RPC_TIMEOUT_S
        )
        try:
            first = health_of(next(stream))
            uuid = next(iter(FakeState(state).read()["gpus"]))
            inject(state, uuid, xid=79)
            changed = health_of(next_where(stream, lambda m: m.devices[0].health == Health.UNHEALTHY))
        finally:
            stream.cancel()
            channel.close()
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert any("-mig-" in name for name in first), first
    assert {h for h, _ in first.values()} == {Health.HEALTHY}
    assert set(changed) == set(first)
    assert {h for h, _ in changed.values()} == {Health.UNHEALTHY}
    assert all("XID 79" in m for _, m in changed.values())
