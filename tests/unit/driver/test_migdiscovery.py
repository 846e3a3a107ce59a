"""MIG devices published for one GPU: dynamic (counters) and static (existing instances)."""

from __future__ import annotations

from driver.inventory import AttributeValue, Version
from driver.migdiscovery import discover_dynamic, discover_static
from mig.manager import MigManager
from mig.profiles import mig_specs
from tests.unit.mig.fakenode import make_node

PARENT_ATTRS: dict[str, AttributeValue] = {
    "type": "gpu",
    "uuid": "GPU-parent",
    "productName": "NVIDIA A100-SXM4-40GB",
    "brand": "Nvidia",
    "architecture": "Ampere",
    "cudaComputeCapability": Version("8.0.0"),
    "driverVersion": Version("580.126.20"),
    "cudaDriverVersion": Version("13.0.0"),
    "resource.kubernetes.io/pciBusID": "0000:07:00.0",
    "resource.kubernetes.io/pcieRoot": "pci0000:00",
    "resource.kubernetes.io/numaNode": 0,
}
MIB = 1 << 20


def test_dynamic_devices_counters_and_full_gpu(tmp_path):
    node = make_node(tmp_path, "a100-40gb-x1-mig")
    gpu = node.nvml.gpu(0)
    pub = discover_dynamic(node.backend, gpu.minor, gpu.uuid, PARENT_ATTRS)
    assert len(pub.devices) == 25
    dev = next(d for d in pub.devices if d.name == "gpu-0-mig-1g5gb-19-3")
    assert dev.kind == "mig-dynamic"
    assert dev.attributes["type"] == "mig"
    assert dev.attributes["profile"] == "1g.5gb"
    assert dev.attributes["parentUUID"] == gpu.uuid
    assert "uuid" not in dev.attributes
    assert dev.attributes["productName"] == "NVIDIA A100-SXM4-40GB"
    assert dev.attributes["resource.kubernetes.io/pcieRoot"] == "pci0000:00"
    assert dev.capacity == {
        "multiprocessors": 14,
        "copyEngines": 1,
        "decoders": 0,
        "encoders": 0,
        "jpegEngines": 0,
        "ofaEngines": 0,
        "memory": 4864 * MIB,
    }
    (consumption,) = dev.consumes_counters
    assert consumption.counter_set == "gpu-0-counter-set"
    assert consumption.counters["memory-slice-3"] == 1
    assert not any(k.startswith("memory-slice-") and k != "memory-slice-3" for k in consumption.counters)
    assert dev.mig_spec is not None
    assert (dev.mig_spec.gi_profile_id, dev.mig_spec.placement_start) == (19, 3)
    assert pub.counter_set is not None
    assert pub.counter_set.name == "gpu-0-counter-set"
    assert len(pub.counter_set.counters) == 15  # 7 dimensions + 8 memory slices (API limit 32)
    assert pub.full_gpu_consumption[0].counters == pub.counter_set.counters
    assert pub.full_gpu_capacity["multiprocessors"] == 98
    for d in pub.devices:  # every device consumes only counters that exist, within their values
        for name, value in d.consumes_counters[0].counters.items():
            assert value <= pub.counter_set.counters[name]


def test_static_devices_are_existing_instances_with_uuid_and_slices(tmp_path):
    node = make_node(tmp_path, "a100-40gb-x1-mig")
    gpu = node.nvml.gpu(0)
    assert discover_static(node.backend, gpu.minor, gpu.uuid, PARENT_ATTRS) == ()
    specs = mig_specs(gpu.minor, gpu.uuid, node.backend.profiles(gpu.uuid))
    three_g = next(s for s in specs if s.name == "gpu-0-mig-3g20gb-9-4")
    live = MigManager(node.backend).create(three_g)
    one_g = next(s for s in specs if s.name == "gpu-0-mig-1g5gb-19-0")
    node.backend.create_gi(gpu.uuid, one_g.gi_profile_id, 0)  # GI without CI: not published
    (dev,) = discover_static(node.backend, gpu.minor, gpu.uuid, PARENT_ATTRS)
    assert dev.name == "gpu-0-mig-3g20gb-9-4"
    assert dev.kind == "mig-static"
    assert dev.attributes["uuid"] == live.mig_uuid
    assert dev.attributes["type"] == "mig"
    assert {k: v for k, v in dev.capacity.items() if k.startswith("memorySlice")} == {
        f"memorySlice{i}": 1 for i in range(4, 8)
    }
    assert dev.capacity["multiprocessors"] == 42
    assert dev.mig_live == live
    assert dev.consumes_counters == ()


def test_mig_off_gpu_has_no_static_devices(tmp_path):
    node = make_node(tmp_path, "a100-40gb-x8")
    gpu = node.nvml.gpu(0)
    assert discover_static(node.backend, gpu.minor, gpu.uuid, PARENT_ATTRS) == ()
    # dynamic publication still lists every placement (the Hopper path uses it with MIG off)
    assert len(discover_dynamic(node.backend, gpu.minor, gpu.uuid, PARENT_ATTRS).devices) == 25
