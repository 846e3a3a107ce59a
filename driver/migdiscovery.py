"""MIG devices of one MIG-capable GPU, as inventory values: what discovery publishes for it.

Dynamic mode: one ``mig-dynamic`` device per (profile, placement), each consuming its
profile's counters and memory slices from the GPU's counter set; the counter set itself; and
what the full GPU consumes (all of it) with its dynamic-mode capacity. Static mode: the MIG
devices that already exist, as ``mig-static`` devices with their ``MIG-...`` uuid and
``memorySlice<i>`` capacities. The parent's attributes come in as a mapping built by
discovery for the full GPU, so attribute code lives in one place. No NVML calls beyond the
:class:`mig.backend.MigBackend` given; no Kubernetes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import structlog

from driver.inventory import AllocatableDevice, AttributeValue, CounterConsumption, CounterSet, Inventory
from driver.nvml.types import GpuInfo, SystemInfo
from mig.backend import MigBackend
from mig.counters import counter_set_name, full_gpu_capacity, gpu_counters, mig_consumption, profile_capacity
from mig.profiles import GiProfile, Placement, mig_specs, profile_by_id
from mig.spec import MigInstance, MigSpec, canonical_name

log = structlog.get_logger(__name__)

# Parent attributes a MIG device carries over (NVIDIA's CommonAttributesMig); type/uuid are its own.
PARENT_ATTRIBUTES = (
    "productName",
    "brand",
    "architecture",
    "cudaComputeCapability",
    "driverVersion",
    "cudaDriverVersion",
    "addressingMode",
    "resource.kubernetes.io/pciBusID",
    "resource.kubernetes.io/pcieRoot",
    "resource.kubernetes.io/numaNode",
)


@dataclass(frozen=True, slots=True)
class DynamicMig:
    """What one GPU publishes in dynamic MIG mode."""

    devices: tuple[AllocatableDevice, ...]
    counter_set: CounterSet | None  # None when NVML gave no profile data
    full_gpu_consumption: tuple[CounterConsumption, ...]  # for the full GPU device
    full_gpu_capacity: Mapping[str, int]  # per-dimension maxima (empty without profile data)


def mig_attributes(
    parent_uuid: str, profile: str, parent_attributes: Mapping[str, AttributeValue]
) -> dict[str, AttributeValue]:
    """A MIG device's attributes: type, profile, parentUUID and the parent's product facts."""
    attributes: dict[str, AttributeValue] = {"type": "mig", "profile": profile, "parentUUID": parent_uuid}
    for key in PARENT_ATTRIBUTES:
        if key in parent_attributes:
            attributes[key] = parent_attributes[key]
    return attributes


def dynamic_devices(
    parent_minor: int,
    parent_uuid: str,
    profiles: Sequence[GiProfile],
    parent_attributes: Mapping[str, AttributeValue],
) -> DynamicMig:
    """Every possible MIG device of the GPU plus its counter set (dynamic MIG)."""
    counters = gpu_counters(profiles)
    if not counters:
        log.warning("mig profiles missing", parent_uuid=parent_uuid)
        return DynamicMig(devices=(), counter_set=None, full_gpu_consumption=(), full_gpu_capacity={})
    set_name = counter_set_name(parent_minor)
    devices: list[AllocatableDevice] = []
    for spec in mig_specs(parent_minor, parent_uuid, profiles):
        prof = profile_by_id(profiles, spec.gi_profile_id)
        if prof is None:  # mig_specs only yields specs of these profiles
            continue
        placement = Placement(spec.placement_start, spec.placement_size)
        devices.append(
            AllocatableDevice(
                name=spec.name,
                kind="mig-dynamic",
                gpu_uuid=parent_uuid,
                gpu_minor=parent_minor,
                attributes=mig_attributes(parent_uuid, prof.name, parent_attributes),
                capacity=profile_capacity(prof),
                consumes_counters=(CounterConsumption(set_name, mig_consumption(prof, placement)),),
                mig_spec=spec,
            )
        )
    return DynamicMig(
        devices=tuple(devices),
        counter_set=CounterSet(name=set_name, counters=counters),
        full_gpu_consumption=(CounterConsumption(set_name, dict(counters)),),
        full_gpu_capacity=full_gpu_capacity(profiles),
    )


def static_devices(
    parent_minor: int,
    parent_uuid: str,
    profiles: Sequence[GiProfile],
    instances: Sequence[MigInstance],
    parent_attributes: Mapping[str, AttributeValue],
) -> tuple[AllocatableDevice, ...]:
    """The MIG devices that exist on the GPU (static MIG); GIs without a CI are skipped."""
    devices: list[AllocatableDevice] = []
    for inst in instances:
        live = inst.to_live(parent_minor)
        prof = profile_by_id(profiles, inst.gi_profile_id)
        if live is None or prof is None:
            log.warning(
                "mig instance not published",
                parent_uuid=parent_uuid,
                gi_id=inst.gi_id,
                reason="no compute instance" if live is None else "unknown profile",
            )
            continue
        capacity = profile_capacity(prof)
        for index in range(inst.placement_start, inst.placement_start + inst.placement_size):
            capacity[f"memorySlice{index}"] = 1
        attributes = mig_attributes(parent_uuid, prof.name, parent_attributes)
        attributes["uuid"] = live.mig_uuid
        devices.append(
            AllocatableDevice(
                name=canonical_name(parent_minor, prof.name, inst.gi_profile_id, inst.placement_start),
                kind="mig-static",
                gpu_uuid=parent_uuid,
                gpu_minor=parent_minor,
                attributes=attributes,
                capacity=capacity,
                mig_spec=MigSpec(
                    parent_minor=parent_minor,
                    parent_uuid=parent_uuid,
                    profile=prof.name,
                    gi_profile_id=inst.gi_profile_id,
                    placement_start=inst.placement_start,
                    placement_size=inst.placement_size,
                ),
                mig_live=live,
            )
        )
    return tuple(devices)


def discover_dynamic(
    backend: MigBackend, parent_minor: int, parent_uuid: str, parent_attributes: Mapping[str, AttributeValue]
) -> DynamicMig:
    """:func:`dynamic_devices` with the profiles read through ``backend``."""
    return dynamic_devices(parent_minor, parent_uuid, backend.profiles(parent_uuid), parent_attributes)


def discover_static(
    backend: MigBackend, parent_minor: int, parent_uuid: str, parent_attributes: Mapping[str, AttributeValue]
) -> tuple[AllocatableDevice, ...]:
    """:func:`static_devices` with profiles and instances read through ``backend``."""
    current, _pending = backend.mig_mode(parent_uuid)
    if not current:
        return ()
    return static_devices(
        parent_minor,
        parent_uuid,
        backend.profiles(parent_uuid),
        backend.list_instances(parent_uuid),
        parent_attributes,
    )


MigMode = str  # "dynamic" | "static"


def make_mig_hook(
    backend: MigBackend,
    mode: MigMode,
    *,
    allow_mig_mode_change: bool = False,
    owned: Collection[tuple[str, int, int]] = (),
) -> Callable[[GpuInfo, SystemInfo, AllocatableDevice], Inventory]:
    """The discovery hook deciding what one MIG-capable GPU publishes.

    MIG safety first: MIG mode is never changed where that needs a reset (Ampere and older), while
    a mode change is pending, or in a vGPU guest; there MIG mode is the admin's decision and the
    GPU publishes what its current mode allows. Dynamic MIG (placements that follow the
    workloads) is offered on GPUs with MIG on, and on Hopper+ GPUs with MIG off only when the node
    allows enabling it on demand. Instances this plugin did not create (``owned`` lists the
    ``(parent uuid, GI profile id, placement start)`` of the ones it did) are never destroyed: they
    are published as static MIG devices and the dynamic placements they overlap are withheld.

    Args:
        backend: MIG queries for the GPU.
        mode: "dynamic" or "static" (the node setting; static also when the API server does not
            keep partitionable-device fields).
        allow_mig_mode_change: enable MIG on demand where no reset is needed (Hopper+).
        owned: the MIG instances recorded in the checkpoint.
    """
    owned_set = set(owned)

    def hook(gpu: GpuInfo, system: SystemInfo, full: AllocatableDevice) -> Inventory:
        pending = gpu.mig_mode_pending is not None and gpu.mig_mode_pending != gpu.mig_mode_current
        can_enable = gpu.mig_toggle_without_reset and allow_mig_mode_change and not gpu.is_vgpu_guest
        dynamic = mode == "dynamic" and not pending and not gpu.is_vgpu_guest
        if dynamic and (gpu.mig_enabled or can_enable):
            return _dynamic_gpu(backend, gpu, full, owned_set)
        if gpu.mig_enabled:
            static = discover_static(backend, gpu.minor, gpu.uuid, full.attributes)
            warnings = (
                () if static else (f"GPU {gpu.minor} has MIG mode on but no MIG devices; nothing to publish",)
            )
            return Inventory(devices=static, warnings=warnings)
        return Inventory(devices=(full,))

    return hook


def _dynamic_gpu(
    backend: MigBackend, gpu: GpuInfo, full: AllocatableDevice, owned: set[tuple[str, int, int]]
) -> Inventory:
    dyn = discover_dynamic(backend, gpu.minor, gpu.uuid, full.attributes)
    if dyn.counter_set is None:
        return Inventory(devices=(full,) if not gpu.mig_enabled else (), warnings=("no MIG profile data",))
    foreign: list[MigInstance] = []
    if gpu.mig_enabled:
        foreign = [
            inst
            for inst in backend.list_instances(gpu.uuid)
            if (gpu.uuid, inst.gi_profile_id, inst.placement_start) not in owned
        ]
    taken = {
        s for inst in foreign for s in range(inst.placement_start, inst.placement_start + inst.placement_size)
    }
    devices = [
        d for d in dyn.devices if d.mig_spec is None or not taken.intersection(d.mig_spec.memory_slices)
    ]
    warnings: list[str] = []
    if foreign:
        static = static_devices(gpu.minor, gpu.uuid, backend.profiles(gpu.uuid), foreign, full.attributes)
        devices.extend(static)
        warnings.append(
            f"GPU {gpu.minor} has {len(foreign)} MIG instance(s) this plugin did not create; they are "
            "published as static MIG devices and never destroyed, and overlapping placements are withheld"
        )
    # The full GPU is offered only while MIG is off: a GPU in MIG mode runs no full-GPU work. It
    # consumes every counter, so the scheduler never hands it out next to a MIG slice of it.
    if not gpu.mig_enabled and not foreign:
        capacity = {**dyn.full_gpu_capacity, **full.capacity}
        devices.insert(
            0,
            AllocatableDevice(
                name=full.name,
                kind=full.kind,
                gpu_uuid=full.gpu_uuid,
                gpu_minor=full.gpu_minor,
                attributes=full.attributes,
                capacity=capacity,
                consumes_counters=dyn.full_gpu_consumption,
            ),
        )
    return Inventory(devices=tuple(devices), counter_sets=(dyn.counter_set,), warnings=tuple(warnings))
