"""Discovery publishes full GPUs with exactly NVIDIA's attributes, and fails loudly otherwise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pynvml
import pytest

from driver.discovery import (
    DiscoveryError,
    cuda_driver_version,
    discover,
    full_gpu_device,
    pcie_root,
    semver_of,
)
from driver.errors import NvmlError
from driver.inventory import Inventory, Version
from driver.nvml.backend import Nvml
from driver.nvml.fakestate import FakeState
from driver.nvml.topology import load_topology


def open_fake(tmp_path: Path, topology: str, node: str = "node-a") -> Nvml:
    return Nvml.open("fake", fake_topology=topology, fake_state=tmp_path / "state.json", node_name=node)


def test_a100_node_publishes_eight_gpus_with_exact_attributes(tmp_path):
    topo = load_topology("a100-40gb-x8")
    with open_fake(tmp_path, "a100-40gb-x8") as nvml:
        inv = discover(nvml, "node-a", sysfs_root=None)
    assert [d.name for d in inv.devices] == [f"gpu-{i}" for i in range(8)]
    assert inv.warnings == ()
    assert inv.counter_sets == ()
    dev = inv.get("gpu-3")
    assert dev is not None
    uuid = topo.gpu_uuid(3, "node-a")
    assert (dev.kind, dev.gpu_uuid, dev.gpu_minor) == ("gpu", uuid, 3)
    assert dict(dev.attributes) == {
        "type": "gpu",
        "uuid": uuid,
        "productName": "NVIDIA A100-SXM4-40GB",
        "brand": "Nvidia",
        "architecture": "Ampere",
        "cudaComputeCapability": Version("8.0.0"),
        "driverVersion": Version("580.126.20"),
        "cudaDriverVersion": Version("13.0.0"),
        "resource.kubernetes.io/pciBusID": "0000:4e:00.0",
        "resource.kubernetes.io/numaNode": 0,
    }
    assert dict(dev.capacity) == {"memory": 42949672960}
    assert inv.get("gpu-7").attributes["resource.kubernetes.io/numaNode"] == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("topology", "facts"),
    [
        ("h100-80gb-x8", ("NVIDIA H100 80GB HBM3", "Hopper", "9.0.0", 85520809984)),
        ("h200-x1", ("NVIDIA H200", "Hopper", "9.0.0", 150754820096)),
        ("a100-80gb-x4", ("NVIDIA A100-SXM4-80GB", "Ampere", "8.0.0", 85899345920)),
        ("t4-x4", ("Tesla T4", "Turing", "7.5.0", 16106127360)),
        ("l4-x2", ("NVIDIA L4", "Ada Lovelace", "8.9.0", 24152899584)),
    ],
)
def test_other_nodes(tmp_path, topology, facts):
    product, arch, cc, memory = facts
    with open_fake(tmp_path, topology) as nvml:
        inv = discover(nvml, "node-a", sysfs_root=None)
    assert len(inv.devices) == len(load_topology(topology).gpus)
    for dev in inv.devices:
        assert dev.attributes["productName"] == product
        assert dev.attributes["architecture"] == arch
        assert dev.attributes["cudaComputeCapability"] == Version(cc)
        assert dev.capacity == {"memory": memory}


def test_two_nodes_of_one_topology_have_different_uuids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with open_fake(tmp_path / "a", "l4-x2", "node-a") as a, open_fake(tmp_path / "b", "l4-x2", "node-b") as b:
        ua = {d.gpu_uuid for d in discover(a, "node-a", sysfs_root=None).devices}
        ub = {d.gpu_uuid for d in discover(b, "node-b", sysfs_root=None).devices}
    assert len(ua) == 2
    assert not ua & ub


def test_memory_capacity_is_omitted_when_nvml_says_not_supported(tmp_path):
    with open_fake(tmp_path, "l4-x2") as nvml:
        nvml.module.fake.state.add_fault("nvmlDeviceGetMemoryInfo", pynvml.NVML_ERROR_NOT_SUPPORTED)
        inv = discover(nvml, "node-a", sysfs_root=None)
    assert all(d.capacity == {} for d in inv.devices)


def test_mig_enabled_gpu_without_hook_publishes_nothing_and_says_why(tmp_path):
    with open_fake(tmp_path, "a100-40gb-x8") as nvml:
        uuid = nvml.gpu(2).uuid
        with nvml.module.fake.state.edit() as doc:
            doc["gpus"][uuid]["mig"].update(current=True, pending=True)
        inv = discover(nvml, "node-a", sysfs_root=None)
    assert "gpu-2" not in [d.name for d in inv.devices]
    assert len(inv.devices) == 7
    assert len(inv.warnings) == 1
    assert uuid in inv.warnings[0]
    assert "MIG" in inv.warnings[0]


def test_only_mig_enabled_gpus_and_no_hook_is_an_error_not_an_empty_inventory(tmp_path):
    with (
        open_fake(tmp_path, "a100-40gb-x1-mig") as nvml,
        pytest.raises(DiscoveryError, match="MIG mode enabled"),
    ):
        discover(nvml, "node-a", sysfs_root=None)


def test_mig_hook_decides_for_mig_capable_gpus_only(tmp_path):
    seen = []

    def hook(gpu, system, full):
        seen.append((gpu.minor, system.driver_version, full.name))
        if gpu.mig_enabled:
            return Inventory(warnings=(f"mig on {gpu.minor}",))
        renamed = dataclasses.replace(full, attributes={**full.attributes, "extra": True})
        return Inventory(devices=(renamed,))

    with open_fake(tmp_path, "a100-40gb-x1-mig") as nvml:
        with pytest.raises(DiscoveryError, match="mig on 0"):
            discover(nvml, "n", sysfs_root=None, mig_hook=hook)
        assert seen == [(0, "580.126.20", "gpu-0")]
    seen.clear()
    (tmp_path / "t4").mkdir()
    with open_fake(tmp_path / "t4", "t4-x4") as nvml:
        inv = discover(nvml, "n", sysfs_root=None, mig_hook=hook)
    assert seen == []  # T4 is not MIG capable: the hook is not asked
    assert len(inv.devices) == 4
    (tmp_path / "h").mkdir()
    with open_fake(tmp_path / "h", "h200-x1") as nvml:
        inv = discover(nvml, "n", sysfs_root=None, mig_hook=hook)
    assert inv.devices[0].attributes["extra"] is True


def test_no_gpus_is_a_clear_error(tmp_path):
    with open_fake(tmp_path, "l4-x2") as nvml:
        nvml.module.nvmlDeviceGetCount = lambda: 0
        with pytest.raises(DiscoveryError, match="no GPUs"):
            discover(nvml, "node-a", sysfs_root=None)


def test_nvml_failure_propagates_for_the_daemon_to_retry(tmp_path):
    with open_fake(tmp_path, "l4-x2") as nvml:
        nvml.module.fake.state.add_fault("nvmlDeviceGetName", pynvml.NVML_ERROR_UNKNOWN, times=1)
        with pytest.raises(NvmlError, match="nvmlDeviceGetName"):
            discover(nvml, "node-a", sysfs_root=None)
        assert len(discover(nvml, "node-a", sysfs_root=None).devices) == 2


def test_lost_gpu_is_skipped_with_a_warning(tmp_path):
    with open_fake(tmp_path, "a100-80gb-x4") as nvml:
        lost = nvml.gpu(1).uuid
        nvml.module.fake.state.add_fault("nvmlDeviceGetMinorNumber", pynvml.NVML_ERROR_GPU_IS_LOST, uuid=lost)
        inv = discover(nvml, "node-a", sysfs_root=None)
    assert [d.name for d in inv.devices] == ["gpu-0", "gpu-2", "gpu-3"]
    assert "lost" in inv.warnings[0]


def test_duplicate_minors_are_refused(tmp_path):
    with open_fake(tmp_path, "l4-x2") as nvml:
        with nvml.module.fake.state.edit() as doc:
            for entry in doc["gpus"].values():
                entry["minor"] = 0
        with pytest.raises(DiscoveryError, match="minor 0"):
            discover(nvml, "node-a", sysfs_root=None)


def make_sysfs(root: Path, bdf: str, parents: list[str], numa: int) -> None:
    device = root / "devices"
    for part in parents:
        device = device / part
    device = device / bdf
    device.mkdir(parents=True)
    (device / "numa_node").write_text(f"{numa}\n")
    links = root / "bus" / "pci" / "devices"
    links.mkdir(parents=True, exist_ok=True)
    (links / bdf).symlink_to(device)


def test_pcie_root_and_numa_come_from_sysfs(tmp_path):
    sysfs = tmp_path / "sys"
    make_sysfs(sysfs, "0000:00:03.0", ["pci0000:00"], 1)
    make_sysfs(sysfs, "0000:00:04.0", ["pci0000:00", "0000:00:01.0"], -1)
    with open_fake(tmp_path, "l4-x2") as nvml:
        inv = discover(nvml, "node-a", sysfs_root=sysfs)
    first, second = inv.devices
    assert first.attributes["resource.kubernetes.io/pcieRoot"] == "pci0000:00"
    assert first.attributes["resource.kubernetes.io/numaNode"] == 1  # sysfs wins over NVML
    assert second.attributes["resource.kubernetes.io/pcieRoot"] == "pci0000:00"
    assert second.attributes["resource.kubernetes.io/numaNode"] == 0  # sysfs -1: NVML's value


def test_pcie_root_absent_or_odd_is_omitted(tmp_path):
    assert pcie_root("0000:00:03.0", tmp_path) is None
    make_sysfs(tmp_path, "0000:00:03.0", ["platform"], 0)
    assert pcie_root("0000:00:03.0", tmp_path) is None


def test_numa_unknown_is_omitted(tmp_path):
    with open_fake(tmp_path, "l4-x2") as nvml:
        gpu = dataclasses.replace(nvml.gpu(0), numa_node=None)
        system = nvml.system()
    dev = full_gpu_device(gpu, system, sysfs_root=tmp_path)
    assert "resource.kubernetes.io/numaNode" not in dev.attributes
    assert "resource.kubernetes.io/pcieRoot" not in dev.attributes


def test_non_semver_driver_version_does_not_crash(tmp_path):
    with open_fake(tmp_path, "l4-x2") as nvml:
        gpu = nvml.gpu(0)
        system = dataclasses.replace(nvml.system(), driver_version="580.126.20-beta+x")
    warnings: list[str] = []
    dev = full_gpu_device(gpu, system, warnings=warnings)
    assert "driverVersion" not in dev.attributes
    assert "driverVersion" in warnings[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("580.126.20", "580.126.20"),
        ("550.54.05", "550.54.5"),
        ("550.163.01", "550.163.1"),
        ("470.82", "470.82.0"),
        ("535", "535.0.0"),
        ("1.2.3.4", None),
        ("r580", None),
        ("", None),
    ],
)
def test_semver_of(text, expected):
    result = semver_of(text)
    assert (result.value if result else None) == expected


@pytest.mark.parametrize(("value", "expected"), [(13000, "13.0.0"), (12040, "12.4.0"), (12090, "12.9.0")])
def test_cuda_driver_version(value, expected):
    assert cuda_driver_version(value) == Version(expected)


def test_state_file_of_a_crashed_plugin_is_reused(tmp_path):
    with open_fake(tmp_path, "a100-40gb-x8") as nvml:
        before = discover(nvml, "node-a", sysfs_root=None)
    state = FakeState(tmp_path / "state.json")
    assert state.read()["topology"] == "a100-40gb-x8"
    with open_fake(tmp_path, "a100-40gb-x8") as nvml:
        after = discover(nvml, "node-a", sysfs_root=None)
    assert before == after
