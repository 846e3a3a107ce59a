# ruff: noqa: N802, N803, N815  (the fake must carry nvidia-ml-py's function and argument names)
"""The MIG part of the fake pynvml: GPU and compute instances that behave like NVML's.

:func:`install` adds the nvidia-ml-py MIG functions (same names, signatures and return shapes)
to a pynvml-like module built by :mod:`driver.nvml.fakepynvml`. Profiles, ids and placements
come from ``driver/nvml/data/mig-profiles.yaml`` through the GPU's ``mig_profile_table``.
Errors are NVML's: an occupied placement or exhausted profile is INSUFFICIENT_RESOURCES, MIG
off is NOT_SUPPORTED, destroying a GI that still has CIs (or a busy instance) is IN_USE, an
unknown id is NOT_FOUND. GI ids follow the slice tree real GPUs use (7+start for 1-slice GIs
on 8-slice parts), CI ids are the lowest free, and every (re)created CI gets a fresh MIG UUID.

Every mutation is written to the state file before the call returns, so a process killed
between creating a GI and its CI leaves a GI without CI, as a real GPU would. When the state
names a ``driverRoot`` the per-instance ``/proc/driver/nvidia/capabilities/.../access`` files
and ``/dev/nvidia-caps/nvidia-cap<K>`` placeholders there follow the instances.

State (the per-GPU ``mig`` key of :mod:`driver.nvml.fakestate`)::

    "mig": {"current": true, "pending": true,
            "gis": {"7": {"profileId": 19, "start": 0, "size": 1, "busy": false,
                          "cis": {"0": {"profileId": 0, "start": 0, "uuid": "MIG-...", "busy": false}}}}}

Top-level optional keys: ``driverRoot`` (path), ``migCreateLatencyMs`` (sleep per GI create,
serialised per GPU in this process; env ``GPU_DRA_FAKE_MIG_CREATE_MS`` also sets it).
Processes holding instances are not modelled beyond the ``busy`` flags tests set.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml
import yaml

from driver.nvml.topology import Topology, TopologyGpu, load_topology

PROFILES_FILE = Path(__file__).parent / "data" / "mig-profiles.yaml"
LATENCY_ENV = "GPU_DRA_FAKE_MIG_CREATE_MS"

NVML_SUCCESS = 0
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_IN_USE = 19
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
GI_PROFILE_COUNT = 18
CI_PROFILE_COUNT = 9
CI_PROFILE_1_SLICE_REV1 = 7
GI_PROFILE_1_SLICE_REV2 = 9
ARCH_HOPPER = 9
VIRTUALIZATION_VGPU = 2

# Creation latency is serialised per GPU across every fake module in this process.
_gpu_locks: dict[str, threading.Lock] = {}
_gpu_locks_guard = threading.Lock()


def _gpu_lock(uuid: str) -> threading.Lock:
    with _gpu_locks_guard:
        return _gpu_locks.setdefault(uuid, threading.Lock())


# --- the profile table --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeGiProfile:
    """One row of the profile table, as the fake GPU knows it."""

    index: int
    id: int
    name: str
    slice_count: int
    instance_count: int
    multiprocessors: int
    copy_engines: int
    decoders: int
    encoders: int
    jpeg: int
    ofa: int
    memory_mib: int
    placements: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class FakeCiProfile:
    """A compute-instance profile allowed inside GIs of one slice count."""

    id: int
    slice_count: int
    max: int


@dataclass(frozen=True, slots=True)
class FakeMigTable:
    """The MIG facts of one GPU model."""

    key: str
    memory_slices: int
    compute_slices: int
    gi_profiles: tuple[FakeGiProfile, ...]
    ci_profiles: dict[int, tuple[FakeCiProfile, ...]]  # GI slice count -> CI profiles

    def gi_by_index(self, index: int) -> FakeGiProfile | None:
        return next((p for p in self.gi_profiles if p.index == index), None)

    def gi_by_id(self, profile_id: int) -> FakeGiProfile | None:
        return next((p for p in self.gi_profiles if p.id == profile_id), None)


_CI_SLICES = {0: 1, 1: 2, 2: 3, 3: 4, 4: 7, 5: 8, 6: 6, 7: 1, 8: 7}


@functools.cache
def _raw_table() -> dict[str, Any]:
    doc = yaml.safe_load(PROFILES_FILE.read_text())
    if not isinstance(doc, dict):
        raise TypeError(f"{PROFILES_FILE} is not a mapping; restore it from shared/data")
    return doc


@functools.cache
def mig_table(key: str) -> FakeMigTable:
    """The MIG table of GPU model ``key`` (a ``gpus`` key of mig-profiles.yaml)."""
    doc = _raw_table()
    gpu = doc["gpus"].get(key)
    if gpu is None:
        raise KeyError(f"no MIG profile table {key!r} in {PROFILES_FILE}; use one of {sorted(doc['gpus'])}")
    profiles: list[FakeGiProfile] = []
    for row in gpu["gpu_instance_profiles"]:
        numbers = [row.get(k) for k in ("profile_id", "nvml_profile_index", "memory_mib", "multiprocessors")]
        if any(v is None for v in numbers) or not row.get("placements"):
            continue  # facts not found in any source: the fake does not invent them
        profiles.append(
            FakeGiProfile(
                index=int(row["nvml_profile_index"]),
                id=int(row["profile_id"]),
                name=str(row["name"]),
                slice_count=int(row["slice_count"]),
                instance_count=int(row["max_instances"]),
                multiprocessors=int(row["multiprocessors"]),
                copy_engines=int(row.get("copy_engines") or 0),
                decoders=int(row.get("decoders") or 0),
                encoders=int(row.get("encoders") or 0),
                jpeg=int(row.get("jpeg") or 0),
                ofa=int(row.get("ofa") or 0),
                memory_mib=int(row["memory_mib"]),
                placements=tuple((int(p["start"]), int(p["size"])) for p in row["placements"]),
            )
        )
    ci: dict[int, tuple[FakeCiProfile, ...]] = {}
    for slices, rows in doc["compute_instance_profiles"]["per_gi_slice_count"].items():
        ci[int(slices)] = tuple(
            FakeCiProfile(int(r["id"]), _CI_SLICES[int(r["id"])], int(r["max"])) for r in rows
        )
    return FakeMigTable(
        key=key,
        memory_slices=int(gpu["memory_slices"]),
        compute_slices=int(gpu["compute_slices"]),
        gi_profiles=tuple(profiles),
        ci_profiles=ci,
    )


def gi_id_for(memory_slices: int, start: int, size: int, taken: set[int]) -> int:
    """The GI id a real GPU gives a new instance: its node in the binary tree of memory slices.

    Full GPU 0, halves 1-2, quarters 3-6, eighths 7-14 on 8-slice parts (a 1-slice GI at
    start s gets 7+s, as observed); the lowest free id when that node is taken or undefined.
    """
    if size > 0 and memory_slices % size == 0 and start % size == 0:
        candidate = memory_slices // size - 1 + start // size
        if candidate not in taken:
            return candidate
    return next(i for i in range(2 * memory_slices) if i not in taken)


# --- handles ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeGpuInstance:
    """A GPU-instance handle: the parent's device handle plus the GI id (state is read per call)."""

    device: Any
    parent_uuid: str
    id: int


@dataclass(frozen=True, slots=True)
class FakeComputeInstance:
    """A compute-instance handle."""

    gpu_instance: FakeGpuInstance
    id: int


@dataclass(frozen=True, slots=True)
class FakeMigDevice:
    """A MIG device handle (what nvmlDeviceGetMigDeviceHandleByIndex returns)."""

    parent: Any
    parent_uuid: str
    gi_id: int
    ci_id: int


@dataclass(frozen=True, slots=True)
class FakeGpuInstanceInfo:
    """``nvmlGpuInstanceInfo_t`` with a Python handle in ``device``."""

    device: Any
    id: int
    profileId: int  # NVML's field name
    placement: Any  # c_nvmlGpuInstancePlacement_t


@dataclass(frozen=True, slots=True)
class FakeComputeInstanceInfo:
    """``nvmlComputeInstanceInfo_t`` with Python handles."""

    device: Any
    gpuInstance: FakeGpuInstance  # NVML's field name
    id: int
    profileId: int
    placement: Any  # c_nvmlComputeInstancePlacement_t


@dataclass(frozen=True, slots=True)
class FakeMigMemory:
    """``nvmlMemory_t`` of a MIG device."""

    total: int
    free: int
    used: int


def _fail(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


def _out(ref: Any) -> Any:
    """The ctypes object behind ``byref(x)``, ``pointer(x)`` or ``x``."""
    if hasattr(ref, "_obj"):
        return ref._obj
    if hasattr(ref, "contents"):
        return ref.contents
    return ref


# --- the fake -----------------------------------------------------------------------------


class FakeMig:
    """MIG behaviour of the fake GPUs of one state file; its methods become module functions."""

    def __init__(
        self,
        module: Any,
        state: Any,
        topology: Topology | None = None,
        enter: Callable[[str, Any], None] | None = None,
    ) -> None:
        self._module = module
        self._state = state
        self._topology = topology
        self._enter = enter
        self._orig_uuid: Callable[[Any], str] = module.nvmlDeviceGetUUID
        self._orig: dict[str, Callable[..., Any]] = {}

    # -- facts ---------------------------------------------------------------------------

    def _topo(self, doc: dict[str, Any]) -> Topology:
        if self._topology is None:
            self._topology = load_topology(str(doc["topology"]))
        return self._topology

    def _facts(self, doc: dict[str, Any], uuid: str) -> tuple[dict[str, Any], TopologyGpu]:
        gpu = doc.get("gpus", {}).get(uuid)
        if gpu is None:
            raise _fail(NVML_ERROR_NOT_FOUND)
        topo = self._topo(doc)
        facts = next(g for g in topo.gpus if g.index == int(gpu["index"]))
        return gpu, facts

    def _table(self, gpu: dict[str, Any], facts: TopologyGpu) -> FakeMigTable:
        key = gpu.get("mig", {}).get("profileTable") or facts.mig_profile_table
        if not facts.mig_capable or not key:
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        return mig_table(str(key))

    def _uuid(self, device: Any) -> str:
        if isinstance(device, FakeMigDevice):
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        return str(self._orig_uuid(device))

    def _mig_on(self, gpu: dict[str, Any]) -> dict[str, Any]:
        mig: dict[str, Any] = gpu.setdefault("mig", {"current": False, "pending": False})
        if not mig.get("current"):
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        return mig

    def _gi(self, gi: FakeGpuInstance, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        gpu, _facts = self._facts(doc, gi.parent_uuid)
        mig = self._mig_on(gpu)
        entry = mig.get("gis", {}).get(str(gi.id))
        if entry is None:
            raise _fail(NVML_ERROR_NOT_FOUND)
        return gpu, entry

    def _latency_s(self, doc: dict[str, Any]) -> float:
        value = doc.get("migCreateLatencyMs", os.environ.get(LATENCY_ENV, "0"))
        return float(value or 0) / 1000.0

    # -- MIG mode ------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        gpu, facts = self._facts(self._state.read(), self._uuid(device))
        if not facts.mig_capable:
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        mig = gpu.get("mig", {})
        return [int(bool(mig.get("current"))), int(bool(mig.get("pending")))]

    def nvmlDeviceSetMigMode(self, device: Any, mode: int) -> int:
        uuid = self._uuid(device)
        if mode not in (0, 1):
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        with self._state.edit() as doc:
            gpu, facts = self._facts(doc, uuid)
            if not facts.mig_capable:
                raise _fail(NVML_ERROR_NOT_SUPPORTED)
            if facts.virtualization_mode == VIRTUALIZATION_VGPU:
                raise _fail(NVML_ERROR_NO_PERMISSION)
            mig = gpu.setdefault("mig", {"current": False, "pending": False})
            if not mode and mig.get("gis"):
                raise _fail(NVML_ERROR_IN_USE)
            mig["pending"] = bool(mode)
            if facts.architecture >= ARCH_HOPPER:
                mig["current"] = bool(mode)
            # Ampere and older keep the old mode until the GPU is reset (see reset_gpu).
            return NVML_SUCCESS if mig["current"] == mig["pending"] else NVML_ERROR_RESET_REQUIRED

    # -- GI profiles and placements ------------------------------------------------------

    def nvmlDeviceGetGpuInstanceProfileInfo(self, device: Any, profile: int, version: int = 2) -> Any:
        if profile < 0 or profile >= GI_PROFILE_COUNT:
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        gpu, facts = self._facts(self._state.read(), self._uuid(device))
        prof = self._table(gpu, facts).gi_by_index(profile)
        if prof is None:
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        info: Any
        if version == 2:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            info.name = f"MIG {prof.name}".encode()
        elif version == 1:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_t()
        else:
            raise _fail(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        info.id = prof.id
        info.isP2pSupported = 0
        info.sliceCount = prof.slice_count
        info.instanceCount = prof.instance_count
        info.multiprocessorCount = prof.multiprocessors
        info.copyEngineCount = prof.copy_engines
        info.decoderCount = prof.decoders
        info.encoderCount = prof.encoders
        info.jpegCount = prof.jpeg
        info.ofaCount = prof.ofa
        info.memorySizeMB = prof.memory_mib
        return info

    def nvmlDeviceGetGpuInstanceProfileInfoV(self, device: Any, profile: int, version: int = 2) -> Any:
        return self.nvmlDeviceGetGpuInstanceProfileInfo(device, profile, version)

    def _profile_by_id(self, device: Any, profile_id: int, doc: dict[str, Any]) -> FakeGiProfile:
        gpu, facts = self._facts(doc, self._uuid(device))
        prof = self._table(gpu, facts).gi_by_id(profile_id)
        if prof is None:
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        return prof

    def nvmlDeviceGetGpuInstancePossiblePlacements(
        self, device: Any, profileId: int, placementsRef: Any, countRef: Any
    ) -> int:
        prof = self._profile_by_id(device, profileId, self._state.read())
        count = _out(countRef)
        if placementsRef is not None:
            if len(placementsRef) < len(prof.placements):
                count.value = len(prof.placements)
                raise _fail(NVML_ERROR_INSUFFICIENT_SIZE)
            for i, (start, size) in enumerate(prof.placements):
                placementsRef[i].start = start
                placementsRef[i].size = size
        count.value = len(prof.placements)
        return NVML_SUCCESS

    def _free_placements(self, table: FakeMigTable, mig: dict[str, Any], prof: FakeGiProfile) -> list[int]:
        gis = mig.get("gis", {})
        same = sum(1 for g in gis.values() if g["profileId"] == prof.id)
        used_compute = sum(p.slice_count for g in gis.values() if (p := table.gi_by_id(g["profileId"])))
        if same >= prof.instance_count or used_compute + prof.slice_count > table.compute_slices:
            return []
        occupied = {s for g in gis.values() for s in range(g["start"], g["start"] + g["size"])}
        return [
            start for start, size in prof.placements if not occupied.intersection(range(start, start + size))
        ]

    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, device: Any, profileId: int) -> int:
        doc = self._state.read()
        uuid = self._uuid(device)
        gpu, facts = self._facts(doc, uuid)
        table = self._table(gpu, facts)
        mig = self._mig_on(gpu)
        prof = self._profile_by_id(device, profileId, doc)
        # Count how many more fit by filling free placements one after another.
        trial = {"gis": dict(mig.get("gis", {}))}
        added = 0
        while free := self._free_placements(table, trial, prof):
            trial["gis"][f"trial{added}"] = {
                "profileId": prof.id,
                "start": free[0],
                "size": prof.placements[0][1],
            }
            added += 1
        return added

    # -- GI lifecycle --------------------------------------------------------------------

    def nvmlDeviceCreateGpuInstanceWithPlacement(self, device: Any, profileId: int, placement: Any) -> Any:
        pl = _out(placement)
        return self._create_gi(device, profileId, int(pl.start), int(pl.size))

    def nvmlDeviceCreateGpuInstance(self, device: Any, profileId: int) -> Any:
        return self._create_gi(device, profileId, None, None)

    def _create_gi(self, device: Any, profile_id: int, start: int | None, size: int | None) -> Any:
        uuid = self._uuid(device)
        with _gpu_lock(uuid):
            latency = self._latency_s(self._state.read())
            if latency > 0:
                time.sleep(latency)  # the GPU is busy reconfiguring; other GPUs are not
            with self._state.edit() as doc:
                gpu, facts = self._facts(doc, uuid)
                table = self._table(gpu, facts)
                if facts.virtualization_mode == VIRTUALIZATION_VGPU:
                    raise _fail(NVML_ERROR_NOT_SUPPORTED)
                mig = self._mig_on(gpu)
                prof = table.gi_by_id(profile_id)
                if prof is None:
                    raise _fail(NVML_ERROR_INVALID_ARGUMENT)
                if start is not None and (start, size) not in prof.placements:
                    raise _fail(NVML_ERROR_INVALID_ARGUMENT)
                free = self._free_placements(table, mig, prof)
                if start is None:
                    if not free:
                        raise _fail(NVML_ERROR_INSUFFICIENT_RESOURCES)
                    start = free[0]
                    size = prof.placements[0][1]
                elif start not in free:
                    raise _fail(NVML_ERROR_INSUFFICIENT_RESOURCES)
                size = next(sz for st, sz in prof.placements if st == start)
                gis = mig.setdefault("gis", {})
                gi_id = gi_id_for(table.memory_slices, start, size, {int(k) for k in gis})
                gis[str(gi_id)] = {
                    "profileId": prof.id,
                    "start": start,
                    "size": size,
                    "busy": False,
                    "cis": {},
                }
                self._write_caps(doc, gpu, gi_id, None)
        return FakeGpuInstance(device, uuid, gi_id)

    def nvmlGpuInstanceGetInfo(self, gpuInstance: FakeGpuInstance) -> FakeGpuInstanceInfo:
        _gpu, entry = self._gi(gpuInstance, self._state.read())
        placement = pynvml.c_nvmlGpuInstancePlacement_t()
        placement.start = entry["start"]
        placement.size = entry["size"]
        return FakeGpuInstanceInfo(gpuInstance.device, gpuInstance.id, entry["profileId"], placement)

    def nvmlDeviceGetGpuInstances(
        self, device: Any, profileId: int, gpuInstancesRef: Any, countRef: Any
    ) -> int:
        """Fills ``gpuInstancesRef`` (a list here: fake handles are Python objects) and the count."""
        doc = self._state.read()
        uuid = self._uuid(device)
        gpu, _facts = self._facts(doc, uuid)
        mig = self._mig_on(gpu)
        self._profile_by_id(device, profileId, doc)
        ids = sorted(int(k) for k, g in mig.get("gis", {}).items() if g["profileId"] == profileId)
        handles = [FakeGpuInstance(device, uuid, i) for i in ids]
        if gpuInstancesRef is not None:
            if len(gpuInstancesRef) < len(handles):
                _out(countRef).value = len(handles)
                raise _fail(NVML_ERROR_INSUFFICIENT_SIZE)
            for i, handle in enumerate(handles):
                gpuInstancesRef[i] = handle
        _out(countRef).value = len(handles)
        return NVML_SUCCESS

    def nvmlDeviceGetGpuInstanceById(self, device: Any, gpuInstanceId: int) -> FakeGpuInstance:
        handle = FakeGpuInstance(device, self._uuid(device), int(gpuInstanceId))
        self._gi(handle, self._state.read())
        return handle

    def nvmlGpuInstanceDestroy(self, gpuInstance: FakeGpuInstance) -> int:
        with self._state.edit() as doc:
            gpu, entry = self._gi(gpuInstance, doc)
            if entry.get("cis") or entry.get("busy"):
                raise _fail(NVML_ERROR_IN_USE)
            del gpu["mig"]["gis"][str(gpuInstance.id)]
            if not gpu["mig"]["gis"]:
                del gpu["mig"]["gis"]  # as the state began
            self._remove_caps(doc, gpu, gpuInstance.id, None)
        return NVML_SUCCESS

    # -- CI lifecycle --------------------------------------------------------------------

    def _gi_profile(self, doc: dict[str, Any], uuid: str, entry: dict[str, Any]) -> FakeGiProfile:
        gpu, facts = self._facts(doc, uuid)
        prof = self._table(gpu, facts).gi_by_id(entry["profileId"])
        if prof is None:
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        return prof

    def _ci_profiles(self, doc: dict[str, Any], uuid: str, entry: dict[str, Any]) -> list[FakeCiProfile]:
        gpu, facts = self._facts(doc, uuid)
        table = self._table(gpu, facts)
        prof = self._gi_profile(doc, uuid, entry)
        profiles = list(table.ci_profiles.get(prof.slice_count, ()))
        if prof.index == GI_PROFILE_1_SLICE_REV2:
            profiles.append(FakeCiProfile(CI_PROFILE_1_SLICE_REV1, 1, 1))
        return profiles

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, device: FakeGpuInstance, profile: int, engProfile: int, version: int = 2
    ) -> Any:
        if profile < 0 or profile >= CI_PROFILE_COUNT or engProfile != 0:
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        doc = self._state.read()
        _gpu, entry = self._gi(device, doc)
        ci = next((c for c in self._ci_profiles(doc, device.parent_uuid, entry) if c.id == profile), None)
        if ci is None:
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        gi_prof = self._gi_profile(doc, device.parent_uuid, entry)
        info: Any
        if version == 2:
            info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t()
            prefix = "" if ci.slice_count == gi_prof.slice_count else f"{ci.slice_count}c."
            info.name = f"MIG {prefix}{gi_prof.name}".encode()
        elif version == 1:
            info = pynvml.c_nvmlComputeInstanceProfileInfo_t()
        else:
            raise _fail(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        info.id = ci.id
        info.sliceCount = ci.slice_count
        info.instanceCount = ci.max
        info.multiprocessorCount = gi_prof.multiprocessors * ci.slice_count // gi_prof.slice_count
        info.sharedCopyEngineCount = gi_prof.copy_engines
        info.sharedDecoderCount = gi_prof.decoders
        info.sharedEncoderCount = gi_prof.encoders
        info.sharedJpegCount = gi_prof.jpeg
        info.sharedOfaCount = gi_prof.ofa
        return info

    def nvmlGpuInstanceGetComputeInstanceProfileInfoV(
        self, device: FakeGpuInstance, profile: int, engProfile: int, version: int = 2
    ) -> Any:
        return self.nvmlGpuInstanceGetComputeInstanceProfileInfo(device, profile, engProfile, version)

    def nvmlGpuInstanceCreateComputeInstance(self, gpuInstance: FakeGpuInstance, profileId: int) -> Any:
        with self._state.edit() as doc:
            gpu, entry = self._gi(gpuInstance, doc)
            ci = next(
                (c for c in self._ci_profiles(doc, gpuInstance.parent_uuid, entry) if c.id == profileId), None
            )
            if ci is None:
                raise _fail(NVML_ERROR_INVALID_ARGUMENT)
            gi_prof = self._gi_profile(doc, gpuInstance.parent_uuid, entry)
            cis = entry.setdefault("cis", {})
            used = {
                s for c in cis.values() for s in range(c["start"], c["start"] + _CI_SLICES[c["profileId"]])
            }
            same = sum(1 for c in cis.values() if c["profileId"] == profileId)
            starts = [
                s
                for s in range(0, gi_prof.slice_count - ci.slice_count + 1, ci.slice_count)
                if not used.intersection(range(s, s + ci.slice_count))
            ]
            if same >= ci.max or not starts:
                raise _fail(NVML_ERROR_INSUFFICIENT_RESOURCES)
            ci_id = next(i for i in range(8) if str(i) not in cis)
            cis[str(ci_id)] = {
                "profileId": profileId,
                "start": starts[0],
                "uuid": f"MIG-{uuidlib.uuid4()}",
                "busy": False,
            }
            self._write_caps(doc, gpu, gpuInstance.id, ci_id)
        return FakeComputeInstance(gpuInstance, ci_id)

    def _ci(self, ci: FakeComputeInstance, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        gpu, entry = self._gi(ci.gpu_instance, doc)
        found = entry.get("cis", {}).get(str(ci.id))
        if found is None:
            raise _fail(NVML_ERROR_NOT_FOUND)
        return gpu, found

    def nvmlGpuInstanceGetComputeInstances(
        self, gpuInstance: FakeGpuInstance, profileId: int, computeInstancesRef: Any, countRef: Any
    ) -> int:
        """Fills ``computeInstancesRef`` (a list here) and the count."""
        _gpu, entry = self._gi(gpuInstance, self._state.read())
        ids = sorted(int(k) for k, c in entry.get("cis", {}).items() if c["profileId"] == profileId)
        handles = [FakeComputeInstance(gpuInstance, i) for i in ids]
        if computeInstancesRef is not None:
            if len(computeInstancesRef) < len(handles):
                _out(countRef).value = len(handles)
                raise _fail(NVML_ERROR_INSUFFICIENT_SIZE)
            for i, handle in enumerate(handles):
                computeInstancesRef[i] = handle
        _out(countRef).value = len(handles)
        return NVML_SUCCESS

    def nvmlGpuInstanceGetComputeInstanceById(
        self, gpuInstance: FakeGpuInstance, computeInstanceId: int
    ) -> FakeComputeInstance:
        handle = FakeComputeInstance(gpuInstance, int(computeInstanceId))
        self._ci(handle, self._state.read())
        return handle

    def nvmlComputeInstanceGetInfo_v2(self, computeInstance: FakeComputeInstance) -> FakeComputeInstanceInfo:
        _gpu, entry = self._ci(computeInstance, self._state.read())
        placement = pynvml.c_nvmlComputeInstancePlacement_t()
        placement.start = entry["start"]
        placement.size = _CI_SLICES[entry["profileId"]]
        gi = computeInstance.gpu_instance
        mig_device = FakeMigDevice(gi.device, gi.parent_uuid, gi.id, computeInstance.id)
        return FakeComputeInstanceInfo(mig_device, gi, computeInstance.id, entry["profileId"], placement)

    def nvmlComputeInstanceGetInfo(self, computeInstance: FakeComputeInstance) -> FakeComputeInstanceInfo:
        return self.nvmlComputeInstanceGetInfo_v2(computeInstance)

    def nvmlComputeInstanceDestroy(self, computeInstance: FakeComputeInstance) -> int:
        with self._state.edit() as doc:
            gpu, entry = self._ci(computeInstance, doc)
            if entry.get("busy"):
                raise _fail(NVML_ERROR_IN_USE)
            gi_id = computeInstance.gpu_instance.id
            del gpu["mig"]["gis"][str(gi_id)]["cis"][str(computeInstance.id)]
            self._remove_caps(doc, gpu, gi_id, computeInstance.id)
        return NVML_SUCCESS

    # -- MIG device handles --------------------------------------------------------------

    def _mig_devices(self, gpu: dict[str, Any]) -> list[tuple[int, int]]:
        gis = gpu.get("mig", {}).get("gis", {})
        return sorted((int(g), int(c)) for g, entry in gis.items() for c in entry.get("cis", {}))

    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        gpu, facts = self._facts(self._state.read(), self._uuid(device))
        if not facts.mig_capable or not gpu.get("mig", {}).get("current"):
            return 0
        return self._table(gpu, facts).compute_slices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> FakeMigDevice:
        uuid = self._uuid(device)
        gpu, facts = self._facts(self._state.read(), uuid)
        mig = self._mig_on(gpu)
        if index < 0 or index >= self._table(gpu, facts).compute_slices:
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        devices = self._mig_devices({"mig": mig})
        if index >= len(devices):
            raise _fail(NVML_ERROR_NOT_FOUND)
        gi_id, ci_id = devices[index]
        return FakeMigDevice(device, uuid, gi_id, ci_id)

    def _mig_entry(self, mig: FakeMigDevice) -> dict[str, Any]:
        gi = FakeGpuInstance(mig.parent, mig.parent_uuid, mig.gi_id)
        return self._ci(FakeComputeInstance(gi, mig.ci_id), self._state.read())[1]

    def nvmlDeviceIsMigDeviceHandle(self, device: Any) -> ctypes.c_uint:
        return ctypes.c_uint(1 if isinstance(device, FakeMigDevice) else 0)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: Any) -> Any:
        if not isinstance(migDevice, FakeMigDevice):
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        return migDevice.parent

    def nvmlDeviceGetGpuInstanceId(self, device: Any) -> int:
        if not isinstance(device, FakeMigDevice):
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        self._mig_entry(device)
        return device.gi_id

    def nvmlDeviceGetComputeInstanceId(self, device: Any) -> int:
        if not isinstance(device, FakeMigDevice):
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        self._mig_entry(device)
        return device.ci_id

    # Wrappers of the base fake's functions for MIG handles.

    def nvmlDeviceGetUUID(self, device: Any) -> str:
        if isinstance(device, FakeMigDevice):
            return str(self._mig_entry(device)["uuid"])
        return self._orig_uuid(device)

    def nvmlDeviceGetHandleByUUID(self, uuid: Any) -> Any:
        text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        if not text.startswith("MIG-"):
            return self._orig["nvmlDeviceGetHandleByUUID"](uuid)
        if self._enter is not None:
            self._enter("nvmlDeviceGetHandleByUUID", None)
        doc = self._state.read()
        for parent_uuid, gpu in doc.get("gpus", {}).items():
            for gi_id, entry in gpu.get("mig", {}).get("gis", {}).items():
                for ci_id, ci in entry.get("cis", {}).items():
                    if ci.get("uuid") == text:
                        parent = self._orig["nvmlDeviceGetHandleByUUID"](parent_uuid)
                        return FakeMigDevice(parent, parent_uuid, int(gi_id), int(ci_id))
        raise _fail(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetMemoryInfo(self, device: Any, *args: Any) -> Any:
        if not isinstance(device, FakeMigDevice):
            return self._orig["nvmlDeviceGetMemoryInfo"](device, *args)
        if self._enter is not None:
            self._enter("nvmlDeviceGetMemoryInfo", device)
        self._mig_entry(device)
        doc = self._state.read()
        gpu, _facts = self._facts(doc, device.parent_uuid)
        gi = gpu["mig"]["gis"][str(device.gi_id)]
        total = self._gi_profile(doc, device.parent_uuid, gi).memory_mib << 20
        return FakeMigMemory(total=total, free=total, used=0)

    # -- driver root capability files ----------------------------------------------------

    def _caps_paths(
        self, doc: dict[str, Any], gpu: dict[str, Any], gi: int, ci: int | None
    ) -> tuple[Path, Path]:
        root = Path(doc["driverRoot"])
        minor = int(gpu["minor"])
        rel = f"gpu{minor}/mig/gi{gi}" + ("" if ci is None else f"/ci{ci}")
        cap_minor = cap_minor_for(minor, gi, ci)
        return (
            root / "proc/driver/nvidia/capabilities" / rel / "access",
            root / "dev/nvidia-caps" / f"nvidia-cap{cap_minor}",
        )

    def _write_caps(self, doc: dict[str, Any], gpu: dict[str, Any], gi: int, ci: int | None) -> None:
        if not doc.get("driverRoot"):
            return
        access, node = self._caps_paths(doc, gpu, gi, ci)
        access.parent.mkdir(parents=True, exist_ok=True)
        access.write_text(
            f"DeviceFileMinor: {cap_minor_for(int(gpu['minor']), gi, ci)}\nDeviceFileMode: 292\n"
            "DeviceFileModify: 1\n"
        )
        node.parent.mkdir(parents=True, exist_ok=True)
        node.touch()

    def _remove_caps(self, doc: dict[str, Any], gpu: dict[str, Any], gi: int, ci: int | None) -> None:
        if not doc.get("driverRoot"):
            return
        access, node = self._caps_paths(doc, gpu, gi, ci)
        access.unlink(missing_ok=True)
        node.unlink(missing_ok=True)
        for parent in (access.parent, access.parent.parent) if ci is None else (access.parent,):
            if parent.name.startswith(("gi", "ci")):
                with contextlib.suppress(OSError):  # another instance's files are still there
                    parent.rmdir()


def cap_minor_for(gpu_minor: int, gi: int, ci: int | None) -> int:
    """The nvidia-caps minor of ``gpu<m>/gi<g>[/ci<c>]/access`` (fixed layout of mig-minors)."""
    base = 3 + 135 * gpu_minor + 9 * gi
    return base if ci is None else base + 1 + ci


_EXPORTED = (
    "nvmlDeviceGetMigMode",
    "nvmlDeviceSetMigMode",
    "nvmlDeviceGetGpuInstanceProfileInfo",
    "nvmlDeviceGetGpuInstanceProfileInfoV",
    "nvmlDeviceGetGpuInstancePossiblePlacements",
    "nvmlDeviceGetGpuInstanceRemainingCapacity",
    "nvmlDeviceCreateGpuInstanceWithPlacement",
    "nvmlDeviceCreateGpuInstance",
    "nvmlGpuInstanceGetInfo",
    "nvmlDeviceGetGpuInstances",
    "nvmlDeviceGetGpuInstanceById",
    "nvmlGpuInstanceDestroy",
    "nvmlGpuInstanceGetComputeInstanceProfileInfo",
    "nvmlGpuInstanceGetComputeInstanceProfileInfoV",
    "nvmlGpuInstanceCreateComputeInstance",
    "nvmlGpuInstanceGetComputeInstances",
    "nvmlGpuInstanceGetComputeInstanceById",
    "nvmlComputeInstanceGetInfo",
    "nvmlComputeInstanceGetInfo_v2",
    "nvmlComputeInstanceDestroy",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceIsMigDeviceHandle",
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetUUID",
)
_WRAPPED = ("nvmlDeviceGetHandleByUUID", "nvmlDeviceGetMemoryInfo")
_CONSTANTS = (
    "c_nvmlGpuInstancePlacement_t",
    "c_nvmlComputeInstancePlacement_t",
    "NVML_DEVICE_MIG_DISABLE",
    "NVML_DEVICE_MIG_ENABLE",
    "NVML_GPU_INSTANCE_PROFILE_COUNT",
    "NVML_COMPUTE_INSTANCE_PROFILE_COUNT",
    "NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE_REV1",
    "NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED",
)


def install(module: Any, state: Any, topology: Topology | None = None) -> FakeMig:
    """Give the fake pynvml ``module`` the MIG functions, backed by ``state`` (a FakeState).

    ``state`` may also be the base fake's core (anything with ``state`` and ``topology``).
    When the module carries the base fake's core as ``module.fake``, every MIG call first
    goes through its ``enter(op, handle)``, so the init check and injected faults apply to
    MIG calls as to the others.
    """
    core = getattr(module, "fake", None)
    if hasattr(state, "state") and hasattr(state, "topology"):
        core, topology, state = state, state.topology, state.state
    enter = getattr(core, "enter", None)
    fake = FakeMig(module, state, topology, enter)
    for name in _WRAPPED:
        original = getattr(module, name, None)
        if original is not None:
            fake._orig[name] = original
            setattr(module, name, getattr(fake, name))
    for name in _EXPORTED:
        fn = getattr(fake, name)
        setattr(module, name, fn if enter is None else _entered(enter, name, fn))
    for name in _CONSTANTS:
        if not hasattr(module, name):
            setattr(module, name, getattr(pynvml, name))
    return fake


def _entered(enter: Callable[[str, Any], None], op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    delegates = op == "nvmlDeviceGetUUID"  # the base fake's own function enters for full GPUs

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        handle = args[0] if args else None
        if not delegates or isinstance(handle, FakeMigDevice):
            enter(op, handle)
        return fn(*args)

    return call


# --- helpers for tests and tools ----------------------------------------------------------


def reset_gpu(state: Any, uuid: str) -> None:
    """What a GPU reset does to MIG: the pending mode becomes current; turning MIG off drops instances."""
    with state.edit() as doc:
        mig = doc["gpus"][uuid].setdefault("mig", {"current": False, "pending": False})
        mig["current"] = bool(mig.get("pending"))
        if not mig["current"]:
            mig["gis"] = {}


def set_busy(state: Any, uuid: str, gi_id: int, ci_id: int | None = None, busy: bool = True) -> None:
    """Pretend a process uses the GI (or one of its CIs), so destroying it fails with IN_USE."""
    with state.edit() as doc:
        entry = doc["gpus"][uuid]["mig"]["gis"][str(gi_id)]
        if ci_id is not None:
            entry = entry["cis"][str(ci_id)]
        entry["busy"] = busy
