"""Every feature gate changes what the plugin does, and a gate it does not implement is refused.

- ``MPSSupport=false`` / ``TimeSlicingSettings=false``: a claim asking for that strategy fails
  with a per-claim error naming the gate, and nothing is started or changed on the GPU (no MPS
  daemon, no ``nvidia-smi`` run, no CDI spec, nothing checkpointed); the other strategy still works.
- ``DynamicMIG=false``: a node that would offer dynamic MIG placements publishes static MIG only.
- Gates NVIDIA's chart lists but gpu-dra does not implement are refused at start, by name.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from driver import config
from driver.checkpoint import CheckpointStore
from driver.daemon import Daemon
from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc
from tests.ground.standins import read_journal
from tests.integration.test_daemon import (
    BOOT_ID_PATH,
    NODE,
    REPO,
    Layout,
    start,
    stop,
    temp_layout,
    wait_for_socket,
)
from tests.integration.test_state import DRIVER, make_claim

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def layout() -> Iterator[Layout]:
    with temp_layout("gdg-") as lay:
        yield lay


def sharing_config(sharing: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "source": "FromClaim",
            "requests": ["gpu"],
            "opaque": {
                "driver": DRIVER,
                "parameters": {
                    "apiVersion": "resource.nvidia.com/v1beta1",
                    "kind": "GpuConfig",
                    "sharing": sharing,
                },
            },
        }
    ]


MPS = {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}}
TIME_SLICING = {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}


def prepare(layout: Layout, uid: str) -> str:
    """NodePrepareResources for claim ``uid`` over the DRA socket; returns the claim's error text."""
    with grpc.insecure_channel(f"unix://{layout.dra_socket}") as channel:
        resp = dra_v1_pb2_grpc.DRAPluginStub(channel).NodePrepareResources(
            dra_v1_pb2.NodePrepareResourcesRequest(
                claims=[dra_v1_pb2.Claim(namespace="team-a", name=f"c-{uid}", uid=uid)]
            ),
            timeout=60,
        )
    return str(resp.claims[uid].error)


def put(layout: Layout, uid: str, device: str, sharing: dict[str, Any]) -> None:
    claim = make_claim(
        uid, [("gpu", device)], namespace="team-a", name=f"c-{uid}", config=sharing_config(sharing)
    )
    claim["status"]["allocation"]["devices"]["results"][0]["pool"] = NODE
    layout.put_claim(claim)


def smi_runs(layout: Layout) -> list[str]:
    """What the GPU tool stand-ins (nvidia-smi, MPS control) were asked to do, oldest first."""
    return [json.dumps(e) for e in read_journal(layout.state / "fake-nvml.json")]


@pytest.mark.parametrize(
    ("gate", "refused", "allowed"),
    [
        pytest.param("MPSSupport", MPS, TIME_SLICING, id="MPSSupport=false"),
        pytest.param("TimeSlicingSettings", TIME_SLICING, MPS, id="TimeSlicingSettings=false"),
    ],
)
def test_sharing_gate_off_refuses_that_strategy_per_claim_and_starts_nothing(
    layout: Layout, gate: str, refused: dict[str, Any], allowed: dict[str, Any]
) -> None:
    mps_root = layout.base / "mps"
    put(layout, "uid-off", "gpu-1", refused)
    put(layout, "uid-on", "gpu-2", allowed)
    proc = start(layout, "--feature-gates", f"{gate}=false", "--mps-root", str(mps_root))
    wait_for_socket(proc, layout.reg_socket)
    try:
        journal_before = smi_runs(layout)
        error = prepare(layout, "uid-off")
        assert f"feature gate {gate}=false" in error, error
        assert f"{gate}=true" in error and "remove the sharing config" in error, error
        # Nothing started or changed for the refused claim.
        assert smi_runs(layout) == journal_before
        assert not mps_root.exists() or list(mps_root.iterdir()) == []
        assert not list(layout.cdi.glob("*uid-off*"))
        assert CheckpointStore(layout.state / "checkpoint.json", BOOT_ID_PATH).get("uid-off") is None
        # The other strategy's gate is still on: the gate turns off exactly one thing.
        assert prepare(layout, "uid-on") == ""
    finally:
        code, out = stop(proc)
    assert code == 0, out


def _daemon(*argv: str) -> Daemon:
    cfg = config.parse(
        ["--node-name", NODE, "--nvml-backend", "fake", "--no-publish", "--fake-claims-dir", "/none", *argv]
    )
    return Daemon(cfg)


@pytest.mark.parametrize("gate_on", [True, False], ids=["DynamicMIG=true", "DynamicMIG=false"])
def test_dynamic_mig_gate_off_publishes_static_mig_only(tmp_path: Path, gate_on: bool) -> None:
    daemon = _daemon(
        "--fake-topology",
        "h100-80gb-x1",
        "--allow-mig-mode-change",
        "true",
        "--state-dir",
        str(tmp_path),
        "--feature-gates",
        f"DynamicMIG={'true' if gate_on else 'false'}",
    )
    nvml = daemon._open_nvml()
    assert nvml is not None
    try:
        checkpoint, problem = daemon._checkpoint()
        assert problem is None
        daemon._mig_backend = daemon._mig(nvml)
        inventory = daemon._discover(nvml, daemon._mig_hook(checkpoint, daemon.cfg.mig_mode))
    finally:
        nvml.shutdown()
    assert inventory is not None
    kinds = {d.kind for d in inventory.devices}
    if gate_on:
        assert "mig-dynamic" in kinds and inventory.counter_sets, sorted(kinds)
    else:
        # Static MIG on a GPU with MIG off: the full GPU, no placements, no counters.
        assert [d.name for d in inventory.devices] == ["gpu-0"]
        assert not inventory.counter_sets


@pytest.mark.parametrize("gate", sorted(config.UNIMPLEMENTED_FEATURE_GATES))
def test_unimplemented_gate_is_refused_at_start_by_name(layout: Layout, gate: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["PYTHONPATH"] = str(REPO)
    argv = layout.argv("--feature-gates", f"{gate}=true")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{gate}=true is not implemented by gpu-dra" in proc.stderr
    assert not layout.reg_socket.exists()
    # Set to false (the value NVIDIA's chart defaults to) it is accepted.
    assert config.parse_feature_gates(f"{gate}=false")[gate] is False
