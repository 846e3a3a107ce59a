"""Contract: the same discovery code gives exactly what the NVML library underneath reports.

Parametrised over our fake pynvml and (marker ``mocknvml``) nvidia-ml-py over the mock
libnvidia-ml.so.1 built by ``tests/peers/build.sh mocknvml``. Each case runs in a child
process (nvidia-ml-py loads the library once per process). The child runs ``discover()`` and,
separately, reads every value straight from the pynvml-like module; the parent derives the
expected devices from those raw readings with its own code, and checks the raw readings
against a source that does not go through NVML at all: the topology YAML for the fake, the
mock's UUID rule and known product facts for the mock.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys
from pathlib import Path
from driver.discovery import discover
from driver.inventory import Version
from driver.nvml.backend import Nvml

backend, arg1, arg2 = sys.argv[1], sys.argv[2], sys.argv[3]
if backend == "fake":
    nvml = Nvml.open("fake", fake_topology=arg1, fake_state=Path(arg2), node_name="node-m")
else:
    nvml = Nvml.open("real", driver_root=Path(arg1) if arg1 else None)
inv = discover(nvml, "node-m", sysfs_root=None)
m = nvml.module

def opt(fn, *args):
    try:
        return fn(*args)
    except m.NVMLError as exc:
        return {"error": exc.value}

raw = []
for i in range(m.nvmlDeviceGetCount()):
    h = m.nvmlDeviceGetHandleByIndex(i)
    mem = opt(m.nvmlDeviceGetMemoryInfo, h)
    mig = opt(m.nvmlDeviceGetMigMode, h)
    raw.append({
        "uuid": m.nvmlDeviceGetUUID(h),
        "name": m.nvmlDeviceGetName(h),
        "minor": m.nvmlDeviceGetMinorNumber(h),
        "busId": m.nvmlDeviceGetPciInfo(h).busId,
        "memory": mem if isinstance(mem, dict) else mem.total,
        "brand": opt(m.nvmlDeviceGetBrand, h),
        "arch": opt(m.nvmlDeviceGetArchitecture, h),
        "cc": list(m.nvmlDeviceGetCudaComputeCapability(h)),
        "numa": opt(m.nvmlDeviceGetNumaNodeId, h),
        "mig": mig if isinstance(mig, dict) else list(mig),
    })
def enc(v):
    return {"version": v.value} if isinstance(v, Version) else v
out = {
    "driver": m.nvmlSystemGetDriverVersion(),
    "cuda": m.nvmlSystemGetCudaDriverVersion(),
    "raw": raw,
    "devices": [
        {"name": d.name, "attributes": {k: enc(v) for k, v in d.attributes.items()},
         "capacity": dict(d.capacity)}
        for d in inv.devices
    ],
}
nvml.shutdown()
print("RESULT " + json.dumps(out))
"""

# go-nvlib's strings, written out again here on purpose (not imported from the driver).
BRANDS = {2: "Tesla", 14: "Nvidia", 1: "Quadro", 5: "GeForce", 0: "Unknown"}
ARCHS = {6: "Turing", 7: "Ampere", 8: "Ada Lovelace", 9: "Hopper", 10: "Blackwell"}


def run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def expected_devices(out: dict[str, Any]) -> list[dict[str, Any]]:
    """What NVIDIA's driver would publish for these raw NVML readings."""
    nums = [int(p) for p in out["driver"].split(".")]
    driver = ".".join(str(n) for n in [*nums, 0, 0][:3])
    cuda = f"{out['cuda'] // 1000}.{(out['cuda'] % 1000) // 10}.0"
    devices = []
    for gpu in out["raw"]:
        if isinstance(gpu["mig"], list) and gpu["mig"][0] == 1:
            continue
        bus = gpu["busId"].lower()
        domain, rest = bus.split(":", 1)
        attrs: dict[str, Any] = {
            "type": "gpu",
            "uuid": gpu["uuid"],
            "productName": gpu["name"],
            "brand": BRANDS[gpu["brand"]] if isinstance(gpu["brand"], int) else "Unknown",
            "architecture": ARCHS[gpu["arch"]] if isinstance(gpu["arch"], int) else "Unknown",
            "cudaComputeCapability": {"version": f"{gpu['cc'][0]}.{gpu['cc'][1]}.0"},
            "driverVersion": {"version": driver},
            "cudaDriverVersion": {"version": cuda},
            "resource.kubernetes.io/pciBusID": f"{int(domain, 16):04x}:{rest}",
        }
        if isinstance(gpu["numa"], int) and gpu["numa"] >= 0:
            attrs["resource.kubernetes.io/numaNode"] = gpu["numa"]
        capacity = {"memory": gpu["memory"]} if isinstance(gpu["memory"], int) else {}
        devices.append({"name": f"gpu-{gpu['minor']}", "attributes": attrs, "capacity": capacity})
    return sorted(devices, key=lambda d: d["attributes"]["resource.kubernetes.io/pciBusID"])


def check_contract(out: dict[str, Any]) -> None:
    assert out["raw"], "the library reports no GPUs"
    assert out["devices"] == expected_devices(out)


@pytest.mark.parametrize("topology", ["a100-40gb-x8", "h100-80gb-x8", "t4-x4", "l4-x2", "a100-40gb-x1-mig"])
def test_fake(topology, tmp_path):
    if topology == "a100-40gb-x1-mig":
        # MIG-enabled only: without MIG support there is nothing to publish, and that is an error.
        with pytest.raises(AssertionError, match="DiscoveryError"):
            run_child(["fake", topology, str(tmp_path / "s.json")], {})
        return
    out = run_child(["fake", topology, str(tmp_path / "s.json")], {})
    check_contract(out)
    # Independently of NVML: the topology file itself.
    doc = yaml.safe_load((REPO / "driver" / "nvml" / "topologies" / f"{topology}.yaml").read_text())
    assert out["driver"] == doc["driver_version"]
    assert out["cuda"] == doc["cuda_driver_version"]
    assert [g["name"] for g in out["raw"]] == [doc["gpu"]["product_name"]] * len(doc["gpus"])
    assert [g["busId"][4:].lower() for g in out["raw"]] == [g["pci_bus_id"] for g in doc["gpus"]]
    assert [g["numa"] for g in out["raw"]] == [g["numa_node"] for g in doc["gpus"]]
    assert {g["memory"] for g in out["raw"]} == {doc["gpu"]["memory_bytes"]}
    assert len({d["attributes"]["uuid"] for d in out["devices"]}) == len(doc["gpus"])


# --- NVIDIA's mock libnvidia-ml ---------------------------------------------------------

MOCK_FACTS = {  # profile: (product name fragment, architecture, compute capability)
    "dgxa100": ("A100", "Ampere", "8.0.0"),
    "dgxh100": ("H100", "Hopper", "9.0.0"),
    "dgxh200": ("H200", "Hopper", "9.0.0"),
    "dgxb200": ("B200", "Blackwell", "10.0.0"),
}


def mock_uuid(seed: str, index: int) -> str:
    """The mock's UUID rule (tests/peers: stableUUID), recomputed here."""
    h = hashlib.sha1(f"gpu-dra-mock-nvml/{seed}/{index}".encode()).hexdigest()  # noqa: S324 - not security
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def mock_seed(config: Path, profile: str) -> str:
    for line in config.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "uuid_seed":
            return value.strip().strip("'\"")
    return profile


@pytest.mark.mocknvml
@pytest.mark.parametrize("profile", sorted(MOCK_FACTS))
def test_mocknvml(profile):
    from tests.ground import peers

    out = run_child(["real", "", ""], peers.mocknvml_env(profile))
    check_contract(out)
    fragment, arch, cc = MOCK_FACTS[profile]
    seed = mock_seed(peers.mocknvml_config(profile), profile)
    assert [g["uuid"] for g in out["raw"]] == [mock_uuid(seed, i) for i in range(len(out["raw"]))]
    for dev in out["devices"]:
        assert fragment in dev["attributes"]["productName"]
        assert dev["attributes"]["architecture"] == arch
        assert dev["attributes"]["cudaComputeCapability"] == {"version": cc}


@pytest.mark.mocknvml
def test_mocknvml_loaded_from_a_driver_root(tmp_path):
    """The library is found under the driver root's lib dirs, with no LD_LIBRARY_PATH."""
    from tests.ground import peers

    lib = tmp_path / "driver-root" / "usr" / "lib64" / "libnvidia-ml.so.1"
    lib.parent.mkdir(parents=True)
    lib.symlink_to(peers.mocknvml_lib_dir() / "libnvidia-ml.so.1")
    env = {"MOCK_NVML_CONFIG": str(peers.mocknvml_config("dgxa100")), "LD_LIBRARY_PATH": ""}
    out = run_child(["real", str(tmp_path / "driver-root"), ""], env)
    check_contract(out)
    assert len(out["devices"]) == 8
