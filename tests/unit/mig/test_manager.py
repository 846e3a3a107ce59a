"""MigManager over the fake NVML: round trips, rollback, mismatches, and the MIG-mode safety rules."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from driver.nvml import fakemig
from mig.errors import MigBackendError, MigMismatchError, MigPlacementError, MigUnsupportedError
from mig.manager import MigManager
from mig.profiles import mig_specs
from mig.spec import MigLive, MigSpec


def _specs(node: Any, profile: str, index: int = 0) -> list[MigSpec]:
    gpu = node.nvml.gpu(index)
    return [
        s for s in mig_specs(gpu.minor, gpu.uuid, node.backend.profiles(gpu.uuid)) if s.profile == profile
    ]


def _mig_state(node: Any, index: int = 0) -> Any:
    return json.loads(node.state_path.read_text())["gpus"][node.uuid(index)]["mig"]


def test_create_destroy_round_trip_returns_the_fake_to_its_start(a100, a100_manager):
    before = _mig_state(a100)
    specs = _specs(a100, "1g.5gb")
    lives = [a100_manager.create(s) for s in specs]
    assert [(lv.gi_id, lv.ci_id) for lv in lives] == [(7 + i, 0) for i in range(7)]
    assert len({lv.mig_uuid for lv in lives}) == 7
    assert a100_manager.find(specs[3]) == lives[3]
    for live in lives:
        assert a100_manager.destroy(live)
    assert _mig_state(a100) == before
    assert a100_manager.find(specs[3]) is None


def test_occupied_placement_is_a_placement_error(a100, a100_manager):
    spec = _specs(a100, "1g.5gb")[0]
    a100_manager.create(spec)
    with pytest.raises(MigPlacementError, match="occupied"):
        a100_manager.create(spec)
    with pytest.raises(MigPlacementError):
        a100_manager.create(_specs(a100, "7g.40gb")[0])


def test_destroy_twice_is_fine(a100, a100_manager):
    live = a100_manager.create(_specs(a100, "2g.10gb")[1])
    assert a100_manager.destroy(live)
    assert not a100_manager.destroy(live)


def test_destroy_refuses_an_instance_that_is_not_the_recorded_one(a100, a100_manager):
    spec = _specs(a100, "1g.5gb")[0]
    live = a100_manager.create(spec)
    a100_manager.destroy(live)
    other = a100_manager.create(spec)  # same ids, new UUID: someone else's now
    assert (other.gi_id, other.ci_id) == (live.gi_id, live.ci_id)
    with pytest.raises(MigMismatchError, match="left in place"):
        a100_manager.destroy(live)
    assert a100_manager.find(spec) == other


def test_rollback_clears_a_gi_left_without_ci(a100, a100_manager):
    spec = _specs(a100, "1g.5gb")[2]
    a100.backend.create_gi(spec.parent_uuid, spec.gi_profile_id, spec.placement_start)  # crash after GI
    assert a100_manager.find(spec) is None
    partial = a100_manager.find_instance(spec)
    assert partial is not None
    assert partial.ci_id is None
    assert a100_manager.rollback(spec)
    assert a100_manager.find_instance(spec) is None
    assert not a100_manager.rollback(spec)


def test_failed_ci_create_destroys_the_gi(a100, a100_manager):
    spec = _specs(a100, "1g.5gb")[0]
    a100.state.add_fault("nvmlGpuInstanceCreateComputeInstance", 999, times=1)
    with pytest.raises(MigBackendError):
        a100_manager.create(spec)
    assert a100_manager.find_instance(spec) is None


def test_busy_ci_fails_destroy_and_keeps_the_device(a100, a100_manager):
    live = a100_manager.create(_specs(a100, "1g.5gb")[0])
    fakemig.set_busy(a100.state, live.parent_uuid, live.gi_id, live.ci_id)
    with pytest.raises(MigBackendError) as e:
        a100_manager.destroy(live)
    assert e.value.code == fakemig.NVML_ERROR_IN_USE
    fakemig.set_busy(a100.state, live.parent_uuid, live.gi_id, live.ci_id, busy=False)
    assert a100_manager.destroy(live)


def test_unknown_lists_instances_not_recorded(a100, a100_manager):
    specs = _specs(a100, "1g.5gb")
    ours = a100_manager.create(specs[0])
    theirs = a100_manager.create(specs[1])
    unknown = a100_manager.unknown(ours.parent_uuid, [ours])
    assert [(u.gi_id, u.mig_uuid) for u in unknown] == [(theirs.gi_id, theirs.mig_uuid)]


# --- safety -----------------------------------------------------------------------------


def test_ampere_mig_off_is_never_switched_on(tmp_path):
    from tests.unit.mig.fakenode import make_node

    node = make_node(tmp_path, "a100-40gb-x8")
    manager = MigManager(node.backend, allow_mig_mode_change=True)
    with pytest.raises(MigUnsupportedError, match="reset"):
        manager.create(_specs(node, "1g.5gb")[0])
    assert node.backend.mig_mode(node.uuid()) == (False, False)


def test_hopper_enables_only_when_allowed_and_disables_again(h100):
    spec = _specs(h100, "1g.10gb")[0]
    with pytest.raises(MigUnsupportedError, match="allow_mig_mode_change"):
        MigManager(h100.backend).create(spec)
    assert h100.backend.mig_mode(spec.parent_uuid) == (False, False)
    manager = MigManager(h100.backend, allow_mig_mode_change=True)
    live = manager.create(spec)
    assert h100.backend.mig_mode(spec.parent_uuid) == (True, True)
    manager.destroy(live)
    assert h100.backend.mig_mode(spec.parent_uuid) == (False, False)


def test_pending_mode_or_vgpu_guest_blocks_changes(h100):
    uuid = h100.uuid()
    with h100.state.edit() as doc:
        doc["gpus"][uuid]["mig"] = {"current": False, "pending": True}
    manager = MigManager(h100.backend, allow_mig_mode_change=True)
    assert "pending" in (manager.mode_change_refusal(uuid) or "")

    class VgpuBackend:
        def __getattr__(self, name):
            return getattr(h100.backend, name)

        def is_vgpu_guest(self, parent_uuid):
            return True

    uuid1 = h100.uuid(1)
    guest = MigManager(VgpuBackend(), allow_mig_mode_change=True)
    assert "vGPU" in (guest.mode_change_refusal(uuid1) or "")
    assert manager.mode_change_refusal(uuid1) is None


def test_per_gpu_lock_serialises_one_gpu_only(a100_manager):
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def hold(uuid: str) -> None:
        with a100_manager.gpu_lock(uuid):
            order.append(f"in {uuid}")
            inside.set()
            release.wait(5)
            order.append(f"out {uuid}")

    t = threading.Thread(target=hold, args=("GPU-a",))
    t.start()
    inside.wait(5)
    with a100_manager.gpu_lock("GPU-b"):  # another GPU is not blocked
        order.append("b")
    blocked = threading.Thread(target=lambda: a100_manager.gpu_lock("GPU-a").__enter__())
    blocked.daemon = True
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # same GPU waits
    release.set()
    t.join(5)
    blocked.join(5)
    assert order[:2] == ["in GPU-a", "b"]


def test_destroy_with_mig_off_is_success(a100, a100_manager):
    live = MigLive(0, a100.uuid(), 7, 0, "MIG-x", 19, 0)
    with a100.state.edit() as doc:
        doc["gpus"][a100.uuid()]["mig"] = {"current": False, "pending": False}
    assert not a100_manager.destroy(live)
