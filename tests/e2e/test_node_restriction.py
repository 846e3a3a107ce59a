"""What the chart's identity may do, with real tokens against the real API server.

Why: the plugin runs on every GPU node with one ServiceAccount; a compromised or buggy plugin on
node A must not rewrite node B's devices, and the ClusterRole must hold exactly what the plugin
calls. Here the chart is installed, a Pod of its ServiceAccount is bound to node A (nothing runs
it), and a token bound to that Pod (it carries authentication.kubernetes.io/node-name=A) drives
the plugin's own API facade (driver/kube.py): A's slices are writable, B's are not, a token
without a node is refused, and every RBAC verb the chart grants is needed by a facade call
(removing it makes that call fail).

What it does not do: run the plugin daemon (the kubelet-plugin tests do, with the same facade).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient
from kubernetes import config as kconfig

from driver.errors import ApiError
from driver.inventory import DRIVER_NAME
from driver.kube import Kube, RestTransport
from tests.e2e.test_chart import CHART, Helm, make_helm
from tests.ground.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

WAIT_S = 30.0
NODE_CLAIM = "authentication.kubernetes.io/node-name"


@dataclass(frozen=True)
class Ground:
    ns: str
    service_account: str
    cluster_role: str
    node_a: str
    node_b: str
    pod: str
    claim: str
    token_a: str
    workdir: Path


@pytest.fixture(scope="module")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return make_helm(control_plane, tmp_path_factory.mktemp("helm-nr"))


@pytest.fixture(scope="module")
def ground(
    control_plane: ControlPlane,
    kube_client: kclient.ApiClient,
    helm: Helm,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Ground]:
    """The chart's RBAC and policy installed (no DeviceClasses: other tests own those names)."""
    suffix = uuid.uuid4().hex[:6]
    ns, release = f"nr-{suffix}", f"nr{suffix}"
    helm.run(
        "install", release, str(CHART), "--namespace", ns, "--create-namespace",
        "--set-json", "deviceClasses.create=false",
    )  # fmt: skip
    try:
        objs = [d for d in yaml.safe_load_all(helm.run("get", "manifest", release, "-n", ns).stdout) if d]
        sa = next(o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount")
        role = next(o["metadata"]["name"] for o in objs if o["kind"] == "ClusterRole")
        node_a, node_b = f"nr-a-{suffix}", f"nr-b-{suffix}"
        control_plane.create_node(node_a)
        control_plane.create_node(node_b)
        core: Any = kclient.CoreV1Api(kube_client)
        pod = "plugin-on-a"
        core.create_namespaced_pod(
            ns,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod},
                "spec": {
                    "nodeName": node_a,
                    "serviceAccountName": sa,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "plugin", "image": "registry.invalid/gpu-dra:test"}],
                },
            },
        )
        claim = "one-gpu"
        _custom(kube_client).create_namespaced_custom_object(
            "resource.k8s.io",
            "v1",
            ns,
            "resourceclaims",
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {"name": claim},
                "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "any"}}]}},
            },
        )
        token = control_plane.service_account_token(ns, sa, bound_pod=pod)
        workdir = tmp_path_factory.mktemp("nr")
        _wait_for_policy(control_plane, token, node_b, workdir)
        yield Ground(ns, sa, role, node_a, node_b, pod, claim, token, workdir)
    finally:
        helm.run("uninstall", release, "-n", ns, check=False)


def _custom(api: kclient.ApiClient) -> Any:
    return kclient.CustomObjectsApi(api)


def _configuration(kubeconfig: Path) -> kclient.Configuration:
    configuration = kclient.Configuration()
    kconfig.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), client_configuration=configuration
    )
    return configuration


def _wait_for_policy(control_plane: ControlPlane, token: str, other_node: str, workdir: Path) -> None:
    """The API server enforces a new policy once its informer has it (well under a second): until
    then writes are allowed, so wait until a dry-run write of another node's slice is refused."""
    configuration = _configuration(control_plane.kubeconfig_for_token(token, workdir / "probe.kubeconfig"))
    with kclient.ApiClient(configuration) as api:
        custom = _custom(api)

        def refused() -> bool:
            try:
                custom.create_cluster_custom_object(
                    "resource.k8s.io", "v1", "resourceslices", _slice(other_node), dry_run="All"
                )
            except kclient.ApiException as e:
                if e.status == 422 and "ValidatingAdmissionPolicy" in str(e.body):
                    return True
                raise
            return False

        _until("the chart's ValidatingAdmissionPolicy to be enforced", refused)


def _kube(control_plane: ControlPlane, token: str, path: Path) -> Kube:
    """The plugin's API facade authenticated with `token` (no client-side throttling in tests)."""
    configuration = _configuration(control_plane.kubeconfig_for_token(token, path))
    return Kube(RestTransport(configuration), qps=1000.0, burst=1000)


@pytest.fixture(scope="module")
def plugin_a(control_plane: ControlPlane, ground: Ground) -> Kube:
    return _kube(control_plane, ground.token_a, ground.workdir / "a.kubeconfig")


def _slice(node: str, name: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name} if name else {"generateName": f"{node}-{DRIVER_NAME}-"}
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": meta,
        "spec": {
            "driver": DRIVER_NAME,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0", "attributes": {"type": {"string": "gpu"}}}],
        },
    }


def _admin_slice(kube_client: kclient.ApiClient, node: str) -> dict[str, Any]:
    created: dict[str, Any] = _custom(kube_client).create_cluster_custom_object(
        "resource.k8s.io", "v1", "resourceslices", _slice(node, f"{node}-{uuid.uuid4().hex[:6]}")
    )
    return created


def _denied(call: Callable[[], Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_token_bound_to_the_pod_carries_node_a(
    control_plane: ControlPlane, kube_client: kclient.ApiClient, ground: Ground
) -> None:
    auth: Any = kclient.AuthenticationV1Api(kube_client)
    review = auth.create_token_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": ground.token_a}}
    )
    assert review.status.authenticated
    assert review.status.user.username == f"system:serviceaccount:{ground.ns}:{ground.service_account}"
    assert review.status.user.extra[NODE_CLAIM] == [ground.node_a]


def test_plugin_on_a_writes_its_own_slices(plugin_a: Kube, ground: Ground) -> None:
    created = plugin_a.create_slice(_slice(ground.node_a))
    assert created["spec"]["nodeName"] == ground.node_a
    listed = plugin_a.list_slices(DRIVER_NAME, ground.node_a)
    assert created["metadata"]["name"] in {s["metadata"]["name"] for s in listed}
    created["spec"]["pool"]["generation"] = 2
    updated = plugin_a.update_slice(created)
    assert updated["spec"]["pool"]["generation"] == 2
    plugin_a.delete_slice(updated["metadata"]["name"], updated["metadata"]["uid"], "")


def test_plugin_on_a_cannot_create_a_slice_of_b(plugin_a: Kube, ground: Ground) -> None:
    err = _denied(lambda: plugin_a.create_slice(_slice(ground.node_b)))
    assert err.status == 422, err
    assert (
        f"the gpu-dra plugin on node {ground.node_a} may not write ResourceSlices of node {ground.node_b}"
        in str(err)
    )
    # Nor one that names no node (allNodes) - it would serve B too.
    everywhere = _slice(ground.node_a)
    del everywhere["spec"]["nodeName"]
    everywhere["spec"]["allNodes"] = True
    err = _denied(lambda: plugin_a.create_slice(everywhere))
    assert "may not write ResourceSlices of node" in str(err)


def test_plugin_on_a_cannot_update_or_delete_slices_of_b(
    plugin_a: Kube, kube_client: kclient.ApiClient, ground: Ground
) -> None:
    theirs = _admin_slice(kube_client, ground.node_b)
    changed = {**theirs, "spec": {**theirs["spec"], "pool": {**theirs["spec"]["pool"], "generation": 7}}}
    err = _denied(lambda: plugin_a.update_slice(changed))
    assert f"may not write ResourceSlices of node {ground.node_b}" in str(err)
    # Taking B's slice over by renaming its node is refused too.
    taken = {**theirs, "spec": {**theirs["spec"], "nodeName": ground.node_a}}
    err = _denied(lambda: plugin_a.update_slice(taken))
    # The API server's own validation (nodeName is immutable) answers before the policy's check
    # of the stored object does; either refusal will do.
    assert err.status == 422, err
    assert "field is immutable" in str(err) or "may not write ResourceSlices" in str(err)
    err = _denied(lambda: plugin_a.delete_slice(theirs["metadata"]["name"], theirs["metadata"]["uid"], ""))
    assert f"may not write ResourceSlices of node {ground.node_b}" in str(err)
    still = _custom(kube_client).get_cluster_custom_object(
        "resource.k8s.io", "v1", "resourceslices", theirs["metadata"]["name"]
    )
    assert still["spec"]["pool"]["generation"] == 1
    assert still["spec"]["nodeName"] == ground.node_b


def test_token_without_a_node_cannot_write_slices(control_plane: ControlPlane, ground: Ground) -> None:
    token = control_plane.service_account_token(ground.ns, ground.service_account)
    unbound = _kube(control_plane, token, ground.workdir / "unbound.kubeconfig")
    err = _denied(lambda: unbound.create_slice(_slice(ground.node_a)))
    assert "may only write ResourceSlices from a pod bound to a node" in str(err)
    # Reading stays allowed: the policy is about writes.
    assert isinstance(unbound.list_slices(DRIVER_NAME, ground.node_a), list)


def test_policy_leaves_other_identities_alone(kube_client: kclient.ApiClient, ground: Ground) -> None:
    # The admin (and the kubelet, the scheduler...) are not matched by the policy.
    theirs = _admin_slice(kube_client, ground.node_b)
    _custom(kube_client).delete_cluster_custom_object(
        "resource.k8s.io", "v1", "resourceslices", theirs["metadata"]["name"]
    )


def test_role_allows_what_the_plugin_reads_and_nothing_else(
    control_plane: ControlPlane, plugin_a: Kube, ground: Ground
) -> None:
    assert plugin_a.get_node(ground.node_a)["metadata"]["name"] == ground.node_a
    claim = plugin_a.get_resource_claim(ground.ns, ground.claim)
    assert claim["metadata"]["name"] == ground.claim
    watch = plugin_a.watch_slices(DRIVER_NAME, ground.node_a, timeout_s=1)
    watch.close()

    with kclient.ApiClient(_configuration(ground.workdir / "a.kubeconfig")) as api:
        core: Any = kclient.CoreV1Api(api)
        custom: Any = kclient.CustomObjectsApi(api)
        forbidden: list[tuple[str, Callable[[], Any]]] = [
            ("list pods", lambda: core.list_namespaced_pod(ground.ns)),
            ("delete node", lambda: core.delete_node(ground.node_b)),
            ("patch node", lambda: core.patch_node(ground.node_a, {"metadata": {"labels": {"x": "y"}}})),
            ("list nodes", core.list_node),
            ("read secrets", lambda: core.list_namespaced_secret(ground.ns)),
            ("update claim status", lambda: custom.patch_namespaced_custom_object_status(
                "resource.k8s.io", "v1", ground.ns, "resourceclaims", ground.claim, {"status": {}})),
            ("list claims", lambda: custom.list_namespaced_custom_object(
                "resource.k8s.io", "v1", ground.ns, "resourceclaims")),
            ("create events", lambda: core.create_namespaced_event(ground.ns, {
                "metadata": {"generateName": "x-"}, "involvedObject": {"kind": "Node", "name": ground.node_a},
                "reason": "Test", "message": "m"})),
        ]  # fmt: skip
        for what, call in forbidden:
            with pytest.raises(kclient.ApiException) as info:
                call()
            assert info.value.status == 403, f"{what}: {info.value.status} {info.value.reason}"


# -- every granted verb is used --------------------------------------------------------------------


def _verb_calls(
    plugin: Kube, kube_client: kclient.ApiClient, ground: Ground
) -> dict[tuple[str, str], Callable[[], Any]]:
    """For each (resource, verb) the ClusterRole grants, the plugin facade call that needs it."""

    def update() -> None:
        mine = _admin_slice(kube_client, ground.node_a)
        mine["spec"]["pool"]["generation"] = 2
        plugin.update_slice(mine)

    def delete() -> None:
        mine = _admin_slice(kube_client, ground.node_a)
        plugin.delete_slice(mine["metadata"]["name"], mine["metadata"]["uid"], "")

    def watch() -> None:
        plugin.watch_slices(DRIVER_NAME, ground.node_a, timeout_s=1).close()

    def event() -> None:
        plugin.create_event(
            "default",  # Events about a cluster-scoped object live in default
            {
                "apiVersion": "events.k8s.io/v1",
                "kind": "Event",
                "metadata": {"generateName": "rbac-check-"},
                "eventTime": "2026-01-01T00:00:00.000000Z",
                "reportingController": "gpu.nvidia.com/kubelet-plugin",
                "reportingInstance": f"gpu.nvidia.com/kubelet-plugin-{ground.node_a}",
                "action": "Check",
                "reason": "RbacCheck",
                "type": "Normal",
                "regarding": {"apiVersion": "v1", "kind": "Node", "name": ground.node_a},
            },
        )

    return {
        ("events", "create"): event,
        ("nodes", "get"): lambda: plugin.get_node(ground.node_a),
        ("resourceclaims", "get"): lambda: plugin.get_resource_claim(ground.ns, ground.claim),
        ("resourceslices", "list"): lambda: plugin.list_slices(DRIVER_NAME, ground.node_a),
        ("resourceslices", "watch"): watch,
        ("resourceslices", "create"): lambda: plugin.create_slice(_slice(ground.node_a)),
        ("resourceslices", "update"): update,
        ("resourceslices", "delete"): delete,
    }


# Granted although driver/kube.py has no call for it; see the report in the chart's rbac.yaml.
UNUSED_GRANTS: frozenset[tuple[str, str]] = frozenset()


def _until(what: str, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")
        time.sleep(0.1)


def _allowed(call: Callable[[], Any]) -> bool:
    return not _forbidden(call)


def _forbidden(call: Callable[[], Any]) -> bool:
    try:
        call()
    except ApiError as e:
        if e.status == 403:
            return True
        raise
    return False


def test_every_granted_verb_is_needed(plugin_a: Kube, kube_client: kclient.ApiClient, ground: Ground) -> None:
    rbac: Any = kclient.RbacAuthorizationV1Api(kube_client)
    api: Any = kube_client
    original = rbac.read_cluster_role(ground.cluster_role)
    granted = {(rule.resources[0], verb) for rule in original.rules for verb in rule.verbs}
    calls = _verb_calls(plugin_a, kube_client, ground)
    assert granted - set(calls) == UNUSED_GRANTS
    try:
        for resource, verb in sorted(set(calls)):
            assert (resource, verb) in granted
            call = calls[(resource, verb)]
            call()  # allowed with the full role
            reduced = [
                {
                    "apiGroups": rule.api_groups,
                    "resources": rule.resources,
                    "verbs": [v for v in rule.verbs if not (rule.resources[0] == resource and v == verb)],
                }
                for rule in original.rules
            ]
            rbac.patch_cluster_role(ground.cluster_role, {"rules": [r for r in reduced if r["verbs"]]})
            _until(f"{resource}/{verb} to be forbidden without its rule", functools.partial(_forbidden, call))
            rbac.patch_cluster_role(
                ground.cluster_role, {"rules": api.sanitize_for_serialization(original.rules)}
            )
            _until(f"{resource}/{verb} to be allowed again", functools.partial(_allowed, call))
    finally:
        rbac.patch_cluster_role(
            ground.cluster_role, {"rules": api.sanitize_for_serialization(original.rules)}
        )
