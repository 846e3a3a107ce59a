"""Partitionable-device counters (KEP-4815) of a MIG-capable GPU: what each device consumes.

One counter set per physical GPU, ``gpu-<minor>-counter-set``, with one counter per capacity
dimension (value = the largest profile's value; memory in bytes) and one per memory slice (value
1). A MIG device consumes its profile's values plus its memory slices, so the scheduler can never
hand out overlapping placements; the full GPU consumes everything, so it and any MIG slice of it
exclude each other. Plain dicts out: ``driver.migdiscovery`` wraps them in inventory types.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mig.profiles import GiProfile, Placement, memory_slice_count

# Device capacity name -> counter name (camelCase -> kebab-case, as NVIDIA's driver derives them).
CAPACITY_TO_COUNTER = {
    "multiprocessors": "multiprocessors",
    "copyEngines": "copy-engines",
    "decoders": "decoders",
    "encoders": "encoders",
    "jpegEngines": "jpeg-engines",
    "ofaEngines": "ofa-engines",
    "memory": "memory",
}


def counter_set_name(parent_minor: int) -> str:
    """``gpu-<minor>-counter-set``."""
    return f"gpu-{parent_minor}-counter-set"


def memory_slice_counter(index: int) -> str:
    """``memory-slice-<i>``."""
    return f"memory-slice-{index}"


def profile_capacity(profile: GiProfile) -> dict[str, int]:
    """A MIG device's capacities: its profile's engine counts and memory in bytes."""
    return {
        "multiprocessors": profile.multiprocessors,
        "copyEngines": profile.copy_engines,
        "decoders": profile.decoders,
        "encoders": profile.encoders,
        "jpegEngines": profile.jpeg_engines,
        "ofaEngines": profile.ofa_engines,
        "memory": profile.memory_bytes,
    }


def full_gpu_capacity(profiles: Iterable[GiProfile]) -> dict[str, int]:
    """Per-dimension maxima over all profiles (the full GPU's capacity in dynamic MIG mode)."""
    maxima = dict.fromkeys(CAPACITY_TO_COUNTER, 0)
    for prof in profiles:
        for name, value in profile_capacity(prof).items():
            maxima[name] = max(maxima[name], value)
    return maxima


def gpu_counters(profiles: Sequence[GiProfile]) -> dict[str, int]:
    """The counters of the GPU's counter set; empty when there is no MIG data (publish no set then)."""
    if not profiles:
        return {}
    counters = {CAPACITY_TO_COUNTER[name]: value for name, value in full_gpu_capacity(profiles).items()}
    for index in range(memory_slice_count(profiles)):
        counters[memory_slice_counter(index)] = 1
    return counters


def mig_consumption(profile: GiProfile, placement: Placement) -> dict[str, int]:
    """What one MIG device at ``placement`` takes from its parent's counter set."""
    consumed = {CAPACITY_TO_COUNTER[name]: value for name, value in profile_capacity(profile).items()}
    for index in placement.slices:
        consumed[memory_slice_counter(index)] = 1
    return consumed


def full_gpu_consumption(profiles: Sequence[GiProfile]) -> dict[str, int]:
    """The full GPU takes every counter at its full value."""
    return gpu_counters(profiles)
