"""What the seeds' manifests need from the control plane: DeviceTaintRules and the beta APIs.

The test ground's 1.36 API server serves ``resource.k8s.io/v1beta1`` and ``v1beta2`` and runs with
``DRADeviceTaintRules`` on (``tests/ground/controlplane.py``), so these run against the real
scheduler:

- a DeviceTaintRule (the 1.35+ shape: ``deviceSelector`` by driver/pool/device) with a
  ``NoSchedule`` taint keeps new claims off one GPU - picked by its uuid - while the claim already
  allocated on it stays allocated and prepared;
- a ResourceClaim written in ``resource.k8s.io/v1beta1`` (the request fields directly on the
  request, no ``exactly``), as seed-era manifests are, is converted by the server, allocated and
  prepared.
"""

from __future__ import annotations

from typing import Any

import pytest

from driver.inventory import DRIVER_NAME
from tests.e2e.test_mig_exclusive import full_gpu, gpu_uuid, published
from tests.e2e.test_scenario_02 import (
    await_on,
    claim_and_pod,
    is_unschedulable,
    list_pods,
    namespace_doc,
    read_claim,
    results,
    running_pods,
)
from tests.ground.node import NodeFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TAINT_KEY = "example.com/maintenance"


def taint_rule(name: str, pool: str, device: str) -> dict[str, Any]:
    """A DeviceTaintRule as 1.35+ servers take it: the device named by driver, pool and name."""
    return {
        "apiVersion": "resource.k8s.io/v1beta2",
        "kind": "DeviceTaintRule",
        "metadata": {"name": name},
        "spec": {
            "deviceSelector": {"driver": DRIVER_NAME, "pool": pool, "device": device},
            "taint": {"key": TAINT_KEY, "value": "fan-replacement", "effect": "NoSchedule"},
        },
    }


def device_with_uuid(devices: dict[str, dict[str, Any]], uuid: str) -> str:
    (name,) = [n for n in devices if devices[n]["attributes"].get("uuid", {}).get("string") == uuid]
    return name


def test_device_taint_rule_keeps_new_claims_off_one_gpu(node_factory: NodeFactory) -> None:
    node = node_factory("gpu-taint", "l4-x2")
    devices, _ = published(node)
    uuid = gpu_uuid(devices, "gpu-0")
    target = device_with_uuid(devices, uuid)
    ns = "taint-rule"
    node_factory.apply([namespace_doc(ns), *claim_and_pod("before", ns, node.name, full_gpu(uuid))])
    running_pods(node, ns, "before", 1)
    before = read_claim(node.api, ns, "before")
    assert [r["device"] for r in results(before)] == [target]

    node_factory.apply([taint_rule("gpu-taint-maintenance", node.name, target)])
    # A new claim for exactly that GPU cannot be allocated while the taint is on it ...
    node_factory.apply(claim_and_pod("pinned", ns, node.name, full_gpu(uuid)))
    await_on(
        node, lambda: all(map(is_unschedulable, list_pods(node.api, ns, "pinned"))), "pinned unschedulable"
    )
    assert not results(read_claim(node.api, ns, "pinned"))
    # ... a claim for any GPU gets the other one ...
    any_gpu = {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}}
    node_factory.apply(claim_and_pod("other", ns, node.name, any_gpu))
    running_pods(node, ns, "other", 1)
    (other,) = results(read_claim(node.api, ns, "other"))
    assert other["device"] != target
    # ... and the claim allocated before the rule keeps its GPU (NoSchedule does not evict).
    after = read_claim(node.api, ns, "before")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert [r["device"] for r in results(after)] == [target]
    assert node.checkpoint()[after["metadata"]["uid"]].state == "PrepareCompleted"
    assert [p["status"]["phase"] for p in list_pods(node.api, ns, "before")] == ["Running"]


AMPERE_OVER_20GI = (
    'device.attributes["gpu.nvidia.com"].architecture == "Ampere" && '
    'device.capacity["gpu.nvidia.com"].memory.isGreaterThan(quantity("20Gi"))'
)


def v1beta1_claim(name: str, namespace: str) -> dict[str, Any]:
    """Scenario 01's request as a 1.32-era manifest: v1beta1, request fields without ``exactly``."""
    return {
        "apiVersion": "resource.k8s.io/v1beta1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpu",
                        "deviceClassName": "gpu.nvidia.com",
                        "allocationMode": "ExactCount",
                        "count": 1,
                        "selectors": [{"cel": {"expression": AMPERE_OVER_20GI}}],
                    }
                ]
            }
        },
    }


def test_v1beta1_claim_is_converted_and_allocated(node_factory: NodeFactory) -> None:
    node = node_factory("gpu-v1beta1", "a100-80gb-x4")
    ns = "v1beta1-claim"
    claim, pod = claim_and_pod("seed", ns, node.name, {})
    node_factory.apply([namespace_doc(ns), v1beta1_claim("seed", ns), pod])
    running_pods(node, ns, "seed", 1)
    stored = read_claim(node.api, ns, "seed")  # read back over v1: converted by the server
    (request,) = stored["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == "gpu.nvidia.com"
    (result,) = results(stored)
    assert (result["driver"], result["pool"], result["request"]) == (DRIVER_NAME, node.name, "gpu")
    assert node.checkpoint()[stored["metadata"]["uid"]].state == "PrepareCompleted"
    assert claim["kind"] == "ResourceClaim"
