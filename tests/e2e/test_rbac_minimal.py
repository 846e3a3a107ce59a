"""The chart's ClusterRole is exactly what the running plugin needs: enough, and nothing more.

Why: the plugin runs on every GPU node; a permission it does not use is attack surface, and one it
lacks turns into GPUs that never appear or pods that never start. Here the real plugin process runs
with a token of the chart's ServiceAccount (tests/ground/node.py), first with the rendered role
(everything works: slices published with the Node as owner, a claim prepared), then once per
granted (resource, verb) with a role lacking just that verb, each time showing the plugin function
that breaks - in its log and on the API server. The role is restored after each case.

tests/e2e/test_node_restriction.py checks the same rules against the API facade in isolation;
this file shows that the daemon itself depends on them. What it does not do: test the admission
policy (test_node_restriction.py) or Helm itself (test_chart.py).
"""

from __future__ import annotations

import copy
import json
import signal
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client as kclient

from driver.inventory import DRIVER_NAME
from tests.ground.kubelet import KubeletError
from tests.ground.node import (
    Cluster,
    NodeFactory,
    SimulatedNode,
    get_json,
    request_json,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NODE = "rbac-min-a"
TOPOLOGY = "l4-x2"
WAIT_S = 60.0
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
CLUSTER_ROLES = "/apis/rbac.authorization.k8s.io/v1/clusterroles"

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)

# Granted by the chart although the daemon never calls it (it lists and watches); see rbac.yaml.
# The test shows the plugin works without it, so the lead can drop it from the chart.
NOT_USED_BY_THE_DAEMON: frozenset[tuple[str, str]] = frozenset()


@dataclass
class Ground:
    """One simulated node plus what the cases need to break it and tell."""

    node: SimulatedNode
    api: kclient.ApiClient
    role_name: str
    rendered_rules: list[dict[str, Any]]
    user: str
    namespace: str
    claim_name: str
    claim_uid: str

    def claim_ref(self) -> tuple[str, str, str]:
        return (self.namespace, self.claim_uid, self.claim_name)


# -- role handling ---------------------------------------------------------------------------------


def granted(rules: list[dict[str, Any]]) -> list[Rule]:
    return sorted(
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups") or [""]
        for resource in rule.get("resources") or []
        for verb in rule.get("verbs") or []
    )


def without(rules: list[dict[str, Any]], drop: Rule) -> list[dict[str, Any]]:
    """``rules`` with the one (group, resource, verb) removed (the rest of each rule kept)."""
    group, resource, verb = drop
    out: list[dict[str, Any]] = []
    for rule in rules:
        if group in (rule.get("apiGroups") or [""]) and resource in (rule.get("resources") or []):
            others = [r for r in rule["resources"] if r != resource]
            if others:
                out.append({**rule, "resources": others})
            verbs = [v for v in rule["verbs"] if v != verb]
            if verbs:
                out.append({**rule, "resources": [resource], "verbs": verbs})
        else:
            out.append(copy.deepcopy(rule))
    return out


def set_rules(g: Ground, rules: list[dict[str, Any]]) -> None:
    put_rules(g.api, g.role_name, rules)


def put_rules(api: kclient.ApiClient, role_name: str, rules: list[dict[str, Any]]) -> None:
    path = f"{CLUSTER_ROLES}/{role_name}"
    body = get_json(api, path)
    body["rules"] = rules
    request_json(api, "PUT", path, body=body)


def allowed(g: Ground, rule: Rule) -> bool:
    """What the authorizer answers for the plugin's identity right now (SubjectAccessReview)."""
    group, resource, verb = rule
    review = request_json(
        g.api,
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        body={
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": g.user,
                "resourceAttributes": {"group": group, "resource": resource, "verb": verb},
            },
        },
    )
    return bool(review["status"].get("allowed"))


@contextmanager
def role_lacking(g: Ground, rule: Rule) -> Iterator[None]:
    """The chart's role minus ``rule`` for the block (in effect before it starts), then the full role."""
    set_rules(g, without(g.rendered_rules, rule))
    try:
        wait_for(lambda: not allowed(g, rule), WAIT_S, f"{rule} to be denied after removing it")
        yield
    finally:
        set_rules(g, copy.deepcopy(g.rendered_rules))
        wait_for(lambda: all(allowed(g, r) for r in granted(g.rendered_rules)), WAIT_S, "the full role")


# -- observing the plugin --------------------------------------------------------------------------


def log_offset(node: SimulatedNode) -> int:
    return node.plugin_log.stat().st_size if node.plugin_log.exists() else 0


def events_since(node: SimulatedNode, offset: int) -> list[dict[str, Any]]:
    with node.plugin_log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wait_logged(node: SimulatedNode, offset: int, event: str, needle: str) -> dict[str, Any]:
    """Wait for a plugin log ``event`` whose error contains ``needle``; return it."""

    def found() -> dict[str, Any] | None:
        for e in events_since(node, offset):
            if e.get("event") == event and needle in str(e.get("error", "")):
                return e
        return None

    return wait_for(found, WAIT_S, f"plugin log event {event!r} with {needle!r} on {node.name}")


def forbidden(verb: str, resource: str) -> str:
    """The part of the API server's 403 message naming the missing permission."""
    return f'cannot {verb} resource "{resource}"'


def our_slices(node: SimulatedNode) -> list[dict[str, Any]]:
    return [s for s in node.slices() if s["spec"]["driver"] == DRIVER_NAME]


def devices_view(node: SimulatedNode) -> dict[str, Any]:
    """Published devices by name and the pool's shape: what a repaired pool must equal again."""
    slices = our_slices(node)
    return {
        "devices": {d["name"]: d for s in slices for d in s["spec"].get("devices") or []},
        "slices": len(slices),
        "complete": {
            (s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"]) for s in slices
        }
        == {(slices[0]["spec"]["pool"]["generation"], len(slices))}
        if slices
        else False,
    }


def restart_plugin(node: SimulatedNode) -> None:
    node.kill_plugin(signal.SIGTERM)
    node.start_plugin(wait=True)


# -- changes behind the plugin's back (as admin) ----------------------------------------------------


def delete_our_slices(g: Ground) -> None:
    for s in our_slices(g.node):
        request_json(g.api, "DELETE", f"{SLICES}/{s['metadata']['name']}")
    wait_for(lambda: not our_slices(g.node), WAIT_S, "the admin's delete of the slices to take")


def edit_a_slice(g: Ground) -> tuple[str, str]:
    """Drop one attribute of gpu-0 in its slice; return (slice name, dropped attribute)."""
    for s in our_slices(g.node):
        for d in s["spec"].get("devices") or []:
            if d["name"] == "gpu-0":
                attr = sorted(d["attributes"])[-1]
                del d["attributes"][attr]
                request_json(g.api, "PUT", f"{SLICES}/{s['metadata']['name']}", body=s)
                return s["metadata"]["name"], attr
    raise AssertionError(f"gpu-0 is not published by {g.node.name}")


def add_stale_slice(g: Ground) -> str:
    """A slice of this node's pool with an unusable name and generation 0: the plugin must delete it."""
    name = f"stale-{g.node.name}-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": DRIVER_NAME,
            "nodeName": g.node.name,
            "pool": {"name": g.node.name, "generation": 0, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-99"}],
        },
    }
    request_json(g.api, "POST", SLICES, body=body)
    return name


def slice_exists(g: Ground, name: str) -> bool:
    return any(s["metadata"]["name"] == name for s in our_slices(g.node))


# -- the cases: each shows what breaks without one rule ---------------------------------------------


def case_slices_create(g: Ground) -> None:
    """Without create, the pool cannot be (re)published: slices wiped behind its back stay gone."""
    offset = log_offset(g.node)
    delete_our_slices(g)
    wait_logged(g.node, offset, "resource slice sync failed", forbidden("create", "resourceslices"))
    assert our_slices(g.node) == []


def case_slices_update(g: Ground) -> None:
    """Without update, a slice changed behind its back cannot be repaired."""
    offset = log_offset(g.node)
    name, attr = edit_a_slice(g)
    wait_logged(g.node, offset, "resource slice sync failed", forbidden("update", "resourceslices"))
    edited = get_json(g.api, f"{SLICES}/{name}")
    gpu0 = next(d for d in edited["spec"]["devices"] if d["name"] == "gpu-0")
    assert attr not in gpu0["attributes"]


def case_slices_delete(g: Ground) -> None:
    """Without delete, an obsolete slice in the pool cannot be removed."""
    offset = log_offset(g.node)
    stale = add_stale_slice(g)
    wait_logged(g.node, offset, "resource slice sync failed", forbidden("delete", "resourceslices"))
    assert slice_exists(g, stale)


def case_slices_list(g: Ground) -> None:
    """Without list, the plugin cannot see its pool: no sync (and no watch) can start."""
    offset = log_offset(g.node)
    delete_our_slices(g)
    wait_logged(g.node, offset, "resource slice sync failed", forbidden("list", "resourceslices"))
    assert our_slices(g.node) == []


def case_slices_watch(g: Ground) -> None:
    """Without watch, the plugin never hears of changes behind its back (the watch fails at start)."""
    offset = log_offset(g.node)
    restart_plugin(g.node)  # a running watch outlives the role change; a new one is refused
    wait_logged(g.node, offset, "resource slice watch failed", forbidden("watch", "resourceslices"))


def case_not_needed(g: Ground) -> None:
    """A rule the daemon does not use: without it, publishing, repairing and preparing still work."""
    before = devices_view(g.node)
    offset = log_offset(g.node)
    delete_our_slices(g)
    restart_plugin(g.node)
    g.node.wait_published(WAIT_S)
    name, _ = edit_a_slice(g)
    stale = add_stale_slice(g)
    wait_for(
        lambda: not slice_exists(g, stale) and devices_view(g.node)["devices"] == before["devices"],
        WAIT_S,
        f"the plugin to repair {name} and delete {stale} without resourceslices/get",
    )
    assert prepare_and_unprepare(g)
    failures = [
        e
        for e in events_since(g.node, offset)
        if e.get("level") in ("warning", "error") and "403" in str(e.get("error", ""))
    ]
    assert failures == [], failures


def case_claims_get(g: Ground) -> None:
    """Without resourceclaims/get, prepare cannot read the allocation: a per-claim error, forbidden."""
    with pytest.raises(KubeletError) as info:
        g.node.kubelet.prepare(DRIVER_NAME, [g.claim_ref()])
    assert forbidden("get", "resourceclaims") in str(info.value)
    assert g.node.cdi_spec(g.claim_uid) is None
    assert g.claim_uid not in g.node.checkpoint()


def case_nodes_get(g: Ground) -> None:
    """Without nodes/get, the publisher cannot set the Node as owner: no slice is written."""
    offset = log_offset(g.node)
    delete_our_slices(g)
    wait_logged(g.node, offset, "resource slice sync failed", forbidden("get", "nodes"))
    assert our_slices(g.node) == []


def case_events_create(g: Ground) -> None:
    """Without events/create, a failed prepare still fails for the kubelet, but no Event reaches the claim."""
    bogus = (g.namespace, str(uuid.uuid4()), g.claim_name)  # a UID the claim does not have
    offset = log_offset(g.node)
    with pytest.raises(KubeletError):
        g.node.emulator.prepare(DRIVER_NAME, [bogus])
    wait_logged(g.node, offset, "sending an event failed", forbidden("create", "events"))


CASES: dict[tuple[str, str], Callable[[Ground], None]] = {
    ("events", "create"): case_events_create,
    ("resourceslices", "create"): case_slices_create,
    ("resourceslices", "update"): case_slices_update,
    ("resourceslices", "delete"): case_slices_delete,
    ("resourceslices", "list"): case_slices_list,
    ("resourceslices", "watch"): case_slices_watch,
    ("resourceclaims", "get"): case_claims_get,
    ("nodes", "get"): case_nodes_get,
}


# -- the claim ---------------------------------------------------------------------------------------


def allocated_claim(api: kclient.ApiClient, namespace: str, name: str, node: str) -> dict[str, Any]:
    """A ResourceClaim for one GPU, allocated to ``node``'s gpu-1 by writing its status as admin."""
    path = f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims"
    claim = request_json(
        api,
        "POST",
        path,
        body={
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}
            },
        },
    )
    claim["status"] = {
        "allocation": {
            "devices": {
                "results": [{"request": "gpu", "driver": DRIVER_NAME, "pool": node, "device": "gpu-1"}]
            }
        }
    }
    stored: dict[str, Any] = request_json(api, "PUT", f"{path}/{name}/status", body=claim)
    return stored


def prepare_and_unprepare(g: Ground) -> bool:
    """Prepare the claim (the CDI spec appears), then unprepare it (the node is clean again)."""
    prepared = g.node.kubelet.prepare(DRIVER_NAME, [g.claim_ref()])
    [device] = prepared[g.claim_uid]
    assert (device.pool_name, device.device_name) == (g.node.name, "gpu-1")
    assert g.node.cdi_spec(g.claim_uid) is not None
    g.node.kubelet.unprepare(DRIVER_NAME, [g.claim_ref()])
    assert g.node.cdi_spec(g.claim_uid) is None
    return True


# -- the test ----------------------------------------------------------------------------------------


def rendered_role(cluster: Cluster) -> dict[str, Any]:
    [role] = [o for o in cluster.objects.objects if o["kind"] == "ClusterRole"]
    return role


@pytest.fixture
def ground(node_factory: NodeFactory) -> Iterator[Ground]:
    cluster = node_factory.cluster
    role = rendered_role(cluster)
    namespace = f"rbac-min-{uuid.uuid4().hex[:6]}"
    node_factory.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}])
    node = node_factory(NODE, TOPOLOGY)
    claim = allocated_claim(cluster.api, namespace, "one-gpu", NODE)  # goes with its namespace
    objects = cluster.objects
    yield Ground(
        node=node,
        api=cluster.api,
        role_name=role["metadata"]["name"],
        rendered_rules=copy.deepcopy(role["rules"]),
        user=f"system:serviceaccount:{objects.namespace}:{objects.service_account}",
        namespace=namespace,
        claim_name="one-gpu",
        claim_uid=claim["metadata"]["uid"],
    )
    # Whatever happened, the session's other tests need the chart's role back.
    set_rules_safely(cluster.api, role)


def set_rules_safely(api: kclient.ApiClient, role: Mapping[str, Any]) -> None:
    name = role["metadata"]["name"]
    if get_json(api, f"{CLUSTER_ROLES}/{name}").get("rules") != role["rules"]:
        put_rules(api, name, copy.deepcopy(role["rules"]))


def test_plugin_needs_every_rule_of_the_chart_role_and_no_more(ground: Ground) -> None:
    g = ground
    node = g.node
    live = get_json(g.api, f"{CLUSTER_ROLES}/{g.role_name}")
    assert granted(live["rules"]) == granted(g.rendered_rules), "the installed role is not the chart's"

    # Enough: with the chart's role the plugin published its pool, owned by the Node, and prepares.
    user, nodes = node.identity()
    assert (user, nodes) == (g.user, [node.name])
    node_uid = get_json(g.api, f"/api/v1/nodes/{node.name}")["metadata"]["uid"]
    slices = our_slices(node)
    assert slices
    for s in slices:
        owners = [(o["kind"], o["name"], o["uid"]) for o in s["metadata"].get("ownerReferences") or []]
        assert owners == [("Node", node.name, node_uid)], owners
    assert prepare_and_unprepare(g)
    healthy = devices_view(node)

    rules = granted(g.rendered_rules)
    assert {(r, v) for _, r, v in rules} == set(CASES) | NOT_USED_BY_THE_DAEMON, (
        "every rule of the chart's role needs a case here showing what breaks without it"
    )
    for rule in rules:
        _, resource, verb = rule
        case = case_not_needed if (resource, verb) in NOT_USED_BY_THE_DAEMON else CASES[(resource, verb)]
        with role_lacking(g, rule):
            case(g)
        # Back to the full role: a restarted plugin repairs the pool and prepares again.
        restart_plugin(node)
        wait_for(lambda: devices_view(node) == healthy, WAIT_S, f"the pool to be repaired after {rule}")
        assert prepare_and_unprepare(g)
