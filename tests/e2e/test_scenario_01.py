"""Scenario 01: a GPU chosen by description (architecture and memory), not by count.

tests/data/scenarios/01-attribute-selection/expect.md, on the real control plane with nodes
gpu-a100 (8x A100-SXM4-40GB) and gpu-t4 (4x T4), for the real kubelet (DRA v1) and a real 1.32
kubelet (v1beta1 only). One flow covers both halves of the expectation: with only
gpu-t4 the pod stays Pending and nothing is allocated there; once gpu-a100 joins, the pod lands on it,
is prepared with one GPU whose CDI device resolves to that GPU's device node plus the control
nodes, and deleting the Deployment unprepares the claim.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from driver.inventory import DRIVER_NAME
from tests.ground.kubelet import KUBELET_132_SERVICES, KUBELET_134_SERVICES, PREPARE, UNPREPARE
from tests.ground.node import (
    NodeFactory,
    SimulatedNode,
    allocation_results,
    cdi_inject,
    list_pods,
    pod_claim,
    pod_phase_on,
    scenario_path,
    slice_device,
    unschedulable_message,
    wait_for,
    wait_for_pod,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NS = "gpu-demo"
APP = "app=gpu-demo-app"
WAIT_S = 90.0
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")

KUBELETS = pytest.mark.parametrize(
    "kubelet",
    [
        pytest.param(KUBELET_134_SERVICES, id="real-kubelet-v1", marks=pytest.mark.real_kubelet),
        # The pinned real 1.32 kubelet (pins.env K8S_KUBELET_V1BETA1), which knows only v1beta1.
        pytest.param(KUBELET_132_SERVICES, id="real-kubelet-1.32-v1beta1", marks=pytest.mark.real_kubelet),
    ],
)


def device_nodes(edits: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["path"]: n for n in edits.get("deviceNodes") or []}


def assert_resolves_to_gpu(node: SimulatedNode, claim_uid: str, device: str, cdi_id: str) -> None:
    """The plugin's spec names this GPU's node and the control nodes, and the CDI library agrees."""
    minor = int(device.removeprefix("gpu-"))
    spec = node.cdi_spec(claim_uid)
    assert spec is not None, f"no CDI spec for claim {claim_uid} in {node.cdi_root}"
    kind, _, name = cdi_id.partition("=")
    assert spec["kind"] == kind == "k8s.gpu.nvidia.com/claim"
    (entry,) = [d for d in spec["devices"] if d["name"] == name]
    nodes = {**device_nodes(spec.get("containerEdits") or {}), **device_nodes(entry["containerEdits"])}
    assert f"/dev/nvidia{minor}" in nodes
    assert set(CONTROL_NODES) <= set(nodes)
    other_gpus = {p for p in nodes if re.fullmatch(r"/dev/nvidia\d+", p)} - {f"/dev/nvidia{minor}"}
    assert other_gpus == set(), f"the spec also hands out {other_gpus}"
    assert node.driver_root is not None
    host = nodes[f"/dev/nvidia{minor}"].get("hostPath", f"/dev/nvidia{minor}")
    assert host == str(node.driver_root.node(f"nvidia{minor}"))

    oci = cdi_inject(node.cdi_root, cdi_id)
    linux = {d["path"]: d for d in oci["linux"]["devices"]}
    assert (linux[f"/dev/nvidia{minor}"]["major"], linux[f"/dev/nvidia{minor}"]["minor"]) == (195, minor)
    assert set(CONTROL_NODES) <= set(linux)
    assert {p for p in linux if re.fullmatch(r"/dev/nvidia\d+", p)} == {f"/dev/nvidia{minor}"}


@KUBELETS
def test_pod_gets_an_ampere_gpu_on_gpu_a100_and_never_a_t4(
    node_factory: NodeFactory, kubelet: tuple[str, ...]
) -> None:
    node_factory.kubelet_services = kubelet
    t4 = node_factory("gpu-t4", "t4-x4")
    # The plugin runs as the chart's ServiceAccount, from a pod on its node: the chart's RBAC and
    # admission policy are what let it publish and read claims here.
    objs = node_factory.cluster.objects
    assert t4.identity() == (f"system:serviceaccount:{objs.namespace}:{objs.service_account}", ["gpu-t4"])
    objects = node_factory.apply(scenario_path("01-attribute-selection"))
    deployment = next(o for o in objects if o["kind"] == "Deployment")

    # Only gpu-t4: no T4 matches (Turing, 16 GiB), so the pod stays Pending and unallocated.
    pending = wait_for_pod(
        node_factory.api,
        NS,
        APP,
        unschedulable_message,
        timeout=WAIT_S,
        what="the scheduler to give up on the pod",
    )
    assert pod_phase_on(pending) == ("", "Pending")
    assert "claim" in unschedulable_message(pending), unschedulable_message(pending)
    claim = pod_claim(node_factory.api, pending, "gpu-0")
    assert claim is not None and allocation_results(claim) == []
    assert t4.kubelet.calls == []
    assert t4.checkpoint() == {}
    assert not list(t4.cdi_root.glob("*.json"))

    # gpu-a100 joins: the pod lands there with one full GPU of the node's pool.
    a100 = node_factory("gpu-a100", "a100-40gb-x8")
    pod = wait_for_pod(
        node_factory.api,
        NS,
        APP,
        lambda p: pod_phase_on(p) == ("gpu-a100", "Running"),
        timeout=WAIT_S,
        what="the pod to run on gpu-a100",
    )
    claim = pod_claim(node_factory.api, pod, "gpu-0")
    assert claim is not None
    uid = claim["metadata"]["uid"]
    (result,) = allocation_results(claim)
    assert (result["driver"], result["pool"], result["request"]) == (DRIVER_NAME, "gpu-a100", "gpu-0")
    device = result["device"]
    assert re.fullmatch(r"gpu-\d", device), device
    published = slice_device(a100, device)
    assert published["attributes"]["architecture"] == {"string": "Ampere"}
    assert published["attributes"]["type"] == {"string": "gpu"}
    assert published["capacity"]["memory"]["value"] == "40Gi"

    # NodePrepareResources: one call, over the service this kubelet picked, one device.
    assert a100.kubelet.plugin_for(DRIVER_NAME) is not None
    assert a100.kubelet.plugin_for(DRIVER_NAME).service == kubelet[0]  # type: ignore[union-attr]
    prepares = [c for c in a100.kubelet.calls if c.method == PREPARE]
    assert [(c.claims, c.error) for c in prepares] == [(((NS, uid, claim["metadata"]["name"]),), "")]
    (prepared,) = a100.kubelet.claim_devices(uid)
    cdi_id = f"k8s.gpu.nvidia.com/claim={uid}-{device}"
    assert (prepared.pool_name, prepared.device_name, prepared.cdi_device_ids) == (
        "gpu-a100",
        device,
        (cdi_id,),
    )
    assert prepared.request_names == ("gpu-0",)
    assert a100.kubelet.pod_cdi_devices[pod["metadata"]["uid"]] == {"gpu-demo-app": [cdi_id]}
    recorded = a100.checkpoint()[uid]
    assert recorded.state == "PrepareCompleted"
    assert [(d.device, d.cdi_device_ids) for d in recorded.devices] == [(device, [cdi_id])]
    assert_resolves_to_gpu(a100, uid, device, cdi_id)
    # Nothing happened on the T4 node meanwhile.
    assert t4.kubelet.calls == [] and t4.checkpoint() == {}

    # Deleting the Deployment unprepares: spec gone, checkpoint without the claim.
    node_factory.delete([deployment])
    wait_for(
        lambda: not list_pods(node_factory.api, NS, APP),
        WAIT_S,
        "the pod to go",
    )
    wait_for(lambda: uid not in a100.checkpoint(), WAIT_S, "the claim to leave the checkpoint")
    assert a100.cdi_spec(uid) is None
    assert not list(a100.cdi_root.glob("*.json"))
    unprepares = [c for c in a100.kubelet.calls if c.method == UNPREPARE]
    assert [(c.claims, c.error) for c in unprepares] == [(((NS, uid, claim["metadata"]["name"]),), "")]
