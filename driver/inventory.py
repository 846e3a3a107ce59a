"""What this node can offer: the devices discovery found, in the terms ResourceSlices use.

An :class:`Inventory` is a plain value: discovery builds it from NVML, ``resourceslices`` turns it
into API objects, ``state`` looks devices up in it by name. It knows nothing about NVML calls
or the API server.

Attribute names follow NVIDIA's driver exactly (``type``, ``uuid``, ``productName``, ``brand``,
``architecture``, ``cudaComputeCapability``, ``driverVersion``, ``cudaDriverVersion``,
``resource.kubernetes.io/pciBusID``, ``resource.kubernetes.io/pcieRoot``,
``resource.kubernetes.io/numaNode``; MIG adds ``profile`` and ``parentUUID``). Bare names live in
the driver's domain (``gpu.nvidia.com``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from mig.spec import MigLive, MigSpec

DRIVER_NAME = "gpu.nvidia.com"

DeviceKind = Literal["gpu", "mig-static", "mig-dynamic"]


@dataclass(frozen=True, slots=True)
class Version:
    """A semver attribute value (``{"version": "8.0.0"}`` on the wire)."""

    value: str


AttributeValue = bool | int | str | Version


@dataclass(frozen=True, slots=True)
class CounterSet:
    """Shared counters of one physical GPU (partitionable devices, KEP-4815)."""

    name: str  # gpu-<minor>-counter-set
    counters: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class CounterConsumption:
    """How much of a counter set one device uses when allocated."""

    counter_set: str
    counters: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """How a claim consumes one capacity of a shareable device (KEP-5075 ``requestPolicy``).

    Plain integers in the capacity's unit; ``validRange`` with ``min``, optional ``max`` and ``step``.
    """

    default: int
    min: int
    max: int | None = None
    step: int | None = None


@dataclass(frozen=True, slots=True)
class AllocatableDevice:
    """One device as published in a ResourceSlice.

    ``capacity`` values are plain integers (bytes for memory, counts otherwise). A device with
    ``allow_multiple_allocations`` is offered as shares (consumable capacity); ``request_policies``
    then say how each capacity is consumed.
    """

    name: str
    kind: DeviceKind
    gpu_uuid: str  # the physical GPU (the parent, for MIG)
    gpu_minor: int
    attributes: Mapping[str, AttributeValue]
    capacity: Mapping[str, int]
    consumes_counters: tuple[CounterConsumption, ...] = ()
    mig_spec: MigSpec | None = None  # mig-dynamic (and mig-static: its profile/placement)
    mig_live: MigLive | None = None  # mig-static: the instance that already exists
    allow_multiple_allocations: bool = False
    request_policies: Mapping[str, RequestPolicy] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every device and counter set this node publishes, in publication order."""

    devices: tuple[AllocatableDevice, ...] = ()
    counter_sets: tuple[CounterSet, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def get(self, name: str) -> AllocatableDevice | None:
        """The device called ``name``, or None."""
        for device in self.devices:
            if device.name == name:
                return device
        return None
