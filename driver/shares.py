"""Consumable shares: full GPUs offered as fractions (KEP-5075), and what one share may use.

Publishing (:func:`offer_shares`): with feature gate ``ConsumableShares`` a full GPU is published
with ``allowMultipleAllocations: true`` and a ``requestPolicy`` on ``memory`` in one of NVIDIA's
modes (``--consumable-shares``):

* ``memory`` (our default): a claim that asks for no memory consumes all of it, so it gets the
  whole GPU as before; ``capacity.requests.memory: 10Gi`` gets a 10Gi share. Range
  [1Gi, memory] in 1Mi steps (NVIDIA's step; the minimum is ours: a CUDA context alone takes
  several hundred MiB, so a smaller share could not start a kernel).
* ``unlimited``: memory default 0, range [0, memory], 1Mi steps - every claim is a share and
  memory is only accounted where a claim asks for it.
* ``N`` (a number): memory as ``unlimited``, plus capacity ``shares`` = N (default 1, step 1).

Every mode adds capacity ``computePercent`` = 100 (default 0, range [0, 100], step 1): the share of
the GPU's SMs a claim asks for, which becomes the MPS active thread percentage. 0 (not asked)
means "in proportion to the memory (or shares) taken". MPS thread percentages are ceilings, not
reservations, so the scheduler's sum over shares is accounting, not a guarantee of SMs.

Counters: a full GPU of a dynamic-MIG GPU consumes every counter of its GPU; the scheduler charges
a multi-allocatable device's counters once, while any share of it is allocated, so shares and MIG
devices of one GPU exclude each other. MIG devices are not offered as shares (see README).

Prepare (:func:`share_limits`): the allocation result's ``consumedCapacity`` says what a share got.

This module is pure: no NVML, no API server, no MPS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from driver.inventory import DRIVER_NAME, AllocatableDevice, Inventory, RequestPolicy

MIB = 1 << 20
#: Smallest memory share in mode ``memory`` (requests below are rounded up to it by the scheduler).
MIN_SHARE_MEMORY = 1 << 30
MEMORY = "memory"
SHARES = "shares"
COMPUTE = "computePercent"

ShareKind = Literal["disabled", "memory", "unlimited", "shares"]


@dataclass(frozen=True, slots=True)
class ShareMode:
    """How full GPUs are offered: ``kind`` and, for ``shares``, how many."""

    kind: ShareKind
    count: int = 0

    @property
    def enabled(self) -> bool:
        return self.kind != "disabled"


def parse_share_mode(text: str) -> ShareMode:
    """``memory`` | ``unlimited`` | ``disabled`` | a positive integer N.

    Raises:
        ValueError: anything else (the message lists the accepted values).
    """
    value = text.strip().lower()
    if value in ("memory", "unlimited", "disabled"):
        return ShareMode(value)  # type: ignore[arg-type]
    if value.isdigit() and int(value) > 0:
        return ShareMode("shares", int(value))
    raise ValueError(
        f"{text!r} is not a share mode; use memory (default), unlimited, a positive number of shares "
        "(e.g. 4), or disabled"
    )


def offer_shares(inventory: Inventory, mode: ShareMode) -> Inventory:
    """``inventory`` with every full GPU offered as shares in ``mode`` (unchanged when disabled)."""
    if not mode.enabled:
        return inventory
    devices = tuple(_shareable(d, mode) if d.kind == "gpu" else d for d in inventory.devices)
    return dataclasses.replace(inventory, devices=devices)


def _shareable(device: AllocatableDevice, mode: ShareMode) -> AllocatableDevice:
    total = device.capacity.get(MEMORY)
    if total is None or total < MIN_SHARE_MEMORY + MIB:
        return device  # nothing sensible to split (unknown or tiny memory)
    memory = total - total % MIB  # the policy's steps must reach the capacity exactly
    capacity = {**device.capacity, MEMORY: memory, COMPUTE: 100}
    policies = {COMPUTE: RequestPolicy(default=0, min=0, max=100, step=1)}
    if mode.kind == "memory":
        policies[MEMORY] = RequestPolicy(default=memory, min=MIN_SHARE_MEMORY, max=memory, step=MIB)
    else:
        policies[MEMORY] = RequestPolicy(default=0, min=0, max=memory, step=MIB)
    if mode.kind == "shares":
        capacity[SHARES] = mode.count
        policies[SHARES] = RequestPolicy(default=1, min=1, max=mode.count, step=1)
    return dataclasses.replace(
        device, capacity=capacity, allow_multiple_allocations=True, request_policies=policies
    )


@dataclass(frozen=True, slots=True)
class ShareLimits:
    """What one share of a GPU may use.

    ``memory_bytes`` None: no memory limit (mode ``unlimited`` without a request).
    ``whole``: the share holds the entire GPU and nothing can share it (mode ``memory``, all
    memory taken), so it is prepared as a full GPU, MPS-free.
    """

    memory_bytes: int | None
    thread_percentage: int
    whole: bool = False

    @property
    def memory_mib(self) -> int | None:
        return None if self.memory_bytes is None else self.memory_bytes // MIB


def _consumed(consumed: Mapping[str, Any], name: str) -> Fraction | None:
    for key in (name, f"{DRIVER_NAME}/{name}"):
        if key in consumed:
            from driver.resourceslices import parse_quantity

            return parse_quantity(consumed[key])
    return None


def share_limits(device: AllocatableDevice, consumed: Mapping[str, Any]) -> ShareLimits:
    """The limits of a share of ``device`` from its allocation result's ``consumedCapacity``.

    Raises:
        ValueError: a consumed amount is not a quantity, or more than the device has.
    """
    total = device.capacity.get(MEMORY, 0)
    policy = device.request_policies.get(MEMORY)
    memory = _consumed(consumed, MEMORY)
    compute = _consumed(consumed, COMPUTE)
    shares = _consumed(consumed, SHARES)
    count = device.capacity.get(SHARES)
    if memory is not None and memory > total:
        raise ValueError(f"share of {device.name} consumed {memory} bytes of memory, the GPU has {total}")
    if compute is not None and not 0 <= compute <= 100:
        raise ValueError(f"share of {device.name} consumed computePercent {compute}, allowed 0..100")
    fraction: Fraction | None = None
    memory_bytes: int | None = None
    if memory is not None and memory > 0:
        memory_bytes = int(memory) - int(memory) % MIB
        fraction = Fraction(memory_bytes, total) if total else None
    elif shares is not None and count:
        fraction = shares / count
        memory_bytes = int(total * fraction) // MIB * MIB
    if compute is not None and compute > 0:
        threads = math.ceil(compute)
    elif fraction is not None:
        threads = max(1, math.ceil(fraction * 100))
    else:
        threads = 100
    whole = (
        policy is not None
        and policy.min > 0
        and memory_bytes is not None
        and memory_bytes >= total - total % MIB
        and threads == 100
    )
    return ShareLimits(memory_bytes=memory_bytes, thread_percentage=min(threads, 100), whole=whole)
