"""The fake pynvml's MIG part behaves like NVML (ids, placements, errors, persistence, cap files)."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import pynvml
import pytest

from driver.nvml import fakemig
from tests.unit.mig.fakenode import make_node

ONE_G = 19  # 1g.5gb on A100-40GB


def _placement(m: Any, start: int, size: int) -> Any:
    p = m.c_nvmlGpuInstancePlacement_t()
    p.start, p.size = start, size
    return ctypes.byref(p)


def _code(exc_info: Any) -> int:
    return int(exc_info.value.value)


@pytest.fixture
def node(tmp_path):
    n = make_node(tmp_path, "a100-40gb-x1-mig")
    yield n
    n.nvml.shutdown()


@pytest.fixture
def dev(node):
    return node.module.nvmlDeviceGetHandleByIndex(0)


def test_profile_info_by_index_returns_the_profile_id(node, dev):
    m = node.module
    info = m.nvmlDeviceGetGpuInstanceProfileInfo(dev, m.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    assert (info.id, info.sliceCount, info.instanceCount, info.memorySizeMB) == (19, 1, 7, 4864)
    assert (info.multiprocessorCount, info.copyEngineCount, info.decoderCount, info.ofaCount) == (14, 1, 0, 0)
    assert m.nvmlDeviceGetGpuInstanceProfileInfo(dev, 4).id == 0  # 7g
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceGetGpuInstanceProfileInfo(dev, 5)  # 8_SLICE: not on A100
    assert _code(e) == pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceGetGpuInstanceProfileInfo(dev, m.NVML_GPU_INSTANCE_PROFILE_COUNT)
    assert _code(e) == pynvml.NVML_ERROR_INVALID_ARGUMENT


def test_possible_placements_of_1g5gb_are_0_to_6(node, dev):
    m = node.module
    count = ctypes.c_uint(0)
    m.nvmlDeviceGetGpuInstancePossiblePlacements(dev, ONE_G, None, ctypes.byref(count))
    assert count.value == 7
    buf = (m.c_nvmlGpuInstancePlacement_t * count.value)()
    m.nvmlDeviceGetGpuInstancePossiblePlacements(dev, ONE_G, buf, ctypes.byref(count))
    assert [(p.start, p.size) for p in buf] == [(i, 1) for i in range(7)]


def test_seven_1g_fit_an_eighth_fails_and_ids_follow_the_slice_tree(node, dev):
    m = node.module
    gis = [m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, s, 1)) for s in range(7)]
    assert [m.nvmlGpuInstanceGetInfo(g).id for g in gis] == [7 + s for s in range(7)]
    assert m.nvmlDeviceGetGpuInstanceRemainingCapacity(dev, ONE_G) == 0
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceCreateGpuInstance(dev, ONE_G)
    assert _code(e) == pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES


def test_overlapping_placement_is_insufficient_resources(node, dev):
    m = node.module
    m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, 14, _placement(m, 2, 2))  # 2g.10gb on slices 2-3
    for profile, start, size in ((ONE_G, 3, 1), (14, 2, 2), (9, 0, 4), (0, 0, 8)):
        with pytest.raises(pynvml.NVMLError) as e:
            m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, profile, _placement(m, start, size))
        assert _code(e) == pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
    with pytest.raises(pynvml.NVMLError) as e:  # not a placement of this profile at all
        m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 7, 1))
    assert _code(e) == pynvml.NVML_ERROR_INVALID_ARGUMENT


def test_ci_lifecycle_mig_handles_and_in_use(node, dev):
    m = node.module
    gi = m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, 9, _placement(m, 4, 4))  # 3g.20gb
    ci_prof = m.nvmlGpuInstanceGetComputeInstanceProfileInfo(
        gi, 2, m.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
    )
    assert (ci_prof.id, ci_prof.sliceCount, ci_prof.multiprocessorCount) == (2, 3, 42)
    ci = m.nvmlGpuInstanceCreateComputeInstance(gi, ci_prof.id)
    info = m.nvmlComputeInstanceGetInfo(ci)
    mig_uuid = m.nvmlDeviceGetUUID(info.device)
    assert mig_uuid.startswith("MIG-")
    assert bool(m.nvmlDeviceIsMigDeviceHandle(info.device))
    assert not bool(m.nvmlDeviceIsMigDeviceHandle(dev))
    assert m.nvmlDeviceGetMaxMigDeviceCount(dev) == 7
    handle = m.nvmlDeviceGetMigDeviceHandleByIndex(dev, 0)
    assert m.nvmlDeviceGetUUID(handle) == mig_uuid
    assert m.nvmlDeviceGetGpuInstanceId(handle) == m.nvmlGpuInstanceGetInfo(gi).id
    assert m.nvmlDeviceGetComputeInstanceId(handle) == info.id
    assert m.nvmlDeviceGetUUID(m.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)) == node.uuid()
    assert m.nvmlDeviceGetUUID(m.nvmlDeviceGetHandleByUUID(mig_uuid)) == mig_uuid
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceGetMigDeviceHandleByIndex(dev, 1)
    assert _code(e) == pynvml.NVML_ERROR_NOT_FOUND
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlGpuInstanceDestroy(gi)
    assert _code(e) == pynvml.NVML_ERROR_IN_USE
    gi_id = m.nvmlGpuInstanceGetInfo(gi).id
    m.nvmlComputeInstanceDestroy(ci)
    m.nvmlGpuInstanceDestroy(gi)
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceGetGpuInstanceById(dev, gi_id)
    assert _code(e) == pynvml.NVML_ERROR_NOT_FOUND


def test_busy_instance_cannot_be_destroyed(node, dev):
    m = node.module
    gi = m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 0, 1))
    gi_id = m.nvmlGpuInstanceGetInfo(gi).id
    ci = m.nvmlGpuInstanceCreateComputeInstance(gi, 0)
    fakemig.set_busy(node.state, node.uuid(), gi_id, 0)
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlComputeInstanceDestroy(ci)
    assert _code(e) == pynvml.NVML_ERROR_IN_USE


def test_new_uuid_on_recreate_and_ids_reused(node, dev):
    m = node.module
    uuids, ids = [], []
    for _ in range(2):
        gi = m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 5, 1))
        ci = m.nvmlGpuInstanceCreateComputeInstance(gi, 0)
        info = m.nvmlComputeInstanceGetInfo(ci)
        uuids.append(m.nvmlDeviceGetUUID(info.device))
        ids.append((m.nvmlGpuInstanceGetInfo(gi).id, info.id))
        m.nvmlComputeInstanceDestroy(ci)
        m.nvmlGpuInstanceDestroy(gi)
    assert uuids[0] != uuids[1]
    assert ids[0] == ids[1] == (12, 0)


def test_state_survives_reopen_and_crash_leaves_gi_without_ci(tmp_path):
    first = make_node(tmp_path, "a100-40gb-x1-mig")
    m = first.module
    dev = m.nvmlDeviceGetHandleByIndex(0)
    m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 0, 1))
    # the process dies here, before the CI: a new session over the same file sees the GI alone
    second = make_node(tmp_path, "a100-40gb-x1-mig")
    m2 = second.module
    dev2 = m2.nvmlDeviceGetHandleByIndex(0)
    gi = m2.nvmlDeviceGetGpuInstanceById(dev2, 7)
    assert m2.nvmlGpuInstanceGetInfo(gi).profileId == ONE_G
    with pytest.raises(pynvml.NVMLError) as e:
        m2.nvmlGpuInstanceGetComputeInstanceById(gi, 0)
    assert _code(e) == pynvml.NVML_ERROR_NOT_FOUND
    assert m2.nvmlDeviceGetMaxMigDeviceCount(dev2) == 7
    with pytest.raises(pynvml.NVMLError):
        m2.nvmlDeviceGetMigDeviceHandleByIndex(dev2, 0)


def test_mig_off_is_not_supported(tmp_path):
    node = make_node(tmp_path, "a100-40gb-x8")
    m = node.module
    dev = m.nvmlDeviceGetHandleByIndex(0)
    assert m.nvmlDeviceGetMigMode(dev) == [0, 0]
    assert m.nvmlDeviceGetMaxMigDeviceCount(dev) == 0
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 0, 1))
    assert _code(e) == pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceGetGpuInstanceById(dev, 7)
    assert _code(e) == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_ampere_mode_change_stays_pending_until_reset(tmp_path):
    node = make_node(tmp_path, "a100-40gb-x8")
    m = node.module
    dev = m.nvmlDeviceGetHandleByIndex(0)
    status = m.nvmlDeviceSetMigMode(dev, m.NVML_DEVICE_MIG_ENABLE)
    assert status == pynvml.NVML_ERROR_RESET_REQUIRED
    assert m.nvmlDeviceGetMigMode(dev) == [0, 1]
    fakemig.reset_gpu(node.state, node.uuid())
    assert m.nvmlDeviceGetMigMode(dev) == [1, 1]


def test_hopper_mode_change_is_immediate_and_refused_while_in_use(tmp_path):
    node = make_node(tmp_path, "h100-80gb-x8")
    m = node.module
    dev = m.nvmlDeviceGetHandleByIndex(0)
    assert m.nvmlDeviceSetMigMode(dev, 1) == pynvml.NVML_SUCCESS
    assert m.nvmlDeviceGetMigMode(dev) == [1, 1]
    m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 0, 1))
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceSetMigMode(dev, 0)
    assert _code(e) == pynvml.NVML_ERROR_IN_USE


def test_non_mig_gpu_is_not_supported(tmp_path):
    node = make_node(tmp_path, "t4-x4")
    m = node.module
    dev = m.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceGetGpuInstanceProfileInfo(dev, 0)
    assert _code(e) == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_capability_files_follow_instances(node, dev, tmp_path):
    root = tmp_path / "root"
    with node.state.edit() as doc:
        doc["driverRoot"] = str(root)
    m = node.module
    gi = m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 1, 1))  # GI id 8
    ci = m.nvmlGpuInstanceCreateComputeInstance(gi, 0)
    gi_access = root / "proc/driver/nvidia/capabilities/gpu0/mig/gi8/access"
    ci_access = root / "proc/driver/nvidia/capabilities/gpu0/mig/gi8/ci0/access"
    assert gi_access.read_text().startswith(f"DeviceFileMinor: {3 + 9 * 8}\n")
    assert ci_access.read_text().startswith(f"DeviceFileMinor: {3 + 9 * 8 + 1}\n")
    assert (root / f"dev/nvidia-caps/nvidia-cap{3 + 9 * 8}").exists()
    assert (root / f"dev/nvidia-caps/nvidia-cap{3 + 9 * 8 + 1}").exists()
    m.nvmlComputeInstanceDestroy(ci)
    m.nvmlGpuInstanceDestroy(gi)
    assert not gi_access.exists()
    assert not ci_access.exists()
    assert not list((root / "dev/nvidia-caps").iterdir())


def test_injected_fault_applies_to_mig_calls(node, dev):
    node.state.add_fault("nvmlDeviceCreateGpuInstanceWithPlacement", 999, times=1)
    m = node.module
    with pytest.raises(pynvml.NVMLError) as e:
        m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 0, 1))
    assert _code(e) == 999
    m.nvmlDeviceCreateGpuInstanceWithPlacement(dev, ONE_G, _placement(m, 0, 1))
    gis = json.loads(node.state_path.read_text())["gpus"][node.uuid()]["mig"]["gis"]
    assert list(gis) == ["7"]


def test_gi_id_tree():
    assert fakemig.gi_id_for(8, 0, 8, set()) == 0
    assert fakemig.gi_id_for(8, 4, 2, set()) == 5
    assert fakemig.gi_id_for(8, 6, 1, set()) == 13
    assert fakemig.gi_id_for(4, 2, 1, set()) == 5  # A30: 1g GIs 3..6
    assert fakemig.gi_id_for(8, 0, 1, {7}) == 0  # taken: lowest free
    assert fakemig.cap_minor_for(1, 2, None) == 3 + 135 + 18
