"""ResourceSlices: building, validation, pool-generation plans, the publisher over an in-memory API.

Also the kube facade's API-version handling, over a scripted ApiClient.
"""

from __future__ import annotations

import copy
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from driver.errors import ApiConflictError, ApiError, ApiNotFoundError, SliceValidationError
from driver.inventory import AllocatableDevice, CounterConsumption, CounterSet, Inventory, Version
from driver.kube import Kube, ResourceNotServedError, slice_from_version, slice_to_version
from driver.resourceslices import (
    EmptyInventoryError,
    SlicePublisher,
    build_slices,
    comparable_spec,
    dropped_fields,
    encode_attribute,
    generate_name,
    natural_key,
    parse_quantity,
    plan_sync,
    slice_index,
    validate_pool,
    validate_slice,
)

DRIVER = "gpu.nvidia.com"
NODE = "node-1"
NODE_UID = "4b5a3c1e-0000-4000-8000-000000000001"
A100_MEMORY = 42949672960


# -- inventories ---------------------------------------------------------------------------------


def gpu(minor: int, bus: int | None = None, memory: int = A100_MEMORY) -> AllocatableDevice:
    bus = minor if bus is None else bus
    return AllocatableDevice(
        name=f"gpu-{minor}",
        kind="gpu",
        gpu_uuid=f"GPU-{minor:08d}-0000-0000-0000-000000000000",
        gpu_minor=minor,
        attributes={
            "type": "gpu",
            "uuid": f"GPU-{minor:08d}-0000-0000-0000-000000000000",
            "productName": "NVIDIA A100-SXM4-40GB",
            "brand": "Nvidia",
            "architecture": "Ampere",
            "cudaComputeCapability": Version("8.0.0"),
            "driverVersion": Version("570.133.20"),
            "cudaDriverVersion": Version("12.8.0"),
            "resource.kubernetes.io/pciBusID": f"0000:{bus:02x}:00.0",
            "resource.kubernetes.io/pcieRoot": "pci0000:00",
            "addressingMode": "None",
        },
        capacity={"memory": memory},
    )


def a100_inventory(count: int = 8) -> Inventory:
    return Inventory(devices=tuple(gpu(i) for i in range(count)))


_PROFILES = (  # (profile, gi id, size, placements, multiprocessors, memory MiB)
    ("1g.5gb", 19, 1, range(7), 14, 4864),
    ("2g.10gb", 14, 2, (0, 2, 4), 28, 9856),
    ("3g.20gb", 9, 4, (0, 4), 42, 19968),
    ("7g.40gb", 0, 8, (0,), 98, 40192),
)


def mig_gpu(minor: int, bus: int) -> tuple[list[AllocatableDevice], CounterSet]:
    """One A100-40GB published the dynamic-MIG way: counter set, full GPU and every placement."""
    set_name = f"gpu-{minor}-counter-set"
    counters = {"multiprocessors": 98, "memory": A100_MEMORY} | {f"memory-slice-{i}": 1 for i in range(8)}
    full = gpu(minor, bus)
    devices = [
        AllocatableDevice(
            name=full.name,
            kind="gpu",
            gpu_uuid=full.gpu_uuid,
            gpu_minor=minor,
            attributes=full.attributes,
            capacity=full.capacity,
            consumes_counters=(CounterConsumption(set_name, counters),),
        )
    ]
    for profile, gi, size, starts, sms, mib in _PROFILES:
        for start in starts:
            used = {"multiprocessors": sms, "memory": mib * 2**20} | {
                f"memory-slice-{i}": 1 for i in range(start, start + size)
            }
            devices.append(
                AllocatableDevice(
                    name=f"gpu-{minor}-mig-{profile.replace('.', '')}-{gi}-{start}",
                    kind="mig-dynamic",
                    gpu_uuid=full.gpu_uuid,
                    gpu_minor=minor,
                    attributes={
                        "type": "mig",
                        "profile": profile,
                        "parentUUID": full.gpu_uuid,
                        "resource.kubernetes.io/pciBusID": f"0000:{bus:02x}:00.0",
                    },
                    capacity={"multiprocessors": sms, "memory": mib * 2**20},
                    consumes_counters=(CounterConsumption(set_name, used),),
                )
            )
    return devices, CounterSet(set_name, counters)


def mig_inventory(buses: dict[int, int]) -> Inventory:
    devices: list[AllocatableDevice] = []
    sets: list[CounterSet] = []
    for minor, bus in buses.items():
        gpu_devices, counter_set = mig_gpu(minor, bus)
        devices += gpu_devices
        sets.append(counter_set)
    return Inventory(devices=tuple(devices), counter_sets=tuple(sets))


def device_names(resource_slice: dict[str, Any]) -> list[str]:
    return [d["name"] for d in resource_slice["spec"].get("devices", [])]


# -- names and encoding --------------------------------------------------------------------------


def test_natural_key_orders_numbers_by_value():
    names = ["gpu-10", "gpu-2", "gpu-1", "gpu-1-mig-1g5gb-19-3", "gpu-1-mig-1g5gb-19-10"]
    assert sorted(names, key=natural_key) == [
        "gpu-1",
        "gpu-1-mig-1g5gb-19-3",
        "gpu-1-mig-1g5gb-19-10",
        "gpu-2",
        "gpu-10",
    ]


def test_generate_name_pads_index_and_is_cut_like_the_api_server():
    assert generate_name(0, 1, DRIVER, NODE) == "00000-gpu.nvidia.com-node-1-"
    assert generate_name(17, 18, DRIVER, NODE) == "00011-gpu.nvidia.com-node-1-"
    assert generate_name(0, 0x100001, DRIVER, NODE).startswith("000000-")
    long_node = "n" * 100
    name = generate_name(3, 4, DRIVER, long_node)
    assert len(name) == 58
    assert name.startswith("00003-gpu.nvidia.com-nnn")
    assert slice_index(name + "abcde") == 3
    assert slice_index("no-index-here") is None


def test_attribute_encoding_keeps_each_type():
    assert encode_attribute(True) == {"bool": True}
    assert encode_attribute(3) == {"int": 3}
    assert encode_attribute("Ampere") == {"string": "Ampere"}
    assert encode_attribute(Version("8.0.0")) == {"version": "8.0.0"}


def test_parse_quantity_reads_suffixes_and_exponents():
    assert parse_quantity("42949672960") == A100_MEMORY
    assert parse_quantity("40Gi") == A100_MEMORY
    assert parse_quantity("1k") == 1000
    assert parse_quantity("1e3") == 1000
    assert parse_quantity("500m") * 2 == 1
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("12 GB")


# -- build_slices --------------------------------------------------------------------------------


def test_full_gpus_make_one_slice_with_every_device():
    slices = build_slices(a100_inventory(8), NODE, DRIVER, NODE_UID, 36)
    assert len(slices) == 1
    (s,) = slices
    assert s["apiVersion"] == "resource.k8s.io/v1"
    assert s["kind"] == "ResourceSlice"
    assert s["metadata"]["generateName"] == "00000-gpu.nvidia.com-node-1-"
    assert s["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": NODE_UID, "controller": True}
    ]
    assert s["spec"]["driver"] == DRIVER
    assert s["spec"]["nodeName"] == NODE
    assert s["spec"]["pool"] == {"name": NODE, "generation": 0, "resourceSliceCount": 1}
    assert "sharedCounters" not in s["spec"]
    assert device_names(s) == [f"gpu-{i}" for i in range(8)]
    device = s["spec"]["devices"][0]
    assert device["capacity"] == {"memory": {"value": "40Gi"}}  # canonical, as NVIDIA publishes it
    assert device["attributes"]["productName"] == {"string": "NVIDIA A100-SXM4-40GB"}
    assert device["attributes"]["driverVersion"] == {"version": "570.133.20"}
    assert device["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": "0000:00:00.0"}
    validate_pool(slices)


def test_devices_are_in_natural_name_order():
    inventory = Inventory(devices=tuple(gpu(i) for i in (10, 2, 0, 1)))
    (s,) = build_slices(inventory, NODE, DRIVER, NODE_UID, 36)
    assert device_names(s) == ["gpu-0", "gpu-1", "gpu-2", "gpu-10"]


def test_more_than_128_devices_split_into_several_slices():
    inventory = Inventory(devices=tuple(gpu(i, bus=i % 256) for i in range(200)))
    slices = build_slices(inventory, NODE, DRIVER, NODE_UID, 36, pool_generation=4)
    assert [len(device_names(s)) for s in slices] == [128, 72]
    assert [s["metadata"]["generateName"][:6] for s in slices] == ["00000-", "00001-"]
    assert all(s["spec"]["pool"] == {"name": NODE, "generation": 4, "resourceSliceCount": 2} for s in slices)
    validate_pool(slices)


def test_no_node_uid_leaves_owner_reference_out():
    (s,) = build_slices(a100_inventory(1), NODE, DRIVER, "", 36)
    assert "ownerReferences" not in s["metadata"]


def test_mig_on_1_35_plus_is_a_counters_slice_then_one_devices_slice_per_gpu_in_pci_order():
    inventory = mig_inventory({0: 0x81, 1: 0x07})  # gpu-1 sits on the lower PCI bus
    slices = build_slices(inventory, NODE, DRIVER, NODE_UID, 36)
    assert len(slices) == 3
    counters, first, second = slices
    assert "devices" not in counters["spec"]
    assert [c["name"] for c in counters["spec"]["sharedCounters"]] == [
        "gpu-0-counter-set",
        "gpu-1-counter-set",
    ]
    assert counters["spec"]["sharedCounters"][0]["counters"]["memory-slice-0"] == {"value": "1"}
    assert "sharedCounters" not in first["spec"]
    assert device_names(first)[0] == "gpu-1"
    assert all(n.startswith("gpu-1") for n in device_names(first))
    assert all(n.startswith("gpu-0") for n in device_names(second))
    mig = next(d for d in first["spec"]["devices"] if d["name"] == "gpu-1-mig-2g10gb-14-2")
    assert mig["consumesCounters"] == [
        {
            "counterSet": "gpu-1-counter-set",
            "counters": {
                "memory": {"value": "9856Mi"},
                "memory-slice-2": {"value": "1"},
                "memory-slice-3": {"value": "1"},
                "multiprocessors": {"value": "28"},
            },
        }
    ]
    validate_pool(slices, 36)


def test_mig_before_1_35_is_one_combined_slice_per_gpu():
    inventory = mig_inventory({0: 0x81, 1: 0x07})
    slices = build_slices(inventory, NODE, DRIVER, NODE_UID, 34)
    assert len(slices) == 2
    assert [c["name"] for c in slices[0]["spec"]["sharedCounters"]] == ["gpu-1-counter-set"]
    assert all(n.startswith("gpu-1") for n in device_names(slices[0]))
    assert [c["name"] for c in slices[1]["spec"]["sharedCounters"]] == ["gpu-0-counter-set"]
    validate_pool(slices, 34)
    with pytest.raises(SliceValidationError, match=r"only one of spec\.devices and spec\.sharedCounters"):
        validate_pool(slices, 36)


def test_more_than_8_counter_sets_take_several_counter_slices():
    inventory = mig_inventory({i: i for i in range(10)})
    slices = build_slices(inventory, NODE, DRIVER, NODE_UID, 36)
    assert [len(s["spec"].get("sharedCounters", [])) for s in slices[:2]] == [8, 2]
    assert len(slices) == 12
    validate_pool(slices, 36)


def test_a_gpu_with_more_than_64_counter_consuming_devices_is_split_at_64():
    devices, counter_set = mig_gpu(0, 0)
    extra = [
        AllocatableDevice(
            name=f"gpu-0-extra-{i}",
            kind="mig-dynamic",
            gpu_uuid=devices[0].gpu_uuid,
            gpu_minor=0,
            attributes={"type": "mig"},
            capacity={},
            consumes_counters=(CounterConsumption(counter_set.name, {"multiprocessors": 1}),),
        )
        for i in range(60)
    ]
    inventory = Inventory(devices=tuple(devices + extra), counter_sets=(counter_set,))
    slices = build_slices(inventory, NODE, DRIVER, NODE_UID, 36)
    assert [len(device_names(s)) for s in slices[1:]] == [64, len(devices) + 60 - 64]
    validate_pool(slices, 36)
    combined = build_slices(inventory, NODE, DRIVER, NODE_UID, 34)
    with pytest.raises(SliceValidationError, match="more than the 64 allowed"):
        validate_pool(combined, 34)


# -- validate_slice: one failing case per rule ---------------------------------------------------


def valid_slice() -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": "00000-gpu.nvidia.com-node-1-abcde"},
        "spec": {
            "driver": DRIVER,
            "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
            "nodeName": NODE,
            "devices": [
                {
                    "name": "gpu-0",
                    "attributes": {"type": {"string": "gpu"}, "driverVersion": {"version": "570.133.20"}},
                    "capacity": {"memory": {"value": "40Gi"}},
                }
            ],
        },
    }


def counters_slice(sets: int = 1, counters: int = 1) -> dict[str, Any]:
    s = valid_slice()
    del s["spec"]["devices"]
    s["spec"]["sharedCounters"] = [
        {"name": f"gpu-{i}-counter-set", "counters": {f"c{j}": {"value": "1"} for j in range(counters)}}
        for i in range(sets)
    ]
    return s


def dev(s: dict[str, Any]) -> dict[str, Any]:
    device: dict[str, Any] = s["spec"]["devices"][0]
    return device


def many_devices(n: int, consumes: bool) -> Callable[[dict[str, Any]], None]:
    def mutate(s: dict[str, Any]) -> None:
        s["spec"]["devices"] = [
            {"name": f"gpu-{i}"}
            | (
                {"consumesCounters": [{"counterSet": "a", "counters": {"x": {"value": "1"}}}]}
                if consumes
                else {}
            )
            for i in range(n)
        ]

    return mutate


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(s: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = s
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value

    return mutate


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(s: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = s
        for part in parents:
            target = target[part]
        del target[last]

    return mutate


RULES: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    (
        "name not a subdomain",
        _set("metadata.name", "Bad_Name"),
        "metadata.name 'Bad_Name' must be a DNS-1123 subdomain",
    ),
    ("no name", _set("metadata", {}), "metadata.name or metadata.generateName is required"),
    ("generateName bad", _set("metadata", {"generateName": "UPPER-"}), "metadata.generateName"),
    ("driver missing", _del("spec.driver"), "spec.driver is required"),
    ("driver too long", _set("spec.driver", "a" * 64), "<= 63 chars"),
    ("driver not a subdomain", _set("spec.driver", "gpu_nvidia.com"), "spec.driver 'gpu_nvidia.com'"),
    ("pool missing", _del("spec.pool"), "spec.pool is required"),
    ("pool name missing", _set("spec.pool.name", ""), "spec.pool.name is required"),
    ("pool name too long", _set("spec.pool.name", "a" * 254), "longer than 253"),
    ("pool name segment", _set("spec.pool.name", "a//b"), "spec.pool.name segment"),
    ("negative generation", _set("spec.pool.generation", -1), "spec.pool.generation must be an integer >= 0"),
    (
        "zero slice count",
        _set("spec.pool.resourceSliceCount", 0),
        "resourceSliceCount must be an integer > 0",
    ),
    ("no node selection", _del("spec.nodeName"), "exactly one of nodeName, nodeSelector, allNodes"),
    ("two node selections", _set("spec.allNodes", True), "found ['nodeName', 'allNodes']"),
    ("node name empty", _set("spec.nodeName", ""), "spec.nodeName is required"),
    (
        "allNodes false",
        lambda s: (s["spec"].pop("nodeName"), s["spec"].update(allNodes=False)),
        "spec.allNodes may only be true",
    ),
    (
        "node selector two terms",
        lambda s: (s["spec"].pop("nodeName"), s["spec"].update(nodeSelector={"nodeSelectorTerms": [{}, {}]})),
        "exactly one nodeSelectorTerms",
    ),
    (
        "device name not a label",
        _set("spec.devices.0.name", "gpu.0"),
        "device name 'gpu.0' must be a DNS-1123 label",
    ),
    ("device name missing", _set("spec.devices.0.name", ""), "device name is required"),
    (
        "duplicate device",
        lambda s: s["spec"]["devices"].append(copy.deepcopy(dev(s))),
        "device name 'gpu-0' appears twice",
    ),
    (
        "identifier > 32",
        lambda s: dev(s)["attributes"].update({"a" * 33: {"int": 1}}),
        "identifier longer than 32",
    ),
    (
        "identifier not C",
        lambda s: dev(s)["attributes"].update({"9lives": {"int": 1}}),
        "must be a C identifier",
    ),
    (
        "bad domain",
        lambda s: dev(s)["attributes"].update({"Bad_Domain/x": {"int": 1}}),
        "domain 'Bad_Domain' must be a DNS subdomain",
    ),
    (
        "domain too long",
        lambda s: dev(s)["attributes"].update({"a" * 64 + "/x": {"int": 1}}),
        "must be a DNS subdomain of <= 63",
    ),
    ("two slashes", lambda s: dev(s)["attributes"].update({"a/b/c": {"int": 1}}), "more than one '/'"),
    ("empty identifier", lambda s: dev(s)["attributes"].update({"a.com/": {"int": 1}}), "empty identifier"),
    ("empty domain", lambda s: dev(s)["attributes"].update({"/x": {"int": 1}}), "empty domain"),
    (
        "string > 64 bytes",
        lambda s: dev(s)["attributes"].update({"x": {"string": "é" * 33}}),
        "66 bytes, more than the 64 allowed",
    ),
    ("bad version", lambda s: dev(s)["attributes"].update({"v": {"version": "1.2"}}), "semantic version"),
    (
        "two value types",
        lambda s: dev(s)["attributes"].update({"x": {"int": 1, "string": "a"}}),
        "exactly one of",
    ),
    ("no value type", lambda s: dev(s)["attributes"].update({"x": {}}), "exactly one of"),
    ("int not int", lambda s: dev(s)["attributes"].update({"x": {"int": "1"}}), "must be an int64"),
    ("bool not bool", lambda s: dev(s)["attributes"].update({"x": {"bool": 1}}), "must be a bool"),
    ("empty list", lambda s: dev(s)["attributes"].update({"x": {"strings": []}}), "non-empty list"),
    (
        "attributes + capacity > 32",
        lambda s: dev(s)["attributes"].update({f"a{i}": {"int": i} for i in range(31)}),
        "more than the 32 allowed per device",
    ),
    (
        "attribute values > 48",
        lambda s: dev(s)["attributes"].update({"many": {"ints": list(range(47))}}),
        "attribute values, more than the 48 allowed",
    ),
    (
        "bad quantity",
        _set("spec.devices.0.capacity.memory", {"value": "40 GiB"}),
        "not a Kubernetes quantity",
    ),
    ("capacity without value", _set("spec.devices.0.capacity.memory", {}), "needs a 'value'"),
    ("capacity bad name", lambda s: dev(s)["capacity"].update({"mem-ory": {"value": "1"}}), "capacity name"),
    (
        "requestPolicy without multi-allocation",
        _set("spec.devices.0.capacity.memory", {"value": "1", "requestPolicy": {"default": "1"}}),
        "allowed only with allowMultipleAllocations",
    ),
    (
        "consumesCounters > 2",
        _set(
            "spec.devices.0.consumesCounters",
            [{"counterSet": f"s{i}", "counters": {"x": {"value": "1"}}} for i in range(3)],
        ),
        "consumesCounters has 3 entries, more than the 2 allowed",
    ),
    (
        "consumesCounters twice the same set",
        _set(
            "spec.devices.0.consumesCounters",
            [{"counterSet": "s", "counters": {"x": {"value": "1"}}}] * 2,
        ),
        "names counter set 's' twice",
    ),
    (
        "consumesCounters no counters",
        _set("spec.devices.0.consumesCounters", [{"counterSet": "s", "counters": {}}]),
        "must have at least 1 counter",
    ),
    (
        "consumesCounters > 32 counters",
        _set(
            "spec.devices.0.consumesCounters",
            [{"counterSet": "s", "counters": {f"c{i}": {"value": "1"} for i in range(33)}}],
        ),
        "33 counters, more than the 32 allowed",
    ),
    (
        "consumed counter set name",
        _set("spec.devices.0.consumesCounters", [{"counterSet": "S", "counters": {"x": {"value": "1"}}}]),
        "consumesCounters counterSet 'S'",
    ),
    ("129 devices", many_devices(129, consumes=False), "129 devices, more than the 128 allowed"),
    ("65 counter consumers", many_devices(65, consumes=True), "65 devices, more than the 64 allowed"),
    (
        "65 devices with list attributes",
        lambda s: s["spec"].update(
            devices=[{"name": f"d{i}", "attributes": {"l": {"ints": [1]}}} for i in range(65)]
        ),
        "more than the 64 allowed",
    ),
    (
        "65 tainted devices",
        lambda s: s["spec"].update(
            devices=[{"name": f"d{i}", "taints": [{"key": "k", "effect": "NoSchedule"}]} for i in range(65)]
        ),
        "more than the 64 allowed",
    ),
    (
        "taints > 16",
        _set("spec.devices.0.taints", [{"key": f"k{i}", "effect": "NoSchedule"} for i in range(17)]),
        "17 taints, more than the 16 allowed",
    ),
    ("taint effect", _set("spec.devices.0.taints", [{"key": "k", "effect": "Sometimes"}]), "taint effect"),
    ("per-device node name without flag", _set("spec.devices.0.nodeName", NODE), "no perDeviceNodeSelection"),
    (
        "per-device selection missing",
        lambda s: (s["spec"].pop("nodeName"), s["spec"].update(perDeviceNodeSelection=True)),
        "each device sets exactly one of nodeName/nodeSelector/allNodes",
    ),
    (
        "devices and counters",
        lambda s: s["spec"].update(sharedCounters=counters_slice()["spec"]["sharedCounters"]),
        "only one of spec.devices and spec.sharedCounters",
    ),
]

COUNTER_RULES: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    (
        "> 8 sets",
        lambda s: s["spec"].update(sharedCounters=counters_slice(9)["spec"]["sharedCounters"]),
        "9 sharedCounters sets, more than the 8 allowed",
    ),
    ("0 counters", _set("spec.sharedCounters.0.counters", {}), "must have at least 1 counter"),
    (
        "> 32 counters",
        lambda s: s["spec"].update(sharedCounters=counters_slice(1, 33)["spec"]["sharedCounters"]),
        "33 counters, more than the 32 allowed",
    ),
    (
        "set name",
        _set("spec.sharedCounters.0.name", "Set_0"),
        "sharedCounters name 'Set_0' must be a DNS-1123 label",
    ),
    (
        "counter name",
        _set("spec.sharedCounters.0.counters", {"Memory": {"value": "1"}}),
        "counter name 'Memory'",
    ),
    (
        "counter quantity",
        _set("spec.sharedCounters.0.counters", {"m": {"value": "lots"}}),
        "not a Kubernetes quantity",
    ),
    (
        "duplicate set",
        lambda s: s["spec"]["sharedCounters"].append(copy.deepcopy(s["spec"]["sharedCounters"][0])),
        "appears twice",
    ),
]


def test_the_base_slices_are_valid():
    validate_slice(valid_slice())
    validate_slice(counters_slice(8, 32))
    validate_slice(counters_slice() | {"spec": {**counters_slice()["spec"], "sharedCounters": []}})


@pytest.mark.parametrize(("mutate", "message"), [(m, msg) for _, m, msg in RULES], ids=[r[0] for r in RULES])
def test_validate_slice_names_each_broken_device_rule(mutate, message):
    s = valid_slice()
    mutate(s)
    with pytest.raises(SliceValidationError) as caught:
        validate_slice(s)
    assert message in str(caught.value)
    assert "API server would reject it" in str(caught.value)


@pytest.mark.parametrize(
    ("mutate", "message"), [(m, msg) for _, m, msg in COUNTER_RULES], ids=[r[0] for r in COUNTER_RULES]
)
def test_validate_slice_names_each_broken_counter_rule(mutate, message):
    s = counters_slice()
    mutate(s)
    with pytest.raises(SliceValidationError, match="API server would reject") as caught:
        validate_slice(s)
    assert message in str(caught.value)


def test_driver_name_case_is_ignored_as_the_server_ignores_it():
    s = valid_slice()
    s["spec"]["driver"] = "GPU.nvidia.com"
    validate_slice(s)


def test_devices_and_counters_together_are_fine_before_1_35():
    s = valid_slice()
    s["spec"]["sharedCounters"] = counters_slice()["spec"]["sharedCounters"]
    validate_slice(s, server_minor=34)


def test_error_names_the_device():
    s = valid_slice()
    dev(s)["attributes"]["x"] = {"string": "y" * 65}
    with pytest.raises(SliceValidationError, match="device 'gpu-0'"):
        validate_slice(s)


# -- validate_pool -------------------------------------------------------------------------------


def two_slice_pool() -> list[dict[str, Any]]:
    return build_slices(mig_inventory({0: 0, 1: 1}), NODE, DRIVER, NODE_UID, 36)


def test_pool_rejects_a_device_name_in_two_slices():
    slices = two_slice_pool()
    slices[2]["spec"]["devices"][0]["name"] = "gpu-0"
    with pytest.raises(SliceValidationError, match="device name 'gpu-0' is also in another slice"):
        validate_pool(slices)


def test_pool_rejects_a_counter_set_in_two_slices():
    slices = two_slice_pool()
    slices.append(copy.deepcopy(slices[0]))
    for s in slices:
        s["spec"]["pool"]["resourceSliceCount"] = len(slices)
    with pytest.raises(
        SliceValidationError, match="counter set 'gpu-0-counter-set' is also in another slice"
    ):
        validate_pool(slices)


def test_pool_rejects_a_dangling_counter_set_reference():
    slices = two_slice_pool()
    slices[1]["spec"]["devices"][0]["consumesCounters"][0]["counterSet"] = "gpu-9-counter-set"
    with pytest.raises(SliceValidationError, match="'gpu-9-counter-set' which no slice of the pool defines"):
        validate_pool(slices)


def test_pool_rejects_an_undefined_counter():
    slices = two_slice_pool()
    slices[1]["spec"]["devices"][0]["consumesCounters"][0]["counters"]["bogus"] = {"value": "1"}
    with pytest.raises(SliceValidationError, match=r"consumes counters \['bogus'\]"):
        validate_pool(slices)


def test_pool_before_1_35_needs_counters_in_the_same_slice():
    slices = build_slices(mig_inventory({0: 0, 1: 1}), NODE, DRIVER, NODE_UID, 34)
    slices[0]["spec"]["sharedCounters"], slices[1]["spec"]["sharedCounters"] = (
        slices[1]["spec"]["sharedCounters"],
        slices[0]["spec"]["sharedCounters"],
    )
    with pytest.raises(SliceValidationError, match=r"before Kubernetes 1\.35 it must be in the same slice"):
        validate_pool(slices, 34)


def test_pool_rejects_a_wrong_slice_count_and_mixed_generations():
    slices = two_slice_pool()
    for s in slices:
        s["spec"]["pool"]["resourceSliceCount"] = 2
    with pytest.raises(SliceValidationError, match="resourceSliceCount is 2 but the pool has 3 slices"):
        validate_pool(slices)
    slices = two_slice_pool()
    slices[0]["spec"]["pool"]["generation"] = 7
    with pytest.raises(SliceValidationError, match="disagree on pool"):
        validate_pool(slices)


# -- comparison and dropped fields ---------------------------------------------------------------


def test_comparable_spec_ignores_quantity_spelling_pool_and_empty_fields():
    a = valid_slice()
    b = copy.deepcopy(a)
    dev(b)["capacity"]["memory"] = {"value": "42949672960"}
    b["spec"]["pool"]["generation"] = 9
    b["spec"]["allNodes"] = None
    dev(b)["taints"] = []
    assert comparable_spec(a) == comparable_spec(b)
    dev(b)["capacity"]["memory"] = {"value": "41Gi"}
    assert comparable_spec(a) != comparable_spec(b)


def test_dropped_fields_lists_what_the_server_did_not_keep():
    (counters, devices, _) = two_slice_pool()
    stored_devices = copy.deepcopy(devices)
    for d in stored_devices["spec"]["devices"]:
        del d["consumesCounters"]
    assert dropped_fields(devices, stored_devices) == ("spec.devices[].consumesCounters",)
    stored_counters = copy.deepcopy(counters)
    del stored_counters["spec"]["sharedCounters"]
    assert dropped_fields(counters, stored_counters) == ("spec.sharedCounters",)
    assert dropped_fields(devices, devices) == ()


# -- plan_sync: pool generation rules ------------------------------------------------------------

_names = itertools.count()


def stored_as(desired: dict[str, Any], generation: int, suffix: str | None = None) -> dict[str, Any]:
    """``desired`` as the server would hold it after a create at ``generation``."""
    out = copy.deepcopy(desired)
    meta = out["metadata"]
    meta["name"] = meta.pop("generateName") + (suffix or f"{next(_names):05d}")
    meta["uid"] = f"uid-{meta['name']}"
    meta["resourceVersion"] = str(next(_names))
    out["spec"]["pool"]["generation"] = generation
    return out


def desired_pool(n_gpus: int = 3) -> list[dict[str, Any]]:
    inventory = Inventory(devices=tuple(gpu(i) for i in range(n_gpus * 128)))
    return build_slices(inventory, NODE, DRIVER, NODE_UID, 36)


def test_plan_creates_everything_at_generation_1_on_an_empty_pool():
    desired = desired_pool()
    plan = plan_sync([], desired, NODE)
    assert plan.generation == 1
    assert (len(plan.creates), plan.updates, plan.deletes) == (3, (), ())
    assert all(s["spec"]["pool"]["generation"] == 1 for s in plan.creates)


def test_plan_is_empty_when_the_pool_is_as_desired():
    desired = desired_pool()
    stored = [stored_as(s, 5) for s in desired]
    plan = plan_sync(stored, desired, NODE)
    assert (plan.writes, plan.generation) == (0, 5)


def test_plan_updates_one_changed_slice_without_a_generation_bump():
    desired = desired_pool()
    stored = [stored_as(s, 5) for s in desired]
    desired[1]["spec"]["devices"][0]["attributes"]["brand"] = {"string": "Tesla"}
    plan = plan_sync(stored, desired, NODE)
    assert plan.generation == 5
    assert [old["metadata"]["name"] for old, _ in plan.updates] == [stored[1]["metadata"]["name"]]
    assert plan.updates[0][1]["spec"]["pool"]["generation"] == 5
    assert (plan.creates, plan.deletes) == ((), ())


def test_plan_bumps_the_generation_and_rewrites_all_when_two_slices_change():
    desired = desired_pool()
    stored = [stored_as(s, 5) for s in desired]
    for s in desired[:2]:
        s["spec"]["devices"][0]["attributes"]["brand"] = {"string": "Tesla"}
    plan = plan_sync(stored, desired, NODE)
    assert plan.generation == 6
    assert len(plan.updates) == 3
    assert all(new["spec"]["pool"]["generation"] == 6 for _, new in plan.updates)


def test_plan_bumps_the_generation_when_a_slice_is_missing():
    desired = desired_pool()
    stored = [stored_as(s, 5) for s in desired[:2]]
    plan = plan_sync(stored, desired, NODE)
    assert plan.generation == 6
    assert len(plan.creates) == 1
    assert plan.creates[0]["metadata"]["generateName"].startswith("00002-")
    assert len(plan.updates) == 2


def test_plan_deletes_obsolete_slices():
    desired = desired_pool(2)
    good = [stored_as(s, 5) for s in desired]
    older = stored_as(desired[0], 4)
    beyond = stored_as(
        build_slices(Inventory(devices=tuple(gpu(i) for i in range(3 * 128))), NODE, DRIVER, NODE_UID, 36)[2],
        5,
    )
    unparsable = copy.deepcopy(good[0])
    unparsable["metadata"]["name"] = "handmade-slice"
    duplicate = stored_as(desired[1], 5, suffix="zzzzz")
    duplicate["spec"]["devices"][0]["attributes"]["brand"] = {"string": "changed"}
    other_pool = stored_as(desired[0], 5)
    other_pool["spec"]["pool"]["name"] = "someone-else"
    plan = plan_sync([*good, older, beyond, unparsable, duplicate, other_pool], desired, NODE)
    assert {s["metadata"]["name"] for s in plan.deletes} == {
        s["metadata"]["name"] for s in (older, beyond, unparsable, duplicate, other_pool)
    }
    assert plan.creates == ()
    assert plan.updates == ()  # the kept duplicate is the one equal to the desired slice
    assert plan.generation == 5


def test_plan_uses_a_higher_driver_generation():
    desired = desired_pool()
    stored = [stored_as(s, 5) for s in desired]
    plan = plan_sync(stored, desired, NODE, driver_generation=9)
    assert plan.generation == 9
    assert len(plan.updates) == 3


# -- publisher over an in-memory API -------------------------------------------------------------


class FakeWatch:
    def __init__(self) -> None:
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            event = self.events.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        self.events.put(None)


class FakeKube:
    """What the publisher needs of an API server, in memory, counting writes.

    ``drop`` lists spec fields this "server" throws away (a disabled feature gate); ``canonical``
    rewrites quantities the way the real server may (``1000`` -> ``1k``).
    """

    def __init__(self, minor: int = 36, drop: tuple[str, ...] = (), canonical: bool = True) -> None:
        self.minor = minor
        self.drop = drop
        self.canonical = canonical
        self.slices: dict[str, dict[str, Any]] = {}
        self.writes = 0
        self.dry_runs = 0
        self.calls: list[str] = []
        self.failures: dict[str, list[Exception]] = {}
        self.node_exists = True
        self.node_uid = NODE_UID
        self._rv = itertools.count(100)
        self._lock = threading.Lock()
        self._watches: list[FakeWatch] = []

    # helpers for tests
    def fail(self, method: str, *errors: Exception) -> None:
        self.failures.setdefault(method, []).extend(errors)

    def _maybe_fail(self, method: str) -> None:
        self.calls.append(method)
        pending = self.failures.get(method)
        if pending:
            raise pending.pop(0)

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        for watch in self._watches:
            watch.events.put({"type": kind, "object": copy.deepcopy(obj)})

    def delete_behind_our_back(self) -> None:
        """What the kubelet does at its start: wipe this node's slices."""
        with self._lock:
            gone = list(self.slices.values())
            self.slices.clear()
        for obj in gone:
            self._emit("DELETED", obj)

    def touch_behind_our_back(self) -> None:
        """Someone adds a label: a MODIFIED event that changes nothing we publish."""
        with self._lock:
            obj = next(iter(self.slices.values()))
            obj["metadata"].setdefault("labels", {})["touched"] = "yes"
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
            snapshot = copy.deepcopy(obj)
        self._emit("MODIFIED", snapshot)

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        for field in self.drop:
            obj["spec"].pop(field, None)
            for device in obj["spec"].get("devices", []):
                device.pop(field, None)
        if self.canonical:
            for device in obj["spec"].get("devices", []):
                for holder in device.get("capacity", {}).values():
                    if holder["value"] == "1000":
                        holder["value"] = "1k"
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return obj

    # the SliceApi surface
    def server_version(self) -> tuple[int, int]:
        self._maybe_fail("server_version")
        return 1, self.minor

    def get_node(self, name: str) -> dict[str, Any]:
        self._maybe_fail("get_node")
        if not self.node_exists:
            raise ApiNotFoundError(f'nodes "{name}" not found', status=404, reason="NotFound")
        return {"metadata": {"name": name, "uid": self.node_uid}}

    def list_slices_at(self, driver: str, node: str) -> tuple[list[dict[str, Any]], str]:
        self._maybe_fail("list")
        with self._lock:
            items = [
                copy.deepcopy(s)
                for s in self.slices.values()
                if s["spec"]["driver"] == driver and s["spec"].get("nodeName") == node
            ]
            return items, str(next(self._rv))

    def create_slice(self, resource_slice: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        self._maybe_fail("create")
        if dry_run:
            with self._lock:
                self.dry_runs += 1
                obj = copy.deepcopy(resource_slice)
                obj["metadata"]["name"] = obj["metadata"].pop("generateName") + "dryrn"
                return self._store(obj)
        with self._lock:
            self.writes += 1
            obj = copy.deepcopy(resource_slice)
            meta = obj["metadata"]
            meta["name"] = meta.pop("generateName") + f"{next(self._rv):05d}"[-5:]
            meta["uid"] = f"uid-{meta['name']}"
            self._store(obj)
            self.slices[meta["name"]] = obj
            snapshot = copy.deepcopy(obj)
        self._emit("ADDED", snapshot)
        return snapshot

    def update_slice(self, resource_slice: dict[str, Any]) -> dict[str, Any]:
        self._maybe_fail("update")
        with self._lock:
            self.writes += 1
            name = resource_slice["metadata"]["name"]
            current = self.slices.get(name)
            if current is None:
                raise ApiNotFoundError(f"{name} not found", status=404, reason="NotFound")
            if current["metadata"]["resourceVersion"] != resource_slice["metadata"]["resourceVersion"]:
                raise ApiConflictError(f"{name} changed", status=409, reason="Conflict")
            obj = self._store(copy.deepcopy(resource_slice))
            self.slices[name] = obj
            snapshot = copy.deepcopy(obj)
        self._emit("MODIFIED", snapshot)
        return snapshot

    def delete_slice(self, name: str, uid: str, resource_version: str) -> None:
        self._maybe_fail("delete")
        with self._lock:
            self.writes += 1
            current = self.slices.get(name)
            if current is None:
                raise ApiNotFoundError(f"{name} not found", status=404, reason="NotFound")
            if (
                current["metadata"]["uid"] != uid
                or current["metadata"]["resourceVersion"] != resource_version
            ):
                raise ApiConflictError(f"{name} precondition failed", status=409, reason="Conflict")
            del self.slices[name]
        self._emit("DELETED", current)

    def watch_slices(
        self, driver: str, node: str, resource_version: str = "", timeout_s: int = 300
    ) -> FakeWatch:
        self._maybe_fail("watch")
        watch = FakeWatch()
        self._watches.append(watch)
        return watch


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``condition``; the timeout only bounds a broken run, nothing asserts on elapsed time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


@pytest.fixture
def publisher_for() -> Iterator[Callable[..., SlicePublisher]]:
    made: list[SlicePublisher] = []

    def make(kube: FakeKube, **kwargs: Any) -> SlicePublisher:
        kwargs.setdefault("resync_delay_s", 0.01)
        kwargs.setdefault("backoff_initial_s", 0.01)
        publisher = SlicePublisher(kube, NODE, DRIVER, **kwargs)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.stop()


def stored_devices(kube: FakeKube) -> list[str]:
    return sorted(
        (d["name"] for s in kube.slices.values() for d in s["spec"].get("devices", [])), key=natural_key
    )


def test_publisher_creates_the_pool_once_and_then_stays_quiet(publisher_for):
    kube = FakeKube()
    publisher = publisher_for(kube)
    publisher.start(a100_inventory(8))
    assert publisher.wait_synced(10)
    assert stored_devices(kube) == [f"gpu-{i}" for i in range(8)]
    (stored,) = kube.slices.values()
    assert stored["spec"]["pool"]["generation"] == 1
    assert stored["metadata"]["ownerReferences"][0]["uid"] == NODE_UID
    writes = kube.writes
    assert writes == 1
    publisher.update(a100_inventory(8))  # equal inventory: nothing to do
    lists = kube.calls.count("list")
    kube.touch_behind_our_back()  # a change that does not touch what we publish
    assert wait_for(lambda: kube.calls.count("list") > lists)
    assert publisher.wait_synced(10)
    assert kube.writes == writes
    assert publisher.api_writes == writes


def test_publisher_republishes_after_the_kubelet_wipes_our_slices(publisher_for):
    kube = FakeKube()
    publisher = publisher_for(kube)
    publisher.start(a100_inventory(8))
    assert publisher.wait_synced(10)
    kube.delete_behind_our_back()
    assert kube.slices == {}
    assert wait_for(lambda: len(stored_devices(kube)) == 8)
    assert publisher.wait_synced(10)
    # Repaired through the running watch, not by re-establishing a broken one.
    assert kube.calls.count("watch") == 1


def test_publisher_updates_only_on_change_and_deletes_surplus_slices(publisher_for):
    kube = FakeKube()
    publisher = publisher_for(kube)
    publisher.start(Inventory(devices=tuple(gpu(i, bus=i % 256) for i in range(200))))
    assert publisher.wait_synced(10)
    assert len(kube.slices) == 2
    publisher.update(a100_inventory(4))
    assert wait_for(lambda: len(kube.slices) == 1)
    assert publisher.wait_synced(10)
    (stored,) = kube.slices.values()
    assert stored_devices(kube) == [f"gpu-{i}" for i in range(4)]
    assert stored["spec"]["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 1}


def test_publisher_retries_failures_with_backoff(publisher_for):
    kube = FakeKube()
    kube.fail("list", ApiError("boom", status=500), ApiError("boom again", status=503))
    kube.fail("create", ApiError("etcd timeout", status=500))
    publisher = publisher_for(kube)
    publisher.start(a100_inventory(2))
    assert wait_for(lambda: len(stored_devices(kube)) == 2)
    assert publisher.wait_synced(10)
    assert publisher.last_error is None


def test_publisher_waits_for_the_node_to_exist(publisher_for):
    kube = FakeKube()
    kube.node_exists = False
    publisher = publisher_for(kube)
    publisher.start(a100_inventory(1))
    assert wait_for(lambda: publisher.last_error is not None)
    assert "check --node-name" in str(publisher.last_error)
    assert kube.slices == {}
    kube.node_exists = True
    assert wait_for(lambda: len(kube.slices) == 1)


def test_publisher_follows_a_recreated_node(publisher_for):
    kube = FakeKube()
    publisher = publisher_for(kube)
    publisher.start(a100_inventory(1))
    assert publisher.wait_synced(10)
    kube.node_uid = "new-node-uid"
    kube.touch_behind_our_back()
    assert wait_for(
        lambda: next(iter(kube.slices.values()))["metadata"]["ownerReferences"][0]["uid"] == "new-node-uid"
    )


def test_publisher_refuses_an_empty_or_invalid_inventory(publisher_for):
    publisher = publisher_for(FakeKube())
    with pytest.raises(EmptyInventoryError, match="retry discovery"):
        publisher.start(Inventory())
    bad = AllocatableDevice(
        name="GPU_0", kind="gpu", gpu_uuid="GPU-x", gpu_minor=0, attributes={}, capacity={}
    )
    with pytest.raises(SliceValidationError, match="device name 'GPU_0'"):
        publisher.start(Inventory(devices=(bad,)))


def test_publisher_lays_out_mig_for_the_server_version(publisher_for):
    kube = FakeKube(minor=34)
    publisher = publisher_for(kube)
    publisher.start(mig_inventory({0: 0, 1: 1}))
    assert publisher.wait_synced(10)
    assert len(kube.slices) == 2
    assert all("sharedCounters" in s["spec"] and "devices" in s["spec"] for s in kube.slices.values())


def test_publisher_probes_dropped_fields_before_publishing_counters(publisher_for):
    """A server that drops counters is found out by a dry run: nothing with counters is ever stored."""
    kube = FakeKube(minor=35, drop=("sharedCounters", "consumesCounters"))
    reported: list[tuple[str, ...]] = []
    publisher = publisher_for(kube, on_dropped_fields=reported.append)
    publisher.start(mig_inventory({0: 0, 1: 1}))
    assert publisher.wait_synced(10)
    assert reported == [("spec.devices[].consumesCounters", "spec.sharedCounters")]
    assert kube.dry_runs >= 1
    assert kube.writes == 0 and not kube.slices
    # The owner answers with an inventory the server can hold (static MIG, no counters).
    publisher.update(a100_inventory(2))
    assert publisher.wait_synced(10)
    assert len(kube.slices) == 1
    assert len(reported) == 1


def test_publisher_without_owner_adopts_dropped_fields_and_does_not_loop(publisher_for):
    """With nobody to switch layouts, what the server kept is adopted and never re-sent."""
    kube = FakeKube(minor=35, drop=("sharedCounters", "consumesCounters"))
    publisher = publisher_for(kube)
    publisher.start(mig_inventory({0: 0, 1: 1}))
    assert publisher.wait_synced(10)
    writes = kube.writes
    assert writes > 0
    lists = kube.calls.count("list")
    kube.touch_behind_our_back()
    assert wait_for(lambda: kube.calls.count("list") > lists)
    assert publisher.wait_synced(10)
    assert kube.writes == writes


def test_publisher_keeps_quiet_when_the_server_respells_quantities(publisher_for):
    kube = FakeKube(canonical=True)
    device = gpu(0, memory=1000)
    publisher = publisher_for(kube)
    publisher.start(Inventory(devices=(device,)))
    assert publisher.wait_synced(10)
    (stored,) = kube.slices.values()
    assert stored["spec"]["devices"][0]["capacity"]["memory"] == {"value": "1k"}
    lists = kube.calls.count("list")
    kube.touch_behind_our_back()
    assert wait_for(lambda: kube.calls.count("list") > lists)
    assert publisher.wait_synced(10)
    assert kube.writes == 1


def test_publisher_reconnects_a_broken_watch(publisher_for):
    kube = FakeKube()
    kube.fail("watch", ApiError("watch refused", status=500))
    publisher = publisher_for(kube)
    publisher.start(a100_inventory(1))
    assert publisher.wait_synced(10)
    assert wait_for(lambda: kube.calls.count("watch") >= 2)
    assert wait_for(lambda: len(kube._watches) == 1)
    kube.delete_behind_our_back()
    assert wait_for(lambda: len(kube.slices) == 1)


# -- the kube facade's version handling (over a scripted transport) -----------------------------


class ScriptedResponse:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.data = json.dumps(body).encode()


class ScriptedTransport:
    """Answers ``send`` from a table of (method, path) -> (status, body); records what was sent."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, dict[str, Any]]]) -> None:
        self.answers = answers
        self.paths: list[str] = []
        self.bodies: list[bytes | None] = []

    def send(
        self,
        method: str,
        path: str,
        *,
        query: Any,
        body: bytes | None,
        timeout: Any,
        stream: bool,
    ) -> ScriptedResponse:
        self.paths.append(path)
        self.bodies.append(body)
        status, answer = self.answers.get((method, path), (404, {"kind": "Status", "reason": "NotFound"}))
        return ScriptedResponse(status, answer)


def _group(*versions: str) -> tuple[int, dict[str, Any]]:
    return 200, {"kind": "APIGroup", "versions": [{"version": v} for v in versions]}


def test_claim_from_a_v1beta1_only_server_comes_back_v1_shaped():
    claim = {
        "apiVersion": "resource.k8s.io/v1beta1",
        "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "ns", "uid": "u-1"},
        "spec": {"devices": {"requests": [{"name": "gpu", "deviceClassName": "gpu.nvidia.com", "count": 1}]}},
        "status": {
            "allocation": {
                "devices": {
                    "results": [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0"}]
                }
            }
        },
    }
    api = ScriptedTransport(
        {
            ("GET", "/apis/resource.k8s.io"): _group("v1beta1"),
            ("GET", "/apis/resource.k8s.io/v1beta1/namespaces/ns/resourceclaims/c"): (200, claim),
        }
    )
    got = Kube(api).get_resource_claim("ns", "c")
    assert got["apiVersion"] == "resource.k8s.io/v1"
    assert got["spec"]["devices"]["requests"] == [
        {"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": 1}}
    ]
    assert got["status"] == claim["status"]
    assert got["metadata"]["uid"] == "u-1"


def test_a_missing_claim_is_not_found_and_a_version_gone_is_rediscovered():
    missing = (
        404,
        {"kind": "Status", "reason": "NotFound", "details": {"name": "c"}, "message": "not found"},
    )
    api = ScriptedTransport(
        {
            ("GET", "/apis/resource.k8s.io"): _group("v1", "v1beta2"),
            ("GET", "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c"): missing,
        }
    )
    kube = Kube(api)
    with pytest.raises(ApiNotFoundError) as caught:
        kube.get_resource_claim("ns", "c")
    assert not isinstance(caught.value, ResourceNotServedError)
    assert (caught.value.status, caught.value.reason) == (404, "NotFound")
    # The server stops serving v1 (a downgrade): the bare 404 makes the facade look again.
    api.answers[("GET", "/apis/resource.k8s.io")] = _group("v1beta2")
    api.answers[("GET", "/apis/resource.k8s.io/v1beta2/namespaces/ns/resourceclaims/d")] = (
        200,
        {"metadata": {"uid": "u-2"}},
    )
    assert kube.get_resource_claim("ns", "d")["metadata"]["uid"] == "u-2"
    assert api.paths[-1] == "/apis/resource.k8s.io/v1beta2/namespaces/ns/resourceclaims/d"


def test_api_errors_keep_status_and_reason():
    api = ScriptedTransport(
        {
            ("GET", "/apis/resource.k8s.io"): _group("v1"),
            ("POST", "/apis/resource.k8s.io/v1/resourceslices"): (
                409,
                {"reason": "AlreadyExists", "message": "x"},
            ),
            ("GET", "/api/v1/nodes/n"): (403, {"reason": "Forbidden", "message": "no"}),
        }
    )
    kube = Kube(api)
    with pytest.raises(ApiConflictError) as conflict:
        kube.create_slice(valid_slice())
    assert (conflict.value.status, conflict.value.reason) == (409, "AlreadyExists")
    with pytest.raises(ApiError, match="check the driver's RBAC") as forbidden:
        kube.get_node("n")
    assert forbidden.value.status == 403


def test_v1beta1_slices_nest_device_fields_in_basic_and_come_back_flat():
    s = valid_slice()
    wire = slice_to_version(s, "v1beta1")
    assert wire["apiVersion"] == "resource.k8s.io/v1beta1"
    assert wire["spec"]["devices"][0] == {
        "name": "gpu-0",
        "basic": {k: v for k, v in dev(s).items() if k != "name"},
    }
    back = slice_from_version(wire, "v1beta1")
    assert back == s
    assert slice_to_version(s, "v1beta2")["spec"] == s["spec"]


def test_kubernetes_134_limits_counters_per_slice_not_per_set():
    """1.34 sums shared counters over all sets (32) and counters consumed per device (32)."""
    two_sets = counters_slice(2, 20)
    validate_slice(two_sets, server_minor=36)
    with pytest.raises(SliceValidationError, match=r"40 shared counters .* 32 a Kubernetes < 1.35"):
        validate_slice(two_sets, server_minor=34)
    greedy = valid_slice()
    greedy["spec"]["sharedCounters"] = [
        {"name": "set-a", "counters": {f"c{j}": {"value": "1"} for j in range(20)}},
    ]
    greedy["spec"]["devices"][0]["consumesCounters"] = [
        {"counterSet": "set-a", "counters": {f"c{j}": {"value": "1"} for j in range(20)}},
        {"counterSet": "set-b", "counters": {f"d{j}": {"value": "1"} for j in range(13)}},
    ]
    with pytest.raises(SliceValidationError, match=r"consumes 33 counters"):
        validate_slice(greedy, server_minor=34)


@pytest.mark.parametrize(
    ("value", "binary", "text"),
    [
        (42949672960, True, "40Gi"),
        (5100273664, True, "4864Mi"),
        (1536, True, "1536"),
        (0, True, "0"),
        (108, False, "108"),
        (2000, False, "2k"),
        (1, False, "1"),
    ],
)
def test_quantities_are_written_in_canonical_form(value: int, binary: bool, text: str) -> None:
    """Memory is a binary quantity (``40Gi``), counts decimal, as the API server writes them."""
    from driver.resourceslices import canonical_quantity

    assert canonical_quantity(value, binary) == text
    assert parse_quantity(text) == value


class FastWatchKube(FakeKube):
    """A server whose watch delivers a create's ADDED event before the create's response."""

    def create_slice(self, resource_slice: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        if not dry_run:
            wait_for(lambda: bool(self._watches), 5.0)  # the publisher's watch is running
        result = super().create_slice(resource_slice, dry_run=dry_run)
        if not dry_run:
            # Hold the response until the watch thread has taken the event (bounded, not asserted).
            wait_for(lambda: all(w.events.empty() for w in self._watches), 2.0)
            time.sleep(0.2)
        return result


def test_publisher_recognises_its_own_create_when_the_watch_is_faster(publisher_for):
    """The ADDED event of a slice we just created is our own write, not a change behind our back
    (which would re-list and re-sync: the log once said "changed behind our back; re-syncing")."""
    kube = FastWatchKube()
    publisher = publisher_for(kube)
    publisher.start(a100_inventory(8))
    assert publisher.wait_synced(10)
    assert wait_for(lambda: kube.writes == 1)
    time.sleep(0.5)  # room for a wrong re-sync to show (nothing asserts on time)
    after_create = kube.calls[kube.calls.index("create") + 1 :]
    assert "list" not in after_create, kube.calls
    assert kube.writes == 1


def test_publisher_backoff_is_capped_at_a_few_seconds():
    """After a long API server outage slices return within seconds (a 60 s cap once took 35 s)."""
    from driver.resourceslices import BACKOFF_MAX_S, backoff_delay

    publisher = SlicePublisher(FakeKube(), NODE, DRIVER)
    assert BACKOFF_MAX_S <= 5.0
    delays = [backoff_delay(n, publisher._backoff_initial, publisher._backoff_max) for n in range(1, 200)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == BACKOFF_MAX_S
