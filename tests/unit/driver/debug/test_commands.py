"""The debug subcommands end to end through argparse, on fake topologies and temporary directories."""

from __future__ import annotations

import json

import pytest
import yaml

from driver import cli
from driver.debug.commands import main, mig_picture, topology_inventory

T4_SELECTOR = 'device.attributes["gpu.nvidia.com"].productName.contains("T4")'
CLAIM = {
    "apiVersion": "resource.k8s.io/v1",
    "kind": "ResourceClaimTemplate",
    "metadata": {"name": "t", "namespace": "ns"},
    "spec": {
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpus",
                        "exactly": {
                            "deviceClassName": "gpu.nvidia.com",
                            "count": 2,
                            "selectors": [{"cel": {"expression": T4_SELECTOR}}],
                        },
                    }
                ]
            }
        }
    },
}


@pytest.fixture
def claim_file(tmp_path):
    path = tmp_path / "claim.yaml"
    path.write_text(yaml.safe_dump(CLAIM))
    return path


def test_simulate_json_says_fits_with_devices(claim_file, capsys):
    assert main(["simulate", str(claim_file), "--topology", "t4-x4", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "fits"
    assert data["allocation"] == {"gpus": ["gpu-0", "gpu-1"]}
    assert data["requests"][0]["matching"] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]


def test_simulate_table_names_failing_clause_and_exit_1(claim_file, capsys):
    assert main(["simulate", str(claim_file), "--topology", "l4-x2"]) == 1
    out = capsys.readouterr().out
    assert 'request #0 false: device.attributes["gpu.nvidia.com"].productName.contains("T4")' in out
    assert "would fit: no" in out


def test_explain_flags_rejected_expression_with_fix(tmp_path, capsys):
    bad = json.loads(json.dumps(CLAIM))
    sel = bad["spec"]["spec"]["devices"]["requests"][0]["exactly"]["selectors"][0]["cel"]
    sel["expression"] = 'device.capacity["gpu.nvidia.com"].memory >= quantity("10Gi")'
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["simulate", str(path), "--topology", "t4-x4"]) == 1
    out = capsys.readouterr().out
    assert "REJECTED by the API server" in out
    assert 'fix: device.capacity["gpu.nvidia.com"].memory.compareTo(quantity("10Gi")) >= 0' in out


def test_explain_against_slices_file_and_class_file(tmp_path, claim_file, capsys):
    from driver.debug.commands import inventory_slices

    slices = inventory_slices(topology_inventory("t4-x4", "n1"), "n1")
    (tmp_path / "slices.yaml").write_text(yaml.safe_dump_all(slices))
    (tmp_path / "class.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "DeviceClass",
                "metadata": {"name": "gpu.nvidia.com"},
                "spec": {
                    "selectors": [
                        {"cel": {"expression": 'device.attributes["gpu.nvidia.com"].type == "mig"'}}
                    ]
                },
            }
        )
    )
    args = ["explain", str(claim_file), "--slices-file", str(tmp_path / "slices.yaml"), "-o", "json"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--class-file", str(tmp_path / "class.yaml")]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["requests"][0]["devices"][0]["clauses"][0]["result"] == "false"
    assert data["requests"][0]["devices"][0]["clauses"][1]["result"] == "not evaluated"


def test_simulate_dynamic_mig_search_honours_counters(tmp_path, capsys):
    claim = {
        "kind": "ResourceClaim",
        "metadata": {"name": "m"},
        "spec": {
            "devices": {
                "requests": [
                    {"name": "full", "exactly": {"deviceClassName": "gpu.nvidia.com"}},
                    {"name": "slice", "exactly": {"deviceClassName": "mig.nvidia.com"}},
                ]
            }
        },
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(claim))
    assert (
        main(["simulate", str(path), "--topology", "a100-40gb-x1-mig", "--mig", "dynamic", "-o", "yaml"]) == 1
    )
    assert yaml.safe_load(capsys.readouterr().out)["verdict"] == "unschedulable"


def test_devices_and_mig_on_topology(capsys):
    assert main(["devices", "--topology", "a100-40gb-x8", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data["devices"]] == [f"gpu-{i}" for i in range(8)]
    assert all(d["heldBy"] is None for d in data["devices"])
    inv = topology_inventory("a100-40gb-x1-mig")
    name = next(
        d.name
        for d in inv.devices
        if d.kind == "mig-dynamic" and d.mig_spec and d.mig_spec.profile == "3g.20gb"
    )
    picture = mig_picture(inv, {name: "ns/c (uid-1)"})
    assert picture[0]["slices"] == 8
    assert picture[0]["instances"][0]["claim"] == "ns/c (uid-1)"


def test_probe_fails_without_sockets(tmp_path, capsys):
    args = [
        "probe",
        "--kubelet-plugins-directory-path",
        str(tmp_path / "plugins"),
        "--kubelet-registrar-directory-path",
        str(tmp_path / "registry"),
        "--timeout",
        "0.5",
        "-o",
        "json",
    ]
    assert main(args) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_claims_and_cdi_on_empty_state(tmp_path, capsys, monkeypatch):
    boot = tmp_path / "boot_id"
    boot.write_text("b1\n")
    monkeypatch.setenv("GPU_DRA_BOOT_ID_PATH", str(boot))
    common = ["--state-dir", str(tmp_path / "state"), "--cdi-root", str(tmp_path / "cdi"), "-o", "json"]
    assert main(["claims", *common]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["claims"] == []
    assert (data["checkpoint"]["valid"], data["checkpoint"]["exists"]) == (True, False)
    assert main(["cdi", *common]) == 0
    assert json.loads(capsys.readouterr().out) == {"specs": [], "orphans": [], "problems": []}


def test_registered_in_gpu_dra_parser():
    parser = cli.build_parser()
    args = parser.parse_args(["simulate", "c.yaml", "--topology", "t4-x4"])
    assert callable(args.func)
    for command in ("explain", "devices", "slices", "claims", "cdi", "mig", "doctor", "probe"):
        assert callable(parser.parse_args([command, *(["c.yaml"] if command == "explain" else [])]).func)


def test_doctor_names_a_directory_in_place_of_the_checkpoint_and_a_full_state_dir(tmp_path, monkeypatch):
    """Issue 17: the start-up conditions the plugin reports are visible to `gpu-dra doctor` too."""
    from dataclasses import replace

    import pytest

    from driver.config import Config
    from driver.debug.doctor import CheckFailedError, Doctor

    state = tmp_path / "state"
    state.mkdir()
    cfg = replace(Config(node_name="n"), state_dir_override=state)
    check = Doctor(cfg, kube=lambda: None)
    assert "MiB free" in check.state_dir()
    (state / "checkpoint.json").mkdir()
    with pytest.raises(CheckFailedError, match="is a directory, where the checkpoint file belongs"):
        check.state_dir()
    (state / "checkpoint.json").rmdir()

    class Full:
        f_bavail = 0
        f_frsize = 4096

    monkeypatch.setattr("os.statvfs", lambda _p: Full())
    with pytest.raises(CheckFailedError, match=f"directory {state} is full"):
        check.state_dir()
    assert state.is_dir()
