"""ResourceSlice publishing against the real API server: accepted, repaired after a wipe, quiet when idle.

Also checks that our client-side validation agrees with the server's: every slice the unit tests
call invalid is refused by the real API server too.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as kclient

from driver.errors import ApiError, SliceValidationError
from driver.inventory import DRIVER_NAME
from driver.kube import Kube
from driver.resourceslices import SlicePublisher, validate_slice
from tests.ground.controlplane import ControlPlane
from tests.unit.driver.test_resourceslices import (
    COUNTER_RULES,
    RULES,
    a100_inventory,
    counters_slice,
    mig_inventory,
    valid_slice,
)

pytestmark = pytest.mark.e2e


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll; the timeout is the requirement's bound (seconds, not the Go helper's 30 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def kube(control_plane: ControlPlane) -> Kube:
    return Kube.from_config(control_plane.kubeconfig)


@pytest.fixture
def node(control_plane: ControlPlane) -> dict[str, Any]:
    return control_plane.create_node(f"slices-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def publisher(kube: Kube, node: dict[str, Any]) -> Iterator[SlicePublisher]:
    p = SlicePublisher(kube, node["metadata"]["name"], DRIVER_NAME, resync_delay_s=0.2)
    yield p
    p.stop()


def devices_of(slices: list[dict[str, Any]]) -> list[str]:
    return sorted(d["name"] for s in slices for d in s["spec"].get("devices", []))


def test_server_reports_its_version(kube: Kube, control_plane: ControlPlane):
    major, minor = kube.server_version()
    assert (major, f"v{major}.{minor}") == (1, ".".join(control_plane.version.split(".")[:2]))
    assert kube.resource_api_version() == "v1"


def test_8x_a100_pool_is_accepted_repaired_and_quiet(
    kube: Kube, node: dict[str, Any], publisher: SlicePublisher
):
    name = node["metadata"]["name"]
    publisher.start(a100_inventory(8))
    assert publisher.wait_synced(30), publisher.last_error
    slices = kube.list_slices(DRIVER_NAME, name)
    assert len(slices) == 1
    (stored,) = slices
    assert devices_of(slices) == sorted(f"gpu-{i}" for i in range(8))
    assert stored["metadata"]["name"].startswith(f"00000-{DRIVER_NAME}-{name}-")
    assert stored["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    assert stored["spec"]["pool"] == {"name": name, "generation": 1, "resourceSliceCount": 1}
    gpu0 = next(d for d in stored["spec"]["devices"] if d["name"] == "gpu-0")
    assert gpu0["attributes"]["driverVersion"] == {"version": "570.133.20"}
    assert gpu0["capacity"]["memory"]["value"] == "40Gi"  # stored canonical, as NVIDIA publishes it

    # Idle: no writes (the server's resourceVersion of our slice does not move either).
    writes = publisher.api_writes
    version = stored["metadata"]["resourceVersion"]
    time.sleep(3)
    assert publisher.api_writes == writes
    assert [s["metadata"]["resourceVersion"] for s in kube.list_slices(DRIVER_NAME, name)] == [version]

    # The kubelet wipes a node's slices at its start: we put them back within seconds.
    for s in kube.list_slices(DRIVER_NAME, name):
        kube.delete_slice(s["metadata"]["name"], s["metadata"]["uid"], s["metadata"]["resourceVersion"])
    assert kube.list_slices(DRIVER_NAME, name) == []
    assert wait_for(lambda: len(devices_of(kube.list_slices(DRIVER_NAME, name))) == 8, timeout_s=10)


def test_mig_pool_with_shared_counters_is_kept_by_the_server(
    kube: Kube, node: dict[str, Any], control_plane: ControlPlane
):
    name = node["metadata"]["name"]
    dropped: list[tuple[str, ...]] = []
    publisher = SlicePublisher(kube, name, DRIVER_NAME, resync_delay_s=0.2, on_dropped_fields=dropped.append)
    try:
        publisher.start(mig_inventory({0: 0x07, 1: 0x0F}))
        assert publisher.wait_synced(30), publisher.last_error
        slices = sorted(kube.list_slices(DRIVER_NAME, name), key=lambda s: s["metadata"]["name"])
        _, minor = kube.server_version()
        if minor >= 35:
            assert len(slices) == 3
            assert [c["name"] for c in slices[0]["spec"]["sharedCounters"]] == [
                "gpu-0-counter-set",
                "gpu-1-counter-set",
            ]
        else:
            assert len(slices) == 2
        assert dropped == []
        consumers = [d for s in slices for d in s["spec"].get("devices", []) if d.get("consumesCounters")]
        assert len(consumers) == 2 * 14  # full GPU + 13 placements per A100-40GB
        writes = publisher.api_writes
        time.sleep(2)
        assert publisher.api_writes == writes
    finally:
        publisher.stop()


def _server_rejects(kube: Kube, body: dict[str, Any]) -> bool:
    try:
        created = kube.create_slice(body)
    except ApiError as exc:
        return 400 <= exc.status < 500
    meta = created["metadata"]
    kube.delete_slice(meta["name"], meta["uid"], meta["resourceVersion"])
    return False


# Rules where we are deliberately stricter than the 1.36 API server, found by this test.
STRICTER_THAN_SERVER = {
    # The server stores "a/b/c" as an attribute name, but no claim can name it (CEL and
    # matchAttribute take <domain>/<identifier>); the spec's rule is kept.
    "two slashes",
    # The server defaults a missing capacity value to 0; a device with capacity 0 is a bug in
    # discovery, not something to publish.
    "capacity without value",
}


def test_the_server_accepts_what_we_accept_and_rejects_what_we_reject(kube: Kube, node: dict[str, Any]):
    name = node["metadata"]["name"]

    def fresh(base: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(base)
        body["metadata"] = {"generateName": "validation-"}
        body["spec"]["nodeName"] = name
        body["spec"]["pool"]["name"] = f"validation-{uuid.uuid4().hex[:6]}"
        return body

    minor = kube.server_version()[1]

    def we_reject(body: dict[str, Any]) -> bool:
        try:
            validate_slice(body, server_minor=minor)
        except SliceValidationError:
            return True
        return False

    assert not _server_rejects(kube, fresh(valid_slice()))
    # The biggest counter layout we allow: 1.36 limits each set, 1.34 the slice's total.
    largest = fresh(counters_slice(8, 32))
    assert _server_rejects(kube, largest) == we_reject(largest)
    disagreements = []
    for label, mutate, _ in [*RULES, *[(f"counters: {r[0]}", r[1], r[2]) for r in COUNTER_RULES]]:
        body = fresh(counters_slice() if label.startswith("counters: ") else valid_slice())
        mutate(body)
        # Every rule holds on the newest server (the unit tests prove we reject each); an older
        # server may allow some (1.34 keeps devices and counters in one slice): then so do we.
        ours, theirs = we_reject(body), _server_rejects(kube, body)
        expected = (True, False) if label in STRICTER_THAN_SERVER else (theirs, theirs)
        if (ours, theirs) != expected:
            disagreements.append(f"{label}: we reject={ours}, server rejects={theirs}")
    assert disagreements == [], disagreements


def test_claim_get_is_v1_shaped(kube: Kube, control_plane: ControlPlane, kube_client: kclient.ApiClient):
    namespace = f"claims-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(namespace)
    objects = kclient.CustomObjectsApi(kube_client)
    created: Any = objects.create_namespaced_custom_object(
        "resource.k8s.io",
        "v1",
        namespace,
        "resourceclaims",
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": "one-gpu"},
            "spec": {
                "devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}
            },
        },
    )
    claim = kube.get_resource_claim(namespace, "one-gpu")
    assert claim["apiVersion"] == "resource.k8s.io/v1"
    assert claim["metadata"]["uid"] == created["metadata"]["uid"]
    assert claim["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] == "gpu.nvidia.com"
    with pytest.raises(ApiError) as missing:
        kube.get_resource_claim(namespace, "no-such-claim")
    assert missing.value.status == 404
    assert missing.value.reason == "NotFound"


def test_sequential_claim_gets_reuse_one_keep_alive_connection(control_plane: ControlPlane):
    """Each new TLS session costs the kubelet's call a handshake; sequential GETs must share one."""
    kube = Kube.from_config(control_plane.kubeconfig)
    kube.resource_api_version()
    for _ in range(20):
        with pytest.raises(ApiError):
            kube.get_resource_claim("default", "no-such-claim")
    transport: Any = kube._transport
    assert len(transport._pool.pools) == 1
    pool = transport._pool.connection_from_url(transport._host)  # the one pool, looked up
    assert pool.num_connections == 1, f"{pool.num_connections} TLS connections for 21 requests"
    assert pool.num_requests == 21
