"""The CDI project's own library (the code containerd and CRI-O use) loads our specs and injects them.

Uses the `cdi` command built by tests/peers/build.sh on tags.cncf.io/container-device-interface
pkg/cdi (`validate DIR`, `devices DIR`, `inject --spec-dirs DIR DEVICE...`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cdi.names import qualified_device_id
from cdi.store import CdiStore
from tests.ground import peers
from tests.ground.driverroot import FakeDriverRoot
from tests.unit.cdi.claimspec import MIG_DEVICE, build_claim_spec
from tests.unit.cdi.conftest import UID


@pytest.fixture(scope="module")
def cdi_cmd() -> Path:
    try:
        return peers.cdi_path()
    except (peers.PeerBuildError, OSError) as exc:
        pytest.skip(f"the Go-built `cdi` peer could not be built (run tests/peers/build.sh cdi): {exc}")


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)


def test_cdi_library_loads_and_injects_our_spec(
    tmp_path: Path, fake_root: FakeDriverRoot, cdi_cmd: Path
) -> None:
    spec_dir = tmp_path / "cdi"
    CdiStore(spec_dir).write_claim_spec(UID, build_claim_spec(fake_root, UID))

    checked = run([str(cdi_cmd), "validate", str(spec_dir)])
    assert checked.returncode == 0, checked.stderr
    assert "ok: 2 devices" in checked.stdout

    listed = run([str(cdi_cmd), "devices", str(spec_dir)])
    assert listed.returncode == 0, listed.stderr
    ids = [qualified_device_id(UID, "gpu-0"), qualified_device_id(UID, MIG_DEVICE)]
    assert sorted(listed.stdout.split()) == sorted(ids)

    injected = run([str(cdi_cmd), "inject", "--spec-dirs", str(spec_dir), *ids])
    assert injected.returncode == 0, injected.stderr
    oci = json.loads(injected.stdout)
    dev_paths = {d["path"] for d in oci["linux"]["devices"]}
    assert {
        "/dev/nvidia0",
        "/dev/nvidia1",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
    } <= dev_paths
    caps = {d["path"]: d for d in oci["linux"]["devices"] if "nvidia-caps" in d["path"]}
    assert {(d["major"], d["minor"]) for d in caps.values()} == {(239, 237), (239, 238)}
    mounts = {m["destination"]: m for m in oci["mounts"]}
    cuda = mounts["/usr/lib/x86_64-linux-gnu/libcuda.so.580.126.20"]
    assert cuda["source"] == str(fake_root.lib_dir / "libcuda.so.580.126.20")
    assert "/usr/bin/nvidia-smi" in mounts
    assert "NVIDIA_VISIBLE_DEVICES=void" in oci["process"]["env"]
    hooks = oci["hooks"]["createContainer"]
    assert [h["args"][1] for h in hooks][:2] == ["create-symlinks", "enable-cuda-compat"]


def test_cdi_library_rejects_a_broken_spec(tmp_path: Path, cdi_cmd: Path) -> None:
    # The other half of the check: the peer does fail on a spec it should refuse.
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    (spec_dir / "k8s.gpu.nvidia.com-claim_x.json").write_text(
        json.dumps(
            {
                "cdiVersion": "0.3.0",
                "kind": "k8s.gpu.nvidia.com/claim",
                "devices": [
                    {"name": "0-gpu-0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}
                ],
            }
        )
    )
    checked = run([str(cdi_cmd), "validate", str(spec_dir)])
    assert checked.returncode != 0
    assert "0.5.0" in checked.stderr
