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

Each condition also names its :class:`Fault` s (a fatal or ignored XID, a lost GPU, an
unmonitored GPU): ``driver.taints`` turns those into ResourceSlice device taints, from the same
snapshot the stream sends, so the kubelet's view and the scheduler's agree by construction.

Conditions are sticky, as in NVIDIA's driver: an XID is not forgotten until the plugin restarts,
or until ``driver.recovery`` sees the GPU recover (or an operator clears it) and the monitor calls
the source's ``forget``. The fake source's file is the truth for what it reports (removing an
entry heals the GPU), but a forgotten entry stays forgotten until it changes.

This module does not speak gRPC (``driver.kubeletplugin.healthstream`` does), does not build
taints or talk to the API server, and never removes a device from publication.
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
    from driver.recovery import ClearRequest, ClearRequests, RecoveryRules

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


class FaultKind(enum.Enum):
    """What went wrong; the value is the suffix of NVIDIA's taint key (``gpu.nvidia.com/<value>``)."""

    XID = "xid"
    GPU_LOST = "gpu-lost"
    UNMONITORED = "unmonitored"


@dataclass(frozen=True, slots=True)
class Fault:
    """One thing wrong with a GPU or MIG instance: what a device taint is made from.

    ``fatal`` is False only for an XID in the ignore list (NVIDIA's taint effect None).
    """

    kind: FaultKind
    xid: int | None = None
    fatal: bool = True


@dataclass(frozen=True, slots=True)
class Condition:
    """What is known about one GPU or MIG instance."""

    status: Health
    message: str
    faults: frozenset[Fault] = frozenset()


HEALTHY = Condition(Health.HEALTHY, "healthy")


class Scope(NamedTuple):
    """A physical GPU (``gi_id`` None) or one MIG GPU instance on it."""

    gpu_uuid: str
    gi_id: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """One published device's health as the stream reports it, and the faults behind it."""

    device: str
    status: Health
    message: str
    faults: frozenset[Fault] = frozenset()


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

    def forget(self, scope: Scope, kinds: frozenset[FaultKind]) -> None:
        """Drop the faults of these kinds at ``scope`` (the GPU recovered or an operator cleared them).

        Called from the monitor's thread, between waits.
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
        return Condition(
            Health.HEALTHY,
            f"healthy; XID {xid} ignored (application error){suffix}",
            frozenset({Fault(FaultKind.XID, xid, fatal=False)}),
        )
    return Condition(
        Health.UNHEALTHY,
        f"XID {xid} critical error{suffix}; drain the GPU and check the node's kernel log (dmesg)",
        frozenset({Fault(FaultKind.XID, xid)}),
    )


def lost_condition(detail: str = "") -> Condition:
    """A GPU that fell off the bus (or whose events name a GPU NVML cannot read)."""
    return Condition(Health.UNHEALTHY, _lost_message(detail), frozenset({Fault(FaultKind.GPU_LOST)}))


def unmonitored_condition(reason: str) -> Condition:
    """A GPU whose health nobody watches: UNKNOWN, never a reason to stop scheduling."""
    return Condition(Health.UNKNOWN, _unmonitored_message(reason), frozenset({Fault(FaultKind.UNMONITORED)}))


def merge_faults(current: frozenset[Fault], new: frozenset[Fault]) -> frozenset[Fault]:
    """One fault per kind (one taint per key, as NVIDIA's driver): the newer replaces the older,
    except that an ignored XID never replaces a fatal one (sticky severity)."""
    by_kind = {f.kind: f for f in current}
    for fault in new:
        old = by_kind.get(fault.kind)
        if old is None or fault.fatal or not old.fatal:
            by_kind[fault.kind] = fault
    return frozenset(by_kind.values())


def merge(current: Condition | None, new: Condition) -> Condition:
    """The condition that stands after ``new`` arrives: never downgrade severity (sticky)."""
    if current is None:
        return new
    faults = merge_faults(current.faults, new.faults)
    winner = new if _SEVERITY[new.status] >= _SEVERITY[current.status] else current
    return Condition(winner.status, winner.message, faults)


def without(condition: Condition, kinds: frozenset[FaultKind]) -> Condition | None:
    """``condition`` with faults of ``kinds`` dropped; None when nothing is left wrong.

    What remains is re-described from the remaining faults (a cleared XID no longer says UNHEALTHY
    when only an ignored one, or an unmonitored GPU, is left).
    """
    left = frozenset(f for f in condition.faults if f.kind not in kinds)
    if left == condition.faults:
        return condition
    out: Condition | None = None
    for fault in sorted(left, key=lambda f: (f.kind.value, f.xid or 0)):
        out = merge(out, condition_of(fault))
    return out


def condition_of(fault: Fault, ignored: frozenset[int] = IGNORED_XIDS) -> Condition:
    """The condition a single fault stands for (its message re-derived)."""
    if fault.kind is FaultKind.GPU_LOST:
        return lost_condition()
    if fault.kind is FaultKind.UNMONITORED:
        return unmonitored_condition("see the plugin log")
    return classify_xid(fault.xid or 0, ignored if not fault.fatal else frozenset())


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
                whole = Condition(cond.status, f"MIG instance GI {scope.gi_id}: {cond.message}", cond.faults)
            per_gpu[scope.gpu_uuid] = _worst(per_gpu.get(scope.gpu_uuid), whole)
    out = []
    for d in devices:
        cond = per_gpu.get(d.gpu_uuid, HEALTHY)
        if d.mig_live is not None:
            own = conditions.get(Scope(d.gpu_uuid, d.mig_live.gi_id))
            if own is not None:
                cond = _worst(cond, own)
        out.append(DeviceHealth(d.name, cond.status, cond.message, cond.faults))
    return tuple(out)


def _worst(a: Condition | None, b: Condition) -> Condition:
    """The worse condition's status and message, with the faults of both."""
    if a is None:
        return b
    winner = b if _SEVERITY[b.status] > _SEVERITY[a.status] else a
    return Condition(winner.status, winner.message, merge_faults(a.faults, b.faults))


class HealthMonitor:
    """Keeps the current :class:`Snapshot` of every published device and wakes waiters on change."""

    def __init__(
        self,
        pool: str,
        devices: Callable[[], Sequence[AllocatableDevice]],
        source: HealthSource,
        *,
        wait_s: float = 1.0,
        recovery: RecoveryRules | None = None,
        recovery_poll_s: float = 10.0,
        clears: ClearRequests | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        pool: the ResourceSlice pool (the node name).
        devices: the published devices, asked on every update (the inventory may be replaced).
        source: where conditions come from.
        wait_s: the longest one source wait blocks (bounds stop latency and inventory refresh).
        recovery: the rules that take recovered faults away (``driver.recovery``); None keeps
            every fault until restart, as NVIDIA's driver does.
        recovery_poll_s: how often the recovery rules read the GPUs (only GPUs with faults).
        clears: the operator's clear requests, applied on every poll.
        """
        self.pool = pool
        self._devices = devices
        self._source = source
        self._wait_s = wait_s
        self._recovery = recovery
        self._recovery_poll_s = recovery_poll_s
        self._clears = clears
        self._clock = clock
        self._next_recovery = 0.0
        #: Told about each fault newly seen at a scope (metrics: health events by XID).
        self.on_faults: Callable[[list[Fault]], None] | None = None
        self._seen: dict[Scope, frozenset[Fault]] = {}
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
            conditions = dict(self._source.wait(timeout_s))
        except (DriverError, OSError, ValueError) as exc:
            log.warning("health source failed; keeping the last known health", error=str(exc))
            return False
        if self._clears is not None:
            for request in self._clears.take():
                self._forget(conditions, self._clear_scopes(request, conditions), request.kinds)
                log.info(
                    "taints cleared by an operator",
                    target=request.target,
                    kinds=sorted(k.value for k in request.kinds),
                )
        now = self._clock()
        if self._recovery is not None and now >= self._next_recovery:
            self._next_recovery = now + self._recovery_poll_s
            try:
                recovered = self._recovery.recovered(conditions)
            except Exception as exc:  # noqa: BLE001 - a probe bug must not stop health reporting
                log.warning("recovery check failed; faults stay", error=str(exc))
                recovered = {}
            for scope, kinds in recovered.items():
                self._forget(conditions, [scope], kinds)
        self._update(conditions)
        return True

    def _clear_scopes(self, request: ClearRequest, conditions: Mapping[Scope, Condition]) -> list[Scope]:
        """Every scope of the GPU named by a clear request (a device name or a GPU UUID)."""
        uuids = {d.gpu_uuid for d in self._devices() if request.target in (d.name, d.gpu_uuid)}
        if not uuids:
            log.warning(
                "taint clear request names no published device or GPU",
                target=request.target,
                fix="use a device name from `gpu-dra devices` or a GPU UUID",
            )
        return [s for s in conditions if s.gpu_uuid in uuids]

    def _forget(
        self, conditions: dict[Scope, Condition], scopes: Iterable[Scope], kinds: frozenset[FaultKind]
    ) -> None:
        for scope in scopes:
            self._source.forget(scope, kinds)
            left = without(conditions[scope], kinds)
            if left is None:
                del conditions[scope]
            else:
                conditions[scope] = left
            if self._recovery is not None and FaultKind.XID in kinds:
                self._recovery.forget([scope])

    def _update(self, conditions: Mapping[Scope, Condition]) -> None:
        seen = {scope: cond.faults for scope, cond in conditions.items()}
        new = [f for scope, faults in seen.items() for f in faults - self._seen.get(scope, frozenset())]
        self._seen = seen
        if new and self.on_faults is not None:
            try:
                self.on_faults(new)
            except Exception:  # an observer must not stop health reporting
                log.exception("health fault observer failed")
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
                    faults=sorted(f"{f.kind.value}{'' if f.xid is None else f'={f.xid}'}" for f in d.faults),
                )


# --- the fake source -------------------------------------------------------------------------


class FakeHealthSource:
    """Reads ``state["health"]`` of the fake NVML state file every ``poll_s`` seconds.

    Entry format, keyed by GPU UUID (all keys optional)::

        {"xid": 79, "gi": 3, "gpuLost": false, "unmonitored": false, "message": "injected",
         "recoveryAction": 1}

    ``gpuLost`` makes the GPU UNHEALTHY, ``unmonitored`` UNKNOWN, ``xid`` goes through
    :func:`classify_xid`; ``gi`` narrows the condition to one MIG instance. ``recoveryAction``
    is what the fake NVML answers for ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`` (see
    ``driver.recovery``); it is not a fault itself. Removing the entry heals the GPU (unlike real
    XIDs); a forgotten entry (recovered, or cleared by an operator) is not reported again until
    its fault fields change.
    """

    _FAULT_FIELDS = ("xid", "gi", "gpuLost", "unmonitored", "message")

    def __init__(
        self, state_path: Path, *, poll_s: float = 1.0, ignored: frozenset[int] = IGNORED_XIDS
    ) -> None:
        self._path = Path(state_path)
        self._poll_s = poll_s
        self._ignored = ignored
        self._closed = threading.Event()
        self._entries: dict[Scope, str] = {}  # the fault fields last read, per scope
        self._forgotten: dict[Scope, tuple[str, frozenset[FaultKind]]] = {}

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
        entries: dict[Scope, str] = {}
        for uuid, entry in raw.items():
            if not isinstance(entry, dict):
                raise ConfigError(
                    f"fake NVML state {self._path}: health entry of {uuid} must be an object; fix the file"
                )
            scope = Scope(str(uuid), None if entry.get("gi") is None else int(entry["gi"]))
            key = repr(sorted((k, entry[k]) for k in self._FAULT_FIELDS if k in entry))
            entries[scope] = key
            cond: Condition | None = self._condition(entry)
            forgotten = self._forgotten.get(scope)
            if forgotten is not None and forgotten[0] == key and cond is not None:
                cond = without(cond, forgotten[1])
            if cond is not None and cond != HEALTHY:
                out[scope] = merge(out.get(scope), cond)
        # An entry that changed or went away is a new story: forget the forgetting.
        self._forgotten = {s: f for s, f in self._forgotten.items() if entries.get(s) == f[0]}
        self._entries = entries
        return out

    def forget(self, scope: Scope, kinds: frozenset[FaultKind]) -> None:
        """Stop reporting these faults at ``scope`` until its entry's fault fields change."""
        key = self._entries.get(scope)
        if key is None:
            return
        old = self._forgotten.get(scope)
        already = old[1] if old is not None and old[0] == key else frozenset()
        self._forgotten[scope] = (key, already | kinds)

    def _condition(self, entry: Mapping[str, Any]) -> Condition:
        detail = str(entry.get("message", ""))
        if entry.get("gpuLost"):
            return lost_condition(detail)
        if entry.get("unmonitored"):
            return unmonitored_condition(detail or "injected")
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
            self._conditions[Scope(uuid)] = unmonitored_condition(reason)

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
            self._conditions[Scope(uuid)] = lost_condition(reason)

    def forget(self, scope: Scope, kinds: frozenset[FaultKind]) -> None:
        """Drop recovered or operator-cleared faults; a GPU back from "lost" is watched again."""
        cond = self._conditions.get(scope)
        if cond is None:
            return
        left = without(cond, kinds)
        if left is None:
            del self._conditions[scope]
        else:
            self._conditions[scope] = left
        if FaultKind.GPU_LOST in kinds and self._lost:
            still_lost = any(
                f.kind is FaultKind.GPU_LOST for c in self._conditions.values() for f in c.faults
            )
            if not still_lost:
                self._lost = False
                if self._set is None:
                    self._register()

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
