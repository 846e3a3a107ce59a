"""The fake pynvml has nvidia-ml-py's surface: names, arguments, return shapes, errors."""

from __future__ import annotations

import inspect

import pynvml
import pytest

from driver.nvml.fakepynvml import _API_FUNCTIONS, FakeDevice, _Api, make_fake_pynvml
from driver.nvml.fakestate import FakeState
from driver.nvml.topology import load_topology


@pytest.fixture
def fake(tmp_path):
    module = make_fake_pynvml("a100-40gb-x8", tmp_path / "state.json", "node-a")
    module.nvmlInit()
    yield module
    module.nvmlShutdown()


@pytest.mark.parametrize("name", _API_FUNCTIONS)
def test_every_function_exists_in_nvidia_ml_py_with_the_same_parameters(name):
    real = getattr(pynvml, name)
    ours = getattr(_Api, name)  # this layer's own function, before any MIG wrapping
    real_params = [p.name for p in inspect.signature(real).parameters.values()]
    our_params = [p.name for p in inspect.signature(ours).parameters.values()][1:]  # drop self
    # nvidia-ml-py names the handle argument "handle" or "device"; positions must agree.
    normalise = {"device": "handle"}
    assert [normalise.get(p, p) for p in our_params] == [normalise.get(p, p) for p in real_params]


def test_constants_and_error_classes_are_nvidia_ml_pys(fake):
    assert fake.NVMLError is pynvml.NVMLError
    assert fake.NVML_ERROR_NOT_SUPPORTED == 3
    assert fake.NVML_INIT_FLAG_NO_GPUS == 1
    assert fake.NVMLError_NotFound is pynvml.NVMLError_NotFound


def test_calls_before_init_fail_uninitialized(tmp_path):
    module = make_fake_pynvml("l4-x2", tmp_path / "s.json", "n")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        module.nvmlDeviceGetCount()
    module.nvmlInitWithFlags(pynvml.NVML_INIT_FLAG_NO_GPUS)
    module.nvmlInit()
    module.nvmlShutdown()
    assert module.nvmlDeviceGetCount() == 2  # still one reference
    module.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        module.nvmlShutdown()


def test_return_shapes_match_nvidia_ml_py(fake):
    topo = load_topology("a100-40gb-x8")
    h = fake.nvmlDeviceGetHandleByIndex(3)
    assert fake.nvmlDeviceGetUUID(h) == topo.gpu_uuid(3, "node-a")
    assert fake.nvmlDeviceGetName(h) == "NVIDIA A100-SXM4-40GB"
    assert fake.nvmlDeviceGetMinorNumber(h) == 3
    assert fake.nvmlDeviceGetIndex(h) == 3
    mem = fake.nvmlDeviceGetMemoryInfo(h)
    assert isinstance(mem, pynvml.c_nvmlMemory_t)
    assert (mem.total, mem.free, mem.used) == (42949672960, 42949672960, 0)
    mem2 = fake.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2)
    assert isinstance(mem2, pynvml.c_nvmlMemory_v2_t)
    assert mem2.total == 42949672960
    pci = fake.nvmlDeviceGetPciInfo(h)
    assert isinstance(pci, pynvml.nvmlPciInfo_t)
    assert pci.busId == "00000000:4E:00.0"
    assert pci.busIdLegacy == "0000:4E:00.0"
    assert (pci.domain, pci.bus, pci.device) == (0, 0x4E, 0)
    assert pci.pciDeviceId == 0x20B010DE
    assert fake.nvmlDeviceGetBrand(h) == pynvml.NVML_BRAND_NVIDIA
    assert fake.nvmlDeviceGetArchitecture(h) == pynvml.NVML_DEVICE_ARCH_AMPERE
    assert fake.nvmlDeviceGetCudaComputeCapability(h) == (8, 0)
    assert fake.nvmlDeviceGetNumaNodeId(h) == 0
    assert fake.nvmlDeviceGetMigMode(h) == [0, 0]
    assert fake.nvmlDeviceGetComputeMode(h) == pynvml.NVML_COMPUTEMODE_DEFAULT
    assert fake.nvmlDeviceGetVirtualizationMode(h) == pynvml.NVML_GPU_VIRTUALIZATION_MODE_NONE
    assert fake.nvmlSystemGetDriverVersion() == "580.126.20"
    assert fake.nvmlSystemGetCudaDriverVersion() == 13000
    assert fake.nvmlSystemGetCudaDriverVersion_v2() == 13000
    assert fake.nvmlSystemGetNVMLVersion() == "13.580.126.20"


def test_handle_lookups(fake):
    topo = load_topology("a100-40gb-x8")
    uuid = topo.gpu_uuid(5, "node-a")
    assert fake.nvmlDeviceGetHandleByUUID(uuid) == FakeDevice(uuid, 5)
    assert fake.nvmlDeviceGetHandleByUUID(uuid.encode()) == FakeDevice(uuid, 5)
    assert fake.nvmlDeviceGetHandleByPciBusId("00000000:90:00.0").index == 5
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(8)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetName(object())


def test_non_mig_gpu_says_not_supported(tmp_path):
    module = make_fake_pynvml("t4-x4", tmp_path / "s.json", "n")
    module.nvmlInit()
    h = module.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        module.nvmlDeviceGetMigMode(h)
    assert module.nvmlDeviceGetName(h) == "Tesla T4"


def test_mig_enabled_topology_reports_mig_mode(tmp_path):
    module = make_fake_pynvml("a100-40gb-x1-mig", tmp_path / "s.json", "n")
    module.nvmlInit()
    assert module.nvmlDeviceGetMigMode(module.nvmlDeviceGetHandleByIndex(0)) == [1, 1]


def test_state_survives_a_new_module_on_the_same_file(tmp_path):
    path = tmp_path / "s.json"
    first = make_fake_pynvml("a100-40gb-x8", path, "n")
    first.nvmlInit()
    h = first.nvmlDeviceGetHandleByIndex(2)
    first.nvmlDeviceSetComputeMode(h, pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
    uuid = first.nvmlDeviceGetUUID(h)
    # The plugin "crashes"; a new process builds the module again from the same file.
    second = make_fake_pynvml("a100-40gb-x8", path, "n")
    second.nvmlInit()
    h2 = second.nvmlDeviceGetHandleByUUID(uuid)
    assert second.nvmlDeviceGetComputeMode(h2) == pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        second.nvmlDeviceSetComputeMode(h2, 1)  # EXCLUSIVE_THREAD is gone from NVML


def test_stand_in_edits_are_seen_by_the_fake(fake):
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with fake.fake.state.edit() as doc:
        doc["gpus"][h.uuid]["computeMode"] = "PROHIBITED"
        doc["gpus"][h.uuid]["minor"] = 9
    assert fake.nvmlDeviceGetComputeMode(h) == pynvml.NVML_COMPUTEMODE_PROHIBITED
    assert fake.nvmlDeviceGetMinorNumber(h) == 9


def test_fault_fires_the_given_number_of_times(fake):
    state: FakeState = fake.fake.state
    state.add_fault("nvmlDeviceGetHandleByIndex", pynvml.NVML_ERROR_UNKNOWN, times=2)
    for _ in range(2):
        with pytest.raises(pynvml.NVMLError_Unknown) as info:
            fake.nvmlDeviceGetHandleByIndex(0)
        assert info.value.value == pynvml.NVML_ERROR_UNKNOWN
    assert fake.nvmlDeviceGetHandleByIndex(0).index == 0
    assert state.read()["faults"] == []


def test_fault_limited_to_one_gpu_and_forever(fake):
    victim = fake.nvmlDeviceGetHandleByIndex(1)
    fake.fake.state.add_fault("nvmlDeviceGetMemoryInfo", pynvml.NVML_ERROR_GPU_IS_LOST, uuid=victim.uuid)
    for _ in range(3):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            fake.nvmlDeviceGetMemoryInfo(victim)
    assert fake.nvmlDeviceGetMemoryInfo(fake.nvmlDeviceGetHandleByIndex(0)).total == 42949672960


def test_init_fault_covers_both_init_functions(tmp_path):
    module = make_fake_pynvml("l4-x2", tmp_path / "s.json", "n")
    module.fake.state.add_fault("nvmlInit", pynvml.NVML_ERROR_DRIVER_NOT_LOADED, times=1)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        module.nvmlInitWithFlags(0)
    module.nvmlInitWithFlags(0)
    assert module.nvmlDeviceGetCount() == 2
