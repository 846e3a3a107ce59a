"""Static MIG fallback on a real API server that does not keep partitionable-device fields.

Why: a 1.34/1.35 cluster without ``DRAPartitionableDevices`` silently drops ``sharedCounters``
and ``consumesCounters`` from ResourceSlices. Dynamic MIG placements published there would
carry no counters, and the scheduler would hand out overlapping slices of one GPU. The plugin
must notice what the server dropped, say so once (with the fix), publish the MIG devices that
already exist instead (static MIG), and not loop re-sending what the server trims (issue 4
part 5, the last bullet of scenario 04's expect.md).

How: a second, test-local control plane (v1.36.3 with ``DRAPartitionableDevices=false``, which
drops the fields the same way 1.34/1.35 do by default) and the session's control plane as the
contrast, where the same node publishes dynamic placements with their counters. The node has
one A100-40GB in MIG mode with two instances an admin made before the plugin started.

What it does not do: test the publisher's field comparison in isolation (tests/unit) or dynamic
MIG prepares (test_scenario_04).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driver.inventory import DRIVER_NAME
from driver.nvml.fakemig import cap_minor_for
from driver.nvml.mig import NvmlMigBackend
from mig.manager import MigManager
from mig.spec import MigLive, MigSpec
from tests.e2e.test_scenario_02 import (
    await_on,
    claim_and_pod,
    is_running,
    list_pods,
    namespace_doc,
    read_claim,
    results,
    unprepared,
)
from tests.e2e.test_scenario_04 import allow_mig_gpus, gis, mig_claim_spec, seed_fake_state
from tests.ground.controlplane import ControlPlane, start_control_plane
from tests.ground.node import Cluster, NodeFactory, SimulatedNode, start_cluster_objects

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

VERSION = "v1.36.3"
NODE = "gpu-a100-1"
TOPOLOGY = "a100-40gb-x1-mig"
NS = "static-mig"
#: The daemon's one warning when it falls back (driver/daemon.py Daemon._fields_dropped).
FALLBACK_LOG = "publishing existing MIG devices (static MIG)"
#: Long enough for several of the publisher's resync (1 s) and retry (0.5 s doubling) rounds.
IDLE_S = 4.0

#: The admin's MIG devices: (profile, GI profile id, placement start, size) on an A100-40GB.
ADMIN_MIG = (("1g.5gb", 19, 0, 1), ("3g.20gb", 9, 4, 4))
STATIC_NAMES = ["gpu-0-mig-1g5gb-19-0", "gpu-0-mig-3g20gb-9-4"]


@pytest.fixture(scope="module")
def gateless_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of its own whose API server drops partitionable-device fields."""
    cp = start_control_plane(
        tmp_path_factory.mktemp("controlplane-no-partitionable"),
        VERSION,
        extra_feature_gates={"DRAPartitionableDevices": False},
    )
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def gateless_factory(gateless_plane: ControlPlane, tmp_path: Path) -> Iterator[NodeFactory]:
    api = gateless_plane.api_client()
    cluster = Cluster(gateless_plane, api, start_cluster_objects(gateless_plane, api).objects)
    factory = NodeFactory(cluster, tmp_path / "nodes")
    try:
        yield factory
    finally:
        try:
            factory.cleanup()
        finally:
            closer: Any = api.close
            closer()


def node_with_admin_mig(factory: NodeFactory) -> tuple[SimulatedNode, dict[str, MigLive]]:
    """An unstarted node whose GPU already holds :data:`ADMIN_MIG`; those instances by device name."""
    node = factory(NODE, TOPOLOGY, start=False)
    allow_mig_gpus(node)
    nvml = seed_fake_state(node)
    try:
        (gpu,) = node.gpu_state()
        manager = MigManager(NvmlMigBackend(nvml))
        made: list[tuple[MigSpec, MigLive]] = []
        for profile, profile_id, start, size in ADMIN_MIG:
            spec = MigSpec(0, gpu, profile, profile_id, start, size)
            made.append((spec, manager.create(spec)))
    finally:
        nvml.shutdown()
    return node, {spec.name: live for spec, live in made}


def pool(node: SimulatedNode) -> list[dict[str, Any]]:
    return [s for s in node.slices() if s["spec"]["driver"] == DRIVER_NAME]


def devices(slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for s in slices for d in s["spec"].get("devices") or []]


def whole(slices: list[dict[str, Any]]) -> bool:
    """One generation, and every slice of it is there."""
    shapes = {(s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"]) for s in slices}
    return len(shapes) == 1 and next(iter(shapes))[1] == len(slices)


def events(node: SimulatedNode, text: str) -> list[dict[str, Any]]:
    return [e for e in node.plugin_events() if text in str(e.get("event", ""))]


def fallen_back(node: SimulatedNode, admin: dict[str, MigLive]) -> list[dict[str, Any]]:
    """Wait until the pool holds exactly the admin's MIG devices, as static devices; return it."""

    def static_pool() -> list[dict[str, Any]] | None:
        slices = pool(node)
        names = sorted(d["name"] for d in devices(slices))
        return slices if whole(slices) and names == STATIC_NAMES else None

    slices = await_on(node, static_pool, "the pool to hold only the admin's MIG devices")
    for device in devices(slices):
        assert device["attributes"]["uuid"] == {"string": admin[device["name"]].mig_uuid}
        assert device["attributes"]["type"] == {"string": "mig"}
        assert not device.get("consumesCounters"), device
    assert not any(s["spec"].get("sharedCounters") for s in slices), slices
    return slices


def assert_quiet(node: SimulatedNode, slices: list[dict[str, Any]]) -> None:
    """Nothing is written while the node is idle: the plugin does not re-send what the server trims."""
    versions = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in slices}
    syncs = len(events(node, "syncing resource slices"))
    said = len(events(node, FALLBACK_LOG))
    time.sleep(IDLE_S)
    assert {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in pool(node)} == versions
    assert len(events(node, "syncing resource slices")) == syncs, node.log_tail()
    assert len(events(node, FALLBACK_LOG)) == said


def test_dropped_counters_fall_back_to_static_mig(gateless_factory: NodeFactory) -> None:
    node, admin = node_with_admin_mig(gateless_factory)
    (gpu,) = node.gpu_state()
    instances = gis(node, gpu)
    assert len(instances) == len(ADMIN_MIG)
    node.start()
    slices = fallen_back(node, admin)

    # A dry run told the plugin the server drops counters before anything was stored: it says so
    # once, naming the fix, and never published a placement without its counters.
    said = events(node, FALLBACK_LOG)
    assert len(said) == 1, said
    assert "DRAPartitionableDevices" in said[0]["fix"]
    assert any("ounter" in f for f in said[0]["fields"]), said[0]
    probed = events(node, "api server drops partitionable-device fields")
    assert len(probed) == 1, probed
    created = events(node, "resource slice created")
    assert created, node.log_tail()
    assert all(e.get("counter_sets", 0) == 0 for e in created), created
    assert_quiet(node, slices)
    assert gis(node, gpu) == instances  # falling back created and destroyed nothing

    # The real scheduler allocates the static 1g.5gb device; prepare creates nothing.
    gateless_factory.apply([namespace_doc(NS)])
    gateless_factory.apply(claim_and_pod("one-slice", NS, NODE, mig_claim_spec({"mig": "1g.5gb"})))
    await_on(
        node,
        lambda: [p for p in list_pods(node.api, NS, "one-slice") if is_running(p)],
        "the pod on the static MIG device to run",
    )
    claim = read_claim(node.api, NS, "one-slice")
    device = "gpu-0-mig-1g5gb-19-0"
    assert [(r["pool"], r["device"]) for r in results(claim)] == [(NODE, device)]
    uid = claim["metadata"]["uid"]
    (prepared,) = node.checkpoint()[uid].devices
    assert (prepared.device, prepared.kind, prepared.mig) == (device, "mig-static", None)
    spec = node.cdi_spec(uid)
    assert spec is not None
    (cdi_device,) = spec["devices"]
    live = admin[device]
    nodes = {n["path"] for n in cdi_device["containerEdits"].get("deviceNodes") or []}
    assert {
        "/dev/nvidia0",
        f"/dev/nvidia-caps/nvidia-cap{cap_minor_for(0, live.gi_id, None)}",
        f"/dev/nvidia-caps/nvidia-cap{cap_minor_for(0, live.gi_id, live.ci_id)}",
    } <= nodes, nodes
    assert gis(node, gpu) == instances

    # A restarted plugin meets the same server: it falls back again (once), keeps the claim and
    # leaves the admin's instances alone.
    node.kill_plugin()
    node.start_plugin()
    await_on(node, lambda: len(events(node, FALLBACK_LOG)) == 2, "the restarted plugin to fall back")
    assert_quiet(node, fallen_back(node, admin))
    assert uid in node.checkpoint()
    assert gis(node, gpu) == instances

    # Unprepare leaves the admin's instance alone too.
    gateless_factory.delete(gateless_factory.applied[1:])
    unprepared(node, uid)
    assert gis(node, gpu) == instances


def test_server_keeping_counters_gets_dynamic_placements(node_factory: NodeFactory) -> None:
    """Contrast: the same node on the session's control plane (fields kept) publishes placements."""
    node, _ = node_with_admin_mig(node_factory)
    node.start()

    def published() -> list[dict[str, Any]] | None:
        slices = pool(node)
        return slices if whole(slices) else None

    slices = await_on(node, published, "a whole pool")
    assert any(s["spec"].get("sharedCounters") for s in slices), slices
    names = {d["name"] for d in devices(slices)}
    # Placements around the admin's instances are offered (1g.5gb at 1..3), with their counters.
    assert {f"gpu-0-mig-1g5gb-19-{start}" for start in (1, 2, 3)} <= names, sorted(names)
    assert all(d.get("consumesCounters") for d in devices(slices) if d["name"] not in STATIC_NAMES), slices
    assert not events(node, FALLBACK_LOG)
