"""`gpu-dra explain` agrees with the real scheduler on every case of tests/data/cel-corpus.

One node per case (so cases never compete for devices), every node publishing the same slices
(written directly, no plugin); all claims and pods are created at once and the verdicts collected
together: a pod bound to its node (claim allocated) is "fits", PodScheduled=False is
"unschedulable", a claim the API server refuses on create is "rejected".
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from kubernetes import client as kclient
from kubernetes.client.exceptions import ApiException

from driver.debug.explain import BUILTIN_CLASSES, explain, node_from_slices, parse_claim
from tests.ground.controlplane import ControlPlane
from tests.unit.driver.debug.corpus import Case, load_corpus, node_slices

pytestmark = pytest.mark.e2e

GROUP, VERSION = "resource.k8s.io", "v1"
# Bound on waiting for the scheduler; not a timing assertion (a miss reports the undecided cases).
DECIDE_TIMEOUT_S = 180.0
# Unschedulable verdicts are re-read after this long, in case an early one raced the slice informer.
SETTLE_S = 3.0


def _create_classes(custom: Any) -> list[str]:
    """Create the built-in classes that do not exist yet; return the names created (to delete after)."""
    created: list[str] = []
    for name, selectors in BUILTIN_CLASSES.items():
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {"selectors": [{"cel": {"expression": e}} for e in selectors]},
        }
        try:
            custom.create_cluster_custom_object(GROUP, VERSION, "deviceclasses", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        else:
            created.append(name)
    return created


def _clean_up(core: Any, custom: Any, namespace: str, nodes: list[str], classes: list[str]) -> None:
    """Leave the shared control plane as found: other tests install the chart's own DeviceClasses."""
    for name in classes:
        try:
            custom.delete_cluster_custom_object(GROUP, VERSION, "deviceclasses", name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    core.delete_namespace(namespace, grace_period_seconds=0)
    ours = set(nodes)
    for item in custom.list_cluster_custom_object(GROUP, VERSION, "resourceslices")["items"]:
        if item["spec"].get("nodeName") in ours:
            custom.delete_cluster_custom_object(GROUP, VERSION, "resourceslices", item["metadata"]["name"])
    for node in nodes:
        try:
            core.delete_node(node)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _pod(case: Case, node: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": case.name, "namespace": namespace},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "resourceClaims": [{"name": "gpus", "resourceClaimName": case.name}],
            "containers": [
                {
                    "name": "c",
                    "image": "registry.invalid/pause:1",
                    "resources": {"claims": [{"name": "gpus"}]},
                }
            ],
        },
    }


def _scheduler_verdict(pod: Any) -> str | None:
    if pod.spec.node_name:
        return "fits"
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return "unschedulable"
    return None


def test_explain_agrees_with_scheduler(control_plane: ControlPlane):
    cases = load_corpus()
    assert len(cases) >= 40
    api: Any = control_plane.api_client()
    core: Any = kclient.CoreV1Api(api)
    custom: Any = kclient.CustomObjectsApi(api)
    run = uuid.uuid4().hex[:6]
    namespace = f"cel-{run}"
    control_plane.create_namespace(namespace)
    classes = _create_classes(custom)
    nodes: dict[str, str] = {}
    try:
        _agree(control_plane, core, custom, namespace=namespace, run=run, cases=cases, nodes=nodes)
    finally:
        _clean_up(core, custom, namespace, list(nodes.values()), classes)


def _agree(
    control_plane: ControlPlane,
    core: Any,
    custom: Any,
    *,
    namespace: str,
    run: str,
    cases: list[Case],
    nodes: dict[str, str],
) -> None:
    ours: dict[str, str] = {}
    why: dict[str, str] = {}
    minor = int(control_plane.version.lstrip("v").split(".")[1])
    for i, case in enumerate(cases):
        node = f"cel-{run}-{i}"
        nodes[case.name] = node
        control_plane.create_node(node)
        slices = node_slices(case.node, node, server_minor=minor)
        for s in slices:
            custom.create_cluster_custom_object(GROUP, VERSION, "resourceslices", s)
        exp = explain(parse_claim(case.claim(namespace)), node_from_slices(slices))
        ours[case.name] = exp.verdict
        why[case.name] = exp.reason + "".join(f" [{r.message}]" for r in exp.rejections)

    theirs: dict[str, str] = {}
    server_said: dict[str, str] = {}
    for case in cases:
        try:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "resourceclaims", case.claim(namespace)
            )
        except ApiException as exc:
            if exc.status not in (400, 422):
                raise
            theirs[case.name] = "rejected"
            server_said[case.name] = str(exc.body)[:600]
            continue
        core.create_namespaced_pod(namespace, _pod(case, nodes[case.name], namespace))

    def collect() -> None:
        for pod in core.list_namespaced_pod(namespace).items:
            verdict = _scheduler_verdict(pod)
            if verdict is not None:
                theirs[pod.metadata.name] = verdict
                msgs = [c.message for c in pod.status.conditions or [] if c.message]
                server_said[pod.metadata.name] = "; ".join(msgs)[:300]

    deadline = time.monotonic() + DECIDE_TIMEOUT_S
    while time.monotonic() < deadline and len(theirs) < len(cases):
        collect()
        time.sleep(0.5)
    time.sleep(SETTLE_S)
    collect()

    undecided = [c.name for c in cases if c.name not in theirs]
    disagreements = [
        f"{c.file}:{c.name}: explain says {ours[c.name]} ({why[c.name]}), scheduler says "
        f"{theirs[c.name]} ({server_said.get(c.name, '')})"
        for c in cases
        if c.name in theirs and theirs[c.name] != ours[c.name]
    ]
    assert not undecided, f"scheduler gave no verdict for: {undecided}"
    assert not disagreements, "explain disagrees with the scheduler:\n" + "\n".join(disagreements)
    # The corpus' own expectations hold on the real scheduler too.
    wrong = [
        f"{c.name}: expected {c.expect}, got {theirs[c.name]}" for c in cases if theirs[c.name] != c.expect
    ]
    assert not wrong, "corpus expectations wrong:\n" + "\n".join(wrong)
