"""Scenario 04 end to end: seven isolated 1g.5gb slices on one A100-40GB, made on demand.

On the real control plane with a simulated ``gpu-a100-1`` (one A100-SXM4-40GB, MIG mode on, no
instance yet, dynamic MIG): the scheduler gives seven claims seven different 1g.5gb placements
through the partitionable-device counters, each prepare creates exactly that GPU instance and its
compute instance in the fake GPU, the CDI spec carries the parent GPU node, the control nodes and
the two nvidia-caps nodes of that GI/CI, an eighth replica stays Pending, and scaling to zero
leaves the GPU as it began. Also: a claim for two slices of different profiles constrained to
one parent GPU, and MPS on a dynamic MIG device (which NVIDIA's driver cannot do).

The static-MIG fallback needs a 1.34 API server without DRAPartitionableDevices; its test is
skipped on any other control plane (see :func:`test_static_fallback_without_partitionable_devices`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from driver.inventory import DRIVER_NAME
from driver.nvml.backend import Nvml
from driver.nvml.fakemig import cap_minor_for
from driver.nvml.fakestate import FakeState
from mig.spec import ParsedMigName, parse_name
from tests.e2e.test_scenario_02 import (
    NS,
    await_on,
    claim_and_pod,
    is_unschedulable,
    list_claims,
    list_pods,
    namespace_doc,
    no_pods,
    read_claim,
    results,
    running_pods,
    scale,
    unprepared,
)
from tests.e2e.test_scenario_03 import alive, daemon_starts, mps_record, mps_status
from tests.ground.node import NodeFactory, SimulatedNode, scenario_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

APP = "gpu-demo-mig"
NODE = "gpu-a100-1"
TOPOLOGY = "a100-40gb-x1-mig"
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")

# ---------------------------------------------------------------------------------------------
# helpers shared with test_mig_exclusive


def mig_node(factory: NodeFactory, name: str, topology: str, **kwargs: Any) -> SimulatedNode:
    """A started node whose fake GPUs keep MIG capability files in its fake driver root.

    The fake writes ``proc/driver/nvidia/capabilities/.../access`` and ``dev/nvidia-caps`` entries
    for each instance only when its state names the driver root; CDI edits of a MIG device are
    built from those files, as on a real node.
    """
    node = factory(name, topology, start=False, **kwargs)
    seed_fake_state(node).shutdown()
    allow_mig_gpus(node)
    return node.start()


def allow_mig_gpus(node: SimulatedNode) -> None:
    """Let ``node.start()`` accept a pool without full GPUs: a GPU in MIG mode publishes none.

    The harness waits for a device ``gpu-<minor>`` per GPU; in MIG mode each GPU is represented
    by its MIG devices (``gpu-<minor>-mig-...``) instead.
    """

    def published(timeout: float = 90.0) -> list[dict[str, Any]]:
        def complete() -> list[dict[str, Any]] | None:
            slices = [s for s in node.slices() if s["spec"]["driver"] == DRIVER_NAME]
            counts = {s["spec"]["pool"]["resourceSliceCount"] for s in slices}
            names = {d["name"] for s in slices for d in s["spec"].get("devices") or []}
            whole = len(counts) == 1 and counts == {len(slices)}
            every_gpu = all(any(n.startswith(f"gpu-{m}") for n in names) for m in node.gpu_minors)
            return slices if slices and whole and every_gpu else None

        return await_on(
            node, complete, f"ResourceSlices of {node.name} naming a device of every GPU", timeout
        )

    node.wait_published = published  # type: ignore[method-assign]


def seed_fake_state(node: SimulatedNode) -> Nvml:
    """Create the node's fake state before the plugin does; return a fake NVML session on it."""
    nvml = Nvml.open("fake", fake_topology=node.topology, fake_state=node.fake_state, node_name=node.name)
    with FakeState(node.fake_state).edit() as doc:
        doc["driverRoot"] = str(node.workdir / "driver-root")
    return nvml


def mig_name(device: str) -> ParsedMigName:
    """The parts of a published dynamic MIG device name (which must be one)."""
    parsed = parse_name(device)
    assert parsed is not None, f"{device} is not a MIG device name"
    return parsed


def gis(node: SimulatedNode, gpu: str) -> dict[str, dict[str, Any]]:
    """GPU instances of ``gpu`` in the fake state, by GI id."""
    out: dict[str, dict[str, Any]] = node.gpu_state()[gpu].get("mig", {}).get("gis", {})
    return out


def device_nodes(edits: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["path"]: n for n in edits.get("deviceNodes") or []}


def check_mig_prepared(node: SimulatedNode, claim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each allocated MIG device of ``claim`` exists in the fake GPU exactly at its placement,
    is recorded in the checkpoint, and its CDI device has the parent node and both caps nodes.

    Returns the checkpoint's MIG records (in allocation order).
    """
    uid = claim["metadata"]["uid"]
    prepared = node.checkpoint()[uid]
    spec = node.cdi_spec(uid)
    assert spec is not None, f"no CDI spec for claim {uid}"
    assert set(CONTROL_NODES) <= set(device_nodes(spec["containerEdits"])), spec["containerEdits"]
    cdi_devices = {d["name"]: d for d in spec["devices"]}
    records = []
    for result, recorded in zip(results(claim), prepared.devices, strict=True):
        assert recorded.device == result["device"]
        wanted = mig_name(result["device"])
        mig = recorded.mig
        assert mig is not None, f"{result['device']} was prepared without creating a MIG device"
        assert (mig["gi_profile_id"], mig["placement_start"]) == (
            wanted.gi_profile_id,
            wanted.placement_start,
        )
        gi = gis(node, recorded.gpu_uuid)[str(mig["gi_id"])]
        assert (gi["profileId"], gi["start"]) == (wanted.gi_profile_id, wanted.placement_start)
        assert list(gi["cis"]) == [str(mig["ci_id"])]
        assert gi["cis"][str(mig["ci_id"])]["uuid"] == mig["mig_uuid"]
        nodes = device_nodes(cdi_devices[f"{uid}-{result['device']}"]["containerEdits"])
        minor = int(mig["parent_minor"])
        gi_cap = cap_minor_for(minor, int(mig["gi_id"]), None)
        ci_cap = cap_minor_for(minor, int(mig["gi_id"]), int(mig["ci_id"]))
        assert set(nodes) == {
            f"/dev/nvidia{minor}",
            f"/dev/nvidia-caps/nvidia-cap{gi_cap}",
            f"/dev/nvidia-caps/nvidia-cap{ci_cap}",
        }, nodes
        assert nodes[f"/dev/nvidia-caps/nvidia-cap{ci_cap}"]["minor"] == ci_cap
        records.append(dict(mig))
    return records


def mig_claim_spec(profiles: Mapping[str, str], same_parent: bool = True) -> dict[str, Any]:
    """A claim spec with one request per entry (request name -> MIG profile)."""
    requests = [
        {
            "name": name,
            "exactly": {
                "deviceClassName": "mig.nvidia.com",
                "selectors": [
                    {"cel": {"expression": f'device.attributes["gpu.nvidia.com"].profile == "{profile}"'}}
                ],
            },
        }
        for name, profile in profiles.items()
    ]
    spec: dict[str, Any] = {"devices": {"requests": requests}}
    if same_parent:
        spec["devices"]["constraints"] = [{"matchAttribute": "gpu.nvidia.com/parentUUID"}]
    return spec


# ---------------------------------------------------------------------------------------------
# scenario 04


def test_seven_pods_get_seven_1g5gb_placements(node_factory: NodeFactory) -> None:
    node = mig_node(node_factory, NODE, TOPOLOGY)
    before = node.gpu_state()
    (gpu,) = before
    assert before[gpu]["mig"]["current"] is True and not gis(node, gpu)
    node_factory.apply(scenario_path("04-mig-seven"))
    running_pods(node, NS, APP, 7)

    claims = list_claims(node.api, NS)
    assert len(claims) == 7
    devices = sorted(r["device"] for c in claims for r in results(c))
    assert devices == [f"gpu-0-mig-1g5gb-19-{start}" for start in range(7)]
    # Each prepare made exactly one GI (and its CI) at its placement: seven in all.
    for claim in claims:
        check_mig_prepared(node, claim)
    assert sorted(
        (g["profileId"], g["start"], g["size"], len(g["cis"])) for g in gis(node, gpu).values()
    ) == [(19, start, 1, 1) for start in range(7)]

    # An eighth replica: the GPU has no room, the scheduler says so and nothing changes.
    scale(node.api, NS, APP, 8)

    def eighth_pending() -> bool:
        pods = list_pods(node.api, NS, APP)
        return len(pods) == 8 and sum(is_unschedulable(p) for p in pods) == 1

    await_on(node, eighth_pending, "the eighth replica to be reported unschedulable")
    assert len(gis(node, gpu)) == 7
    assert sum(bool(results(c)) for c in list_claims(node.api, NS)) == 7

    # Scale to zero: every instance destroyed, the fake GPU as it began.
    scale(node.api, NS, APP, 0)
    no_pods(node, NS, APP)
    await_on(node, lambda: not node.checkpoint(), "every claim to be unprepared")
    assert node.gpu_state() == before
    assert not any(node.cdi_root.iterdir())


def test_two_profiles_on_one_parent_gpu(node_factory: NodeFactory) -> None:
    node = mig_node(node_factory, NODE, TOPOLOGY)
    before = node.gpu_state()
    (gpu,) = before
    ns = "mig-mixed"
    node_factory.apply(
        [
            namespace_doc(ns),
            *claim_and_pod("mixed", ns, node.name, mig_claim_spec({"big": "3g.20gb", "small": "1g.5gb"})),
        ]
    )
    running_pods(node, ns, "mixed", 1)
    claim = read_claim(node.api, ns, "mixed")
    by_request = {r["request"]: mig_name(r["device"]) for r in results(claim)}
    assert (by_request["big"].profile_slug, by_request["small"].profile_slug) == ("3g20gb", "1g5gb")
    big = set(range(by_request["big"].placement_start, by_request["big"].placement_start + 4))
    assert by_request["small"].placement_start not in big
    records = check_mig_prepared(node, claim)
    assert {r["parent_uuid"] for r in records} == {gpu}
    assert len(gis(node, gpu)) == 2

    node_factory.delete([o for o in node_factory.applied if o["kind"] == "Pod"])
    unprepared(node, claim["metadata"]["uid"])
    assert node.gpu_state() == before


def test_mps_on_a_dynamic_mig_device(node_factory: NodeFactory) -> None:
    node = mig_node(node_factory, NODE, TOPOLOGY)
    before = node.gpu_state()
    (gpu,) = before
    ns = "mig-mps"
    spec = mig_claim_spec({"slice": "1g.5gb"}, same_parent=False)
    spec["devices"]["config"] = [
        {
            "requests": ["slice"],
            "opaque": {
                "driver": DRIVER_NAME,
                "parameters": {
                    "apiVersion": "resource.nvidia.com/v1beta1",
                    "kind": "MigDeviceConfig",
                    "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}},
                },
            },
        }
    ]
    node_factory.apply([namespace_doc(ns), *claim_and_pod("mig-mps", ns, node.name, spec)])
    running_pods(node, ns, "mig-mps", 1)
    claim = read_claim(node.api, ns, "mig-mps")
    uid = claim["metadata"]["uid"]
    (mig,) = check_mig_prepared(node, claim)

    record = mps_record(node, uid)
    pipe_dir = Path(record["groupDir"]) / "pipe"
    pid = int(record["pid"])
    try:
        assert record["uuids"] == [mig["mig_uuid"]]
        (start,) = daemon_starts(node)
        assert start["visibleDevices"] == mig["mig_uuid"]
        status = mps_status(node, pipe_dir)
        assert status is not None and status["devices"] == [mig["mig_uuid"]] and status["percentage"] == 50.0
        # Compute mode is a full-GPU setting: MPS on a MIG device leaves it alone.
        assert node.gpu_state()[gpu]["computeMode"] == before[gpu]["computeMode"]
        spec_doc = node.cdi_spec(uid)
        assert spec_doc is not None
        (cdi_device,) = spec_doc["devices"]
        assert "CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps" in cdi_device["containerEdits"]["env"]

        node_factory.delete([o for o in node_factory.applied if o["kind"] == "Pod"])
        unprepared(node, uid)
        await_on(node, lambda: not alive(pid), f"MPS daemon {pid} to exit")
        assert node.gpu_state() == before
        assert node.cdi_spec(uid) is None
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# The scenario's last bullet (static fallback where the API server drops partitionable-device
# fields) is proven in tests/e2e/test_static_fallback.py, on a control plane started with
# DRAPartitionableDevices off.
