"""Scenario 02 end to end: three replicas time-slice one GPU through one named claim.

On the real control plane with ``gpu-a100`` (8x A100-SXM4-40GB) under the real kubelet: the
scheduler allocates one GPU for the claim; the kubelet asks for it up to once per pod (the three
pods' syncs race, and kubelet 1.36 then calls NodePrepareResources for each) and the plugin
prepares it once: it sets compute mode DEFAULT and time-slice Long through the ``nvidia-smi`` stand-in, and
scaling to zero restores the default. Invalid sharing configs fail prepare per claim, naming the
field and the allowed values, and leave the GPU, the CDI dir and the checkpoint untouched.

Also home of the few Kubernetes helpers the sharing and MIG scenario tests share (pods, claims,
scaling, waiting with the node's diagnostics); what a node is lives in ``tests.ground.node``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pytest
from kubernetes import client as kclient

from driver.inventory import DRIVER_NAME
from tests.ground.node import NodeFactory, SimulatedNode, scenario_path, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

T = TypeVar("T")

NS = "gpu-demo"
APP = "gpu-demo-app"
WAIT_S = 90.0

# ---------------------------------------------------------------------------------------------
# helpers shared by the sharing and MIG scenario tests


def _json(resp: Any) -> Any:
    return json.loads(resp.data)


def list_pods(api: kclient.ApiClient, namespace: str, app: str | None = None) -> list[dict[str, Any]]:
    """Pods of ``namespace`` (with label ``app=<app>`` when given), as the API server has them."""
    core: Any = kclient.CoreV1Api(api)
    selector = f"app={app}" if app else ""
    items: list[dict[str, Any]] = _json(
        core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
    )["items"]
    return items


def is_running(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def is_unschedulable(pod: Mapping[str, Any]) -> bool:
    """The scheduler tried and found no place (PodScheduled False, reason Unschedulable)."""
    return any(
        c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def read_claim(api: kclient.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    res: Any = kclient.ResourceV1Api(api)
    claim: dict[str, Any] = _json(res.read_namespaced_resource_claim(name, namespace, _preload_content=False))
    return claim


def list_claims(api: kclient.ApiClient, namespace: str) -> list[dict[str, Any]]:
    res: Any = kclient.ResourceV1Api(api)
    items: list[dict[str, Any]] = _json(
        res.list_namespaced_resource_claim(namespace, _preload_content=False)
    )["items"]
    return items


def results(claim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The allocation results of a claim (empty when not allocated)."""
    alloc = (claim.get("status") or {}).get("allocation") or {}
    out: list[dict[str, Any]] = (alloc.get("devices") or {}).get("results") or []
    return out


def claim_ref(claim: Mapping[str, Any]) -> tuple[str, str, str]:
    """(namespace, uid, name), as the kubelet puts a claim on the wire."""
    meta = claim["metadata"]
    return meta["namespace"], meta["uid"], meta["name"]


def scale(api: kclient.ApiClient, namespace: str, deployment: str, replicas: int) -> None:
    apps: Any = kclient.AppsV1Api(api)
    apps.patch_namespaced_deployment_scale(deployment, namespace, {"spec": {"replicas": replicas}})


def await_on(node: SimulatedNode, predicate: Callable[[], T | None], what: str, timeout: float = WAIT_S) -> T:
    """:func:`wait_for`, with the node's diagnostics (plugin log, emulator records) on timeout."""
    try:
        value = wait_for(predicate, timeout, what, interval=0.2)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{node.diagnostics()}") from None
    assert value is not None  # wait_for returns only truthy values
    return value


def running_pods(node: SimulatedNode, namespace: str, app: str, count: int) -> list[dict[str, Any]]:
    """Wait until exactly ``count`` pods of ``app`` exist and run; return them."""

    def ready() -> list[dict[str, Any]] | None:
        pods = list_pods(node.api, namespace, app)
        up = [p for p in pods if is_running(p)]
        return up if len(up) == count and len(pods) == count else None

    return await_on(node, ready, f"{count} running pods of {namespace}/{app} on {node.name}")


def no_pods(node: SimulatedNode, namespace: str, app: str | None = None) -> None:
    await_on(
        node, lambda: not list_pods(node.api, namespace, app), f"the pods of {namespace}/{app} to be gone"
    )


def unprepared(node: SimulatedNode, claim_uid: str) -> None:
    """Wait until the plugin's checkpoint no longer holds the claim (unprepare done)."""
    await_on(node, lambda: claim_uid not in node.checkpoint(), f"claim {claim_uid} to be unprepared")


def smi_runs(node: SimulatedNode) -> list[dict[str, Any]]:
    """The stand-in ``nvidia-smi`` calls that changed something (compute mode, time-slice)."""
    return [e for e in node.journal() if e.get("tool") == "nvidia-smi" and e.get("op")]


def claim_and_pod(name: str, namespace: str, node: str, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A ResourceClaim with ``spec`` and a pod on ``node`` using all of it (label ``app=<name>``)."""
    return [
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": dict(spec),
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
                "containers": [
                    {"name": "c", "image": "registry.invalid/app", "resources": {"claims": [{"name": "gpu"}]}}
                ],
            },
        },
    ]


def namespace_doc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def failing_claims(
    factory: NodeFactory,
    node: SimulatedNode,
    namespace: str,
    configs: Mapping[str, Mapping[str, Any]],
    request: Mapping[str, Any],
) -> dict[str, str]:
    """Apply one claim (one request ``gpu``, the config) and pod per entry of ``configs``.

    ``configs`` maps a name to opaque parameters. Returns, per name, the prepare error the kubelet
    emulator got for its pod; the factory deletes the objects at the end of the test.
    """
    docs = [namespace_doc(namespace)]
    for name, parameters in configs.items():
        spec = {
            "devices": {
                "requests": [{"name": "gpu", "exactly": dict(request)}],
                "config": [
                    {"requests": ["gpu"], "opaque": {"driver": DRIVER_NAME, "parameters": dict(parameters)}}
                ],
            }
        }
        docs += claim_and_pod(name, namespace, node.name, spec)
    factory.apply(docs)

    def errors() -> dict[str, str] | None:
        out: dict[str, str] = {}
        for name in configs:
            pods = list_pods(node.api, namespace, name)
            error = node.kubelet.pod_errors.get(pods[0]["metadata"]["uid"]) if pods else None
            if error is None:
                return None
            out[name] = error
        return out

    return await_on(node, errors, f"prepare errors for the pods of {sorted(configs)}")


# ---------------------------------------------------------------------------------------------
# scenario 02


def _successful_prepares(node: SimulatedNode, claim_uid: str) -> int:
    return sum(
        1
        for c in node.kubelet.calls
        if c.method == "NodePrepareResources"
        and not c.error
        and any(uid == claim_uid for _, uid, _ in c.claims)
    )


def test_three_pods_time_slice_one_gpu(node_factory: NodeFactory) -> None:
    node = node_factory("gpu-a100", "a100-40gb-x8")
    before = node.gpu_state()
    node_factory.apply(scenario_path("02-time-slicing"))
    pods = running_pods(node, NS, APP, 3)
    assert {p["spec"]["nodeName"] for p in pods} == {"gpu-a100"}

    claim = read_claim(node.api, NS, APP)
    ref = claim_ref(claim)
    uid = ref[1]
    (result,) = results(claim)
    assert {r["uid"] for r in claim["status"]["reservedFor"]} == {p["metadata"]["uid"] for p in pods}
    # Every pod's container got the same single CDI device of the one claim (the kubelet repeats
    # it once per racing prepare call; runtimes inject a CDI device once however often named).
    cdi_ids = {cdi for p in pods for cdi in node.kubelet.pod_cdi_devices[p["metadata"]["uid"]][APP]}
    (cdi_id,) = cdi_ids

    # Prepared once for the three pods: DEFAULT compute mode and time-slice Long, via nvidia-smi
    # once, however many of the pods' syncs called NodePrepareResources.
    assert 1 <= _successful_prepares(node, uid) <= 3, node.diagnostics()
    (device,) = node.checkpoint()[uid].devices
    gpu = device.gpu_uuid
    state = node.gpu_state()
    assert state[gpu]["computeMode"] == "DEFAULT"
    assert state[gpu]["timeslice"] == 3
    runs = smi_runs(node)
    assert [(e["op"], e["gpus"]) for e in runs] == [("compute-mode", [gpu]), ("timeslice", [gpu])]
    assert runs[0]["mode"] == "DEFAULT"
    assert runs[1]["argv"] == ["compute-policy", "-i", gpu, "--set-timeslice", "3"]
    # The other seven GPUs are as they were.
    assert {u: s for u, s in state.items() if u != gpu} == {u: s for u, s in before.items() if u != gpu}
    spec = node.cdi_spec(uid)
    assert spec is not None
    assert [f"{spec['kind']}={d['name']}" for d in spec["devices"]] == [cdi_id]

    # A second prepare of the same claim (a kubelet retry, another pod) returns the same
    # devices and does nothing twice.
    journal_before = node.journal()
    again = node.kubelet.prepare(DRIVER_NAME, [ref])
    # (The kubelet stored the devices once per racing call; the set is what counts.)
    assert set(again[uid]) == set(node.kubelet.claim_devices(uid))
    assert [d.device_name for d in again[uid]] == [result["device"]]
    assert node.journal() == journal_before
    assert node.gpu_state()[gpu]["timeslice"] == 3

    # The last pod gone -> unprepare restores the default time-slice.
    scale(node.api, NS, APP, 0)
    no_pods(node, NS, APP)
    unprepared(node, uid)
    last = smi_runs(node)[-1]
    assert (last["op"], last["gpus"], last["timeslice"]) == ("timeslice", [gpu], 0)
    assert node.cdi_spec(uid) is None
    assert node.gpu_state() == before


GPU_REQUEST = {
    "deviceClassName": "gpu.nvidia.com",
    "selectors": [{"cel": {"expression": 'device.attributes["gpu.nvidia.com"].architecture == "Ampere"'}}],
}


def _ts(**sharing: Any) -> dict[str, Any]:
    return {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": sharing}


# name -> (opaque parameters, what the error must say: the field path and the allowed values)
INVALID_TIME_SLICING: Mapping[str, tuple[Mapping[str, Any], Sequence[str]]] = {
    "ts-forever": (
        _ts(strategy="TimeSlicing", timeSlicingConfig={"interval": "Forever"}),
        ("sharing.timeSlicingConfig.interval", "Forever", "Default, Short, Medium, Long"),
    ),
    "ts-unknown-field": (
        _ts(strategy="TimeSlicing", timeSlicingConfig={"interval": "Long", "quantum": "5ms"}),
        ("sharing.timeSlicingConfig.quantum", "unknown field", "allowed fields here: interval"),
    ),
    "ts-typo": (
        _ts(strategy="TimeSlice", timeSlicingConfig={"interval": "Long"}),
        ("sharing.strategy", "TimeSlice", "TimeSlicing, MPS"),
    ),
}


def test_invalid_time_slicing_configs_fail_per_claim_and_change_nothing(node_factory: NodeFactory) -> None:
    node = node_factory("gpu-a100", "a100-40gb-x8")
    state_before, journal_before = node.gpu_state(), node.journal()
    ns = "ts-invalid"
    configs = {name: params for name, (params, _) in INVALID_TIME_SLICING.items()}
    errors = failing_claims(node_factory, node, ns, configs, GPU_REQUEST)
    for name, (_, wanted) in INVALID_TIME_SLICING.items():
        error = errors[name]
        assert f"ResourceClaim {name}" in error, error
        for text in wanted:
            assert text in error, f"{name}: {text!r} missing from {error!r}"
        claim = read_claim(node.api, ns, name)
        uid = claim["metadata"]["uid"]
        assert results(claim), f"{name} should have been allocated; the failure must come from prepare"
        assert uid not in node.checkpoint()
        assert node.cdi_spec(uid) is None
    assert node.gpu_state() == state_before
    assert node.journal() == journal_before
    assert not node.cdi_root.exists() or not any(node.cdi_root.iterdir())
