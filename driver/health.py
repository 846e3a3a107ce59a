"""Device health: what the kubelet's resource-health stream reports for each published device.

Why it exists: a GPU that raised a fatal XID or fell off the bus should show up as UNHEALTHY in
the pods that use it (``allocatedResourcesStatus``), and a GPU nobody watches should say so
(UNKNOWN) instead of pretending to be fine.

Three parts:

* a :class:`HealthSource` says what is wrong with which physical GPU (or MIG instance), keyed
  by :class:`Scope`. :class:`NvmlEventSource` waits for NVML XID events; :class:`FakeHealthSource`
  reads a ``health`` map from the fake NVML state file (fault injection for tests and demos);
* :func:`classify_xid` is the one place that decides which XIDs matter (NVIDIA's list of
  application-caused XIDs is ignored, as their driver does);
* :class:`HealthMonitor` runs the source in a background thread and turns its per-GPU
  conditions into one :class:`Snapshot` of *every* published device - a MIG device inherits its
  parent GPU's condition - and wakes waiters when the snapshot changes.

Conditions are sticky, as in NVIDIA's driver: an XID is not forgotten until the plugin restarts
(the fake source is the exception: its file is the truth, so a test can heal a GPU).

This module does not speak gRPC (``driver.kubeletplugin.healthstream`` does), does not taint
devices in ResourceSlices and never removes a device from publication.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import structlog

from driver.errors import ConfigError, DriverError

if TYPE_CHECKING:
    from driver.inventory import AllocatableDevice
    from driver.nvml.backend import Nvml

log = structlog.get_logger(__name__)

#: XIDs caused by applications, not by the GPU (NVIDIA's driver and device plugin skip them).
IGNORED_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})
#: NVML's "no GPU/compute instance" marker in event data.
NO_INSTANCE = 0xFFFFFFFF
FAKE_HEALTH_KEY = "health"

_NVML_NOT_SUPPORTED = 3
_NVML_TIMEOUT = 10
_NVML_FUNCTION_NOT_FOUND = 13
_NVML_GPU_IS_LOST = 15
_EVENT_SINGLE_BIT_ECC = 0x1
_EVENT_DOUBLE_BIT_ECC = 0x2
_EVENT_XID_CRITICAL = 0x8
_EVENT_CALLS = (
    "nvmlEventSetCreate",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetFree",
)


class Health(enum.IntEnum):
    """Same numbers as the wire enum ``HealthStatus`` of both health API versions."""

    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2


# Which condition wins when several apply to one device.
_SEVERITY = {Health.HEALTHY: 0, Health.UNKNOWN: 1, Health.UNHEALTHY: 2}


@dataclass(frozen=True, slots=True)
class Condition:
    """What is known about one GPU or MIG instance."""

    status: Health
    message: str


HEALTHY = Condition(Health.HEALTHY, "healthy")


class Scope(NamedTuple):
    """A physical GPU (``gi_id`` None) or one MIG GPU instance on it."""

    gpu_uuid: str
    gi_id: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """One published device's health as the stream reports it."""

    device: str
    status: Health
    message: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every published device of the pool; ``version`` grows on each change."""

    pool: str
    devices: tuple[DeviceHealth, ...]
    version: int


class HealthSource(Protocol):
    """Where conditions come from; called from the monitor's one background thread."""

    def wait(self, timeout_s: float) -> Mapping[Scope, Condition]:
        """Block up to ``timeout_s`` for news; return every non-default condition known now.

        Scopes left out are healthy. ``timeout_s`` 0 answers at once.
        """
        ...

    def close(self) -> None:
        """Release what the source holds; called once, after the last :meth:`wait` returned."""
        ...


def parse_xid_list(text: str) -> frozenset[int]:
    """``"48, 79"`` -> {48, 79}; malformed entries are dropped (NVIDIA does the same) and logged."""
    xids: set[int] = set()
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        try:
            xids.add(int(item))
        except ValueError:
            log.warning(
                "ignoring malformed XID in ignore list", entry=item, fix="use comma-separated integers"
            )
    return frozenset(xids)


def classify_xid(xid: int, ignored: frozenset[int] = IGNORED_XIDS, detail: str = "") -> Condition:
    """The condition an XID event leaves behind: HEALTHY (noted) for ignored XIDs, else UNHEALTHY."""
    suffix = f": {detail}" if detail else ""
    if xid in ignored:
        return Condition(Health.HEALTHY, f"healthy; XID {xid} ignored (application error){suffix}")
    return Condition(
        Health.UNHEALTHY,
        f"XID {xid} critical error{suffix}; drain the GPU and check the node's kernel log (dmesg)",
    )


def merge(current: Condition | None, new: Condition) -> Condition:
    """The condition that stands after ``new`` arrives: never downgrade severity (sticky)."""
    if current is None or _SEVERITY[new.status] >= _SEVERITY[current.status]:
        return new
    return current


def device_health(
    devices: Sequence[AllocatableDevice], conditions: Mapping[Scope, Condition]
) -> tuple[DeviceHealth, ...]:
    """Resolve per-GPU / per-instance conditions onto every published device, in order.

    A device takes the worst of its GPU's condition and, for a MIG device with a live instance,
    its instance's. An instance condition that matches no published device (dynamic MIG
    publishes placements, not instances) is applied to the whole GPU: reporting too much is
    safer than missing a broken slice.
    """
    live_gis = {(d.gpu_uuid, d.mig_live.gi_id) for d in devices if d.mig_live is not None}
    per_gpu: dict[str, Condition] = {}
    for scope, cond in conditions.items():
        if scope.gi_id is None or (scope.gpu_uuid, scope.gi_id) not in live_gis:
            whole = cond
            if scope.gi_id is not None and cond.status is not Health.HEALTHY:
                whole = Condition(cond.status, f"MIG instance GI {scope.gi_id}: {cond.message}")
            per_gpu[scope.gpu_uuid] = _worst(per_gpu.get(scope.gpu_uuid), whole)
    out = []
    for d in devices:
        cond = per_gpu.get(d.gpu_uuid, HEALTHY)
        if d.mig_live is not None:
            own = conditions.get(Scope(d.gpu_uuid, d.mig_live.gi_id))
            if own is not None:
                cond = _worst(cond, own)
        out.append(DeviceHealth(d.name, cond.status, cond.message))
    return tuple(out)


def _worst(a: Condition | None, b: Condition) -> Condition:
    if a is None or _SEVERITY[b.status] > _SEVERITY[a.status]:
        return b
    return a


class HealthMonitor:
    """Keeps the current :class:`Snapshot` of every published device and wakes waiters on change."""

    def __init__(
        self,
        pool: str,
        devices: Callable[[], Sequence[AllocatableDevice]],
        source: HealthSource,
        *,
        wait_s: float = 1.0,
    ) -> None:
        """Args:
        pool: the ResourceSlice pool (the node name).
        devices: the published devices, asked on every update (the inventory may be replaced).
        source: where conditions come from.
        wait_s: the longest one source wait blocks (bounds stop latency and inventory refresh).
        """
        self.pool = pool
        self._devices = devices
        self._source = source
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._snapshot = Snapshot(pool, device_health(devices(), {}), 0)
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Read the source once (so the first stream message is current), then watch it."""
        self._poll(0.0)
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        self._thread.start()

    def stop(self, join_s: float | None = None) -> bool:
        """End every waiting stream, let the current source wait finish, then release the source.

        ``join_s`` bounds how long to wait for that source wait (None: up to ``wait_s`` + 5 s).
        Returns whether the monitor thread ended; if not, the source is left open - freeing an
        NVML event set another thread waits on is undefined - which at process exit is harmless.
        """
        with self._cond:
            already = self._stopped
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self._wait_s + 5.0 if join_s is None else join_s)
            if self._thread.is_alive():
                return False
            self._thread = None
        if not already:
            self._source.close()
        return True

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopped

    def snapshot(self) -> Snapshot:
        """The current health of every published device."""
        with self._cond:
            return self._snapshot

    def wait_for_change(
        self, version: int, timeout_s: float, cancelled: Callable[[], bool] = lambda: False
    ) -> Snapshot | None:
        """The snapshot once it is newer than ``version`` or ``timeout_s`` passed; None once stopped.

        ``cancelled`` is re-checked whenever :meth:`wake` is called (a stream whose RPC ended).
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._stopped or cancelled() or self._snapshot.version != version, timeout_s
            )
            return None if self._stopped else self._snapshot

    def wake(self) -> None:
        """Make every :meth:`wait_for_change` re-check its ``cancelled`` predicate."""
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stopped:
            if not self._poll(self._wait_s):
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped, self._wait_s)

    def _poll(self, timeout_s: float) -> bool:
        try:
            conditions = self._source.wait(timeout_s)
        except (DriverError, OSError, ValueError) as exc:
            log.warning("health source failed; keeping the last known health", error=str(exc))
            return False
        self._update(conditions)
        return True

    def _update(self, conditions: Mapping[Scope, Condition]) -> None:
        devices = device_health(self._devices(), conditions)
        with self._cond:
            old = self._snapshot
            if devices == old.devices:
                return
            self._snapshot = Snapshot(self.pool, devices, old.version + 1)
            self._cond.notify_all()
        before = {d.device: d for d in old.devices}
        for d in devices:
            prev = before.get(d.device)
            if prev is None or prev.status != d.status or prev.message != d.message:
                log.info(
                    "device health changed",
                    device=d.device,
                    health=d.status.name,
                    was=None if prev is None else prev.status.name,
                    message=d.message,
                )


# --- the fake source -------------------------------------------------------------------------


class FakeHealthSource:
    """Reads ``state["health"]`` of the fake NVML state file every ``poll_s`` seconds.

    Entry format, keyed by GPU UUID (all keys optional)::

        {"xid": 79, "gi": 3, "gpuLost": false, "unmonitored": false, "message": "injected"}

    ``gpuLost`` makes the GPU UNHEALTHY, ``unmonitored`` UNKNOWN, ``xid`` goes through
    :func:`classify_xid`; ``gi`` narrows the condition to one MIG instance. Removing the entry
    heals the GPU (unlike real XIDs).
    """

    def __init__(
        self, state_path: Path, *, poll_s: float = 1.0, ignored: frozenset[int] = IGNORED_XIDS
    ) -> None:
        self._path = Path(state_path)
        self._poll_s = poll_s
        self._ignored = ignored
        self._closed = threading.Event()

    def wait(self, timeout_s: float) -> Mapping[Scope, Condition]:
        """Sleep up to one poll interval, then read the file."""
        from driver.nvml.fakestate import FakeState

        if timeout_s > 0:
            self._closed.wait(min(timeout_s, self._poll_s))
        raw = FakeState(self._path).read().get(FAKE_HEALTH_KEY) or {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"fake NVML state {self._path}: {FAKE_HEALTH_KEY!r} must map GPU UUIDs to objects; "
                "fix the file"
            )
        out: dict[Scope, Condition] = {}
        for uuid, entry in raw.items():
            if not isinstance(entry, dict):
                raise ConfigError(
                    f"fake NVML state {self._path}: health entry of {uuid} must be an object; fix the file"
                )
            scope = Scope(str(uuid), None if entry.get("gi") is None else int(entry["gi"]))
            out[scope] = merge(out.get(scope), self._condition(entry))
        return out

    def _condition(self, entry: Mapping[str, Any]) -> Condition:
        detail = str(entry.get("message", ""))
        if entry.get("gpuLost"):
            return Condition(Health.UNHEALTHY, _lost_message(detail))
        if entry.get("unmonitored"):
            return Condition(Health.UNKNOWN, _unmonitored_message(detail or "injected"))
        if entry.get("xid") is not None:
            return classify_xid(int(entry["xid"]), self._ignored, detail)
        return HEALTHY

    def close(self) -> None:
        """Nothing to release; a later :meth:`wait` does not sleep."""
        self._closed.set()


def _lost_message(detail: str = "") -> str:
    suffix = f" ({detail})" if detail else ""
    return f"GPU is lost{suffix}; the node needs a GPU reset or reboot"


def _unmonitored_message(reason: str) -> str:
    return f"health not monitored: {reason}"


# --- the NVML event source -------------------------------------------------------------------


class NvmlEventSource:
    """XID critical-error events of every GPU from one NVML event set.

    Event waits run outside the session lock (NVML is thread-safe, and a wait blocks for its
    whole timeout). A GPU whose events cannot be registered is reported UNKNOWN, "not
    monitored", with the reason. ``GPU_IS_LOST`` from the wait, or an event naming a GPU we
    cannot read, marks every GPU UNHEALTHY.
    """

    def __init__(
        self, nvml: Nvml, gpu_uuids: Iterable[str], *, ignored: frozenset[int] = IGNORED_XIDS
    ) -> None:
        self._nvml = nvml
        self._m = nvml.module
        self._uuids = tuple(dict.fromkeys(gpu_uuids))
        self._ignored = ignored
        self._conditions: dict[Scope, Condition] = {}
        self._set: Any = None
        self._lost = False
        self._register()

    def _register(self) -> None:
        m = self._m
        missing = [name for name in _EVENT_CALLS if not hasattr(m, name)]
        if missing:
            self._unmonitored(self._uuids, f"this NVML library has no {', '.join(missing)}")
            return
        try:
            self._set = m.nvmlEventSetCreate()
        except m.NVMLError as exc:
            self._unmonitored(self._uuids, f"nvmlEventSetCreate failed: {exc}")
            return
        monitored = []
        for uuid in self._uuids:
            try:
                handle = self._nvml.handle(uuid)
                supported = int(m.nvmlDeviceGetSupportedEventTypes(handle))
                mask = supported & (_EVENT_XID_CRITICAL | _EVENT_DOUBLE_BIT_ECC | _EVENT_SINGLE_BIT_ECC)
                if not mask & _EVENT_XID_CRITICAL:
                    self._unmonitored([uuid], "the GPU does not report XID events")
                    continue
                m.nvmlDeviceRegisterEvents(handle, mask, self._set)
            except (m.NVMLError, DriverError) as exc:
                self._unmonitored([uuid], f"event registration failed: {exc}")
                continue
            monitored.append(uuid)
        log.info(
            "health events registered", monitored=monitored, unmonitored=len(self._uuids) - len(monitored)
        )

    def _unmonitored(self, uuids: Iterable[str], reason: str) -> None:
        for uuid in uuids:
            log.warning("GPU health not monitored", gpu=uuid, reason=reason)
            self._conditions[Scope(uuid)] = Condition(Health.UNKNOWN, _unmonitored_message(reason))

    def wait(self, timeout_s: float) -> Mapping[Scope, Condition]:
        """Wait for one event (at most ``timeout_s``) and fold it into the sticky conditions."""
        m = self._m
        if self._set is None or self._lost:
            # Nothing left to wait on; sleep so the monitor does not spin.
            time.sleep(timeout_s)
            return dict(self._conditions)
        try:
            data = (m.nvmlEventSetWait_v2 if hasattr(m, "nvmlEventSetWait_v2") else m.nvmlEventSetWait)(
                self._set, int(timeout_s * 1000)
            )
        except m.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == _NVML_TIMEOUT:
                return dict(self._conditions)
            if code == _NVML_GPU_IS_LOST:
                self._mark_all_lost("the event wait reported GPU_IS_LOST")
                return dict(self._conditions)
            if code in (_NVML_NOT_SUPPORTED, _NVML_FUNCTION_NOT_FOUND):
                # Permanent: stop waiting (and logging) every second; say so per GPU instead.
                self.close()
                self._unmonitored(self._uuids, f"nvmlEventSetWait is not available ({exc})")
                return dict(self._conditions)
            raise DriverError(f"nvmlEventSetWait failed: {exc}; health stays as last known") from exc
        self._handle_event(data)
        return dict(self._conditions)

    def _handle_event(self, data: Any) -> None:
        m = self._m
        if not int(data.eventType) & _EVENT_XID_CRITICAL:
            return  # ECC counts are registered (as NVIDIA does) but only XIDs change health
        try:
            uuid = m.nvmlDeviceGetUUID(data.device)
        except m.NVMLError as exc:
            self._mark_all_lost(f"an XID event named a GPU whose UUID cannot be read ({exc})")
            return
        uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        xid = int(data.eventData)
        gi = int(data.gpuInstanceId)
        scope = Scope(uuid, None if gi == NO_INSTANCE else gi)
        cond = classify_xid(xid, self._ignored)
        log.warning("XID event", gpu=uuid, xid=xid, gi=scope.gi_id, ignored=xid in self._ignored)
        self._conditions[scope] = merge(self._conditions.get(scope), cond)

    def _mark_all_lost(self, reason: str) -> None:
        log.error("GPU lost; reporting every device unhealthy", reason=reason)
        self._lost = True
        for uuid in self._uuids:
            self._conditions[Scope(uuid)] = Condition(Health.UNHEALTHY, _lost_message(reason))

    def close(self) -> None:
        """Free the event set (once)."""
        event_set, self._set = self._set, None
        if event_set is not None:
            try:
                self._m.nvmlEventSetFree(event_set)
            except self._m.NVMLError as exc:
                log.warning("freeing the NVML event set failed", error=str(exc))


def open_source(
    backend: str,
    nvml: Nvml,
    gpu_uuids: Iterable[str],
    *,
    fake_state: Path | None = None,
    ignored: frozenset[int] = IGNORED_XIDS,
) -> HealthSource:
    """The source for this NVML backend: the state file for ``fake``, XID events otherwise."""
    if backend == "fake":
        if fake_state is None:
            raise ConfigError("the fake health source needs the fake NVML state file; pass fake_state")
        return FakeHealthSource(fake_state, ignored=ignored)
    return NvmlEventSource(nvml, gpu_uuids, ignored=ignored)
