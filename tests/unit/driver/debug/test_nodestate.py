"""What the debug commands read from a node: checkpoint verification, CDI spec status, device
holdings, and the doctor's runtime-config and MPS lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cdi.names import KIND, claim_spec_filename, device_name
from cdi.spec import ContainerEdits, Device, new_spec
from driver.checkpoint import PreparedClaim, PreparedDevice, encode
from driver.debug import nodestate
from driver.debug.commands import main, topology_inventory
from driver.debug.doctor import CheckFailedError, cdi_root_seen

UID = "0b5c9f4e-1111-4222-8333-444455556666"
OTHER = "9d8e7f6a-aaaa-4bbb-8ccc-ddddeeeeffff"


def claim(
    uid: str = UID, device: str = "gpu-0", sharing: list[dict[str, Any]] | None = None
) -> PreparedClaim:
    return PreparedClaim(
        uid=uid,
        namespace="ns",
        name=f"c-{uid[:4]}",
        state="PrepareCompleted",
        devices=[
            PreparedDevice(
                request_names=["gpu"],
                pool="node",
                device=device,
                cdi_device_ids=[f"{KIND}={device_name(uid, device)}"],
                kind="gpu",
                gpu_uuid="GPU-1",
            )
        ],
        sharing=sharing or [],
        started_at=1000.0,
        completed_at=1001.0,
    )


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = tmp_path / "boot_id"
    path.write_text("boot-1\n")
    monkeypatch.setenv(nodestate.BOOT_ID_ENV, str(path))
    return "boot-1"


def write_checkpoint(state: Path, boot_id: str, *claims: PreparedClaim) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = state / nodestate.CHECKPOINT_FILE
    path.write_text(encode(boot_id, {c.uid: c for c in claims}))
    return path


def write_spec(root: Path, uid: str, device: str = "gpu-0") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    spec = new_spec(KIND, [Device(device_name(uid, device), ContainerEdits(env=("A=1",)))])
    path = root / claim_spec_filename(uid)
    path.write_text(spec.to_json())
    return path


def test_checkpoint_verified_stale_and_tampered(tmp_path: Path, boot: str) -> None:
    state = tmp_path / "state"
    assert nodestate.read_checkpoint(state).valid and not nodestate.read_checkpoint(state).exists
    path = write_checkpoint(state, boot, claim())
    view = nodestate.read_checkpoint(state)
    assert view.valid and view.checksum_verified and list(view.claims) == [UID]
    assert view.checksum == json.loads(path.read_text())["checksum"]
    assert view.to_dict()["bootIdMatches"] is True

    write_checkpoint(state, "boot-0", claim())
    stale = nodestate.read_checkpoint(state)
    assert not stale.valid and "boot-0" in str(stale.problem) and "drops them" in str(stale.problem)

    path.write_text(path.read_text().replace('"name":"c-0b5c"', '"name":"x-0b5c"'))
    tampered = nodestate.read_checkpoint(state)
    assert not tampered.valid and not tampered.checksum_verified
    assert "checksum mismatch" in str(tampered.problem)


def test_cdi_spec_statuses(tmp_path: Path) -> None:
    root = tmp_path / "cdi"
    write_spec(root, UID)
    write_spec(root, OTHER)
    claims = {
        UID: claim(),
        "5e5e5e5e-0000-4000-8000-000000000000": claim("5e5e5e5e-0000-4000-8000-000000000000"),
    }
    statuses = {s.claim_uid: s for s in nodestate.cdi_specs(root, claims)}
    assert statuses[UID].status == "ok"
    assert statuses[UID].devices == (f"{KIND}={UID}-gpu-0",)
    assert statuses[OTHER].status == "orphan"
    assert statuses["5e5e5e5e-0000-4000-8000-000000000000"].status == "missing"
    (root / claim_spec_filename(UID)).write_text("{not json")
    (damaged,) = [s for s in nodestate.cdi_specs(root, claims) if s.claim_uid == UID]
    assert damaged.status == "invalid" and "cannot use it" in str(damaged.problem)


def test_holdings_block_the_full_gpu_and_overlapping_placements() -> None:
    inv = topology_inventory("a100-40gb-x1-mig")
    one_g = next(d for d in inv.devices if d.mig_spec and d.mig_spec.profile == "1g.5gb")
    assert one_g.mig_spec is not None
    held = nodestate.device_holdings(inv, {UID: claim(device=one_g.name)})
    assert held[one_g.name].status == "held"
    slice_no = one_g.mig_spec.placement_start
    for d in inv.devices:
        if d.name == one_g.name or d.mig_spec is None:
            continue
        overlaps = slice_no in range(
            d.mig_spec.placement_start, d.mig_spec.placement_start + d.mig_spec.placement_size
        )
        assert held[d.name].status == ("blocked" if overlaps else "free"), d.name
    assert [c.uid for c in held[one_g.name].blocked_by] == []


def test_sharing_summary_says_none_applied() -> None:
    assert nodestate.sharing_summary(claim())[0].startswith("none applied")
    mps = {"kind": "mps", "groupId": "g", "pid": 7, "groupDir": "/r/g", "uuids": ["GPU-1"]}
    assert "MPS control daemon g (pid 7" in nodestate.sharing_summary(claim(sharing=[mps]))[0]


@pytest.mark.parametrize(
    ("text", "root", "ok"),
    [
        ("version = 3\n", "/var/run/cdi", True),
        ("version = 2\n", "/var/run/cdi", False),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nenable_cdi = true\n'
            'cdi_spec_dirs = ["/etc/cdi"]\n',
            "/var/run/cdi",
            False,
        ),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nenable_cdi = true\n'
            'cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]\n',
            "/var/run/cdi",
            True,
        ),
    ],
)
def test_runtime_config_cdi_dirs(tmp_path: Path, text: str, root: str, ok: bool) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    if ok:
        assert root in cdi_root_seen(config, Path(root))
    else:
        with pytest.raises(CheckFailedError):
            cdi_root_seen(config, Path(root))


def test_doctor_fails_the_mps_line_for_a_dead_daemon(tmp_path: Path, boot: str, capsys) -> None:
    record = {
        "kind": "mps",
        "version": 1,
        "groupId": f"{UID}-abcde",
        "groupDir": str(tmp_path / "mps" / f"{UID}-abcde"),
        "uuids": ["GPU-1"],
        "pid": None,
        "startTime": None,
        "multiUser": False,
    }
    state = tmp_path / "state"
    write_checkpoint(state, boot, claim(sharing=[record]))
    write_spec(tmp_path / "cdi", UID)
    args = [
        "doctor",
        "--state-dir", str(state),
        "--cdi-root", str(tmp_path / "cdi"),
        "--mps-root", str(tmp_path / "mps"),
        "--driver-root", str(tmp_path / "driver"),
        "--container-driver-root", str(tmp_path / "driver"),
        "--kubelet-plugins-directory-path", str(tmp_path / "plugins"),
        "--kubelet-registrar-directory-path", str(tmp_path / "registry"),
        "--nvml-backend", "fake",
        "--fake-topology", "t4-x4",
        "--fake-state", str(tmp_path / "fake.json"),
        "--kubeconfig", str(tmp_path / "missing.kubeconfig"),
        "--timeout", "0.5",
        "-o", "json",
    ]  # fmt: skip
    assert main(args) == 1
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    mps = checks["MPS daemons of prepared claims answer"]
    assert not mps["ok"] and "does not answer" in mps["detail"] and mps["todo"]
    assert checks["NVML loads and sees GPUs"]["ok"]
    assert checks["checkpoint valid"]["ok"]
    assert checks["CDI specs match the prepared claims"]["ok"]
    assert not checks["registration and DRA sockets answer"]["ok"]
    assert not checks["API server reachable"]["ok"]


def test_explain_charges_counters_of_devices_held_by_other_claims() -> None:
    from driver.debug.commands import topology_node
    from driver.debug.explain import explain, parse_claim

    node = topology_node("a100-40gb-x1-mig")
    whole = next(d for d in node.devices if d.attributes.get("profile") == "7g.40gb")
    profile = 'device.attributes["gpu.nvidia.com"].profile == "1g.5gb"'
    one_g = {
        "kind": "ResourceClaim",
        "metadata": {"name": "one"},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "m",
                        "exactly": {
                            "deviceClassName": "mig.nvidia.com",
                            "selectors": [{"cel": {"expression": profile}}],
                        },
                    }
                ]
            }
        },
    }
    claim = parse_claim(one_g)
    assert explain(claim, node).verdict == "fits"
    # A 7g.40gb slice held elsewhere uses every memory slice: no 1g.5gb placement is left.
    assert explain(claim, node, allocated=[whole.key]).verdict == "unschedulable"
