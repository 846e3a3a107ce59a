"""Shipped topologies load and carry the facts the fake NVML reports."""

from __future__ import annotations

import pytest

from driver.errors import ConfigError
from driver.nvml.topology import available_topologies, load_topology

EXPECTED = {
    # name: (gpus, product name, arch, cc, memory bytes, mig capable, mig mode, profile table)
    "a100-40gb-x8": (8, "NVIDIA A100-SXM4-40GB", 7, (8, 0), 42949672960, True, False, "A100-SXM4-40GB"),
    "a100-40gb-x1-mig": (1, "NVIDIA A100-SXM4-40GB", 7, (8, 0), 42949672960, True, True, "A100-SXM4-40GB"),
    "a100-80gb-x4": (4, "NVIDIA A100-SXM4-80GB", 7, (8, 0), 85899345920, True, False, "A100-80GB"),
    "h100-80gb-x8": (8, "NVIDIA H100 80GB HBM3", 9, (9, 0), 85520809984, True, False, "H100-80GB"),
    "h200-x1": (1, "NVIDIA H200", 9, (9, 0), 150754820096, True, False, "H200-141GB"),
    "t4-x4": (4, "Tesla T4", 6, (7, 5), 16106127360, False, False, None),
    "l4-x2": (2, "NVIDIA L4", 8, (8, 9), 24152899584, False, False, None),
}


def test_every_required_topology_ships():
    assert set(EXPECTED) <= set(available_topologies())


@pytest.mark.parametrize("name", available_topologies())
def test_topology_loads_with_unique_minors_and_bus_ids(name):
    topo = load_topology(name)
    assert topo.name == name
    assert len({g.minor for g in topo.gpus}) == len(topo.gpus)
    assert len({g.pci_bus_id for g in topo.gpus}) == len(topo.gpus)
    assert topo.driver_version == "580.126.20"
    assert topo.cuda_driver_version == 13000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_topology_facts(name):
    count, product, arch, cc, memory, capable, mode, table = EXPECTED[name]
    topo = load_topology(name)
    assert len(topo.gpus) == count
    for gpu in topo.gpus:
        assert (gpu.product_name, gpu.architecture, gpu.cuda_compute_capability) == (product, arch, cc)
        assert gpu.memory_bytes == memory
        assert (gpu.mig_capable, gpu.mig_mode, gpu.mig_profile_table) == (capable, mode, table)
        assert gpu.brand == 14


def test_mig_profile_tables_exist_in_the_packaged_profile_data():
    import yaml

    from driver.nvml.topology import TOPOLOGY_DIR

    tables = yaml.safe_load((TOPOLOGY_DIR.parent / "data" / "mig-profiles.yaml").read_text())["gpus"]
    for name in available_topologies():
        for gpu in load_topology(name).gpus:
            if gpu.mig_profile_table is not None:
                assert gpu.mig_profile_table in tables


def test_uuids_are_stable_and_differ_per_node_seed_and_index():
    topo = load_topology("a100-40gb-x8")
    a = [topo.gpu_uuid(g.index, "node-a") for g in topo.gpus]
    b = [topo.gpu_uuid(g.index, "node-b") for g in topo.gpus]
    assert a == [load_topology("a100-40gb-x8").gpu_uuid(i, "node-a") for i in range(8)]
    assert len(set(a)) == 8
    assert not set(a) & set(b)
    assert all(u.startswith("GPU-") and len(u) == 40 for u in a)


def test_unknown_topology_names_the_choices():
    with pytest.raises(ConfigError, match="a100-40gb-x8"):
        load_topology("no-such-node")


def test_topology_from_path_and_duplicate_minor_is_rejected(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text(
        "driver_version: '1.2.3'\ncuda_driver_version: 12040\n"
        "gpu: {product_name: X, brand: NVML_BRAND_TESLA, architecture: NVML_DEVICE_ARCH_VOLTA,"
        " cuda_compute_capability: [7, 0], pci_device_id: 1}\n"
        "gpus: [{pci_bus_id: '0000:01:00.0'}, {pci_bus_id: '0000:02:00.0', minor: 5}]\n"
    )
    topo = load_topology(good)
    assert topo.name == "mine"
    assert [g.minor for g in topo.gpus] == [0, 5]
    assert topo.gpus[0].memory_bytes is None
    assert topo.gpus[0].numa_node is None
    assert topo.nvml_version == "12.1.2.3"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("minor: 5", "minor: 0"))
    with pytest.raises(ConfigError, match="unique"):
        load_topology(bad)
