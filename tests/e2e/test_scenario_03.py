"""Scenario 03 end to end: three replicas run concurrently on one GPU through one MPS daemon.

On the real control plane with ``gpu-a100`` under the real kubelet: one GPU is allocated for the
claim and prepared once (however many of the three pods' racing syncs ask for it); the plugin
puts it in EXCLUSIVE_PROCESS, starts one control daemon (the ``nvidia-cuda-mps-control``
stand-in, which records what it is told) with its own pipe and log dirs under the node's MPS
root, sets 33 % threads and a 5Gi (5120M) pinned limit, and hands containers the pipe dir,
``CUDA_MPS_PIPE_DIRECTORY`` and MPS shared memory through CDI. The daemon survives kill -9 of the
plugin and is found again, not started twice; unprepare stops it and restores DEFAULT. Invalid
MPS configs fail the claim clearly and start nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from driver.inventory import DRIVER_NAME
from tests.e2e.test_scenario_02 import (
    APP,
    GPU_REQUEST,
    NS,
    await_on,
    claim_ref,
    failing_claims,
    no_pods,
    read_claim,
    results,
    running_pods,
    scale,
    unprepared,
)
from tests.ground.node import NodeFactory, SimulatedNode, scenario_path
from tests.ground.standins import STATE_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MPS_TOOL = "nvidia-cuda-mps-control"


def mps_status(node: SimulatedNode, pipe_dir: Path) -> dict[str, Any] | None:
    """What the daemon on ``pipe_dir`` was told (stand-in ``get_status``); None when none answers."""
    assert node.driver_root is not None
    proc = subprocess.run(
        [str(node.driver_root.bin_dir / MPS_TOOL)],
        input="get_status\n",
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir), STATE_ENV: str(node.fake_state)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        return None
    status: dict[str, Any] = json.loads(proc.stdout)
    return status


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def daemon_starts(node: SimulatedNode, pipe_dir: Path | None = None) -> list[dict[str, Any]]:
    """``nvidia-cuda-mps-control -d`` invocations (for one pipe dir when given)."""
    return [
        e
        for e in node.journal()
        if e.get("tool") == MPS_TOOL
        and e.get("mode") == "invoke"
        and "-d" in e.get("argv", [])
        and (pipe_dir is None or e.get("pipeDir") == str(pipe_dir))
    ]


def mps_record(node: SimulatedNode, claim_uid: str) -> dict[str, Any]:
    (record,) = node.checkpoint()[claim_uid].sharing
    assert record["kind"] == "mps", record
    return record


@pytest.fixture
def stray_daemons() -> Iterator[list[int]]:
    """Pids of MPS daemons a test saw; any still alive at the end is killed (a failed test's leftovers)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_three_pods_share_one_gpu_through_one_mps_daemon(
    node_factory: NodeFactory, stray_daemons: list[int]
) -> None:
    node = node_factory("gpu-a100", "a100-40gb-x8")
    before = node.gpu_state()
    node_factory.apply(scenario_path("03-mps"))
    pods = running_pods(node, NS, APP, 3)
    claim = read_claim(node.api, NS, APP)
    ref = claim_ref(claim)
    uid = ref[1]
    assert len(results(claim)) == 1
    (device,) = node.checkpoint()[uid].devices
    gpu = device.gpu_uuid

    # One daemon for the claim, its own dirs under the node's MPS root.
    record = mps_record(node, uid)
    group_dir = Path(record["groupDir"])
    pipe_dir, log_dir = group_dir / "pipe", group_dir / "log"
    assert group_dir.parent == node.mps_root
    assert record["groupId"].startswith(uid)
    assert pipe_dir.is_dir() and log_dir.is_dir()
    assert record["uuids"] == [gpu]
    pid = int(record["pid"])
    stray_daemons.append(pid)
    assert alive(pid)
    assert len(daemon_starts(node)) == 1
    assert daemon_starts(node, pipe_dir)[0]["visibleDevices"] == gpu

    # What the daemon was told, in the units it expects; the GPU is EXCLUSIVE_PROCESS.
    status = mps_status(node, pipe_dir)
    assert status is not None
    assert status["pid"] == pid
    assert status["devices"] == [gpu]
    assert status["percentage"] == 33.0
    assert status["limits"] == {gpu: "5120M"}
    told = [e["command"] for e in node.journal() if e.get("tool") == MPS_TOOL and e.get("mode") == "client"]
    assert "set_default_active_thread_percentage 33" in told
    assert f"set_default_device_pinned_mem_limit {gpu} 5120M" in told
    assert node.gpu_state()[gpu]["computeMode"] == "EXCLUSIVE_PROCESS"
    assert {u: s for u, s in node.gpu_state().items() if u != gpu} == {
        u: s for u, s in before.items() if u != gpu
    }

    # CDI: the GPU plus the pipe dir, CUDA_MPS_PIPE_DIRECTORY and MPS shared memory.
    spec = node.cdi_spec(uid)
    assert spec is not None
    (cdi_device,) = spec["devices"]
    edits = cdi_device["containerEdits"]
    assert "CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps" in edits["env"]
    mounts = {m["containerPath"]: m["hostPath"] for m in edits["mounts"]}
    assert mounts["/tmp/nvidia-mps"] == str(pipe_dir)
    assert mounts["/dev/shm"] == str(group_dir / "shm")
    assert any(n["path"] == f"/dev/nvidia{device.device.removeprefix('gpu-')}" for n in edits["deviceNodes"])
    for pod in pods:
        # The same id, repeated once per racing prepare call of the kubelet (see scenario 02).
        assert set(node.kubelet.pod_cdi_devices[pod["metadata"]["uid"]][APP]) == {
            f"k8s.gpu.nvidia.com/claim={cdi_device['name']}"
        }

    # kill -9 of the plugin: the daemon lives on, and the restarted plugin finds it again.
    node.kill_plugin(signal.SIGKILL)
    assert alive(pid)
    node.start_plugin()
    again = node.kubelet.prepare(DRIVER_NAME, [ref])
    assert [d.device_name for d in again[uid]] == [device.device]
    assert mps_record(node, uid) == record
    after_restart = mps_status(node, pipe_dir)
    assert after_restart is not None and after_restart["pid"] == pid
    assert len(daemon_starts(node)) == 1

    # Unprepare (last pod gone) stops that daemon and restores DEFAULT.
    scale(node.api, NS, APP, 0)
    no_pods(node, NS, APP)
    unprepared(node, uid)
    await_on(node, lambda: not alive(pid), f"MPS daemon {pid} to exit")
    assert mps_status(node, pipe_dir) is None
    assert not group_dir.exists()
    assert node.gpu_state()[gpu]["computeMode"] == "DEFAULT"
    assert node.gpu_state() == before
    assert node.cdi_spec(uid) is None
    assert len(daemon_starts(node)) == 1


def _mps(**mps_config: Any) -> dict[str, Any]:
    return {
        "apiVersion": "resource.nvidia.com/v1beta1",
        "kind": "GpuConfig",
        "sharing": {"strategy": "MPS", "mpsConfig": mps_config},
    }


INVALID_MPS: Mapping[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "mps-zero": (
        _mps(defaultActiveThreadPercentage=0),
        ("sharing.mpsConfig.defaultActiveThreadPercentage", "1..100"),
    ),
    "mps-101": (
        _mps(defaultActiveThreadPercentage=101),
        ("sharing.mpsConfig.defaultActiveThreadPercentage", "1..100"),
    ),
    "mps-too-much-memory": (
        # An A100-SXM4-40GB has 40Gi; the limit is checked against the allocated GPU at prepare.
        _mps(defaultActiveThreadPercentage=50, defaultPinnedDeviceMemoryLimit="64Gi"),
        ("sharing.mpsConfig.defaultPinnedDeviceMemoryLimit", "65536Mi", "exceeds its memory"),
    ),
}


def test_invalid_mps_configs_fail_the_claim_and_start_nothing(node_factory: NodeFactory) -> None:
    node = node_factory("gpu-a100", "a100-40gb-x8")
    state_before, journal_before = node.gpu_state(), node.journal()
    ns = "mps-invalid"
    errors = failing_claims(
        node_factory, node, ns, {name: params for name, (params, _) in INVALID_MPS.items()}, GPU_REQUEST
    )
    for name, (_, wanted) in INVALID_MPS.items():
        error = errors[name]
        assert f"ResourceClaim {name}" in error, error
        for text in wanted:
            assert text in error, f"{name}: {text!r} missing from {error!r}"
        claim = read_claim(node.api, ns, name)
        uid = claim["metadata"]["uid"]
        assert results(claim), f"{name} should have been allocated; the failure must come from prepare"
        assert uid not in node.checkpoint()
        assert node.cdi_spec(uid) is None
    assert node.journal() == journal_before  # no daemon started, no compute mode changed
    assert node.gpu_state() == state_before
    assert not node.mps_root.exists() or not any(node.mps_root.iterdir())
