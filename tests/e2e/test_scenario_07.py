"""Scenario 07 end to end: 10Gi shares of non-MIG GPUs, scheduled by capacity and enforced by MPS.

On the real control plane and scheduler with a simulated ``gpu-a100x2`` (2x A100-SXM4-40GB): five
claims for ``capacity.requests.memory: 10Gi`` in five namespaces; four shares fill one GPU, the
fifth goes to the other. One MPS daemon per GPU serves its shares; each share's CDI device carries
its share id, its 10Gi memory limit and its 25 % thread limit. Deleting one pod leaves the other
shares and the daemon alone; a fake client asking 12Gi in a 10Gi share is refused.

Also NVIDIA's three modes on the real scheduler, and that a GPU holding a full-GPU claim or a MIG
device is not offered as shares at the same time (and the other way round).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from driver.resourceslices import parse_quantity
from tests.e2e.test_scenario_02 import (
    await_on,
    claim_and_pod,
    is_running,
    is_unschedulable,
    list_pods,
    namespace_doc,
    read_claim,
    results,
    unprepared,
)
from tests.e2e.test_scenario_03 import alive, daemon_starts, mps_status
from tests.ground.node import NodeFactory, SimulatedNode, scenario_path
from tests.ground.standins import STATE_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

TEAMS = ("team-a", "team-b", "team-c", "team-d", "team-e")
NAME = "inference"
GIB = 1 << 30
MPS_TOOL = "nvidia-cuda-mps-control"


@pytest.fixture
def stray_daemons() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def running(node: SimulatedNode, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = [p for ns in namespaces for p in list_pods(node.api, ns, NAME)]
        return pods if len(pods) == len(namespaces) and all(is_running(p) for p in pods) else None

    return await_on(node, ready, f"pods of {list(namespaces)} running")


def cdi_edits(spec: Mapping[str, Any], device: str) -> dict[str, Any]:
    (cdi_device,) = [d for d in spec["devices"] if d["name"] == device]
    edits: dict[str, Any] = cdi_device["containerEdits"]
    return edits


def env_of(edits: Mapping[str, Any]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in edits.get("env") or [])


def fake_client(
    node: SimulatedNode, spec: Mapping[str, Any], device: str, wanted: str
) -> subprocess.CompletedProcess[str]:
    """A CUDA program in the share's container: the env its CDI device gives, the pipe dir as mounted."""
    edits = cdi_edits(spec, device)
    mounts = {m["containerPath"]: m["hostPath"] for m in edits["mounts"]}
    assert node.driver_root is not None
    return subprocess.run(
        [str(node.driver_root.bin_dir / MPS_TOOL), "--fake-client", wanted],
        env={
            **os.environ,
            **env_of(edits),
            "CUDA_MPS_PIPE_DIRECTORY": mounts["/tmp/nvidia-mps"],
            STATE_ENV: str(node.fake_state),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_four_10gi_shares_fill_one_gpu_the_fifth_takes_the_other(
    node_factory: NodeFactory, stray_daemons: list[int]
) -> None:
    node = node_factory("gpu-a100x2", "a100-40gb-x2")
    before = node.gpu_state()
    node_factory.apply(scenario_path("07"))
    pods = running(node, TEAMS)

    claims = {ns: read_claim(node.api, ns, NAME) for ns in TEAMS}
    by_device: dict[str, list[str]] = {}
    for ns, claim in claims.items():
        (result,) = results(claim)
        assert result["shareID"], result
        assert parse_quantity(result["consumedCapacity"]["memory"]) == 10 * GIB, result
        by_device.setdefault(result["device"], []).append(ns)
    assert sorted(len(v) for v in by_device.values()) == [1, 4], by_device
    full_gpu = next(d for d, v in by_device.items() if len(v) == 4)
    other_gpu = next(d for d, v in by_device.items() if len(v) == 1)

    # One daemon per GPU, shared by the shares of every namespace on it.
    cp = node.checkpoint()
    uuid = {d.device: d.gpu_uuid for c in cp.values() for d in c.devices}
    daemon_dirs = {name: node.mps_root / f"shared-{uuid[name]}" for name in (full_gpu, other_gpu)}
    assert len(daemon_starts(node)) == 2
    assert {e["pipeDir"] for e in daemon_starts(node)} == {str(d / "pipe") for d in daemon_dirs.values()}
    pids: dict[str, int] = {}
    for name, group in daemon_dirs.items():
        status = mps_status(node, group / "pipe")
        assert status is not None
        pids[name] = int(status["pid"])
    stray_daemons.extend(pids.values())
    for name in (full_gpu, other_gpu):
        assert node.gpu_state()[uuid[name]]["computeMode"] == "EXCLUSIVE_PROCESS"
    assert sorted(p.name for p in (daemon_dirs[full_gpu] / "members").iterdir()) == sorted(
        f"{claims[ns]['metadata']['uid']}_{results(claims[ns])[0]['shareID']}.json"
        for ns in by_device[full_gpu]
    )

    # Each share's CDI device: share id in its name, the daemon's dirs, its own limits.
    for ns, claim in claims.items():
        uid = claim["metadata"]["uid"]
        (result,) = results(claim)
        name = f"{uid}-{result['device']}-share-{result['shareID']}"
        spec = node.cdi_spec(uid)
        assert spec is not None
        edits = cdi_edits(spec, name)
        env = env_of(edits)
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=10240M"
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"
        mounts = {m["containerPath"]: m["hostPath"] for m in edits["mounts"]}
        group = daemon_dirs[result["device"]]
        assert mounts == {
            "/tmp/nvidia-mps": str(group / "pipe"),
            "/var/log/nvidia-mps": str(group / "log"),
            "/dev/shm": str(group / "shm"),
        }
        pod = next(p for p in pods if p["metadata"]["namespace"] == ns)
        assert node.emulator.pod_cdi_devices[pod["metadata"]["uid"]]["inference"] == [
            f"k8s.gpu.nvidia.com/claim={name}"
        ]
        (recorded,) = cp[uid].devices
        assert recorded.share_id == result["shareID"]

    # A client asking 12Gi in a 10Gi share is refused; 8Gi is granted.
    ns_a = by_device[full_gpu][0]
    uid_a = claims[ns_a]["metadata"]["uid"]
    (result_a,) = results(claims[ns_a])
    spec_a = node.cdi_spec(uid_a)
    assert spec_a is not None
    share_a = f"{uid_a}-{result_a['device']}-share-{result_a['shareID']}"
    over = fake_client(node, spec_a, share_a, "12Gi")
    assert over.returncode == 2, over
    assert "CUDA_ERROR_OUT_OF_MEMORY" in over.stderr and "10240M" in over.stderr
    within = fake_client(node, spec_a, share_a, "8Gi")
    assert within.returncode == 0, within
    assert within.stdout.strip() == "granted 8192M threads 25"

    # Deleting one pod of the full GPU unprepares its share only.
    ns_b = by_device[full_gpu][1]
    uid_b = claims[ns_b]["metadata"]["uid"]
    victim = next(p for p in pods if p["metadata"]["namespace"] == ns_b)
    node_factory.delete([{**victim, "apiVersion": "v1", "kind": "Pod"}])
    unprepared(node, uid_b)
    rest = tuple(ns for ns in TEAMS if ns != ns_b)
    still = running(node, rest)
    assert {p["metadata"]["uid"] for p in still} == {
        p["metadata"]["uid"] for p in pods if p["metadata"]["namespace"] != ns_b
    }
    assert alive(pids[full_gpu]) and alive(pids[other_gpu])
    assert len(list((daemon_dirs[full_gpu] / "members").iterdir())) == 3
    assert node.cdi_spec(uid_b) is None
    assert len(daemon_starts(node)) == 2

    # The last share of the other GPU gone: its daemon stops, DEFAULT again.
    ns_e = by_device[other_gpu][0]
    uid_e = claims[ns_e]["metadata"]["uid"]
    lone = next(p for p in pods if p["metadata"]["namespace"] == ns_e)
    node_factory.delete([{**lone, "apiVersion": "v1", "kind": "Pod"}])
    unprepared(node, uid_e)
    await_on(node, lambda: not alive(pids[other_gpu]), "the other GPU's daemon to stop")
    assert not daemon_dirs[other_gpu].exists()
    assert node.gpu_state()[uuid[other_gpu]] == before[uuid[other_gpu]]
    assert alive(pids[full_gpu])


def _claim(name: str, ns: str, node: str, request: Mapping[str, Any]) -> list[dict[str, Any]]:
    exactly = {"deviceClassName": "gpu.nvidia.com", **request}
    return claim_and_pod(name, ns, node, {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}})


def _allocated(node: SimulatedNode, ns: str, names: list[str]) -> dict[str, dict[str, Any]]:
    def done() -> dict[str, dict[str, Any]] | None:
        pods = {n: list_pods(node.api, ns, n) for n in names}
        if not all(p and is_running(p[0]) for p in pods.values()):
            return None
        return {n: results(read_claim(node.api, ns, n))[0] for n in names}

    return await_on(node, done, f"claims {names} allocated and their pods running")


def _pending(node: SimulatedNode, ns: str, name: str) -> None:
    def unschedulable() -> bool:
        pods = list_pods(node.api, ns, name)
        return bool(pods) and is_unschedulable(pods[0])

    await_on(node, unschedulable, f"pod {ns}/{name} to be unschedulable")


FIRST_GPU = {
    "selectors": [
        {"cel": {"expression": 'device.attributes["resource.kubernetes.io"].pciBusID == "0000:07:00.0"'}}
    ]
}


@pytest.mark.parametrize(
    ("mode", "requests", "expect"),
    [
        # memory: default = all memory, so a claim without a request takes the GPU whole.
        ("memory", [{}, {"capacity": {"requests": {"memory": "10Gi"}}}], [("40Gi", None), None]),
        # unlimited: default 0; everything fits, limits only where asked.
        (
            "unlimited",
            [{}, {}, {"capacity": {"requests": {"memory": "30Gi"}}}],
            [("0", 100), ("0", 100), ("30Gi", 75)],
        ),
        # 4 shares: default 1 share = 10Gi and 25 % each; a fifth claim does not fit.
        ("4", [{}, {}, {}, {}, {}], [("1", 25), ("1", 25), ("1", 25), ("1", 25), None]),
    ],
)
def test_nvidias_three_modes_on_the_real_scheduler(
    node_factory: NodeFactory,
    stray_daemons: list[int],
    mode: str,
    requests: list[dict[str, Any]],
    expect: list[tuple[str, int | None] | None],
) -> None:
    node = node_factory(f"gpu-share-{mode}", "a100-40gb-x2", extra_args=("--consumable-shares", mode))
    ns = f"shares-{mode}"
    docs: dict[str, list[dict[str, Any]]] = {}
    names = [f"c{i}" for i in range(len(requests))]
    for name, request in zip(names, requests, strict=True):
        docs[name] = _claim(name, ns, node.name, {**FIRST_GPU, **request})  # all on one GPU
    node_factory.apply([namespace_doc(ns)])
    fits = [n for n, e in zip(names, expect, strict=True) if e is not None]
    node_factory.apply([d for n in fits for d in docs[n]])
    allocated = _allocated(node, ns, fits)
    published = next(d for s in node.slices() for d in s["spec"].get("devices") or [] if d["name"] == "gpu-0")
    assert published["allowMultipleAllocations"] is True
    if mode == "4":
        assert published["capacity"]["shares"]["value"] == "4"
    key = "shares" if mode == "4" else "memory"
    for name, want in zip(names, expect, strict=True):
        if want is None:
            continue
        amount, threads = want
        result = allocated[name]
        assert result["device"] == "gpu-0"
        assert parse_quantity(result["consumedCapacity"][key]) == parse_quantity(amount), (name, result)
        uid = read_claim(node.api, ns, name)["metadata"]["uid"]
        spec = node.cdi_spec(uid)
        assert spec is not None
        (cdi_device,) = spec["devices"]
        env = env_of(cdi_device["containerEdits"])
        if threads is None:  # the whole GPU: no MPS, NVIDIA's CDI name
            assert cdi_device["name"] == f"{uid}-gpu-0"
            assert "CUDA_MPS_PIPE_DIRECTORY" not in env
        else:
            assert cdi_device["name"] == f"{uid}-gpu-0-share-{result['shareID']}"
            assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == str(threads)
    for name, want in zip(names, expect, strict=True):
        if want is None:
            node_factory.apply(docs[name])
            _pending(node, ns, name)
    stray_daemons.extend(int(e["pid"]) for e in node.journal() if e.get("mode") == "daemon-start")


def test_a_share_keeps_mig_devices_off_its_gpu(node_factory: NodeFactory, stray_daemons: list[int]) -> None:
    node = node_factory("gpu-share-mig", "h100-80gb-x1", allow_mig_mode_change=True)
    ns = "shares-mig"
    node_factory.apply(
        [namespace_doc(ns), *_claim("share", ns, node.name, {"capacity": {"requests": {"memory": "10Gi"}}})]
    )
    (share,) = _allocated(node, ns, ["share"]).values()
    assert share["device"] == "gpu-0" and share["shareID"]
    spec = {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "mig.nvidia.com"}}]}}
    node_factory.apply(claim_and_pod("mig", ns, node.name, spec))
    _pending(node, ns, "mig")  # the share holds every counter of the GPU
    stray_daemons.extend(int(e["pid"]) for e in node.journal() if e.get("mode") == "daemon-start")


def test_a_mig_device_keeps_shares_off_its_gpu(node_factory: NodeFactory) -> None:
    node = node_factory("gpu-mig-share", "h100-80gb-x1", allow_mig_mode_change=True)
    ns = "mig-shares"
    spec = {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "mig.nvidia.com"}}]}}
    node_factory.apply([namespace_doc(ns), *claim_and_pod("mig", ns, node.name, spec)])
    # Only the scheduler's side matters here: the MIG claim holds its GPU's counters once allocated.
    mig = await_on(node, lambda: results(read_claim(node.api, ns, "mig")), "the MIG claim to be allocated")[0]
    assert "mig" in mig["device"]
    node_factory.apply(_claim("share", ns, node.name, {"capacity": {"requests": {"memory": "1Gi"}}}))
    _pending(node, ns, "share")
