"""NVML implementation of :class:`mig.backend.MigBackend`, over the session's pynvml-like module.

Works unchanged over nvidia-ml-py and the fake (:mod:`driver.nvml.fakemig`). Instances are
enumerated by probing GI ids and CI ids with ``...GetGpuInstanceById`` /
``...GetComputeInstanceById`` rather than with the array-filling enumeration calls: that
finds GIs without CIs (a crash between the two creates) and needs no ctypes handle arrays,
which the fake's Python handles cannot fill.

MIG calls run outside :meth:`Nvml.call`'s session lock (NVML is thread-safe): a GI create
takes hundreds of milliseconds and must not stall other GPUs; ``mig.manager`` serialises per
GPU. NVML errors become :class:`mig.errors.MigBackendError` with the NVML code, which the
manager interprets. Profiles are static per GPU and cached for the session.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import structlog

from driver.errors import NvmlError
from driver.nvml.backend import Nvml
from mig.errors import MigBackendError
from mig.profiles import GiProfile, Placement, nvml_name_to_profile, profile_name
from mig.spec import MigInstance

log = structlog.get_logger(__name__)

NVML_SUCCESS = 0
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
GI_PROFILE_COUNT = 18  # NVML_GPU_INSTANCE_PROFILE_COUNT
CI_PROFILE_COUNT = 9  # NVML_COMPUTE_INSTANCE_PROFILE_COUNT
CI_PROFILE_1_SLICE_REV1 = 7
CI_ENGINE_PROFILE_SHARED = 0
MAX_GI_ID = 32  # 15 ids on 8-slice parts; probe a margin for larger parts
MAX_CI_ID = 8
VIRTUALIZATION_MODE_VGPU = 2
_ABSENT = (NVML_ERROR_NOT_FOUND, NVML_ERROR_INVALID_ARGUMENT)


class NvmlMigBackend:
    """GI/CI operations through one :class:`Nvml` session."""

    def __init__(self, nvml: Nvml) -> None:
        self._nvml = nvml
        self._profiles: dict[str, tuple[GiProfile, ...]] = {}
        self._cache_lock = threading.Lock()

    # --- plumbing -------------------------------------------------------------------------

    def _call(self, op: str, *args: Any) -> Any:
        module = self._nvml.module
        try:
            return getattr(module, op)(*args)
        except module.NVMLError as exc:
            code = getattr(exc, "value", None)
            raise MigBackendError(f"NVML {op} failed: {exc} (code {code})", op=op, code=code) from exc

    def _handle(self, parent_uuid: str) -> Any:
        try:
            return self._nvml.handle(parent_uuid)
        except NvmlError as exc:
            raise MigBackendError(
                f"GPU {parent_uuid} not found by NVML: {exc}; check that the GPU is still present",
                op=exc.op,
                code=exc.code,
            ) from exc

    def _enum(self, name: str, default: int) -> int:
        return int(getattr(self._nvml.module, name, default))

    # --- profiles -------------------------------------------------------------------------

    def profiles(self, parent_uuid: str) -> Sequence[GiProfile]:
        with self._cache_lock:
            cached = self._profiles.get(parent_uuid)
        if cached is not None:
            return cached
        handle = self._handle(parent_uuid)
        try:
            total = int(self._call("nvmlDeviceGetMemoryInfo", handle).total)
        except MigBackendError:
            total = 0
        result: list[GiProfile] = []
        for index in range(self._enum("NVML_GPU_INSTANCE_PROFILE_COUNT", GI_PROFILE_COUNT)):
            try:
                info = self._call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index)
            except MigBackendError as exc:
                if exc.code == NVML_ERROR_INVALID_ARGUMENT:
                    break  # past the last profile index
                if exc.code == NVML_ERROR_NOT_SUPPORTED:
                    continue  # this GPU has no such profile
                raise
            name = (
                profile_name(int(info.sliceCount), int(info.memorySizeMB), total, index)
                if total > 0
                else nvml_name_to_profile(_text(getattr(info, "name", b"")))
            )
            result.append(
                GiProfile(
                    nvml_index=index,
                    profile_id=int(info.id),
                    name=name,
                    slice_count=int(info.sliceCount),
                    instance_count=int(info.instanceCount),
                    multiprocessors=int(info.multiprocessorCount),
                    copy_engines=int(info.copyEngineCount),
                    decoders=int(info.decoderCount),
                    encoders=int(info.encoderCount),
                    jpeg_engines=int(info.jpegCount),
                    ofa_engines=int(info.ofaCount),
                    memory_mib=int(info.memorySizeMB),
                    placements=tuple(self._placements(handle, int(info.id))),
                )
            )
        profiles = tuple(result)
        with self._cache_lock:
            self._profiles[parent_uuid] = profiles
        return profiles

    def _placements(self, handle: Any, profile_id: int) -> list[Placement]:
        module = self._nvml.module
        count = ctypes.c_uint(0)
        self._call(
            "nvmlDeviceGetGpuInstancePossiblePlacements", handle, profile_id, None, ctypes.byref(count)
        )
        if count.value == 0:
            return []
        buffer = (module.c_nvmlGpuInstancePlacement_t * count.value)()
        self._call(
            "nvmlDeviceGetGpuInstancePossiblePlacements", handle, profile_id, buffer, ctypes.byref(count)
        )
        return [Placement(int(buffer[i].start), int(buffer[i].size)) for i in range(count.value)]

    def placements(self, parent_uuid: str, profile_id: int) -> Sequence[Placement]:
        for prof in self.profiles(parent_uuid):
            if prof.profile_id == profile_id:
                return prof.placements
        return self._placements(self._handle(parent_uuid), profile_id)

    # --- lifecycle --------------------------------------------------------------------------

    def create_gi(self, parent_uuid: str, profile_id: int, start: int) -> int:
        size = next((p.size for p in self.placements(parent_uuid, profile_id) if p.start == start), None)
        if size is None:
            raise MigBackendError(
                f"GPU {parent_uuid} has no placement starting at {start} for GI profile {profile_id}; "
                "the device name does not match this GPU's MIG profiles",
                op="nvmlDeviceCreateGpuInstanceWithPlacement",
                code=NVML_ERROR_INVALID_ARGUMENT,
            )
        handle = self._handle(parent_uuid)
        placement = self._nvml.module.c_nvmlGpuInstancePlacement_t()
        placement.start = start
        placement.size = size
        gi = self._call(
            "nvmlDeviceCreateGpuInstanceWithPlacement", handle, profile_id, ctypes.byref(placement)
        )
        return int(self._call("nvmlGpuInstanceGetInfo", gi).id)

    def create_ci(self, parent_uuid: str, gi_id: int) -> tuple[int, str]:
        handle = self._handle(parent_uuid)
        gi = self._call("nvmlDeviceGetGpuInstanceById", handle, gi_id)
        gi_profile_id = int(self._call("nvmlGpuInstanceGetInfo", gi).profileId)
        gi_slices = next(
            (p.slice_count for p in self.profiles(parent_uuid) if p.profile_id == gi_profile_id), None
        )
        ci_profile = self._full_ci_profile(gi, gi_slices)
        ci = self._call("nvmlGpuInstanceCreateComputeInstance", gi, ci_profile)
        info = self._call("nvmlComputeInstanceGetInfo", ci)
        mig_uuid = _text(self._call("nvmlDeviceGetUUID", info.device))
        return int(info.id), mig_uuid

    def _full_ci_profile(self, gi: Any, gi_slices: int | None) -> int:
        """The CI profile spanning the whole GI (C == G), skipping 1_SLICE_REV1 as NVIDIA does."""
        for index in range(self._enum("NVML_COMPUTE_INSTANCE_PROFILE_COUNT", CI_PROFILE_COUNT)):
            if index == CI_PROFILE_1_SLICE_REV1:
                continue
            try:
                info = self._call(
                    "nvmlGpuInstanceGetComputeInstanceProfileInfo", gi, index, CI_ENGINE_PROFILE_SHARED
                )
            except MigBackendError as exc:
                if exc.code in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_INVALID_ARGUMENT):
                    continue
                raise
            if gi_slices is None or int(info.sliceCount) == gi_slices:
                return int(info.id)
        raise MigBackendError(
            f"no compute-instance profile spans a {gi_slices}-slice GPU instance; "
            "check the GPU's MIG support with nvidia-smi mig -lcip",
            op="nvmlGpuInstanceGetComputeInstanceProfileInfo",
            code=NVML_ERROR_NOT_SUPPORTED,
        )

    def destroy_ci(self, parent_uuid: str, gi_id: int, ci_id: int) -> None:
        gi = self._call("nvmlDeviceGetGpuInstanceById", self._handle(parent_uuid), gi_id)
        ci = self._call("nvmlGpuInstanceGetComputeInstanceById", gi, ci_id)
        self._call("nvmlComputeInstanceDestroy", ci)

    def destroy_gi(self, parent_uuid: str, gi_id: int) -> None:
        gi = self._call("nvmlDeviceGetGpuInstanceById", self._handle(parent_uuid), gi_id)
        self._call("nvmlGpuInstanceDestroy", gi)

    def list_instances(self, parent_uuid: str) -> Sequence[MigInstance]:
        handle = self._handle(parent_uuid)
        found: list[MigInstance] = []
        for gi_id in range(MAX_GI_ID):
            try:
                gi = self._call("nvmlDeviceGetGpuInstanceById", handle, gi_id)
                gi_info = self._call("nvmlGpuInstanceGetInfo", gi)
            except MigBackendError as exc:
                if exc.code == NVML_ERROR_NOT_SUPPORTED:
                    return []  # MIG is off
                if exc.code in _ABSENT:
                    continue
                raise
            base = MigInstance(
                parent_uuid=parent_uuid,
                gi_id=gi_id,
                gi_profile_id=int(gi_info.profileId),
                placement_start=int(gi_info.placement.start),
                placement_size=int(gi_info.placement.size),
            )
            cis = self._cis(gi, base)
            found.extend(cis or [base])
        return found

    def _cis(self, gi: Any, base: MigInstance) -> list[MigInstance]:
        result: list[MigInstance] = []
        for ci_id in range(MAX_CI_ID):
            try:
                ci = self._call("nvmlGpuInstanceGetComputeInstanceById", gi, ci_id)
                info = self._call("nvmlComputeInstanceGetInfo", ci)
                mig_uuid = _text(self._call("nvmlDeviceGetUUID", info.device))
            except MigBackendError as exc:
                if exc.code in _ABSENT:
                    continue
                raise
            result.append(
                MigInstance(
                    parent_uuid=base.parent_uuid,
                    gi_id=base.gi_id,
                    gi_profile_id=base.gi_profile_id,
                    placement_start=base.placement_start,
                    placement_size=base.placement_size,
                    ci_id=ci_id,
                    mig_uuid=mig_uuid,
                )
            )
        return result

    # --- mode and safety facts ----------------------------------------------------------------

    def mig_mode(self, parent_uuid: str) -> tuple[bool, bool]:
        try:
            current, pending = self._call("nvmlDeviceGetMigMode", self._handle(parent_uuid))
        except MigBackendError as exc:
            if exc.code == NVML_ERROR_NOT_SUPPORTED:
                return False, False
            raise
        return bool(current), bool(pending)

    def set_mig_mode(self, parent_uuid: str, enabled: bool) -> None:
        mode = (
            self._enum("NVML_DEVICE_MIG_ENABLE", 1) if enabled else self._enum("NVML_DEVICE_MIG_DISABLE", 0)
        )
        status = self._call("nvmlDeviceSetMigMode", self._handle(parent_uuid), mode)
        if int(status) != NVML_SUCCESS:
            raise MigBackendError(
                f"GPU {parent_uuid} accepted MIG mode {int(enabled)} but cannot apply it without a reset "
                f"(activation status {int(status)}); reset the GPU or undo the change",
                op="nvmlDeviceSetMigMode",
                code=int(status),
            )
        log.info("mig mode set", parent_uuid=parent_uuid, enabled=enabled)

    def architecture(self, parent_uuid: str) -> int:
        try:
            return int(self._call("nvmlDeviceGetArchitecture", self._handle(parent_uuid)))
        except MigBackendError as exc:
            if exc.code == NVML_ERROR_NOT_SUPPORTED:
                return 0xFFFFFFFF
            raise

    def is_vgpu_guest(self, parent_uuid: str) -> bool:
        try:
            mode = self._call("nvmlDeviceGetVirtualizationMode", self._handle(parent_uuid))
        except MigBackendError as exc:
            if exc.code == NVML_ERROR_NOT_SUPPORTED:
                return False
            raise
        return int(mode) == VIRTUALIZATION_MODE_VGPU


def _text(value: str | bytes) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.rstrip("\x00")
