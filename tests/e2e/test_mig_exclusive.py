"""A full GPU and MIG slices of it exclude each other, as the real scheduler allocates them.

On Hopper with ``--allow-mig-mode-change true`` and MIG off, a GPU publishes both its full-GPU
device and every MIG placement; the full GPU consumes every counter of the GPU's counter set, so
the scheduler can hand out one or the other, never both, and never two overlapping placements.
These tests show that on the real control plane: a full-GPU claim pinned to a GPU with a MIG
slice in use stays unallocated (and the reverse) until the other side is released, and a burst
of full-GPU and MIG claims created at once never ends up with a conflicting allocation - checked
against the counters the node published, on every snapshot while the scheduler works.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from driver.inventory import DRIVER_NAME
from sharing.config import parse_quantity
from tests.e2e.test_scenario_02 import (
    await_on,
    claim_and_pod,
    is_running,
    is_unschedulable,
    list_claims,
    list_pods,
    namespace_doc,
    read_claim,
    results,
    running_pods,
)
from tests.e2e.test_scenario_04 import check_mig_prepared, gis, mig_node
from tests.ground.node import NodeFactory, SimulatedNode

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def published(node: SimulatedNode) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(devices by name, counter sets by name) of this node's pool."""
    devices: dict[str, dict[str, Any]] = {}
    counter_sets: dict[str, dict[str, Any]] = {}
    for s in node.slices():
        if s["spec"]["driver"] != DRIVER_NAME:
            continue
        for d in s["spec"].get("devices") or []:
            devices[d["name"]] = d
        for c in s["spec"].get("sharedCounters") or []:
            counter_sets[c["name"]] = c
    return devices, counter_sets


def gpu_uuid(devices: Mapping[str, Mapping[str, Any]], name: str) -> str:
    uuid: str = devices[name]["attributes"]["uuid"]["string"]
    return uuid


def request(device_class: str, cel: str) -> dict[str, Any]:
    return {"deviceClassName": device_class, "selectors": [{"cel": {"expression": cel}}]}


def one_request_claim(exactly: Mapping[str, Any]) -> dict[str, Any]:
    return {"devices": {"requests": [{"name": "gpu", "exactly": dict(exactly)}]}}


def full_gpu(uuid: str) -> dict[str, Any]:
    return one_request_claim(
        request("gpu.nvidia.com", f'device.attributes["gpu.nvidia.com"].uuid == "{uuid}"')
    )


def mig_slice(profile: str, parent_uuid: str | None = None) -> dict[str, Any]:
    cel = f'device.attributes["gpu.nvidia.com"].profile == "{profile}"'
    if parent_uuid is not None:
        cel += f' && device.attributes["gpu.nvidia.com"].parentUUID == "{parent_uuid}"'
    return one_request_claim(request("mig.nvidia.com", cel))


def conflicts(
    claims: Sequence[Mapping[str, Any]],
    devices: Mapping[str, Mapping[str, Any]],
    counter_sets: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """Everything wrong with the allocations of ``claims`` on the published pool (empty: consistent).

    Per counter set: the sum of what the allocated devices consume stays within the published
    counters; no memory slice is taken twice; a full GPU and a MIG slice of it are never both
    allocated; no device is allocated twice.
    """
    problems: list[str] = []
    owners: dict[str, str] = {}
    used: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    slices_taken: dict[tuple[str, str], str] = {}
    kinds: dict[str, set[str]] = defaultdict(set)
    for claim in claims:
        name = claim["metadata"]["name"]
        for result in results(claim):
            if result["driver"] != DRIVER_NAME:
                continue
            device = devices[result["device"]]
            if result["device"] in owners:
                problems.append(f"{result['device']} allocated to {owners[result['device']]} and {name}")
            owners[result["device"]] = name
            kind = device["attributes"]["type"]["string"]
            parent = device["attributes"].get("parentUUID", device["attributes"].get("uuid"))["string"]
            kinds[parent].add(kind)
            for consumption in device.get("consumesCounters") or []:
                counter_set = consumption["counterSet"]
                for counter, amount in consumption["counters"].items():
                    used[counter_set][counter] += int(parse_quantity(amount["value"]))
                    if counter.startswith("memory-slice-"):
                        key = (counter_set, counter)
                        if key in slices_taken:
                            problems.append(
                                f"{counter} of {counter_set} taken by {slices_taken[key]} and {name}"
                            )
                        slices_taken[key] = name
    for parent, seen in kinds.items():
        if seen >= {"gpu", "mig"}:
            problems.append(f"GPU {parent} has a full-GPU and a MIG allocation at once")
    for counter_set, counters in used.items():
        capacity = counter_sets[counter_set]["counters"]
        for counter, amount in counters.items():
            limit = int(parse_quantity(capacity[counter]["value"]))
            if amount > limit:
                problems.append(f"{counter_set}/{counter}: {amount} allocated > {limit} published")
    return problems


def test_full_gpu_and_mig_slice_of_it_exclude_each_other(node_factory: NodeFactory) -> None:
    node = mig_node(node_factory, "gpu-h100", "h100-80gb-x8", allow_mig_mode_change=True)
    devices, _ = published(node)
    assert {"gpu-2", "gpu-2-mig-1g10gb-19-0"} <= set(devices), sorted(devices)[:20]
    gpu = gpu_uuid(devices, "gpu-2")
    before = node.gpu_state()
    assert before[gpu]["mig"]["current"] is False
    ns = "mig-exclusive"
    node_factory.apply(
        [namespace_doc(ns), *claim_and_pod("slice-a", ns, node.name, mig_slice("1g.10gb", gpu))]
    )
    running_pods(node, ns, "slice-a", 1)
    check_mig_prepared(node, read_claim(node.api, ns, "slice-a"))
    assert node.gpu_state()[gpu]["mig"]["current"] is True  # enabled on demand (Hopper, allowed)

    # A 1g.10gb slice of the GPU is in use: a full-GPU claim for it cannot be allocated.
    whole = node_factory.apply(claim_and_pod("whole-b", ns, node.name, full_gpu(gpu)))
    await_on(
        node, lambda: all(map(is_unschedulable, list_pods(node.api, ns, "whole-b"))), "whole-b unschedulable"
    )
    assert not results(read_claim(node.api, ns, "whole-b"))

    # Released, the full GPU goes to the waiting claim (it was the slice that held it back).
    node_factory.delete([o for o in node_factory.applied if o["metadata"]["name"] == "slice-a"])
    running_pods(node, ns, "whole-b", 1)
    assert [r["device"] for r in results(read_claim(node.api, ns, "whole-b"))] == ["gpu-2"]
    assert node.gpu_state()[gpu] == before[gpu]  # instance gone, MIG mode off again

    # And the reverse: while the full GPU is in use, no MIG slice of it can be allocated.
    node_factory.apply(claim_and_pod("slice-c", ns, node.name, mig_slice("1g.10gb", gpu)))
    await_on(
        node, lambda: all(map(is_unschedulable, list_pods(node.api, ns, "slice-c"))), "slice-c unschedulable"
    )
    assert not results(read_claim(node.api, ns, "slice-c"))
    node_factory.delete(whole)
    running_pods(node, ns, "slice-c", 1)
    check_mig_prepared(node, read_claim(node.api, ns, "slice-c"))


def test_burst_of_full_gpu_and_mig_claims_never_conflicts(node_factory: NodeFactory) -> None:
    node = mig_node(node_factory, "gpu-h100-1", "h100-80gb-x1", allow_mig_mode_change=True)
    devices, counter_sets = published(node)
    gpu = gpu_uuid(devices, "gpu-0")
    before = node.gpu_state()
    ns = "mig-race"
    profiles = ["1g.10gb"] * 5 + ["2g.20gb"] * 2 + ["3g.40gb"] * 2
    docs = [namespace_doc(ns)]
    for i in range(3):
        docs += claim_and_pod(f"whole-{i}", ns, node.name, full_gpu(gpu))
    for i, profile in enumerate(profiles):
        docs += claim_and_pod(f"slice-{i}", ns, node.name, mig_slice(profile))
    # Interleave full-GPU and MIG pods so neither kind reaches the scheduler first by construction.
    pods = [d for d in docs if d["kind"] == "Pod"]
    order = [docs[0], *(d for d in docs if d["kind"] == "ResourceClaim")]
    order += [p for pair in zip(pods[:3], pods[3:6], strict=True) for p in pair] + pods[6:]
    node_factory.apply(order)

    problems: list[str] = []
    snapshots = 0

    def settled() -> bool:
        """Check one snapshot of the allocations; True once the scheduler is done (or it went wrong)."""
        nonlocal snapshots
        snapshots += 1
        found = conflicts(list_claims(node.api, ns), devices, counter_sets)
        problems.extend(f"snapshot {snapshots}: {p}" for p in found)
        pods_now = list_pods(node.api, ns)
        done = len(pods_now) == len(pods) and all(is_running(p) or is_unschedulable(p) for p in pods_now)
        return done or bool(problems)

    await_on(node, settled, "every pod to run or be reported unschedulable", timeout=120)
    # A few more snapshots after the scheduler settled: nothing turns into a conflict.
    for _ in range(5):
        time.sleep(0.5)
        settled()
    assert not problems, problems
    assert snapshots > 5

    claims = {c["metadata"]["name"]: c for c in list_claims(node.api, ns)}
    allocated = sorted(n for n, c in claims.items() if results(c))
    whole = [n for n in allocated if n.startswith("whole-")]
    slices = [n for n in allocated if n.startswith("slice-")]
    assert allocated, "the scheduler allocated nothing"
    assert (len(whole), bool(slices)) in ((1, False), (0, True)), allocated
    # What was allocated was prepared, and the fake GPU holds exactly the allocated slices.
    running = {p["metadata"]["name"] for p in list_pods(node.api, ns) if is_running(p)}
    assert running == set(allocated)
    for name in slices:
        check_mig_prepared(node, claims[name])
    assert len(gis(node, gpu)) == len(slices)
    assert node.gpu_state()[gpu]["mig"]["current"] is bool(slices)

    # Everything released: the GPU ends as it began (instances gone, MIG mode off again).
    node_factory.delete([o for o in node_factory.applied if o["kind"] != "Namespace"])
    await_on(node, lambda: not node.checkpoint(), "every claim to be unprepared")
    assert node.gpu_state() == before
