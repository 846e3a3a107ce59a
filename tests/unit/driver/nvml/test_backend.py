"""Nvml over the fake: one session, exact values, NVML errors translated with the op name."""

from __future__ import annotations

import pynvml
import pytest

from driver.errors import ConfigError, NvmlError
from driver.nvml.backend import Nvml, find_library
from driver.nvml.fakestate import STATE_ENV
from driver.nvml.topology import available_topologies, load_topology


@pytest.fixture
def nvml(tmp_path):
    session = Nvml.open("fake", fake_topology="h100-80gb-x8", fake_state=tmp_path / "s.json", node_name="n1")
    yield session
    session.shutdown()


@pytest.mark.parametrize("name", available_topologies())
def test_gpus_match_the_topology_exactly(name, tmp_path):
    topo = load_topology(name)
    with Nvml.open("fake", fake_topology=name, fake_state=tmp_path / "s.json", node_name="node-x") as nvml:
        gpus = nvml.gpus()
    assert len(gpus) == len(topo.gpus)
    for info, fact in zip(gpus, topo.gpus, strict=True):
        assert info.uuid == topo.gpu_uuid(fact.index, "node-x")
        assert info.index == fact.index
        assert info.minor == fact.minor
        assert info.product_name == fact.product_name
        assert info.brand == "Nvidia"
        assert info.architecture_id == fact.architecture
        assert info.cuda_compute_capability == fact.cuda_compute_capability
        assert info.memory_bytes == fact.memory_bytes
        assert info.pci_bus_id == fact.pci_bus_id
        assert info.pci_device_id == fact.pci_device_id
        assert info.numa_node == fact.numa_node
        assert info.mig_capable == fact.mig_capable
        assert info.mig_mode_current == (fact.mig_mode if fact.mig_capable else None)
        assert info.mig_mode_pending == (fact.mig_mode if fact.mig_capable else None)
        assert info.virtualization_mode == 0
        assert not info.is_vgpu_guest


def test_architecture_strings_are_go_nvlibs(tmp_path):
    expect = {"h100-80gb-x8": "Hopper", "a100-80gb-x4": "Ampere", "t4-x4": "Turing", "l4-x2": "Ada Lovelace"}
    for name, arch in expect.items():
        with Nvml.open("fake", fake_topology=name, fake_state=tmp_path / f"{name}.json") as nvml:
            assert nvml.gpu(0).architecture == arch


def test_system_info(nvml):
    info = nvml.system()
    assert (info.driver_version, info.cuda_driver_version) == ("580.126.20", 13000)


def test_errors_carry_op_and_code_and_chain_the_nvml_error(nvml):
    nvml.module.fake.state.add_fault("nvmlDeviceGetHandleByIndex", pynvml.NVML_ERROR_UNKNOWN, times=1)
    with pytest.raises(NvmlError) as info:
        nvml.gpu(0)
    assert info.value.op == "nvmlDeviceGetHandleByIndex"
    assert info.value.code == pynvml.NVML_ERROR_UNKNOWN
    assert isinstance(info.value.__cause__, pynvml.NVMLError_Unknown)
    assert "nvmlDeviceGetHandleByIndex" in str(info.value)
    assert nvml.gpu(0).index == 0  # the fault was for one call only


def test_optional_queries_read_as_none_when_not_supported(nvml):
    uuid = nvml.gpu(2).uuid
    state = nvml.module.fake.state
    state.add_fault("nvmlDeviceGetMemoryInfo", pynvml.NVML_ERROR_NOT_SUPPORTED, uuid=uuid)
    state.add_fault("nvmlDeviceGetNumaNodeId", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    info = nvml.gpu(2)
    assert info.memory_bytes is None
    assert info.numa_node is None
    assert nvml.gpu(1).memory_bytes == 85520809984


def test_handle_is_cached_by_uuid_and_unknown_uuid_is_not_found(nvml):
    info = nvml.gpu(4)
    assert nvml.handle(info.uuid) is nvml.handle(info.uuid)
    assert nvml.handle(info.uuid).index == 4
    with pytest.raises(NvmlError) as exc:
        nvml.handle("GPU-00000000-0000-0000-0000-000000000000")
    assert exc.value.code == pynvml.NVML_ERROR_NOT_FOUND


def test_call_is_the_translation_point_for_others(nvml):
    handle = nvml.handle(nvml.gpu(0).uuid)
    assert nvml.call("nvmlDeviceGetName", nvml.module.nvmlDeviceGetName, handle) == "NVIDIA H100 80GB HBM3"
    with pytest.raises(NvmlError, match="nvmlDeviceGetName"):
        nvml.call("nvmlDeviceGetName", nvml.module.nvmlDeviceGetName, object())


def test_driver_not_loaded_at_init_is_an_nvml_error(tmp_path):
    from driver.nvml.fakestate import FakeState

    FakeState.create(tmp_path / "s.json", load_topology("l4-x2"), "").add_fault(
        "nvmlInit", pynvml.NVML_ERROR_DRIVER_NOT_LOADED, times=1
    )
    with pytest.raises(NvmlError) as info:
        Nvml.open("fake", fake_topology="l4-x2", fake_state=tmp_path / "s.json")
    assert info.value.code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    # Not ready is transient: the daemon's retry succeeds.
    Nvml.open("fake", fake_topology="l4-x2", fake_state=tmp_path / "s.json").shutdown()


def test_shutdown_is_idempotent(tmp_path):
    nvml = Nvml.open("fake", fake_topology="l4-x2", fake_state=tmp_path / "s.json")
    nvml.shutdown()
    nvml.shutdown()
    with pytest.raises(NvmlError) as info:
        nvml.device_count()
    assert info.value.code == pynvml.NVML_ERROR_UNINITIALIZED


def test_fake_needs_a_state_file_and_takes_topology_from_it(tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    with pytest.raises(ConfigError, match=STATE_ENV):
        Nvml.open("fake", fake_topology="l4-x2")
    with pytest.raises(ConfigError, match="topology"):
        Nvml.open("fake", fake_state=tmp_path / "fresh.json")
    Nvml.open("fake", fake_topology="t4-x4", fake_state=tmp_path / "s.json", node_name="n").shutdown()
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "s.json"))
    with Nvml.open("fake", node_name="n") as nvml:
        assert nvml.device_count() == 4


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="real"):
        Nvml.open("cuda")  # type: ignore[arg-type]


def test_find_library_searches_the_driver_root_dirs(tmp_path):
    assert find_library(tmp_path) is None
    real = tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "libnvidia-ml.so.580.126.20"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"\x7fELF")
    (real.parent / "libnvidia-ml.so.1").symlink_to(real.name)
    assert find_library(tmp_path) == real
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libnvidia-ml.so.1").symlink_to("/nonexistent/libnvidia-ml.so.1")
    assert find_library(tmp_path) == real  # dangling links are skipped
