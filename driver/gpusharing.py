"""GpuSharing: the state's sharing seam, filled with time-slicing and MPS from ``sharing/``.

For one claim: resolve the opaque configs into config groups (defaults < class < claim), then per
group apply what its sharing asks for - time-slicing on the group's full GPUs, or one MPS control
daemon for the group (full GPUs and MIG devices alike; MPS on dynamic MIG is something NVIDIA's
driver cannot do). What was applied is returned as JSON records, which ``driver.state`` writes to
the checkpoint; :meth:`GpuSharing.undo` works from those records only.

All or nothing: when group 2 fails, group 1 is undone before the error leaves :meth:`apply`, so a
failed prepare leaves no daemon running and no compute mode changed.

This module does not decode configs (``sharing.config``) nor run the tools (``sharing.timeslicing``,
``sharing.mps``); it maps between their terms and the state's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from cdi.spec import ContainerEdits
from driver.errors import PermanentClaimError, TemporaryClaimError
from driver.inventory import AllocatableDevice, Version
from driver.kubeletplugin.claims import Claim
from driver.metrics import stage
from driver.state import SharingOutcome, config_groups
from mig.spec import MigLive
from sharing.config import STRATEGY_MPS, STRATEGY_TIME_SLICING, ConfigGroup
from sharing.errors import ConfigError as SharingConfigError
from sharing.errors import SharingError
from sharing.mps import MpsManager, mps_group_id
from sharing.timeslicing import TimeSlicer

log = structlog.get_logger(__name__)

TIMESLICE = "timeslice"
MPS = "mps"


class GpuSharing:
    """Applies and undoes a claim's time-slicing and MPS settings."""

    def __init__(
        self,
        driver_name: str,
        timeslicer: TimeSlicer,
        mps: MpsManager,
        *,
        time_slicing_enabled: bool = True,
        mps_enabled: bool = True,
    ) -> None:
        self._driver = driver_name
        self._timeslicer = timeslicer
        self._mps = mps
        self._gated_off = {
            strategy: gate
            for strategy, gate, enabled in (
                (STRATEGY_TIME_SLICING, "TimeSlicingSettings", time_slicing_enabled),
                (STRATEGY_MPS, "MPSSupport", mps_enabled),
            )
            if not enabled
        }

    def _check_gates(self, groups: Sequence[ConfigGroup]) -> None:
        """Refuse, before anything starts, a strategy whose feature gate is off on this node."""
        for group in groups:
            sharing = group.sharing
            gate = self._gated_off.get(sharing.strategy) if sharing is not None else None
            if sharing is not None and gate is not None:
                raise PermanentClaimError(
                    f"sharing strategy {sharing.strategy} is turned off on this node by feature gate "
                    f"{gate}=false; remove the sharing config from the claim, or enable the gate "
                    f"(--feature-gates / FEATURE_GATES {gate}=true, chart: plugin.featureGates.{gate})"
                )

    def apply(
        self,
        claim_uid: str,
        claim: Claim,
        devices: Sequence[AllocatableDevice],
        live: Mapping[str, MigLive] | None = None,
        intend: Callable[[dict[str, Any]], None] | None = None,
    ) -> SharingOutcome:
        """Apply the sharing of every config group of ``claim``.

        Args:
            claim_uid: the claim's UID (MPS daemon ids derive from it).
            claim: the ResourceClaim (v1 JSON shape).
            devices: the claim's devices of this driver.
            live: MIG devices created for this claim, by device name (their MIG UUIDs).
            intend: told the undo record of a time slice before it is set (the caller records it,
                so a crash right after the change is still rolled back; MPS keeps its own record
                in the group directory).

        Raises:
            PermanentClaimError: a config is invalid or does not fit these devices.
            TemporaryClaimError: a tool failed or a daemon did not answer in time.
        """
        groups = config_groups(claim, devices, self._driver)
        self._check_gates(groups)
        by_name = {d.name: d for d in devices}
        records: list[dict[str, Any]] = []
        edits: dict[str, ContainerEdits] = {}
        try:
            for group in groups:
                members = [by_name[str(r.get("device"))] for r in group.results if r.get("device") in by_name]
                record, group_edits = self._apply_group(claim_uid, group, members, live or {}, intend)
                if record is not None:
                    records.append(record)
                for name in group_edits:
                    edits[name] = edits.get(name, ContainerEdits()).merged(group_edits[name])
        except SharingConfigError as exc:
            self.undo(claim_uid, records)
            raise PermanentClaimError(f"sharing config does not fit the allocated devices: {exc}") from exc
        except SharingError as exc:
            self.undo(claim_uid, records)
            raise TemporaryClaimError(f"applying GPU sharing failed: {exc}") from exc
        except BaseException:
            self.undo(claim_uid, records)
            raise
        return SharingOutcome(records=tuple(records), edits=edits)

    def check(self, claim: Claim, devices: Sequence[AllocatableDevice]) -> None:
        """Decode every config group and fit it to its devices, changing nothing.

        The checks :meth:`apply` makes before each change, made for all groups up front: MIG
        devices not created yet stand in with placeholder UUIDs (their memory is known).

        Raises:
            PermanentClaimError: a config is invalid or does not fit these devices.
        """
        groups = config_groups(claim, devices, self._driver)
        by_name = {d.name: d for d in devices}
        try:
            for group in groups:
                config = group.config
                members = [by_name[str(r.get("device"))] for r in group.results if r.get("device") in by_name]
                mps = None if config is None else config.mps()
                if mps is None or not members:
                    continue
                uuids = [_checked_uuid(d) for d in members]
                self._mps.check(
                    uuids,
                    mps,
                    {_checked_uuid(d): int(d.capacity.get("memory", 0)) for d in members},
                    {_checked_uuid(d): _capability(d) for d in members},
                )
        except SharingConfigError as exc:
            raise PermanentClaimError(f"sharing config does not fit the allocated devices: {exc}") from exc

    def sweep(self) -> list[Path]:
        """MPS group directories a start killed before its record left behind."""
        return self._mps.sweep_unrecorded()

    def leftovers(self, prefix: str) -> list[dict[str, Any]]:
        """MPS group records under the MPS root (the ownership rebuild reads them)."""
        return self._mps.leftovers(prefix)

    def _apply_group(
        self,
        claim_uid: str,
        group: ConfigGroup,
        members: Sequence[AllocatableDevice],
        live: Mapping[str, MigLive],
        intend: Callable[[dict[str, Any]], None] | None,
    ) -> tuple[dict[str, Any] | None, dict[str, ContainerEdits]]:
        config = group.config
        if config is None or not members:
            return None, {}
        interval = config.time_slicing()
        if interval is not None:
            gpus = sorted({d.gpu_uuid for d in members if d.kind == "gpu"})
            if not gpus:
                return None, {}  # time-slicing has no effect on MIG devices, as with NVIDIA's driver
            record = {"kind": TIMESLICE, "gpus": gpus, "level": interval.level}
            if intend is not None:
                intend(record)
            with stage("timeslice_set"):
                self._timeslicer.apply(gpus, interval)
            log.info("time-slicing applied", gpus=gpus, interval=interval.interval)
            return record, {}
        mps = config.mps()
        if mps is None:
            return None, {}  # no sharing: the device is used as it is, nothing on the GPU changes
        uuids = [_sharing_uuid(d, live) for d in members]
        memory = {_sharing_uuid(d, live): int(d.capacity.get("memory", 0)) for d in members}
        capability = {_sharing_uuid(d, live): _capability(d) for d in members}
        with stage("mps_start"):
            daemon = self._mps.start(mps_group_id(claim_uid, uuids), uuids, mps, memory, capability)
        device_edits = daemon.container_edits()
        return {"kind": MPS, **daemon.to_record()}, {d.name: device_edits for d in members}

    def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Undo recorded sharing, newest first; a record of something already gone is fine.

        Then stop any MPS daemon of this claim that no record names: a plugin killed after
        starting it and before the checkpoint recorded it leaves one, and its rollback ends here.
        """
        for record in reversed(list(records)):
            kind = record.get("kind")
            if kind == TIMESLICE:
                with stage("timeslice_reset"):
                    self._timeslicer.reset([str(u) for u in record.get("gpus", [])])
            elif kind == MPS:
                with stage("mps_stop"):
                    self._mps.stop(record)
            else:
                log.warning("unknown sharing record left alone", record=dict(record), claim_uid=claim_uid)
        recorded = {r.get("groupId") for r in records if r.get("kind") == MPS}
        for leftover in self._mps.leftovers(f"{claim_uid}-"):
            if leftover.get("groupId") not in recorded:
                log.info("stopping unrecorded mps daemon of the claim", mps_group=leftover.get("groupId"))
                self._mps.stop(leftover)


def _sharing_uuid(device: AllocatableDevice, live: Mapping[str, MigLive]) -> str:
    """The UUID MPS addresses: the GPU's, or the MIG device's once it exists."""
    if device.kind == "gpu":
        return device.gpu_uuid
    if device.mig_live is not None:
        return device.mig_live.mig_uuid
    created = live.get(device.name)
    if created is None:
        raise PermanentClaimError(f"MIG device {device.name} has no instance to run MPS on")
    return created.mig_uuid


def _checked_uuid(device: AllocatableDevice) -> str:
    """The UUID MPS will address, or a stand-in for a MIG device that does not exist yet."""
    if device.kind == "gpu":
        return device.gpu_uuid
    if device.mig_live is not None:
        return device.mig_live.mig_uuid
    return f"MIG-pending-{device.name}"


def _capability(device: AllocatableDevice) -> tuple[int, int]:
    value = device.attributes.get("cudaComputeCapability")
    if isinstance(value, Version):
        major, minor, *_ = (int(p) for p in value.value.split("."))
        return major, minor
    return 0, 0


def find_tool(driver_root: Path, name: str) -> Path:
    """``name`` from the driver root's usual bin dirs (as NVIDIA's driver looks it up)."""
    for sub in ("usr/bin", "usr/sbin", "bin", "sbin", "opt/bin", "usr/local/bin"):
        candidate = driver_root / sub / name
        if candidate.is_file():
            return candidate
    return driver_root / "usr/bin" / name
