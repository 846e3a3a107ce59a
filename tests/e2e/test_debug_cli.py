"""The node-level debug CLI against a live simulated node: ``gpu-dra doctor|probe|claims|cdi|slices|
devices|mig|explain`` run as subprocesses with the node's own flags, on the real control plane.

One A100 node (8 GPUs) serves most tests: it holds a plain claim used by two pods (through a
DeviceClass that exists only on the API server) and an MPS claim, both prepared by the kubelet
emulator. The tests read it
healthy first, then stop the plugin and delete its slice behind its back, then damage CDI specs
and an MPS daemon - in that order, sharing the node (module-scoped). A one-GPU MIG node shows the
MIG picture with one 1g.5gb slice held. Every assertion compares the CLI's answer with what the
plugin, the checkpoint or the API server hold.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cdi.names import KIND, claim_spec_filename, device_name
from cdi.spec import ContainerEdits, Device, new_spec
from driver.inventory import DRIVER_NAME
from tests.e2e.test_scenario_02 import claim_and_pod, namespace_doc, read_claim, results
from tests.e2e.test_scenario_04 import mig_node
from tests.ground.controlplane import ControlPlane
from tests.ground.node import REPO, Cluster, NodeFactory, SimulatedNode, request_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NS = "debug-cli"
CLASS = "gpu-dra-debug-cli-a100"
WAIT_S = 90.0
CLI_TIMEOUT_S = 120.0
SCRUBBED = (
    "KUBECONFIG",
    "NODE_NAME",
    "FEATURE_GATES",
    "FAKE_STATE",
    "FAKE_TOPOLOGY",
    "CDI_ROOT",
    "STATE_DIR",
)
ORPHAN_UID = "0d0d0d0d-1234-4567-89ab-cdefcdefcdef"
SOCKETS_LINE = "registration and DRA sockets answer"
CDI_LINE = "CDI specs match the prepared claims"
MPS_LINE = "MPS daemons of prepared claims answer"


# -- running the CLI -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli(node: SimulatedNode, *command: str, kubeconfig: Path | None = None) -> Result:
    """``python -m driver <command>`` with the node plugin's flags (paths, fake NVML, identity)."""
    flags = node.plugin_argv()[4:]  # after: python -m driver plugin
    at = flags.index("--log-format")
    del flags[at : at + 2]
    if kubeconfig is not None:
        flags[flags.index("--kubeconfig") + 1] = str(kubeconfig)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "driver", *command, *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def checks(result: Result) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in result.json()["checks"]}


def failing(result: Result) -> list[str]:
    return [name for name, c in checks(result).items() if c["status"] == "fail"]


# -- the nodes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    node: SimulatedNode
    claims: Mapping[str, dict[str, Any]]  # name -> ResourceClaim as allocated
    admin: Path  # admin kubeconfig

    def uid(self, name: str) -> str:
        uid: str = self.claims[name]["metadata"]["uid"]
        return uid

    def device(self, name: str) -> str:
        (result,) = results(self.claims[name])
        device: str = result["device"]
        return device


@pytest.fixture(scope="module")
def factory(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeFactory]:
    nodes = NodeFactory(cluster, tmp_path_factory.mktemp("debug-cli"))
    try:
        yield nodes
    finally:
        nodes.cleanup()


def prepare(factory: NodeFactory, node: SimulatedNode, docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Apply ``docs``; wait until every claim among them is prepared on ``node``; return the claims."""
    factory.apply(docs)
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "ResourceClaim"]
    ns = next(d["metadata"]["namespace"] for d in docs if d["kind"] == "ResourceClaim")

    def ready() -> dict[str, Any] | None:
        claims = {n: read_claim(node.api, ns, n) for n in names}
        recorded = node.checkpoint()
        done = all(
            c["metadata"]["uid"] in recorded and recorded[c["metadata"]["uid"]].state == "PrepareCompleted"
            for c in claims.values()
        )
        return claims if done else None

    try:
        return wait_for(ready, WAIT_S, f"claims {names} to be prepared on {node.name}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{node.diagnostics()}") from None


def gpu_request(device_class: str, count: int = 1) -> dict[str, Any]:
    return {"name": "gpu", "exactly": {"deviceClassName": device_class, "count": count}}


@pytest.fixture(scope="module")
def a100(factory: NodeFactory, control_plane: ControlPlane) -> Prepared:
    node = factory("dbg-a100", "a100-40gb-x8")
    device_class = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": CLASS},
        "spec": {
            "selectors": [
                {"cel": {"expression": f'device.driver == "{DRIVER_NAME}"'}},
                {"cel": {"expression": 'device.attributes["gpu.nvidia.com"].type == "gpu"'}},
                {"cel": {"expression": 'device.attributes["gpu.nvidia.com"].productName.contains("A100")'}},
            ]
        },
    }
    mps = {
        "devices": {
            "requests": [gpu_request("gpu.nvidia.com")],
            "config": [
                {
                    "requests": ["gpu"],
                    "opaque": {
                        "driver": DRIVER_NAME,
                        "parameters": {
                            "apiVersion": "resource.nvidia.com/v1beta1",
                            "kind": "GpuConfig",
                            "sharing": {
                                "strategy": "MPS",
                                "mpsConfig": {"defaultActiveThreadPercentage": 50},
                            },
                        },
                    },
                }
            ],
        }
    }
    plain = claim_and_pod("plain", NS, node.name, {"devices": {"requests": [gpu_request(CLASS)]}})
    # A second consumer of the same claim (scenario 06's shape).
    second = copy.deepcopy(plain[1])
    second["metadata"].update(name="plain-2", labels={"app": "plain-2"})
    docs = [namespace_doc(NS), device_class, *plain, second, *claim_and_pod("mps", NS, node.name, mps)]
    claims = prepare(factory, node, docs)
    wait_for(
        lambda: len((read_claim(node.api, NS, "plain").get("status") or {}).get("reservedFor") or []) == 2,
        WAIT_S,
        "both pods to reserve the claim plain",
    )
    return Prepared(node, claims, control_plane.kubeconfig)


@pytest.fixture(scope="module")
def mig(factory: NodeFactory, control_plane: ControlPlane) -> Prepared:
    node = mig_node(factory, "dbg-mig", "a100-40gb-x1-mig")
    one_g = {
        "deviceClassName": "mig.nvidia.com",
        "selectors": [{"cel": {"expression": 'device.attributes["gpu.nvidia.com"].profile == "1g.5gb"'}}],
    }
    spec = {"devices": {"requests": [{"name": "gpu", "exactly": one_g}]}}
    docs = [namespace_doc(f"{NS}-mig"), *claim_and_pod("slice", f"{NS}-mig", node.name, spec)]
    return Prepared(node, prepare(factory, node, docs), control_plane.kubeconfig)


# -- a healthy node ------------------------------------------------------------------------------


def test_healthy_node_doctor_probe_claims_cdi_slices(a100: Prepared) -> None:
    node = a100.node
    doctor = cli(node, "doctor", "-o", "json")
    assert failing(doctor) == [], doctor.out + doctor.err
    assert doctor.rc == 0 and doctor.json()["ok"] is True
    table = cli(node, "doctor")
    assert table.rc == 0 and "verdict: healthy" in table.out and "FAIL" not in table.out
    assert cli(node, "probe").rc == 0

    # claims: every prepared claim with its devices, CDI ids and state; the checkpoint verified.
    listed = cli(node, "claims", "-o", "json")
    assert listed.rc == 0, listed.err
    data = listed.json()
    recorded = node.checkpoint()
    by_uid = {c["uid"]: c for c in data["claims"]}
    assert set(by_uid) == set(recorded) == {a100.uid("plain"), a100.uid("mps")}
    for uid, prepared in recorded.items():
        row = by_uid[uid]
        assert row["state"] == "PrepareCompleted"
        assert row["devices"] == [d.device for d in prepared.devices]
        assert row["cdiDeviceIds"] == [i for d in prepared.devices for i in d.cdi_device_ids]
    assert by_uid[a100.uid("plain")]["sharing"] == [] and by_uid[a100.uid("mps")]["sharing"] == ["mps"]
    on_disk = json.loads((node.state_dir / "checkpoint.json").read_text())
    assert data["checkpoint"]["checksumVerified"] is True and data["checkpoint"]["bootIdMatches"] is True
    assert data["checkpoint"]["checksum"] == on_disk["checksum"]

    # claims show: devices, CDI ids, no sharing, and the consumer pod from the API server.
    shown = cli(node, "claims", f"{NS}/plain", "-o", "json")
    assert shown.rc == 0, shown.err
    detail = shown.json()
    plain_dev = a100.device("plain")
    cdi_id = f"{KIND}={device_name(a100.uid('plain'), plain_dev)}"
    assert [(d["device"], d["cdiDeviceIds"]) for d in detail["devices"]] == [(plain_dev, [cdi_id])]
    assert detail["sharing"] == [] and detail["sharingSummary"][0].startswith("none applied")
    assert detail["cdiSpec"]["status"] == "ok"
    assert sorted(c["name"] for c in detail["consumers"]) == ["plain", "plain-2"], detail["consumersProblem"]
    text = cli(node, "claims", a100.uid("plain")).out
    assert f"claim {NS}/plain" in text and cdi_id in text and "none applied" in text
    assert "pods plain (" in text and "pods plain-2 (" in text
    mps_detail = cli(node, "claims", f"{NS}/mps", "-o", "json").json()
    assert [r["kind"] for r in mps_detail["sharing"]] == ["mps"]

    # cdi: both specs, owned and valid.
    specs = cli(node, "cdi", "-o", "json")
    assert specs.rc == 0, specs.out
    assert {s["claim"]: s["status"] for s in specs.json()["specs"]} == {
        a100.uid("plain"): "ok",
        a100.uid("mps"): "ok",
    }
    assert cli(node, "cdi", f"{NS}/plain", "-o", "json").json()["devices"][0]["name"] == (
        device_name(a100.uid("plain"), plain_dev)
    )

    # slices --compare: what the node would publish equals what the plugin published.
    compared = cli(node, "slices", "--compare", "-o", "json")
    assert compared.rc == 0, compared.out
    assert compared.json()["diff"]["inSync"] is True

    # devices: the holders of both prepared GPUs; every other GPU free.
    devices = {d["name"]: d for d in cli(node, "devices", "-o", "json").json()["devices"]}
    assert devices[plain_dev]["heldBy"] == f"{NS}/plain"
    assert devices[plain_dev]["heldByUid"] == a100.uid("plain")
    assert devices[a100.device("mps")]["heldBy"] == f"{NS}/mps"
    assert {n for n, d in devices.items() if d["status"] == "free"} == set(devices) - {
        plain_dev,
        a100.device("mps"),
    }


def explain_claim(count: int) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": f"want-{count}", "namespace": NS},
        "spec": {"devices": {"requests": [gpu_request(CLASS, count)]}},
    }


def test_explain_live_claim_uses_server_class_and_other_claims(a100: Prepared, tmp_path: Path) -> None:
    node = a100.node
    plain_dev, mps_dev = a100.device("plain"), a100.device("mps")
    live = cli(node, "explain", f"{NS}/plain", "-o", "json", kubeconfig=a100.admin)
    assert live.rc == 0, live.out + live.err
    exp = live.json()
    assert exp["deviceClasses"] == {CLASS: "API server"}
    assert exp["warnings"] == []
    assert exp["verdict"] == "fits"
    assert exp["currentAllocation"] == [f"gpu: {node.name}/{plain_dev}"]
    assert exp["allocatedToOtherClaims"] == [{"device": mps_dev, "pool": node.name, "claim": f"{NS}/mps"}]
    assert mps_dev not in exp["allocation"]["gpu"]
    # The class's three selectors are evaluated per device, all true on an A100.
    (request,) = exp["requests"]
    assert len(request["devices"][0]["clauses"]) == 3

    # The plugin's own identity may not read DeviceClasses: said, and not silently replaced.
    limited = cli(node, "explain", f"{NS}/plain", "-o", "json")
    warnings = limited.json()["warnings"]
    assert limited.rc == 1 and any(f"DeviceClass {CLASS}" in w for w in warnings), limited.out
    assert any("ResourceClaims" in w for w in warnings)

    # Held GPUs are not free: 8 do not fit while two are prepared, 6 do, on the others.
    for count, verdict in ((8, "unschedulable"), (6, "fits")):
        path = tmp_path / f"want-{count}.yaml"
        path.write_text(json.dumps(explain_claim(count)))
        result = cli(node, "explain", str(path), "-o", "json", kubeconfig=a100.admin)
        assert result.json()["verdict"] == verdict, result.out
    picked = set(result.json()["allocation"]["gpu"])
    assert len(picked) == 6 and not picked & {plain_dev, mps_dev}


# -- a node in trouble ---------------------------------------------------------------------------


def test_stopped_plugin_and_deleted_slice(a100: Prepared) -> None:
    node = a100.node
    node.kill_plugin(signal.SIGKILL)
    try:
        doctor = cli(node, "doctor")
        assert doctor.rc != 0
        lines = doctor.out.splitlines()
        at = next(i for i, line in enumerate(lines) if SOCKETS_LINE in line)
        assert lines[at].startswith("FAIL") and lines[at + 1].strip().startswith("what to do:"), doctor.out
        assert failing(cli(node, "doctor", "-o", "json")) == [SOCKETS_LINE]
        probe = cli(node, "probe")
        assert probe.rc == 1 and probe.out.strip() != "ok"

        # A slice deleted behind the (stopped) plugin's back shows as a difference.
        for s in node.slices():
            request_json(
                node.api, "DELETE", f"/apis/resource.k8s.io/v1/resourceslices/{s['metadata']['name']}"
            )
        wait_for(lambda: not node.slices(), 30, f"the slices of {node.name} to be deleted")
        compared = cli(node, "slices", "--compare", "-o", "json")
        assert compared.rc == 1
        diff = compared.json()["diff"]
        assert diff["inSync"] is False
        assert set(diff["missingDevices"]) == {f"gpu-{i}" for i in range(8)}
        assert "DIFFERS" in cli(node, "slices", "--compare").out
    finally:
        node.start_plugin()
    node.wait_published()
    assert cli(node, "slices", "--compare", "-o", "json").json()["diff"]["inSync"] is True
    assert cli(node, "probe").rc == 0


def test_damaged_cdi_spec_orphan_and_dead_mps_daemon(a100: Prepared) -> None:
    node = a100.node
    spec_path = node.cdi_spec_path(a100.uid("plain"))
    original = spec_path.read_bytes()
    spec_path.write_text('{"cdiVersion": "0.5.0", "kind": ')
    try:
        doctor = cli(node, "doctor", "-o", "json")
        assert doctor.rc != 0 and failing(doctor) == [CDI_LINE]
        line = checks(doctor)[CDI_LINE]
        assert str(spec_path) in line["detail"] and line["todo"]
        assert "what to do:" in cli(node, "doctor").out
        listed = cli(node, "cdi", "-o", "json")
        assert listed.rc == 1
        assert {s["claim"]: s["status"] for s in listed.json()["specs"]}[a100.uid("plain")] == "invalid"
    finally:
        spec_path.write_bytes(original)

    orphan = node.cdi_root / claim_spec_filename(ORPHAN_UID)
    spec = new_spec(KIND, [Device(device_name(ORPHAN_UID, "gpu-7"), ContainerEdits(env=("X=1",)))])
    orphan.write_text(spec.to_json())
    try:
        listed = cli(node, "cdi", "-o", "json")
        assert listed.json()["orphans"] == [str(orphan)]
        assert "ORPHAN" in cli(node, "cdi").out
        assert failing(cli(node, "doctor", "-o", "json")) == [CDI_LINE]
    finally:
        orphan.unlink()
    assert cli(node, "doctor").rc == 0

    # The MPS claim's daemon quits: the doctor's MPS line fails, naming the claim.
    (record,) = node.checkpoint()[a100.uid("mps")].sharing
    pipe_dir = Path(record["groupDir"]) / "pipe"
    quit_daemon = subprocess.run(
        [str(node.driver_root.bin_dir / "nvidia-cuda-mps-control")],  # type: ignore[union-attr]
        input="quit\n",
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert quit_daemon.returncode == 0, quit_daemon.stderr
    doctor = cli(node, "doctor", "-o", "json")
    assert doctor.rc != 0 and failing(doctor) == [MPS_LINE]
    assert f"{NS}/mps" in checks(doctor)[MPS_LINE]["detail"]


# -- the MIG picture -----------------------------------------------------------------------------


def test_mig_picture_shows_the_held_slice(mig: Prepared) -> None:
    node = mig.node
    uid, device = mig.uid("slice"), mig.device("slice")
    (recorded,) = node.checkpoint()[uid].devices
    assert recorded.mig is not None
    data = cli(node, "mig", "-o", "json")
    assert data.rc == 0, data.err
    (gpu,) = data.json()["gpus"]
    (instance,) = gpu["instances"]
    assert instance["device"] == device and instance["profile"] == "1g.5gb"
    assert instance["claim"] == f"{NS}-mig/slice ({uid})"
    assert instance["migUUID"] == recorded.mig["mig_uuid"]
    assert gpu["slices"] == 8
    assert gpu["freeSlices"] == [s for s in range(8) if s not in instance["memorySlices"]]

    text = cli(node, "mig").out
    assert "1 of 8 memory slices in use" in text and f"{NS}-mig/slice" in text

    # The held placement, the placements overlapping it blocked, and the pool still in sync
    # (the instance the plugin made is its own, not a foreign static device).
    devices = {d["name"]: d for d in cli(node, "devices", "-o", "json").json()["devices"]}
    assert devices[device]["status"] == "held"
    assert any(d["status"] == "blocked" for d in devices.values())
    assert cli(node, "slices", "--compare", "-o", "json").json()["diff"]["inSync"] is True
