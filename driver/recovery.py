"""When a faulty GPU is well again: the rule for each fault, and the operator's clear requests.

Why it exists: NVIDIA's driver never takes a health taint off until the plugin restarts, so a GPU
that was reset stays unschedulable, while a restart forgets a GPU that is still broken. Here each
fault kind has one documented rule (README "Device taints"), checked every poll interval:

* **XID** (``gpu.nvidia.com/xid``, fatal or ignored): the driver's recovery action
  (``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``) was seen asking for something (GPU reset, drain,
  reboot...) after the XID, and now reads NONE - the recovery it asked for happened. A GPU whose
  action never leaves NONE, or whose driver does not report the field, keeps the taint until an
  operator clears it (``gpu-dra taints clear``): nothing tells the plugin the XID is behind it.
* **GPU lost** (``gpu.nvidia.com/gpu-lost``): the GPU answers NVML again (its handle resolves and
  the field read succeeds) and asks for no recovery (NONE or not reported).
* **Unmonitored** (``gpu.nvidia.com/unmonitored``): never automatically - it says the plugin
  cannot watch the GPU, which only a restart with working NVML events changes. An operator may
  clear it, hiding that the GPU is not watched.

A MIG instance's fault follows its parent GPU's reading (the recovery action is per GPU).

An operator's request is a small JSON file dropped into ``<state dir>/taint-clears/`` by
``gpu-dra taints clear`` (atomically; one file per request, so the CLI and the plugin never write
the same file); the monitor applies and deletes it on its next poll.

What it does not do: decide health (``driver.health``) or build taints (``driver.taints``).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from cdi.atomicfile import write_atomic
from driver.errors import ConfigError, DriverError
from driver.health import Condition, FaultKind, Scope

if TYPE_CHECKING:
    from driver.nvml.backend import Nvml

log = structlog.get_logger(__name__)

#: ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`` (nvml.h); the name in nvidia-ml-py is used when present.
RECOVERY_ACTION_FIELD = 230
CLEARS_DIR = "taint-clears"
ALL_KINDS = frozenset(FaultKind)
_NVML_SUCCESS = 0
_NVML_NOT_SUPPORTED = 3
_NVML_FUNCTION_NOT_FOUND = 13


class RecoveryAction(enum.IntEnum):
    """``nvmlDeviceGpuRecoveryAction_t``: what the driver says the GPU needs."""

    NONE = 0
    GPU_RESET = 1
    NODE_REBOOT = 2
    DRAIN_P2P = 3
    DRAIN_AND_RESET = 4


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at a GPU: does it answer, and what recovery does its driver ask for.

    ``action`` is None when the GPU answered but does not report the field (older drivers).
    """

    answered: bool
    action: int | None = None


class RecoveryProbe(Protocol):
    """Reads one GPU's state; called from the health monitor's thread."""

    def read(self, gpu_uuid: str) -> Reading: ...


class NvmlRecoveryProbe:
    """The recovery-action field through NVML (the real library or the fake, same calls)."""

    def __init__(self, nvml: Nvml) -> None:
        self._nvml = nvml
        self._m = nvml.module
        self._field = int(getattr(self._m, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", RECOVERY_ACTION_FIELD))

    def read(self, gpu_uuid: str) -> Reading:
        m = self._m
        try:
            handle = self._nvml.handle(gpu_uuid)
        except (DriverError, m.NVMLError):
            return Reading(answered=False)
        if not hasattr(m, "nvmlDeviceGetFieldValues"):
            return Reading(answered=True)
        try:
            values = m.nvmlDeviceGetFieldValues(handle, [self._field])
        except m.NVMLError as exc:
            if getattr(exc, "value", None) in (_NVML_NOT_SUPPORTED, _NVML_FUNCTION_NOT_FOUND):
                return Reading(answered=True)
            return Reading(answered=False)
        value = values[0]
        code = int(value.nvmlReturn)
        if code == _NVML_SUCCESS:
            return Reading(answered=True, action=int(value.value.uiVal))
        return Reading(answered=code == _NVML_NOT_SUPPORTED)


class RecoveryRules:
    """Applies the per-fault rules above to the current conditions; remembers what it has seen."""

    def __init__(self, probe: RecoveryProbe) -> None:
        self._probe = probe
        self._asked: set[Scope] = set()  # scopes whose GPU asked for a recovery since the XID

    def recovered(self, conditions: Mapping[Scope, Condition]) -> dict[Scope, frozenset[FaultKind]]:
        """Which faults to forget now, per scope (one probe read per GPU)."""
        readings: dict[str, Reading] = {}
        out: dict[Scope, frozenset[FaultKind]] = {}
        for scope, cond in conditions.items():
            kinds = {f.kind for f in cond.faults} - {FaultKind.UNMONITORED}
            if not kinds:
                continue
            reading = readings.get(scope.gpu_uuid)
            if reading is None:
                reading = readings[scope.gpu_uuid] = self._probe.read(scope.gpu_uuid)
            done: set[FaultKind] = set()
            if FaultKind.GPU_LOST in kinds and reading.answered and not reading.action:
                done.add(FaultKind.GPU_LOST)
            if FaultKind.XID in kinds and reading.answered and reading.action is not None:
                if reading.action != RecoveryAction.NONE:
                    if scope not in self._asked:
                        log.info(
                            "GPU asks for recovery",
                            gpu=scope.gpu_uuid,
                            gi=scope.gi_id,
                            action=_action_name(reading.action),
                        )
                    self._asked.add(scope)
                elif scope in self._asked:
                    done.add(FaultKind.XID)
            if done:
                out[scope] = frozenset(done)
                log.info(
                    "GPU recovered",
                    gpu=scope.gpu_uuid,
                    gi=scope.gi_id,
                    cleared=sorted(k.value for k in done),
                    rule="recovery action back to NONE after a recovery was asked for"
                    if FaultKind.XID in done
                    else "the GPU answers NVML again",
                )
        self.forget(s for s, kinds in out.items() if FaultKind.XID in kinds)
        # Scopes without an XID any more (cleared by hand, healed) start over.
        live = {s for s, c in conditions.items() if any(f.kind is FaultKind.XID for f in c.faults)}
        self._asked &= live
        return out

    def forget(self, scopes: Iterable[Scope]) -> None:
        """Start over for these scopes (their XID was cleared)."""
        self._asked.difference_update(scopes)


def _action_name(action: int) -> str:
    try:
        return RecoveryAction(action).name
    except ValueError:
        return str(action)


# -- the operator's clear requests ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClearRequest:
    """Take the taints of ``kinds`` off ``target`` (a device name or a GPU UUID); ``at``: Unix time."""

    target: str
    kinds: frozenset[FaultKind]
    at: float
    path: Path | None = None


def parse_kinds(names: Iterable[str]) -> frozenset[FaultKind]:
    """``["xid", "gpu.nvidia.com/gpu-lost"]`` -> kinds; ``all`` or nothing means every kind."""
    kinds: set[FaultKind] = set()
    for raw in names:
        name = raw.removeprefix("gpu.nvidia.com/")
        if name == "all":
            return ALL_KINDS
        try:
            kinds.add(FaultKind(name))
        except ValueError:
            raise ConfigError(
                f"unknown taint {raw!r}; use one of {', '.join(k.value for k in FaultKind)} or all"
            ) from None
    return frozenset(kinds) or ALL_KINDS


class ClearRequests:
    """The ``taint-clears`` directory: the CLI adds requests, the monitor takes them."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir) / CLEARS_DIR
        self._clock = clock

    def add(self, target: str, kinds: frozenset[FaultKind]) -> Path:
        """Write one request (atomically); returns its file."""
        if not target:
            raise ConfigError("name the device (e.g. gpu-0) or GPU UUID whose taints to clear")
        self.dir.mkdir(parents=True, exist_ok=True)
        at = self._clock()
        path = self.dir / f"{int(at * 1e6)}-{os.getpid()}.json"
        body = {"target": target, "kinds": sorted(k.value for k in kinds), "at": at}
        write_atomic(path, json.dumps(body), mode=0o600)
        return path

    def take(self) -> list[ClearRequest]:
        """Every pending request, oldest first, each file removed; a malformed one is logged and removed."""
        try:
            paths = sorted(
                p for p in self.dir.iterdir() if p.suffix == ".json" and not p.name.startswith(".")
            )
        except FileNotFoundError:
            return []
        out = []
        for path in paths:
            try:
                doc: Any = json.loads(path.read_text())
                out.append(
                    ClearRequest(
                        str(doc["target"]), parse_kinds(doc.get("kinds") or []), float(doc["at"]), path
                    )
                )
            except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
                log.warning("ignoring malformed taint clear request", file=str(path), error=str(exc))
            with contextlib.suppress(OSError):
                path.unlink()
        return out
