"""Scenario 06: two pods share one named ResourceClaim, one GPU, no sharing configuration.

tests/data/scenarios/06-shared-inference/expect.md, on the real control plane with the simulated
node gpu-h100 (8x H100 80GB HBM3), for the real kubelet (DRA v1) and a real 1.32
kubelet (v1beta1 only): both pods land on gpu-h100 with the same CDI device; the claim is prepared once
and unprepared only after the second pod is gone; a repeated unprepare succeeds and does
nothing; the GPU itself is never touched (no compute-mode or time-slice change, no tool run).
"""

from __future__ import annotations

from typing import Any

import pytest

from driver.inventory import DRIVER_NAME
from tests.e2e.test_debug_cli import cli
from tests.ground.kubelet import KUBELET_132_SERVICES, KUBELET_134_SERVICES, PREPARE, UNPREPARE
from tests.ground.node import (
    NodeFactory,
    allocation_results,
    get_json,
    list_pods,
    pod_phase_on,
    scenario_path,
    slice_device,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NS = "default"
CLAIM = "shared-inference-gpu"
PODS = ("qwen-inference", "embedding-service")
WAIT_S = 90.0

KUBELETS = pytest.mark.parametrize(
    "kubelet",
    [
        pytest.param(KUBELET_134_SERVICES, id="real-kubelet-v1", marks=pytest.mark.real_kubelet),
        # The pinned real 1.32 kubelet (pins.env K8S_KUBELET_V1BETA1), which knows only v1beta1.
        pytest.param(KUBELET_132_SERVICES, id="real-kubelet-1.32-v1beta1", marks=pytest.mark.real_kubelet),
    ],
)


@KUBELETS
def test_two_pods_share_one_prepared_gpu(node_factory: NodeFactory, kubelet: tuple[str, ...]) -> None:
    node_factory.kubelet_services = kubelet
    h100 = node_factory("gpu-h100", "h100-80gb-x8")
    gpus_before = h100.gpu_state()
    assert gpus_before, "the fake GPU state file should exist once the plugin runs"
    objects = node_factory.apply(scenario_path("06-shared-inference"))
    pod_objects = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}

    def both_running() -> dict[str, dict[str, Any]] | None:
        pods = {
            p["metadata"]["name"]: p for p in list_pods(node_factory.api, NS) if p["metadata"]["name"] in PODS
        }
        ok = len(pods) == 2 and all(pod_phase_on(p) == ("gpu-h100", "Running") for p in pods.values())
        return pods if ok else None

    pods = wait_for(both_running, WAIT_S, "both pods to run on gpu-h100")
    claim = get_json(node_factory.api, f"/apis/resource.k8s.io/v1/namespaces/{NS}/resourceclaims/{CLAIM}")
    uid = claim["metadata"]["uid"]
    (result,) = allocation_results(claim)
    assert (result["driver"], result["pool"]) == (DRIVER_NAME, "gpu-h100")
    assert slice_device(h100, result["device"])["attributes"]["productName"] == {
        "string": "NVIDIA H100 80GB HBM3"
    }
    reserved = {r["uid"] for r in claim["status"]["reservedFor"]}
    assert reserved == {str(p["metadata"]["uid"]) for p in pods.values()}

    # The same CDI device for both containers. (When both pods are synced at once the kubelet asks
    # once per pod and names the device once per answer; a runtime injects it once however often
    # named, so the set per container is what counts.)
    cdi_id = f"k8s.gpu.nvidia.com/claim={uid}-{result['device']}"
    seen = {
        name: {ctr: set(ids) for ctr, ids in h100.kubelet.pod_cdi_devices[str(p["metadata"]["uid"])].items()}
        for name, p in pods.items()
    }
    assert seen == {"qwen-inference": {"vllm": {cdi_id}}, "embedding-service": {"embedder": {cdi_id}}}

    # Prepared once: the kubelet's one call per pod at most, each answered without error, and on
    # the plugin's side one checkpoint entry and one spec.
    prepares = [c for c in h100.kubelet.calls if c.method == PREPARE]
    assert 1 <= len(prepares) <= len(PODS), h100.diagnostics()
    assert {(c.claims, c.error) for c in prepares} == {(((NS, uid, CLAIM),), "")}
    assert {c.service for c in h100.kubelet.calls} == {kubelet[0]}  # v1, or v1beta1 for a 1.32 kubelet
    recorded = h100.checkpoint()
    assert list(recorded) == [uid]
    assert recorded[uid].state == "PrepareCompleted"
    assert [d.cdi_device_ids for d in recorded[uid].devices] == [[cdi_id]]
    assert recorded[uid].sharing == []
    assert h100.cdi_spec(uid) is not None

    # The debug CLI on the node shows the claim, its two consumers with their device, no sharing.
    shown = cli(h100, "claims", "show", f"{NS}/{CLAIM}", "-o", "json")
    assert shown.rc == 0, shown.err
    detail = shown.json()
    assert [d["cdiDeviceIds"] for d in detail["devices"]] == [[cdi_id]]
    assert detail["sharing"] == []
    assert {c["uid"] for c in detail["consumers"]} == reserved

    # The first pod goes: the claim stays prepared for the second.
    node_factory.delete([pod_objects["qwen-inference"]])
    assert {c.method for c in h100.kubelet.calls} == {PREPARE}
    assert uid in h100.checkpoint()
    assert h100.cdi_spec(uid) is not None

    # The last pod goes: now it is unprepared, once.
    node_factory.delete([pod_objects["embedding-service"]])
    wait_for(lambda: uid not in h100.checkpoint(), WAIT_S, "the claim to leave the checkpoint")
    assert h100.cdi_spec(uid) is None
    # The kubelet's record of a call is complete once the answer is back, after the checkpoint changed.
    unprepares = wait_for(
        lambda: [c for c in h100.kubelet.calls if c.method == UNPREPARE], WAIT_S, "the kubelet's unprepare"
    )
    assert [(c.claims, c.error) for c in unprepares] == [(((NS, uid, CLAIM),), "")]

    # A repeated unprepare (a kubelet restarting mid-cleanup sends one) succeeds (raises on an
    # error) and changes nothing.
    h100.kubelet.unprepare(DRIVER_NAME, [(NS, uid, CLAIM)])
    assert h100.checkpoint() == {}
    assert not list(h100.cdi_root.glob("*.json"))

    # No sharing configuration: the GPU was left as it was and no NVIDIA tool was run.
    assert h100.gpu_state() == gpus_before
    assert {g["computeMode"] for g in gpus_before.values()} == {"DEFAULT"}
    assert h100.journal() == []
