"""The kubelet emulator against the real control plane: pods the real scheduler binds get prepared.

A hand-written ResourceSlice advertises two devices of a test driver on a simulated node; the
real scheduler allocates claims for pods; the emulator (pod-driven mode) prepares them over gRPC
with a tiny test plugin, marks the pods Running, and after deletion unprepares and force-deletes
them. Also covers the start-up and disconnect ResourceSlice wipes against the real API server.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.ground.controlplane import ControlPlane
from tests.ground.kubelet import SERVICE_V1, KubeletEmulator
from tests.integration.test_kubelet_emulator import DRIVER, FakePlugin, one_device_each

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WAIT = 60.0


def _slice(node: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0"}, {"name": "gpu-1"}],
        },
    }


def _slices(api: k8s.ApiClient, node: str) -> list[str]:
    res: Any = k8s.ResourceV1Api(api)
    resp = res.list_resource_slice(field_selector=f"spec.nodeName={node}")
    return sorted(s.metadata.name for s in resp.items)


def _wait(pred: Callable[[], bool], what: str, emu: KubeletEmulator, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {what}; emulator pod_errors={emu.pod_errors} "
                f"sync_errors={emu.sync_errors[-3:]} calls={emu.calls[-3:]}"
            )
        time.sleep(0.2)


def _setup_class(res: Any) -> None:
    try:
        res.create_device_class(
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": "kem-gpu"},
                "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]},
            }
        )
    except k8s.ApiException as err:
        if err.status != 409:  # another test of this session made it
            raise


def _pod(name: str, node: str, claim: dict[str, str], containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "resourceClaims": [{"name": "g", **claim}],
            "containers": containers,
            "terminationGracePeriodSeconds": 30,
        },
    }


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="keme", dir="/tmp"))
    (d / "reg").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def plugin(sockdir: Path) -> Iterator[FakePlugin]:
    (sockdir / "p").mkdir()
    p = FakePlugin(sockdir / "p", sockdir / "reg", handler=one_device_each).start()
    yield p
    p.stop()


def test_pods_bound_by_the_scheduler_are_prepared_and_cleaned_up(
    control_plane: ControlPlane, kube_client: k8s.ApiClient, sockdir: Path, plugin: FakePlugin
) -> None:
    node, ns = "kem-node-1", "kem-e2e"
    control_plane.create_node(node)
    control_plane.create_namespace(ns)
    res: Any = k8s.ResourceV1Api(kube_client)
    core: Any = k8s.CoreV1Api(kube_client)
    res.create_resource_slice(_slice(node, "kem-node-1-slice"))
    _setup_class(res)
    res.create_namespaced_resource_claim_template(
        ns,
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": "one-gpu"},
            "spec": {
                "spec": {
                    "devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "kem-gpu"}}]}
                }
            },
        },
    )
    core.create_namespaced_pod(
        ns,
        _pod(
            "p1",
            node,
            {"resourceClaimTemplateName": "one-gpu"},
            [
                {"name": "main", "image": "busybox", "resources": {"claims": [{"name": "g"}]}},
                {"name": "side", "image": "busybox"},
            ],
        ),
    )

    with KubeletEmulator(node, kube_client, sockdir / "reg") as emu:
        assert emu.wait_registered(DRIVER, timeout=WAIT).service == SERVICE_V1
        emu.start_pod_sync(0.2)

        def running() -> bool:
            return bool(core.read_namespaced_pod("p1", ns).status.phase == "Running")

        _wait(running, "pod p1 Running", emu)
        pod = core.read_namespaced_pod("p1", ns)
        claim_name = pod.status.resource_claim_statuses[0].resource_claim_name
        claim = res.read_namespaced_resource_claim(claim_name, ns)
        uid = claim.metadata.uid
        assert plugin.calls == [(SERVICE_V1, "prepare", [(ns, uid, claim_name)])]
        assert emu.pod_cdi_devices[pod.metadata.uid] == {
            "main": [f"k8s.{DRIVER}/claim={uid}-gpu-0"],
            "side": [],
        }
        assert emu.prepared_claims == {uid}

        core.delete_namespaced_pod("p1", ns)

        def gone() -> bool:
            return not core.list_namespaced_pod(ns, field_selector="metadata.name=p1").items

        _wait(gone, "pod p1 force-deleted by the emulator", emu)
        assert plugin.calls[-1] == (SERVICE_V1, "unprepare", [(ns, uid, claim_name)])
        assert emu.prepared_claims == set()
        assert emu.sync_errors == []


def test_startup_and_disconnect_wipes_delete_slices(
    control_plane: ControlPlane, kube_client: k8s.ApiClient, sockdir: Path, plugin: FakePlugin
) -> None:
    node, other = "kem-node-2", "kem-node-3"
    control_plane.create_node(node)
    control_plane.create_node(other)
    res: Any = k8s.ResourceV1Api(kube_client)
    res.create_resource_slice(_slice(node, "kem-node-2-a"))
    res.create_resource_slice(_slice(other, "kem-node-3-a"))

    emu = KubeletEmulator(node, kube_client, sockdir / "reg", wipe_delay_s=0.5)
    emu.wipe_node_slices()
    assert _slices(kube_client, node) == []
    assert _slices(kube_client, other) == ["kem-node-3-a"], "start-up wipe touches only its own node"

    with emu:
        emu.wait_registered(DRIVER, timeout=WAIT)
        emu.wait_for(lambda: emu.is_connected(DRIVER), WAIT, "connection")
        res.create_resource_slice(_slice(node, "kem-node-2-b"))
        plugin.stop_dra()
        emu.wait_for(lambda: any(w.driver == DRIVER for w in emu.wipes), WAIT, "disconnect wipe")
        assert [w.error for w in emu.wipes] == ["", ""]
        assert _slices(kube_client, node) == []
        assert _slices(kube_client, other) == ["kem-node-3-a"]


def test_a_claim_shared_by_two_pods_is_prepared_once_and_unprepared_after_the_last(
    control_plane: ControlPlane, kube_client: k8s.ApiClient, sockdir: Path, plugin: FakePlugin
) -> None:
    node, ns = "kem-node-4", "kem-e2e-shared"
    control_plane.create_node(node)
    control_plane.create_namespace(ns)
    res: Any = k8s.ResourceV1Api(kube_client)
    core: Any = k8s.CoreV1Api(kube_client)
    res.create_resource_slice(_slice(node, "kem-node-4-slice"))
    _setup_class(res)
    claim = res.create_namespaced_resource_claim(
        ns,
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": "shared"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "kem-gpu"}}]}},
        },
    )
    uid = claim.metadata.uid
    containers = [
        {"name": "main", "image": "busybox", "resources": {"claims": [{"name": "g", "request": "gpu"}]}}
    ]
    for name in ("a", "b"):
        core.create_namespaced_pod(ns, _pod(name, node, {"resourceClaimName": "shared"}, containers))

    with KubeletEmulator(node, kube_client, sockdir / "reg") as emu:
        emu.wait_registered(DRIVER, timeout=WAIT)
        emu.start_pod_sync(0.2)

        def both_running() -> bool:
            return all(core.read_namespaced_pod(n, ns).status.phase == "Running" for n in ("a", "b"))

        _wait(both_running, "pods a and b Running", emu)
        assert plugin.calls == [(SERVICE_V1, "prepare", [(ns, uid, "shared")])]
        assert emu.claim_pods(uid) == {core.read_namespaced_pod(n, ns).metadata.uid for n in ("a", "b")}
        for n in ("a", "b"):
            pod_uid = core.read_namespaced_pod(n, ns).metadata.uid
            assert emu.pod_cdi_devices[pod_uid] == {"main": [f"k8s.{DRIVER}/claim={uid}-gpu-0"]}

        core.delete_namespaced_pod("a", ns)
        _wait(
            lambda: not core.list_namespaced_pod(ns, field_selector="metadata.name=a").items,
            "pod a gone",
            emu,
        )
        assert [c[1] for c in plugin.calls] == ["prepare"], "pod b still uses the claim"

        core.delete_namespaced_pod("b", ns)
        _wait(
            lambda: not core.list_namespaced_pod(ns, field_selector="metadata.name=b").items,
            "pod b gone",
            emu,
        )
        assert plugin.calls[-1] == (SERVICE_V1, "unprepare", [(ns, uid, "shared")])
        assert emu.prepared_claims == set()
