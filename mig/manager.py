"""Creates and destroys MIG devices (GI + default CI) on request, safely and one GPU at a time.

Prepares on one GPU are serialised by a per-GPU lock (NVML GI creation on one GPU is serial
anyway, and placement checks must not race); different GPUs proceed in parallel. The manager
never touches an instance it cannot match to what the caller recorded, and never changes MIG
mode where that needs a GPU reset (Ampere and older), where a mode change is already pending,
or inside a vGPU guest; on Hopper and newer it enables MIG on demand only when the node allows
it. It keeps no durable state: the checkpoint (in ``driver``) records what was created.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import structlog

from mig.backend import ARCH_HOPPER, ARCH_UNKNOWN, MigBackend
from mig.errors import (
    NVML_ERROR_INSUFFICIENT_RESOURCES,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    MigBackendError,
    MigMismatchError,
    MigPlacementError,
    MigUnsupportedError,
)
from mig.spec import MigInstance, MigLive, MigSpec

log = structlog.get_logger(__name__)


class MigManager:
    """GI/CI lifecycle over a :class:`MigBackend`; thread-safe."""

    def __init__(self, backend: MigBackend, *, allow_mig_mode_change: bool = False) -> None:
        self._backend = backend
        self._allow_mode_change = allow_mig_mode_change
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._enabled_by_us: set[str] = set()

    @contextmanager
    def gpu_lock(self, parent_uuid: str) -> Iterator[None]:
        """Hold the lock that serialises MIG changes on one GPU."""
        with self._locks_guard:
            lock = self._locks.setdefault(parent_uuid, threading.Lock())
        with lock:
            yield

    # --- MIG mode safety -------------------------------------------------------------------

    def mode_change_refusal(self, parent_uuid: str) -> str | None:
        """Why MIG mode must not be changed on this GPU, or None when changing it is safe and allowed."""
        if not self._allow_mode_change:
            return "MIG mode changes are off on this node (allow_mig_mode_change enables them on Hopper+)"
        arch = self._backend.architecture(parent_uuid)
        if arch < ARCH_HOPPER or arch == ARCH_UNKNOWN:
            return f"architecture {arch} needs a GPU reset to change MIG mode; that is the admin's decision"
        if self._backend.is_vgpu_guest(parent_uuid):
            return "the GPU is a vGPU guest; MIG mode belongs to the host"
        current, pending = self._backend.mig_mode(parent_uuid)
        if current != pending:
            return f"a MIG mode change is pending (current={current}, pending={pending}); reset the GPU first"
        return None

    def _ensure_enabled(self, parent_uuid: str) -> None:
        current, _pending = self._backend.mig_mode(parent_uuid)
        if current:
            return
        refusal = self.mode_change_refusal(parent_uuid)
        if refusal is not None:
            raise MigUnsupportedError(
                f"MIG mode is disabled on GPU {parent_uuid} and will not be enabled: {refusal}; "
                "enable MIG mode on the GPU (nvidia-smi -i <gpu> -mig 1) or request a full GPU"
            )
        log.info("mig mode enabling", parent_uuid=parent_uuid)
        self._backend.set_mig_mode(parent_uuid, True)
        current, _pending = self._backend.mig_mode(parent_uuid)
        if not current:
            raise MigUnsupportedError(
                f"MIG mode on GPU {parent_uuid} did not become enabled after the request; "
                "check the GPU with nvidia-smi -q and reset it if a change is pending"
            )
        self._enabled_by_us.add(parent_uuid)

    def maybe_disable(self, parent_uuid: str) -> bool:
        """Turn MIG off again on a GPU this manager enabled it on, once no instance is left.

        Returns True when MIG mode was disabled. Caller must hold :meth:`gpu_lock`.
        """
        if parent_uuid not in self._enabled_by_us or self._backend.list_instances(parent_uuid):
            return False
        if self.mode_change_refusal(parent_uuid) is not None:
            return False
        self._backend.set_mig_mode(parent_uuid, False)
        self._enabled_by_us.discard(parent_uuid)
        log.info("mig mode disabled", parent_uuid=parent_uuid)
        return True

    # --- create / find / destroy -----------------------------------------------------------

    def create(self, spec: MigSpec) -> MigLive:
        """Create the GI at exactly ``spec``'s placement plus its default CI; return what now exists.

        Raises MigPlacementError when the placement is taken, MigUnsupportedError when MIG is off
        and may not be turned on, MigBackendError for other failures. A failed CI creation
        destroys the GI again so nothing half-made is left behind by an error (a crash can still
        leave one: :meth:`rollback` clears it).
        """
        with self.gpu_lock(spec.parent_uuid):
            self._ensure_enabled(spec.parent_uuid)
            try:
                gi_id = self._backend.create_gi(spec.parent_uuid, spec.gi_profile_id, spec.placement_start)
            except MigBackendError as exc:
                if exc.code == NVML_ERROR_INSUFFICIENT_RESOURCES:
                    raise MigPlacementError(
                        f"MIG placement {spec.name} on GPU {spec.parent_uuid} is occupied or the profile "
                        f"{spec.profile} has no room left: {exc}; free it or let the scheduler pick another"
                    ) from exc
                raise
            try:
                ci_id, mig_uuid = self._backend.create_ci(spec.parent_uuid, gi_id)
            except Exception:
                log.warning("mig ci create failed, destroying gi", device=spec.name, gi_id=gi_id)
                self._destroy_gi_tolerant(spec.parent_uuid, gi_id)
                raise
            log.info("mig device created", device=spec.name, gi_id=gi_id, ci_id=ci_id, mig_uuid=mig_uuid)
            return MigLive(
                parent_minor=spec.parent_minor,
                parent_uuid=spec.parent_uuid,
                gi_id=gi_id,
                ci_id=ci_id,
                mig_uuid=mig_uuid,
                gi_profile_id=spec.gi_profile_id,
                placement_start=spec.placement_start,
            )

    def instances(self, parent_uuid: str) -> list[MigInstance]:
        """Every instance on the GPU (empty when MIG is off)."""
        current, _pending = self._backend.mig_mode(parent_uuid)
        if not current:
            return []
        return list(self._backend.list_instances(parent_uuid))

    def find_instance(self, spec: MigSpec) -> MigInstance | None:
        """The instance at ``spec``'s profile and placement, complete or not, or None."""
        for inst in self.instances(spec.parent_uuid):
            if inst.matches(spec):
                return inst
        return None

    def find(self, spec: MigSpec) -> MigLive | None:
        """The complete MIG device (GI with CI) at ``spec``'s profile and placement, or None."""
        inst = self.find_instance(spec)
        return None if inst is None else inst.to_live(spec.parent_minor)

    def destroy(self, live: MigLive) -> bool:
        """Destroy the CI then the GI recorded in ``live``; True when something was destroyed.

        An instance already gone (or MIG off) is success. An instance whose ids, profile,
        placement or UUID differ from the record raises MigMismatchError and is left alone.
        """
        with self.gpu_lock(live.parent_uuid):
            found = [i for i in self.instances(live.parent_uuid) if i.gi_id == live.gi_id]
            if not found:
                log.info("mig device already gone", parent_uuid=live.parent_uuid, gi_id=live.gi_id)
                return False
            for inst in found:
                if (
                    inst.gi_profile_id != live.gi_profile_id
                    or inst.placement_start != live.placement_start
                    or inst.ci_id not in (None, live.ci_id)
                    or inst.mig_uuid not in (None, live.mig_uuid)
                ):
                    raise MigMismatchError(
                        f"GI {inst.gi_id} on GPU {live.parent_uuid} (profile {inst.gi_profile_id}, start "
                        f"{inst.placement_start}, CI {inst.ci_id}, {inst.mig_uuid}) is not the recorded "
                        f"{live.mig_uuid} (profile {live.gi_profile_id}, start {live.placement_start}, CI "
                        f"{live.ci_id}); it was not created by this claim and is left in place"
                    )
            self._destroy_found(live.parent_uuid, found)
            self.maybe_disable(live.parent_uuid)
            return True

    def rollback(self, spec: MigSpec) -> bool:
        """Destroy whatever sits at ``spec``'s profile and placement (a half-done prepare); True if any.

        For a prepare that never completed: the caller checked that no completed claim owns
        the device.
        """
        with self.gpu_lock(spec.parent_uuid):
            found = [i for i in self.instances(spec.parent_uuid) if i.matches(spec)]
            if not found:
                return False
            log.info("mig rollback", device=spec.name, gi_id=found[0].gi_id)
            self._destroy_found(spec.parent_uuid, found)
            self.maybe_disable(spec.parent_uuid)
            return True

    def unknown(self, parent_uuid: str, known: Collection[MigLive]) -> list[MigInstance]:
        """Instances on the GPU that none of ``known`` describes (for start-up reconciliation)."""
        known_keys = {(k.gi_id, k.ci_id, k.mig_uuid) for k in known if k.parent_uuid == parent_uuid}
        return [i for i in self.instances(parent_uuid) if (i.gi_id, i.ci_id, i.mig_uuid) not in known_keys]

    def _destroy_found(self, parent_uuid: str, found: list[MigInstance]) -> None:
        for inst in found:
            if inst.ci_id is not None:
                try:
                    self._backend.destroy_ci(parent_uuid, inst.gi_id, inst.ci_id)
                except MigBackendError as exc:
                    if exc.code != NVML_ERROR_NOT_FOUND:
                        raise
        self._destroy_gi_tolerant(parent_uuid, found[0].gi_id)
        log.info("mig device destroyed", parent_uuid=parent_uuid, gi_id=found[0].gi_id)

    def _destroy_gi_tolerant(self, parent_uuid: str, gi_id: int) -> None:
        try:
            self._backend.destroy_gi(parent_uuid, gi_id)
        except MigBackendError as exc:
            if exc.code not in (NVML_ERROR_NOT_FOUND, NVML_ERROR_NOT_SUPPORTED):
                raise
