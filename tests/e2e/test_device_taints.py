"""Device taints from health, on the real scheduler: set -> claims avoid the GPU -> recovery -> allocatable.

A fatal XID injected into a simulated GPU (the fake NVML's health entry, the same input the
kubelet's health stream reads) must put NVIDIA's ``gpu.nvidia.com/xid`` taint on that GPU's
devices in the ResourceSlices, every MIG placement of it included; the real kube-scheduler then
gives a claim pinned to that GPU nothing, a claim that may go anywhere another GPU, and a claim
that tolerates the taint the tainted GPU. When the GPU's driver reports its recovery done (the
recovery action goes back to NONE after asking for a reset) - or an operator clears the taint
with ``gpu-dra taints clear`` - the taint goes and the waiting claim is allocated and prepared.
Throughout, the health stream the kubelet reads says UNHEALTHY for exactly the tainted devices.
MPS and dynamic MIG are on (the defaults) and used by the claims here.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import grpc
import pytest

from driver.inventory import DRIVER_NAME
from driver.kubeletapi import health_v1alpha1_pb2, health_v1alpha1_pb2_grpc
from driver.kubeletplugin.sockets import SocketPaths
from driver.nvml.fakestate import FakeState
from tests.e2e.test_scenario_02 import (
    await_on,
    claim_and_pod,
    is_running,
    is_unschedulable,
    list_pods,
    namespace_doc,
    read_claim,
    results,
)
from tests.e2e.test_scenario_04 import mig_node
from tests.ground.node import REPO, NodeFactory, SimulatedNode

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

XID_KEY = "gpu.nvidia.com/xid"
FAST = ("--recovery-poll-interval", "0.5")
MPS_CONFIG = {
    "apiVersion": "resource.nvidia.com/v1beta1",
    "kind": "GpuConfig",
    "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}},
}
MIG_MPS_CONFIG = {**MPS_CONFIG, "kind": "MigDeviceConfig"}


def devices_by_name(node: SimulatedNode) -> dict[str, dict[str, Any]]:
    return {
        d["name"]: d
        for s in node.slices()
        if s["spec"]["driver"] == DRIVER_NAME
        for d in s["spec"].get("devices") or []
    }


def taints(node: SimulatedNode) -> dict[str, list[tuple[str, str, str]]]:
    """Published taints by device: (key, value, effect); devices without taints left out."""
    out = {}
    for name, d in devices_by_name(node).items():
        if d.get("taints"):
            out[name] = sorted((t["key"], t.get("value", ""), t["effect"]) for t in d["taints"])
    return out


def uuid_of(node: SimulatedNode, device: str) -> str:
    uuid: str = devices_by_name(node)[device]["attributes"]["uuid"]["string"]
    return uuid


def inject(node: SimulatedNode, uuid: str, **entry: Any) -> None:
    with FakeState(node.fake_state).edit() as doc:
        doc.setdefault("health", {})[uuid] = entry


def stream_health(node: SimulatedNode) -> dict[str, int]:
    """One message of the kubelet's health stream (v1alpha1, what a 1.36 kubelet opens), by device."""
    paths = SocketPaths.for_driver(node.registry_dir, node.plugins_dir, DRIVER_NAME)
    with grpc.insecure_channel(f"unix://{paths.dra}") as channel:
        stub = health_v1alpha1_pb2_grpc.DRAResourceHealthStub(channel)
        stream = stub.NodeWatchResources(health_v1alpha1_pb2.NodeWatchResourcesRequest(), timeout=30)
        message = next(iter(stream))
        stream.cancel()  # type: ignore[no-untyped-call]
    return {d.device.device_name: int(d.health) for d in message.devices}


def agree(node: SimulatedNode) -> tuple[dict[str, Any], dict[str, int]] | None:
    """(taints, stream health) once UNHEALTHY in the stream is exactly the devices with NoSchedule taints."""
    published = taints(node)
    health = stream_health(node)
    blocked = {n for n, ts in published.items() if any(effect == "NoSchedule" for _, _, effect in ts)}
    unhealthy = {n for n, h in health.items() if h == health_v1alpha1_pb2.UNHEALTHY}
    return (published, health) if blocked == unhealthy else None


def pinned(uuid: str, *, tolerate: bool = False, mps: bool = False) -> dict[str, Any]:
    exactly: dict[str, Any] = {
        "deviceClassName": "gpu.nvidia.com",
        "selectors": [{"cel": {"expression": f'device.attributes["gpu.nvidia.com"].uuid == "{uuid}"'}}],
    }
    if tolerate:
        exactly["tolerations"] = [{"key": XID_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    spec: dict[str, Any] = {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}
    if mps:
        spec["devices"]["config"] = [
            {"requests": ["gpu"], "opaque": {"driver": DRIVER_NAME, "parameters": MPS_CONFIG}}
        ]
    return spec


def any_gpu() -> dict[str, Any]:
    return {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}}


def allocated_devices(node: SimulatedNode, ns: str, name: str) -> list[str] | None:
    found = [r["device"] for r in results(read_claim(node.api, ns, name))]
    return found or None


def pod_of(node: SimulatedNode, ns: str, name: str) -> dict[str, Any]:
    (pod,) = list_pods(node.api, ns, name)
    return pod


def test_a_tainted_gpu_gets_no_new_claim_until_it_recovers(node_factory: NodeFactory) -> None:
    ns = "taints-full"
    node = node_factory("taints-l4", "l4-x2", extra_args=FAST)
    sick, well = uuid_of(node, "gpu-0"), uuid_of(node, "gpu-1")
    assert taints(node) == {}
    assert set(stream_health(node).values()) == {health_v1alpha1_pb2.HEALTHY}

    # The driver reports XID 48 (double-bit ECC) and asks for a GPU reset.
    inject(node, sick, xid=48, recoveryAction=1, message="injected DBE")
    await_on(
        node, lambda: taints(node) == {"gpu-0": [(XID_KEY, "48", "NoSchedule")]}, "the XID taint on gpu-0"
    )
    published, health = await_on(node, lambda: agree(node), "health stream and taints to agree")
    assert health["gpu-0"] == health_v1alpha1_pb2.UNHEALTHY
    assert health["gpu-1"] == health_v1alpha1_pb2.HEALTHY

    node_factory.apply([namespace_doc(ns)])
    # A claim that tolerates the taint may still have the GPU (with MPS, prepared on it).
    node_factory.apply(claim_and_pod("tolerant", ns, node.name, pinned(sick, tolerate=True, mps=True)))
    assert await_on(node, lambda: allocated_devices(node, ns, "tolerant"), "the tolerating claim") == [
        "gpu-0"
    ]
    await_on(node, lambda: is_running(pod_of(node, ns, "tolerant")), "the tolerating pod to run")
    tolerant = read_claim(node.api, ns, "tolerant")
    assert tolerant["metadata"]["uid"] in node.checkpoint()
    node_factory.delete([o for o in node_factory.applied if o["metadata"]["name"] == "tolerant"])

    # A claim that may go anywhere avoids the tainted GPU; one pinned to it waits.
    node_factory.apply(claim_and_pod("anywhere", ns, node.name, any_gpu()))
    node_factory.apply(claim_and_pod("pinned", ns, node.name, pinned(sick)))
    assert await_on(node, lambda: allocated_devices(node, ns, "anywhere"), "the unpinned claim") == ["gpu-1"]
    await_on(node, lambda: is_unschedulable(pod_of(node, ns, "pinned")), "the pinned pod to be unschedulable")
    assert results(read_claim(node.api, ns, "pinned")) == []
    assert well not in str(taints(node))

    # The reset happened: the driver's recovery action is back to NONE; the taint goes by itself.
    inject(node, sick, xid=48, recoveryAction=0, message="injected DBE")
    await_on(node, lambda: taints(node) == {}, "the XID taint to be cleared on recovery")
    await_on(node, lambda: agree(node), "health stream and taints to agree after recovery")
    assert set(stream_health(node).values()) == {health_v1alpha1_pb2.HEALTHY}
    assert await_on(
        node, lambda: allocated_devices(node, ns, "pinned"), "the pinned claim after recovery"
    ) == ["gpu-0"]
    await_on(node, lambda: is_running(pod_of(node, ns, "pinned")), "the pinned pod to run after recovery")
    assert published  # the first agreement saw the taint


def test_every_mig_placement_of_a_tainted_gpu_is_tainted_until_an_operator_clears_it(
    node_factory: NodeFactory,
) -> None:
    ns = "taints-mig"
    node = mig_node(node_factory, "taints-mig", "a100-40gb-x1-mig", extra_args=FAST)
    devices = devices_by_name(node)
    placements = sorted(n for n, d in devices.items() if d.get("consumesCounters"))
    assert placements, f"no dynamic MIG placements published: {sorted(devices)}"
    target = placements[0]  # any device of the GPU names it for the operator's clear
    parent: str = devices[target]["attributes"]["parentUUID"]["string"]

    # XID 79 (fallen off the bus) with no recovery action reported: nothing says it is over.
    inject(node, parent, xid=79)
    want = [(XID_KEY, "79", "NoSchedule")]
    await_on(
        node,
        lambda: set(taints(node)) == set(devices) and all(t == want for t in taints(node).values()),
        "the XID taint on the GPU and every MIG placement",
    )
    await_on(node, lambda: agree(node), "health stream and taints to agree")

    node_factory.apply([namespace_doc(ns)])
    mig_claim = {
        "devices": {
            "requests": [
                {
                    "name": "gpu",
                    "exactly": {
                        "deviceClassName": "mig.nvidia.com",
                        "selectors": [
                            {"cel": {"expression": 'device.attributes["gpu.nvidia.com"].profile == "1g.5gb"'}}
                        ],
                    },
                }
            ],
            "config": [
                {"requests": ["gpu"], "opaque": {"driver": DRIVER_NAME, "parameters": MIG_MPS_CONFIG}}
            ],
        }
    }
    node_factory.apply(claim_and_pod("slice", ns, node.name, mig_claim))
    await_on(node, lambda: is_unschedulable(pod_of(node, ns, "slice")), "the MIG pod to be unschedulable")
    assert results(read_claim(node.api, ns, "slice")) == []

    # The operator has checked the GPU and clears the taint by hand.
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "driver",
            "taints",
            "clear",
            target,
            "--key",
            "xid",
            "--state-dir",
            str(node.state_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "cleared" in cli.stdout
    await_on(node, lambda: taints(node) == {}, "the taints to be cleared by the operator")
    await_on(node, lambda: agree(node), "health stream and taints to agree after the clear")
    (device,) = await_on(node, lambda: allocated_devices(node, ns, "slice"), "the MIG claim after the clear")
    assert device in placements
    await_on(node, lambda: is_running(pod_of(node, ns, "slice")), "the MIG pod to run after the clear")
    listing = subprocess.run(
        [sys.executable, "-m", "driver", "taints", "--state-dir", str(node.state_dir), "-o", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"devices": {}' in listing.stdout
