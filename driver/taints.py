"""Health -> DRA device taints (KEP-5055): which taint each fault becomes, and keeping them published.

Why it exists: a GPU that raised a fatal XID must stop getting new claims, which only the
scheduler can enforce, and it reads taints from the ResourceSlices. The keys and effects are
NVIDIA's, so tolerations and DeviceTaintRules written for their driver work unchanged:

=====================================  ==========  ==============================================
key                                    value       effect
=====================================  ==========  ==============================================
``gpu.nvidia.com/xid``                 XID number  ``NoSchedule`` (fatal); ``None`` (ignored XID)
``gpu.nvidia.com/gpu-lost``            -           ``NoSchedule`` (``NoExecute`` if configured)
``gpu.nvidia.com/unmonitored``         -           ``None``
=====================================  ==========  ==============================================

A device carries the taints of its GPU's faults (and, for a static MIG device, of its
instance's): the full GPU, every MIG device and every share of it. The taints come from the same
:class:`~driver.health.Snapshot` the kubelet's health stream sends, so the two always agree.

NoExecute for a lost GPU is off by default: with it the API server's device-taint eviction
deletes every pod whose claim holds a tainted device, and a GPU_IS_LOST answer is not always the
end of a GPU (an event-wait failure marks *every* GPU of the node lost until each answers again),
so one flaky read would kill all running workloads of the node. Turn it on (``--gpu-lost-taint-
effect NoExecute``) where a fast reschedule is worth that risk.

:class:`TaintSync` follows the health monitor in a thread of its own: on each change it hands
the taints to the publisher (which retries failed writes with backoff), writes the status file
the debug CLI reads, and tells the observers (metrics, Events) what was set and cleared.

What it does not do: decide health (``driver.health``), decide recovery (``driver.recovery``),
or lay out slices (``driver.resourceslices``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cdi.atomicfile import write_atomic
from driver.health import Fault, FaultKind, HealthMonitor, Snapshot

log = structlog.get_logger(__name__)

KEY_PREFIX = "gpu.nvidia.com/"
XID_KEY = KEY_PREFIX + FaultKind.XID.value
GPU_LOST_KEY = KEY_PREFIX + FaultKind.GPU_LOST.value
UNMONITORED_KEY = KEY_PREFIX + FaultKind.UNMONITORED.value
EFFECTS = ("NoSchedule", "NoExecute", "None")
LOST_EFFECTS = ("NoSchedule", "NoExecute")
STATUS_FILE = "health.json"


@dataclass(frozen=True, slots=True, order=True)
class DeviceTaint:
    """One ``spec.devices[].taints[]`` entry (``timeAdded`` is left to the API server)."""

    key: str
    value: str
    effect: str

    def to_dict(self) -> dict[str, str]:
        out = {"key": self.key, "effect": self.effect}
        if self.value:
            out["value"] = self.value
        return out

    def __str__(self) -> str:
        return f"{self.key}{'=' + self.value if self.value else ''}:{self.effect}"


DeviceTaints = Mapping[str, tuple[DeviceTaint, ...]]


def taint_of(fault: Fault, lost_effect: str = "NoSchedule") -> DeviceTaint:
    """The taint NVIDIA's driver sets for the same event."""
    if fault.kind is FaultKind.XID:
        return DeviceTaint(XID_KEY, str(fault.xid or 0), "NoSchedule" if fault.fatal else "None")
    if fault.kind is FaultKind.GPU_LOST:
        return DeviceTaint(GPU_LOST_KEY, "", lost_effect)
    return DeviceTaint(UNMONITORED_KEY, "", "None")


def taints_of(faults: Iterable[Fault], lost_effect: str = "NoSchedule") -> tuple[DeviceTaint, ...]:
    """One taint per key, sorted by key (faults hold at most one per kind already)."""
    by_key = {t.key: t for t in sorted(taint_of(f, lost_effect) for f in faults)}
    return tuple(by_key[k] for k in sorted(by_key))


def snapshot_taints(
    snapshot: Snapshot, lost_effect: str = "NoSchedule"
) -> dict[str, tuple[DeviceTaint, ...]]:
    """Taints of every device of the snapshot that has any."""
    out = {}
    for device in snapshot.devices:
        taints = taints_of(device.faults, lost_effect)
        if taints:
            out[device.device] = taints
    return out


@dataclass(frozen=True, slots=True)
class TaintChange:
    """One taint set on or taken off one device."""

    device: str
    taint: DeviceTaint
    set: bool


def diff(old: DeviceTaints, new: DeviceTaints) -> list[TaintChange]:
    """Taints set and cleared between two states (a changed value or effect is clear + set)."""
    out: list[TaintChange] = []
    for device in sorted(set(old) | set(new)):
        before, after = set(old.get(device, ())), set(new.get(device, ()))
        out.extend(TaintChange(device, t, False) for t in sorted(before - after))
        out.extend(TaintChange(device, t, True) for t in sorted(after - before))
    return out


class TaintSync:
    """Keeps published taints, the status file and the observers in step with the health monitor.

    Args:
        monitor: the health snapshots.
        publish: hands the complete taint map to the ResourceSlice publisher (None: no API server).
        status_path: the JSON file ``gpu-dra devices`` / ``doctor`` read.
        lost_effect: ``NoSchedule`` (default) or ``NoExecute`` for ``gpu.nvidia.com/gpu-lost``.
        on_change: called with the changes after each publish hand-over (metrics, Events).
    """

    def __init__(
        self,
        monitor: HealthMonitor,
        publish: Callable[[DeviceTaints], None] | None,
        status_path: Path | None,
        *,
        lost_effect: str = "NoSchedule",
        on_change: Callable[[list[TaintChange]], None] | None = None,
        refresh_s: float = 30.0,
    ) -> None:
        if lost_effect not in LOST_EFFECTS:
            raise ValueError(f"gpu-lost taint effect {lost_effect!r} must be one of {LOST_EFFECTS}")
        self._monitor = monitor
        self._publish = publish
        self._status_path = status_path
        self._lost_effect = lost_effect
        self.on_change = on_change
        self._refresh_s = refresh_s
        self._current: dict[str, tuple[DeviceTaint, ...]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def current(self) -> dict[str, tuple[DeviceTaint, ...]]:
        """The taints last handed to the publisher, by device."""
        with self._lock:
            return dict(self._current)

    def start(self) -> None:
        """Apply the current snapshot now, then follow changes in a thread."""
        snapshot = self._monitor.snapshot()
        self.apply(snapshot)
        self._thread = threading.Thread(
            target=self._run, args=(snapshot.version,), name="taints", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._monitor.wake()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _run(self, version: int) -> None:
        while not self._stop.is_set():
            snapshot = self._monitor.wait_for_change(version, self._refresh_s, self._stop.is_set)
            if snapshot is None or self._stop.is_set():
                return
            if snapshot.version != version:
                version = snapshot.version
                try:
                    self.apply(snapshot)
                except Exception:  # a broken observer must not stop taint publishing
                    log.exception("applying device taints failed")

    def apply(self, snapshot: Snapshot) -> list[TaintChange]:
        """Hand this snapshot's taints over; returns what changed."""
        taints = snapshot_taints(snapshot, self._lost_effect)
        with self._lock:
            changes = diff(self._current, taints)
            self._current = taints
        if changes and self._publish is not None:
            self._publish(taints)
        for change in changes:
            log.info(
                "device taint set" if change.set else "device taint cleared",
                device=change.device,
                taint=str(change.taint),
            )
        self._write_status(snapshot, taints)
        if changes and self.on_change is not None:
            self.on_change(changes)
        return changes

    def _write_status(self, snapshot: Snapshot, taints: DeviceTaints) -> None:
        if self._status_path is None:
            return
        doc: dict[str, Any] = {
            "updated": time.time(),
            "pool": snapshot.pool,
            "devices": {
                d.device: {
                    "health": d.status.name,
                    "message": d.message,
                    "taints": [t.to_dict() for t in taints.get(d.device, ())],
                }
                for d in snapshot.devices
            },
        }
        try:
            write_atomic(self._status_path, json.dumps(doc, sort_keys=True), mode=0o644)
        except OSError as exc:
            log.warning("writing the health status file failed", file=str(self._status_path), error=str(exc))


def read_status(path: Path) -> dict[str, Any] | None:
    """The status file the plugin writes (None when there is none or it is unreadable)."""
    try:
        doc: Any = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
