"""Device health model: XID classification, MIG inheritance, the fake and NVML event sources, the monitor."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver.errors import ConfigError, DriverError
from driver.health import (
    HEALTHY,
    Condition,
    FakeHealthSource,
    Health,
    HealthMonitor,
    NvmlEventSource,
    Scope,
    classify_xid,
    device_health,
    merge,
    parse_xid_list,
)
from driver.inventory import AllocatableDevice, DeviceKind
from driver.kubeletplugin.healthstream import HealthStream
from driver.nvml.backend import Nvml
from driver.nvml.fakestate import FakeState
from mig.spec import MigLive, MigSpec


def gpu(minor: int) -> AllocatableDevice:
    return AllocatableDevice(f"gpu-{minor}", "gpu", f"GPU-{minor}", minor, {}, {})


def mig(minor: int, gi: int | None = None, start: int = 0) -> AllocatableDevice:
    spec = MigSpec(minor, f"GPU-{minor}", "1g.5gb", 19, start, 1)
    live = None if gi is None else MigLive(minor, f"GPU-{minor}", gi, 0, f"MIG-{minor}-{gi}", 19, start)
    kind: DeviceKind = "mig-dynamic" if gi is None else "mig-static"
    return AllocatableDevice(spec.name, kind, f"GPU-{minor}", minor, {}, {}, mig_spec=spec, mig_live=live)


def by_name(devices: Any) -> dict[str, Any]:
    return {d.device: d for d in devices}


# --- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 68, 109])
def test_application_xids_leave_the_gpu_healthy(xid: int) -> None:
    cond = classify_xid(xid)
    assert cond.status is Health.HEALTHY
    assert f"XID {xid}" in cond.message


@pytest.mark.parametrize("xid", [48, 63, 74, 79, 94, 95, 999])
def test_other_xids_make_it_unhealthy_naming_the_xid(xid: int) -> None:
    cond = classify_xid(xid)
    assert cond.status is Health.UNHEALTHY
    assert f"XID {xid}" in cond.message


def test_additional_ignored_xids_and_malformed_entries() -> None:
    extra = parse_xid_list(" 48, x, ,79")
    assert extra == {48, 79}
    assert classify_xid(48, extra).status is Health.HEALTHY


def test_conditions_are_sticky_until_something_worse_arrives() -> None:
    bad = classify_xid(79)
    assert merge(bad, classify_xid(13)) == bad
    assert merge(HEALTHY, bad) == bad
    newer = classify_xid(48)
    assert merge(bad, newer) == newer  # same severity: the newer event is reported


# --- resolving onto published devices ------------------------------------------------------------


def test_mig_devices_inherit_their_parent_gpu() -> None:
    devices = [gpu(0), gpu(2), mig(2), mig(2, start=1), mig(0)]
    out = by_name(device_health(devices, {Scope("GPU-2"): classify_xid(79)}))
    assert [d.status for d in out.values()] == [
        Health.HEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,
        Health.UNHEALTHY,
        Health.HEALTHY,
    ]
    assert "XID 79" in out[mig(2).name].message
    assert out["gpu-0"].message == "healthy"


def test_instance_condition_hits_only_the_matching_static_mig_device() -> None:
    a, b = mig(1, gi=3), mig(1, gi=5, start=2)
    out = by_name(device_health([gpu(1), a, b], {Scope("GPU-1", 5): classify_xid(94)}))
    assert out[a.name].status is Health.HEALTHY
    assert out[b.name].status is Health.UNHEALTHY
    assert out["gpu-1"].status is Health.HEALTHY


def test_instance_condition_without_a_published_instance_covers_the_gpu() -> None:
    dyn = mig(1)
    out = by_name(device_health([gpu(1), dyn], {Scope("GPU-1", 7): classify_xid(94)}))
    assert out["gpu-1"].status is Health.UNHEALTHY
    assert out[dyn.name].status is Health.UNHEALTHY
    assert "GI 7" in out[dyn.name].message


def test_worst_condition_wins() -> None:
    unknown = Condition(Health.UNKNOWN, "health not monitored: x")
    static = mig(0, gi=1)
    out = by_name(device_health([static], {Scope("GPU-0"): unknown, Scope("GPU-0", 1): classify_xid(79)}))
    assert out[static.name].status is Health.UNHEALTHY
    out = by_name(device_health([static], {Scope("GPU-0"): unknown}))
    assert out[static.name].status is Health.UNKNOWN


# --- fake source ---------------------------------------------------------------------------------


def inject(state: Path, uuid: str, **entry: Any) -> None:
    with FakeState(state).edit() as doc:
        doc.setdefault("health", {})[uuid] = entry


def test_fake_source_reads_the_health_map(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    source = FakeHealthSource(state, poll_s=0.01)
    assert source.wait(0) == {}  # no file yet: all healthy
    inject(state, "GPU-1", xid=79, message="fell off the bus")
    inject(state, "GPU-2", gpuLost=True)
    inject(state, "GPU-3", unmonitored=True)
    inject(state, "GPU-4", xid=13)
    inject(state, "GPU-5", xid=94, gi=3)
    got = source.wait(0.01)
    assert got[Scope("GPU-1")].status is Health.UNHEALTHY
    assert "XID 79" in got[Scope("GPU-1")].message
    assert "fell off the bus" in got[Scope("GPU-1")].message
    assert got[Scope("GPU-2")].status is Health.UNHEALTHY
    assert "lost" in got[Scope("GPU-2")].message
    assert (got[Scope("GPU-3")].status, got[Scope("GPU-3")].message) == (
        Health.UNKNOWN,
        "health not monitored: injected",
    )
    assert got[Scope("GPU-4")].status is Health.HEALTHY
    assert got[Scope("GPU-5", 3)].status is Health.UNHEALTHY
    with FakeState(state).edit() as doc:
        del doc["health"]["GPU-1"]
    assert Scope("GPU-1") not in source.wait(0)  # the file is the truth: the GPU healed


def test_fake_source_rejects_a_malformed_map_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    with FakeState(state).edit() as doc:
        doc["health"] = ["GPU-1"]
    with pytest.raises(ConfigError, match=r"s\.json.*health"):
        FakeHealthSource(state).wait(0)


# --- monitor -------------------------------------------------------------------------------------


class ScriptedSource:
    """Returns whatever the test put in ``now``; raises when ``fail`` is set."""

    def __init__(self) -> None:
        self.now: dict[Scope, Condition] = {}
        self.fail = False
        self.closed = False
        self.polled = threading.Event()

    def wait(self, timeout_s: float) -> Mapping[Scope, Condition]:
        self.polled.set()
        if self.fail:
            raise DriverError("source broke")
        return dict(self.now)

    def forget(self, scope: Scope, kinds: Any) -> None:
        self.now.pop(scope, None)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def scripted() -> Iterator[tuple[HealthMonitor, ScriptedSource]]:
    source = ScriptedSource()
    monitor = HealthMonitor("node-a", lambda: [gpu(0), gpu(2), mig(2)], source, wait_s=0.01)
    yield monitor, source
    monitor.stop()


def test_monitor_reports_every_device_and_wakes_on_change(scripted: Any) -> None:
    monitor, source = scripted
    monitor.start()
    first = monitor.snapshot()
    assert first.pool == "node-a"
    assert [d.device for d in first.devices] == ["gpu-0", "gpu-2", mig(2).name]
    assert {d.status for d in first.devices} == {Health.HEALTHY}
    source.now = {Scope("GPU-2"): classify_xid(79)}
    changed = monitor.wait_for_change(first.version, 30.0)
    assert changed is not None
    assert changed.version > first.version
    assert [d.status for d in changed.devices] == [Health.HEALTHY, Health.UNHEALTHY, Health.UNHEALTHY]


def test_monitor_without_change_times_out_with_the_same_snapshot(scripted: Any) -> None:
    monitor, _ = scripted
    monitor.start()
    first = monitor.snapshot()
    assert monitor.wait_for_change(first.version, 0.05) == first


def test_failing_source_keeps_the_last_known_health(scripted: Any) -> None:
    monitor, source = scripted
    source.now = {Scope("GPU-0"): classify_xid(79)}
    monitor.start()
    before = monitor.snapshot()
    source.fail = True
    source.now = {}
    source.polled.clear()
    assert source.polled.wait(30)
    assert source.polled.wait(30)
    assert monitor.snapshot().devices == before.devices


def test_stop_releases_waiters_and_closes_the_source(scripted: Any) -> None:
    monitor, source = scripted
    monitor.start()
    version = monitor.snapshot().version
    result: list[Any] = []
    waiter = threading.Thread(target=lambda: result.append(monitor.wait_for_change(version, 60.0)))
    waiter.start()
    monitor.stop()
    waiter.join(30)
    assert result == [None]
    assert source.closed


def test_cancelled_waiter_returns_on_wake(scripted: Any) -> None:
    monitor, _ = scripted
    monitor.start()
    first = monitor.snapshot()
    cancelled = threading.Event()
    result: list[Any] = []
    waiter = threading.Thread(
        target=lambda: result.append(monitor.wait_for_change(first.version, 60.0, cancelled.is_set))
    )
    waiter.start()
    cancelled.set()
    monitor.wake()
    waiter.join(30)
    assert result == [first]


def test_heartbeat_must_stay_inside_the_kubelet_timeout(scripted: Any) -> None:
    monitor, _ = scripted
    for bad in (0.0, -1.0, 30.0, 60.0):
        with pytest.raises(ConfigError, match="heartbeat"):
            HealthStream(monitor, bad)
    assert HealthStream(monitor, 0.2).heartbeat_s == 0.2


# --- NVML event source (over the fake pynvml with event calls added) -----------------------------


class EventData:
    def __init__(self, device: Any, event_type: int, xid: int, gi: int = 0xFFFFFFFF) -> None:
        self.device = device
        self.eventType = event_type
        self.eventData = xid
        self.gpuInstanceId = gi
        self.computeInstanceId = gi


class Events:
    """Event calls for the fake module: a queue of events or NVML error codes."""

    def __init__(self, supported: int = 0x8 | 0x2 | 0x1, unsupported_uuid: str | None = None) -> None:
        self.supported = supported
        self.unsupported_uuid = unsupported_uuid
        self.queue: list[Any] = []
        self.registered: list[tuple[Any, int]] = []
        self.freed = 0
        self.uuid_of: Any = None

    def install(self, monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
        monkeypatch.setattr(module, "nvmlEventSetCreate", lambda: "set", raising=False)
        monkeypatch.setattr(module, "nvmlDeviceGetSupportedEventTypes", self._supported, raising=False)
        monkeypatch.setattr(module, "nvmlDeviceRegisterEvents", self._register, raising=False)
        monkeypatch.setattr(module, "nvmlEventSetWait_v2", self._wait, raising=False)
        monkeypatch.setattr(module, "nvmlEventSetFree", self._free, raising=False)
        self.uuid_of = module.nvmlDeviceGetUUID

    def _supported(self, handle: Any) -> int:
        if self.unsupported_uuid is not None and self.uuid_of(handle) == self.unsupported_uuid:
            return 0x1
        return self.supported

    def _register(self, handle: Any, mask: int, event_set: Any) -> None:
        self.registered.append((handle, mask))

    def _wait(self, event_set: Any, timeout_ms: int) -> Any:
        if not self.queue:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        item = self.queue.pop(0)
        if isinstance(item, int):
            raise pynvml.NVMLError(item)
        return item

    def _free(self, event_set: Any) -> None:
        self.freed += 1


@pytest.fixture
def nvml(tmp_path: Path) -> Iterator[Nvml]:
    session = Nvml.open("fake", fake_topology="a100-40gb-x8", fake_state=tmp_path / "s.json", node_name="n1")
    yield session
    session.shutdown()


def test_nvml_source_reports_fatal_xids_and_skips_ignored_ones(
    nvml: Nvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    events.install(monkeypatch, nvml.module)
    gpus = nvml.gpus()
    uuids = [g.uuid for g in gpus]
    source = NvmlEventSource(nvml, uuids)
    assert len(events.registered) == 8
    assert all(mask == 0xB for _, mask in events.registered)
    assert source.wait(0) == {}  # timeout: nothing known
    h2 = nvml.handle(uuids[2])
    events.queue += [EventData(h2, 0x8, 13), EventData(h2, 0x2, 0), EventData(h2, 0x8, 79)]
    assert source.wait(0.01)[Scope(uuids[2])].status is Health.HEALTHY
    assert source.wait(0.01)[Scope(uuids[2])].status is Health.HEALTHY  # ECC events do not change health
    got = source.wait(0.01)
    assert got[Scope(uuids[2])].status is Health.UNHEALTHY
    assert "XID 79" in got[Scope(uuids[2])].message
    events.queue.append(EventData(h2, 0x8, 31))
    assert source.wait(0.01)[Scope(uuids[2])].status is Health.UNHEALTHY  # sticky
    events.queue.append(EventData(nvml.handle(uuids[3]), 0x8, 94, gi=2))
    assert source.wait(0.01)[Scope(uuids[3], 2)].status is Health.UNHEALTHY
    source.close()
    source.close()
    assert events.freed == 1


def test_nvml_source_marks_every_gpu_lost(nvml: Nvml, monkeypatch: pytest.MonkeyPatch) -> None:
    events = Events()
    events.install(monkeypatch, nvml.module)
    uuids = [g.uuid for g in nvml.gpus()]
    source = NvmlEventSource(nvml, uuids)
    events.queue.append(pynvml.NVML_ERROR_GPU_IS_LOST)
    got = source.wait(0.01)
    assert {got[Scope(u)].status for u in uuids} == {Health.UNHEALTHY}
    assert "lost" in got[Scope(uuids[0])].message


def test_nvml_source_reports_gpus_without_xid_events_as_not_monitored(
    nvml: Nvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    uuids = [g.uuid for g in nvml.gpus()]
    events = Events(unsupported_uuid=uuids[5])
    events.install(monkeypatch, nvml.module)
    got = NvmlEventSource(nvml, uuids).wait(0)
    assert list(got) == [Scope(uuids[5])]
    assert got[Scope(uuids[5])].status is Health.UNKNOWN
    assert "not monitored" in got[Scope(uuids[5])].message


def test_nvml_source_without_event_support_reports_all_unknown(nvml: Nvml) -> None:
    # The fake pynvml has no event calls at all: like a library without them.
    uuids = [g.uuid for g in nvml.gpus()]
    try:
        source = NvmlEventSource(nvml, uuids)
    except AttributeError:
        pytest.fail("a library without event calls must give UNKNOWN, not crash")
    got = source.wait(0)
    assert {got[Scope(u)].status for u in uuids} == {Health.UNKNOWN}


def test_nvml_source_without_a_working_wait_stops_waiting(
    nvml: Nvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    events.install(monkeypatch, nvml.module)
    uuids = [g.uuid for g in nvml.gpus()]
    source = NvmlEventSource(nvml, uuids)
    events.queue.append(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    got = source.wait(0)
    assert {got[Scope(u)].status for u in uuids} == {Health.UNKNOWN}
    assert events.freed == 1
    assert source.wait(0) == got  # no event set left to wait on


def test_nvml_source_unexpected_wait_error_is_a_driver_error(
    nvml: Nvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    events.install(monkeypatch, nvml.module)
    source = NvmlEventSource(nvml, [g.uuid for g in nvml.gpus()])
    events.queue.append(pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(DriverError, match="nvmlEventSetWait"):
        source.wait(0)
