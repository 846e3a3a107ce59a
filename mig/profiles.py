"""GPU-instance profiles as NVML reports them, their go-nvlib names, and the MigSpecs they offer.

Input is what a backend read from NVML (profile info by NVML index plus possible placements);
output is plain values. One GPU-instance profile gives one device kind whose compute instance
spans the whole GI (C == G); compute-instance sub-profiles (``1c.3g.20gb``) are never offered,
as NVIDIA's driver does. This module does no NVML calls and knows no Kubernetes types.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from mig.spec import MigSpec

MIB = 1 << 20
GIB = 1 << 30

# NVML_GPU_INSTANCE_PROFILE_* index -> go-nvlib name suffix (memory-engine and graphics variants).
_SUFFIX_BY_INDEX = {
    7: "+me",  # 1_SLICE_REV1
    8: "+me",  # 2_SLICE_REV1
    10: "+gfx",
    11: "+gfx",
    12: "+gfx",
    13: "-me",
    14: "-me",
    15: "+me.all",
    16: "+me.all",
    17: "+gfx",
}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a GPU instance sits, in memory slices (``nvmlGpuInstancePlacement_t``)."""

    start: int
    size: int

    @property
    def slices(self) -> range:
        """The memory slices this placement occupies."""
        return range(self.start, self.start + self.size)

    def overlaps(self, other: Placement) -> bool:
        """True when the two placements share a memory slice."""
        return self.start < other.start + other.size and other.start < self.start + self.size


@dataclass(frozen=True, slots=True)
class GiProfile:
    """One GPU-instance profile of one GPU (``nvmlGpuInstanceProfileInfo_v2_t`` plus placements)."""

    nvml_index: int  # NVML_GPU_INSTANCE_PROFILE_* (what GetGpuInstanceProfileInfo takes)
    profile_id: int  # info.id (what create/placement calls take)
    name: str  # go-nvlib form, e.g. "1g.5gb"
    slice_count: int
    instance_count: int
    multiprocessors: int
    copy_engines: int
    decoders: int
    encoders: int
    jpeg_engines: int
    ofa_engines: int
    memory_mib: int
    placements: tuple[Placement, ...] = ()

    @property
    def memory_bytes(self) -> int:
        """Profile memory in bytes (NVML's memorySizeMB is MiB)."""
        return self.memory_mib * MIB


def memory_gb(memory_mib: int, total_memory_bytes: int) -> int:
    """The ``<GB>`` of a profile name, rounded the way go-nvlib rounds it.

    The profile's share of memory is rounded up to eighths, then scaled by the GPU's memory
    rounded up to whole GiB; this is what turns 4864 MiB on a 40 GiB A100 into ``5gb``.
    """
    if total_memory_bytes <= 0:
        raise ValueError(f"total memory must be positive to name a MIG profile, got {total_memory_bytes}")
    eighths = math.ceil(memory_mib * MIB / total_memory_bytes * 8)
    # Go's math.Round rounds halves away from zero (H200 3g: 70.5 -> 71); Python's round() would not.
    return math.floor(eighths / 8 * math.ceil(total_memory_bytes / GIB) + 0.5)


def profile_name(slice_count: int, memory_mib: int, total_memory_bytes: int, nvml_index: int) -> str:
    """go-nvlib's profile string, e.g. ``1g.5gb``, ``1g.10gb+me``, ``7g.80gb``."""
    suffix = _SUFFIX_BY_INDEX.get(nvml_index, "")
    return f"{slice_count}g.{memory_gb(memory_mib, total_memory_bytes)}gb{suffix}"


def nvml_name_to_profile(nvml_name: str) -> str:
    """The profile string inside an NVML v2 profile name (``"MIG 1g.5gb"`` -> ``"1g.5gb"``)."""
    name = nvml_name.strip()
    return name.removeprefix("MIG ").strip()


def memory_slice_count(profiles: Iterable[GiProfile]) -> int:
    """Number of memory slices of the GPU: the end of the furthest placement (8 on A100/H100, 4 on A30)."""
    return max((p.start + p.size for prof in profiles for p in prof.placements), default=0)


def mig_specs(parent_minor: int, parent_uuid: str, profiles: Iterable[GiProfile]) -> list[MigSpec]:
    """Every (profile, placement) the GPU offers, in profile then placement order."""
    specs: list[MigSpec] = []
    for prof in profiles:
        specs.extend(
            MigSpec(
                parent_minor=parent_minor,
                parent_uuid=parent_uuid,
                profile=prof.name,
                gi_profile_id=prof.profile_id,
                placement_start=pl.start,
                placement_size=pl.size,
            )
            for pl in sorted(prof.placements, key=lambda p: p.start)
        )
    return specs


def profile_by_id(profiles: Iterable[GiProfile], profile_id: int) -> GiProfile | None:
    """The profile with NVML profile id ``profile_id``, or None."""
    for prof in profiles:
        if prof.profile_id == profile_id:
            return prof
    return None
