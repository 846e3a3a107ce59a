"""Health -> device taints: NVIDIA's keys and effects, MIG inheritance, recovery rules, operator clears,
and the publisher writing taints (with their timeAdded kept) inside the slice limits."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from driver.errors import ConfigError
from driver.health import (
    FakeHealthSource,
    Fault,
    FaultKind,
    Health,
    HealthMonitor,
    Scope,
    Snapshot,
    classify_xid,
    device_health,
    lost_condition,
    merge,
    unmonitored_condition,
    without,
)
from driver.inventory import Inventory
from driver.nvml.backend import Nvml
from driver.nvml.fakestate import FakeState
from driver.recovery import ClearRequests, NvmlRecoveryProbe, Reading, RecoveryRules, parse_kinds
from driver.resourceslices import SlicePublisher, build_slices, keep_time_added, validate_pool
from driver.taints import DeviceTaint, TaintSync, diff, read_status, snapshot_taints, taint_of, taints_of
from tests.unit.driver.test_health import by_name, gpu, mig
from tests.unit.driver.test_resourceslices import (
    DRIVER,
    NODE,
    NODE_UID,
    FakeKube,
    a100_inventory,
    wait_for,
)

XID = "gpu.nvidia.com/xid"
LOST = "gpu.nvidia.com/gpu-lost"
UNMON = "gpu.nvidia.com/unmonitored"


# --- mapping -------------------------------------------------------------------------------------


def test_each_fault_becomes_nvidias_taint() -> None:
    assert taints_of(classify_xid(79).faults) == (DeviceTaint(XID, "79", "NoSchedule"),)
    assert taints_of(classify_xid(13).faults) == (DeviceTaint(XID, "13", "None"),)
    assert taints_of(lost_condition().faults) == (DeviceTaint(LOST, "", "NoSchedule"),)
    assert taints_of(lost_condition().faults, "NoExecute") == (DeviceTaint(LOST, "", "NoExecute"),)
    assert taints_of(unmonitored_condition("x").faults) == (DeviceTaint(UNMON, "", "None"),)
    assert DeviceTaint(XID, "79", "NoSchedule").to_dict() == {
        "key": XID,
        "value": "79",
        "effect": "NoSchedule",
    }
    assert DeviceTaint(LOST, "", "NoSchedule").to_dict() == {"key": LOST, "effect": "NoSchedule"}


def test_one_taint_per_key_and_an_ignored_xid_never_softens_a_fatal_one() -> None:
    cond = merge(merge(classify_xid(79), classify_xid(13)), lost_condition())
    assert cond.status is Health.UNHEALTHY
    assert taints_of(cond.faults) == (
        DeviceTaint(LOST, "", "NoSchedule"),
        DeviceTaint(XID, "79", "NoSchedule"),
    )
    newer_fatal = merge(classify_xid(79), classify_xid(48))
    assert taints_of(newer_fatal.faults) == (DeviceTaint(XID, "48", "NoSchedule"),)
    assert taints_of(merge(classify_xid(13), classify_xid(48)).faults) == (
        DeviceTaint(XID, "48", "NoSchedule"),
    )


def test_without_re_describes_what_is_left() -> None:
    cond = merge(classify_xid(79), unmonitored_condition("x"))
    left = without(cond, frozenset({FaultKind.XID}))
    assert left is not None
    assert left.status is Health.UNKNOWN
    assert left.faults == frozenset({Fault(FaultKind.UNMONITORED)})
    assert without(classify_xid(79), frozenset({FaultKind.XID})) is None


def test_every_mig_device_of_a_tainted_gpu_carries_its_taints_and_an_instance_fault_stays_on_its_device() -> (
    None
):
    static, dynamic = mig(0, gi=1), mig(0, start=4)
    devices = [gpu(0), static, dynamic, gpu(1)]
    out = by_name(device_health(devices, {Scope("GPU-0"): classify_xid(48)}))
    for name in ("gpu-0", static.name, dynamic.name):
        assert taints_of(out[name].faults) == (DeviceTaint(XID, "48", "NoSchedule"),), name
    assert out["gpu-1"].faults == frozenset()
    out = by_name(device_health(devices, {Scope("GPU-0", 1): classify_xid(94)}))
    assert taints_of(out[static.name].faults) == (DeviceTaint(XID, "94", "NoSchedule"),)
    assert out["gpu-0"].faults == frozenset()


def test_diff_lists_set_and_cleared_taints() -> None:
    a = DeviceTaint(XID, "79", "NoSchedule")
    b = DeviceTaint(XID, "48", "NoSchedule")
    changes = diff({"gpu-0": (a,)}, {"gpu-0": (b,), "gpu-1": (a,)})
    assert [(c.device, c.taint.value, c.set) for c in changes] == [
        ("gpu-0", "79", False),
        ("gpu-0", "48", True),
        ("gpu-1", "79", True),
    ]


# --- recovery rules ------------------------------------------------------------------------------


class ScriptedProbe:
    def __init__(self) -> None:
        self.readings: dict[str, Reading] = {}
        self.reads: list[str] = []

    def read(self, gpu_uuid: str) -> Reading:
        self.reads.append(gpu_uuid)
        return self.readings.get(gpu_uuid, Reading(True, 0))


def test_an_xid_clears_only_after_a_recovery_was_asked_for_and_done() -> None:
    probe = ScriptedProbe()
    rules = RecoveryRules(probe)
    conditions = {Scope("GPU-0"): classify_xid(48), Scope("GPU-0", 3): classify_xid(94)}
    assert rules.recovered(conditions) == {}  # action NONE from the start: nothing says it is over
    probe.readings["GPU-0"] = Reading(True, 1)  # GPU_RESET asked
    assert rules.recovered(conditions) == {}
    assert probe.reads.count("GPU-0") == 2  # one read per GPU per round, not per scope
    probe.readings["GPU-0"] = Reading(True, 0)  # reset done
    assert rules.recovered(conditions) == {
        Scope("GPU-0"): frozenset({FaultKind.XID}),
        Scope("GPU-0", 3): frozenset({FaultKind.XID}),
    }


def test_an_xid_on_a_gpu_without_the_field_waits_for_an_operator() -> None:
    probe = ScriptedProbe()
    probe.readings["GPU-0"] = Reading(True, None)
    rules = RecoveryRules(probe)
    for _ in range(3):
        assert rules.recovered({Scope("GPU-0"): classify_xid(48)}) == {}


def test_a_lost_gpu_clears_when_it_answers_again_and_unmonitored_never_does() -> None:
    probe = ScriptedProbe()
    probe.readings["GPU-0"] = Reading(False)
    rules = RecoveryRules(probe)
    conditions = {Scope("GPU-0"): lost_condition(), Scope("GPU-1"): unmonitored_condition("x")}
    assert rules.recovered(conditions) == {}
    probe.readings["GPU-0"] = Reading(True, 2)  # answers, but asks for a reboot
    assert rules.recovered(conditions) == {}
    probe.readings["GPU-0"] = Reading(True, 0)
    assert rules.recovered(conditions) == {Scope("GPU-0"): frozenset({FaultKind.GPU_LOST})}
    assert "GPU-1" not in probe.reads


def test_the_nvml_probe_reads_the_recovery_action_through_the_fake(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    nvml = Nvml.open("fake", fake_topology="a100-40gb-x8", fake_state=state, node_name="n")
    try:
        uuid = nvml.gpus()[0].uuid
        probe = NvmlRecoveryProbe(nvml)
        assert probe.read(uuid) == Reading(True, 0)
        with FakeState(state).edit() as doc:
            doc.setdefault("health", {})[uuid] = {"xid": 48, "recoveryAction": 1}
        assert probe.read(uuid) == Reading(True, 1)
        with FakeState(state).edit() as doc:
            doc["health"][uuid] = {"gpuLost": True}
        assert probe.read(uuid) == Reading(False)
        assert probe.read("GPU-not-here") == Reading(False)
    finally:
        nvml.shutdown()


def test_parse_kinds_accepts_keys_short_names_and_all() -> None:
    assert parse_kinds(["gpu.nvidia.com/xid", "gpu-lost"]) == {FaultKind.XID, FaultKind.GPU_LOST}
    assert parse_kinds([]) == frozenset(FaultKind)
    assert parse_kinds(["all"]) == frozenset(FaultKind)
    with pytest.raises(ConfigError, match="xid, gpu-lost, unmonitored"):
        parse_kinds(["gpu.nvidia.com/bogus"])


def test_clear_requests_are_taken_once_and_malformed_ones_are_dropped(tmp_path: Path) -> None:
    clears = ClearRequests(tmp_path)
    clears.add("gpu-0", frozenset({FaultKind.XID}))
    (clears.dir / "junk.json").write_text("{not json")
    taken = clears.take()
    assert [(r.target, r.kinds) for r in taken] == [("gpu-0", frozenset({FaultKind.XID}))]
    assert clears.take() == []
    assert list(clears.dir.iterdir()) == []
    with pytest.raises(ConfigError, match="name the device"):
        clears.add("", frozenset(FaultKind))


# --- the monitor with recovery and clears, over the fake ------------------------------------------


def inject(state: Path, uuid: str, **entry: Any) -> None:
    with FakeState(state).edit() as doc:
        doc.setdefault("health", {})[uuid] = entry


@pytest.fixture
def fake_node(tmp_path: Path) -> Any:
    state = tmp_path / "s.json"
    nvml = Nvml.open("fake", fake_topology="a100-40gb-x8", fake_state=state, node_name="n")
    uuids = [g.uuid for g in nvml.gpus()[:2]]
    devices = [gpu(0).__class__(f"gpu-{i}", "gpu", uuid, i, {}, {}) for i, uuid in enumerate(uuids)]
    monitor = HealthMonitor(
        "n",
        lambda: devices,
        FakeHealthSource(state, poll_s=0.01),
        wait_s=0.01,
        recovery=RecoveryRules(NvmlRecoveryProbe(nvml)),
        recovery_poll_s=0.0,
        clears=ClearRequests(tmp_path),
    )
    yield monitor, state, uuids, tmp_path
    monitor.stop()
    nvml.shutdown()


def taints_now(monitor: HealthMonitor) -> dict[str, tuple[DeviceTaint, ...]]:
    return snapshot_taints(monitor.snapshot())


def test_monitor_takes_a_taint_off_when_the_gpu_recovers_and_raises_it_again_on_a_new_xid(
    fake_node: Any,
) -> None:
    monitor, state, uuids, _ = fake_node
    monitor.start()
    inject(state, uuids[0], xid=48, recoveryAction=1)
    assert wait_for(lambda: taints_now(monitor) == {"gpu-0": (DeviceTaint(XID, "48", "NoSchedule"),)})
    inject(state, uuids[0], xid=48, recoveryAction=0)  # the reset the driver asked for happened
    assert wait_for(lambda: taints_now(monitor) == {})
    assert by_name(monitor.snapshot().devices)["gpu-0"].status is Health.HEALTHY
    inject(state, uuids[0], xid=79)  # a new event: the fault is back
    assert wait_for(lambda: taints_now(monitor) == {"gpu-0": (DeviceTaint(XID, "79", "NoSchedule"),)})


def test_monitor_applies_an_operator_clear_by_device_name(fake_node: Any) -> None:
    monitor, state, uuids, state_dir = fake_node
    monitor.start()
    inject(state, uuids[1], xid=48)  # recovery action stays NONE: only a person can say it is over
    assert wait_for(lambda: "gpu-1" in taints_now(monitor))
    ClearRequests(state_dir).add("gpu-1", frozenset(FaultKind))
    assert wait_for(lambda: taints_now(monitor) == {})
    assert not list((state_dir / "taint-clears").iterdir())


# --- TaintSync -----------------------------------------------------------------------------------


class StaticMonitor:
    """Just enough of HealthMonitor for TaintSync: a settable snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snap = snapshot
        self.cond = threading.Condition()

    def snapshot(self) -> Snapshot:
        return self.snap

    def set(self, snapshot: Snapshot) -> None:
        with self.cond:
            self.snap = snapshot
            self.cond.notify_all()

    def wait_for_change(self, version: int, timeout_s: float, cancelled: Any = lambda: False) -> Snapshot:
        with self.cond:
            self.cond.wait_for(lambda: cancelled() or self.snap.version != version, timeout_s)
            return self.snap

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


def test_taint_sync_publishes_writes_the_status_file_and_reports_changes(tmp_path: Path) -> None:
    devices = [gpu(0), mig(0, start=4), gpu(1)]
    monitor = StaticMonitor(Snapshot("n", device_health(devices, {}), 0))
    published: list[Mapping[str, Any]] = []
    changes: list[Any] = []
    sync = TaintSync(
        monitor,  # type: ignore[arg-type]
        published.append,
        tmp_path / "health.json",
        on_change=changes.extend,
    )
    sync.start()
    try:
        assert published == []  # nothing to taint: no write
        status = read_status(tmp_path / "health.json")
        assert status is not None
        assert status["devices"]["gpu-0"] == {"health": "HEALTHY", "message": "healthy", "taints": []}
        monitor.set(Snapshot("n", device_health(devices, {Scope("GPU-0"): lost_condition()}), 1))
        assert wait_for(lambda: len(published) == 1)
        want = (DeviceTaint(LOST, "", "NoSchedule"),)
        assert published[0] == {"gpu-0": want, mig(0, start=4).name: want}
        assert wait_for(lambda: len(changes) == 2)
        assert all(c.set for c in changes)
        status = read_status(tmp_path / "health.json")
        assert status is not None
        assert status["devices"]["gpu-0"]["taints"] == [{"key": LOST, "effect": "NoSchedule"}]
        assert status["devices"]["gpu-0"]["health"] == "UNHEALTHY"
        monitor.set(Snapshot("n", device_health(devices, {}), 2))
        assert wait_for(lambda: len(published) == 2 and published[1] == {})
        assert wait_for(lambda: len(changes) == 4)
        assert [c.set for c in changes[2:]] == [False, False]
    finally:
        sync.stop()


def test_taint_sync_refuses_an_unknown_lost_effect(tmp_path: Path) -> None:
    monitor = StaticMonitor(Snapshot("n", (), 0))
    with pytest.raises(ValueError, match="NoSchedule"):
        TaintSync(monitor, None, None, lost_effect="None")  # type: ignore[arg-type]


@pytest.fixture
def publisher_for() -> Any:
    made: list[SlicePublisher] = []

    def make(kube: FakeKube, **kwargs: Any) -> SlicePublisher:
        publisher = SlicePublisher(kube, NODE, DRIVER, resync_delay_s=0.01, backoff_initial_s=0.01, **kwargs)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.stop()


# --- slices --------------------------------------------------------------------------------------


def test_taints_are_encoded_on_their_devices_and_pass_validation() -> None:
    taint = DeviceTaint(XID, "48", "NoSchedule")
    (s,) = build_slices(a100_inventory(8), NODE, DRIVER, NODE_UID, 36, taints={"gpu-3": (taint,)})
    validate_pool([s], 36)
    by_dev = {d["name"]: d for d in s["spec"]["devices"]}
    assert by_dev["gpu-3"]["taints"] == [{"key": XID, "value": "48", "effect": "NoSchedule"}]
    assert "taints" not in by_dev["gpu-2"]


def test_a_taintable_pool_keeps_to_64_devices_per_slice_from_the_start_on_1_35_plus() -> None:
    big = Inventory(
        devices=tuple(gpu(i).__class__(f"gpu-{i}", "gpu", f"GPU-{i}", i, {}, {}) for i in range(100))
    )
    assert [len(s["spec"]["devices"]) for s in build_slices(big, NODE, DRIVER, "", 36)] == [100]
    taintable = build_slices(big, NODE, DRIVER, "", 36, taintable=True)
    assert [len(s["spec"]["devices"]) for s in taintable] == [64, 36]
    tainted = {f"gpu-{i}": (DeviceTaint(XID, "48", "NoSchedule"),) for i in range(100)}
    validate_pool(build_slices(big, NODE, DRIVER, "", 36, taints=tainted, taintable=True), 36)
    # 1.34 does not count taints in the 64-device rule: the layout stays as it was.
    assert [len(s["spec"]["devices"]) for s in build_slices(big, NODE, DRIVER, "", 34, taintable=True)] == [
        100
    ]


def test_keep_time_added_copies_the_servers_stamp_for_taints_that_stay() -> None:
    stored = {
        "spec": {
            "devices": [
                {
                    "name": "gpu-0",
                    "taints": [
                        {
                            "key": XID,
                            "value": "48",
                            "effect": "NoSchedule",
                            "timeAdded": "2026-01-01T00:00:00Z",
                        }
                    ],
                }
            ]
        }
    }
    body: dict[str, Any] = {
        "spec": {
            "devices": [
                {
                    "name": "gpu-0",
                    "taints": [
                        {"key": XID, "value": "48", "effect": "NoSchedule"},
                        {"key": LOST, "effect": "NoSchedule"},
                    ],
                }
            ]
        }
    }
    keep_time_added(stored, body)
    taints = body["spec"]["devices"][0]["taints"]
    assert taints[0]["timeAdded"] == "2026-01-01T00:00:00Z"
    assert "timeAdded" not in taints[1]


def test_publisher_writes_set_taints_and_takes_them_off_again(publisher_for: Any) -> None:
    kube = FakeKube()
    outcomes: list[Exception | None] = []
    publisher = publisher_for(kube, taintable=True, on_sync=outcomes.append)
    publisher.start(a100_inventory(4))
    assert publisher.wait_synced(10)
    taint = taint_of(Fault(FaultKind.XID, 48))

    def stored_taints() -> dict[str, Any]:
        return {
            d["name"]: d.get("taints")
            for s in kube.slices.values()
            for d in s["spec"]["devices"]
            if d.get("taints")
        }

    publisher.set_taints({"gpu-2": (taint,)})
    assert wait_for(lambda: stored_taints() == {"gpu-2": [taint.to_dict()]})
    assert publisher.wait_synced(10)
    writes = kube.writes
    publisher.set_taints({"gpu-2": (taint,)})  # the same taints: nothing to write
    assert publisher.wait_synced(10)
    assert kube.writes == writes
    publisher.set_taints({})
    assert wait_for(lambda: stored_taints() == {})
    assert publisher.wait_synced(10)
    assert outcomes and all(o is None for o in outcomes)


def test_publisher_retries_a_failed_taint_write(publisher_for: Any) -> None:
    from driver.errors import ApiError

    kube = FakeKube()
    outcomes: list[Exception | None] = []
    publisher = publisher_for(kube, taintable=True, on_sync=outcomes.append)
    publisher.start(a100_inventory(2))
    assert publisher.wait_synced(10)
    kube.fail("update", ApiError("etcd timeout", status=500))
    taint = taint_of(Fault(FaultKind.GPU_LOST))
    publisher.set_taints({"gpu-0": (taint,)})
    assert wait_for(lambda: any(d.get("taints") for s in kube.slices.values() for d in s["spec"]["devices"]))
    assert publisher.wait_synced(10)
    assert any(isinstance(o, ApiError) for o in outcomes)
    assert outcomes[-1] is None


def test_a_gpu_offered_as_shares_carries_its_taint_on_the_shared_device_and_validates() -> None:
    from driver.shares import offer_shares, parse_share_mode

    inventory = offer_shares(a100_inventory(2), parse_share_mode("4"))
    shared = inventory.devices[0]
    assert shared.allow_multiple_allocations
    snapshot = Snapshot("n", device_health(inventory.devices, {Scope(shared.gpu_uuid): classify_xid(48)}), 1)
    taints = snapshot_taints(snapshot)
    assert taints == {shared.name: (DeviceTaint(XID, "48", "NoSchedule"),)}
    slices = build_slices(inventory, NODE, DRIVER, NODE_UID, 36, taints=taints, taintable=True)
    validate_pool(slices, 36)
    (device,) = [d for d in slices[0]["spec"]["devices"] if d["name"] == shared.name]
    assert device["allowMultipleAllocations"] is True
    assert device["taints"] == [{"key": XID, "value": "48", "effect": "NoSchedule"}]
