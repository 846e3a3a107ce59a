"""Scenario 05: a platform team's DeviceClass (>= 40 GiB) plus a claim narrowing it to A100 80GB.

tests/data/scenarios/05-high-memory-class/expect.md, on the real control plane with nodes
gpu-a100-80 (4x A100-SXM4-80GB) and gpu-a100 (8x A100-SXM4-40GB), for the real kubelet (DRA v1)
and a real 1.32 kubelet (v1beta1 only): the Job's pod lands on gpu-a100-80 with one 80 GB
card, and the class as the source article wrote it (``memory >= quantity("40Gi")``) is refused
by the real API server with the CEL compile error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient

from driver.inventory import DRIVER_NAME
from tests.ground.kubelet import KUBELET_132_SERVICES, KUBELET_134_SERVICES, PREPARE, UNPREPARE
from tests.ground.node import (
    NodeFactory,
    allocation_results,
    pod_claim,
    pod_phase_on,
    scenario_path,
    slice_device,
    wait_for,
    wait_for_pod,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NS = "default"
JOB = "batch.kubernetes.io/job-name=finetune-qwen"
WAIT_S = 90.0

KUBELETS = pytest.mark.parametrize(
    "kubelet",
    [
        pytest.param(KUBELET_134_SERVICES, id="real-kubelet-v1", marks=pytest.mark.real_kubelet),
        # The pinned real 1.32 kubelet (pins.env K8S_KUBELET_V1BETA1), which knows only v1beta1.
        pytest.param(KUBELET_132_SERVICES, id="real-kubelet-1.32-v1beta1", marks=pytest.mark.real_kubelet),
    ],
)

# The class exactly as the article wrote its selector (a quantity has no `>=` in Kubernetes CEL).
ARTICLE_EXPRESSION = (
    'device.driver == "gpu.nvidia.com" && device.capacity["gpu.nvidia.com"].memory >= quantity("40Gi")'
)


def article_class() -> dict[str, Any]:
    manifests = [d for d in yaml.safe_load_all(scenario_path("05-high-memory-class").read_text()) if d]
    cls: dict[str, Any] = next(d for d in manifests if d["kind"] == "DeviceClass")
    cls["metadata"] = {"name": "high-memory-gpu-as-in-the-article"}
    cls["spec"]["selectors"] = [{"cel": {"expression": ARTICLE_EXPRESSION}}]
    return cls


def test_the_articles_class_is_rejected_by_the_api_server(node_factory: NodeFactory) -> None:
    with pytest.raises(kclient.ApiException) as info:
        node_factory.apply([article_class()])
    err = info.value
    assert err.status == 422, err
    status = json.loads(err.body or "{}")
    assert status["reason"] == "Invalid"
    (cause,) = status["details"]["causes"]
    assert cause["field"] == "spec.selectors[0].cel.expression"
    assert "compilation failed" in cause["message"]
    assert (
        "found no matching overload for '_>=_' applied to '(kubernetes.Quantity, kubernetes.Quantity)'"
        in (cause["message"])
    )
    assert node_factory.applied == []


@KUBELETS
def test_job_lands_on_an_a100_80gb(node_factory: NodeFactory, kubelet: tuple[str, ...]) -> None:
    node_factory.kubelet_services = kubelet
    big, small = node_factory.start_all([("gpu-a100-80", "a100-80gb-x4"), ("gpu-a100", "a100-40gb-x8")])
    node_factory.apply(scenario_path("05-high-memory-class"))

    pod = wait_for_pod(
        node_factory.api,
        NS,
        JOB,
        lambda p: pod_phase_on(p) == ("gpu-a100-80", "Running"),
        timeout=WAIT_S,
        what="the Job's pod to run on gpu-a100-80",
    )
    claim = pod_claim(node_factory.api, pod, "training-gpu")
    assert claim is not None
    uid, claim_name = claim["metadata"]["uid"], claim["metadata"]["name"]
    (result,) = allocation_results(claim)
    assert (result["driver"], result["pool"], result["request"]) == (DRIVER_NAME, "gpu-a100-80", "gpu")
    published = slice_device(big, result["device"])
    assert published["attributes"]["productName"] == {"string": "NVIDIA A100-SXM4-80GB"}
    assert published["capacity"]["memory"]["value"] in ("80Gi", "85899345920")
    # The 40 GB cards pass the class but not the claim's productName selector.
    assert slice_device(small, "gpu-0")["attributes"]["productName"] == {"string": "NVIDIA A100-SXM4-40GB"}

    (prepared,) = big.kubelet.claim_devices(uid)
    cdi_id = f"k8s.gpu.nvidia.com/claim={uid}-{result['device']}"
    assert (prepared.pool_name, prepared.device_name, prepared.cdi_device_ids) == (
        "gpu-a100-80",
        result["device"],
        (cdi_id,),
    )
    assert big.kubelet.pod_cdi_devices[pod["metadata"]["uid"]] == {"trainer": [cdi_id]}
    assert big.checkpoint()[uid].state == "PrepareCompleted"
    assert big.cdi_spec(uid) is not None
    assert [(c.method, c.service) for c in big.kubelet.calls] == [(PREPARE, kubelet[0])]
    assert small.kubelet.calls == [] and small.checkpoint() == {}

    # The trainer finishes: the kubelet unprepares the claim of the completed pod.
    big.kubelet.complete_pod(NS, pod["metadata"]["name"])
    # The kubelet records a call once the answer is back; the checkpoint changes before that.
    unprepares = wait_for(
        lambda: [c for c in big.kubelet.calls if c.method == UNPREPARE],
        WAIT_S,
        "the kubelet to unprepare the finished Job's claim",
    )
    assert uid not in big.checkpoint()
    assert big.cdi_spec(uid) is None
    assert [(c.claims, c.error) for c in unprepares] == [(((NS, uid, claim_name),), "")]
