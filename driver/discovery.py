"""Turn what NVML reports into the devices this node publishes.

:func:`discover` asks :class:`~driver.nvml.backend.Nvml` for every full GPU and builds one
``gpu-<minor>`` :class:`~driver.inventory.AllocatableDevice` per usable GPU, with NVIDIA's
attribute names and types (``type``, ``uuid``, ``productName``, ``brand``, ``architecture``,
``cudaComputeCapability``, ``driverVersion``, ``cudaDriverVersion``,
``resource.kubernetes.io/pciBusID``, ``.../pcieRoot``, ``.../numaNode``) and capacity
``memory``. The PCIe root and NUMA node come from sysfs (as NVIDIA's nvpci does), the NUMA
node falling back to NVML.

MIG is a hook: for every MIG-capable GPU, ``mig_hook(gpu, system, full_gpu)`` decides what
that GPU publishes (its MIG devices, the full GPU, counter sets). Without a hook a GPU with
MIG enabled publishes nothing and says so in :attr:`Inventory.warnings`.

It does not publish, retry or cache: an NVML failure or an empty result raises, and the
daemon retries with backoff.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import structlog

from driver.errors import DriverError, NvmlError
from driver.inventory import AllocatableDevice, AttributeValue, CounterSet, Inventory, Version
from driver.nvml.backend import Nvml
from driver.nvml.types import GpuInfo, SystemInfo

log = structlog.get_logger(__name__)

ATTR_PCI_BUS_ID = "resource.kubernetes.io/pciBusID"
ATTR_PCIE_ROOT = "resource.kubernetes.io/pcieRoot"
ATTR_NUMA_NODE = "resource.kubernetes.io/numaNode"

# A lost GPU will not come back by retrying; the rest of the node is still worth publishing.
_GPU_IS_LOST = 15

_PCIE_ROOT = re.compile(r"^pci[0-9a-f]{4}:[0-9a-f]{2}$")

MigHook = Callable[[GpuInfo, SystemInfo, AllocatableDevice], Inventory]
"""``(gpu, system, full_gpu) -> what this GPU publishes``.

Called for every MIG-capable GPU. ``full_gpu`` is the device discovery would publish for
the whole GPU (built even when MIG is enabled, so MIG devices can copy its attributes); the
returned fragment's devices, counter sets and warnings replace it in the inventory.
"""


class DiscoveryError(DriverError):
    """NVML works but there is nothing to publish (no GPUs, or none usable)."""


def discover(
    nvml: Nvml,
    node_name: str,
    *,
    sysfs_root: Path | None = Path("/sys"),
    mig_hook: MigHook | None = None,
) -> Inventory:
    """Build the node's inventory from NVML.

    Args:
        nvml: an open NVML session.
        node_name: the node (for logs and messages).
        sysfs_root: where to resolve PCIe roots and NUMA nodes; None skips sysfs (a simulated
            node's bus ids mean nothing on the host's /sys).
        mig_hook: publishes MIG-capable GPUs; see :data:`MigHook`.

    Raises:
        NvmlError: NVML is not ready or a GPU query failed (retry later).
        DiscoveryError: no GPUs, or nothing publishable (the message lists why).
    """
    system = nvml.system()
    count = nvml.device_count()
    if count == 0:
        raise DiscoveryError(
            f"NVML on node {node_name} reports no GPUs; check that the NVIDIA driver is loaded and the "
            "GPUs are visible to the plugin (nvidia-smi -L in the driver root)"
        )
    devices: list[AllocatableDevice] = []
    counter_sets: list[CounterSet] = []
    warnings: list[str] = []
    seen_minors: dict[int, str] = {}
    gpus: list[GpuInfo] = []
    for index in range(count):
        try:
            gpus.append(nvml.gpu(index))
        except NvmlError as exc:
            if exc.code != _GPU_IS_LOST:
                raise
            warnings.append(
                f"GPU at NVML index {index} is lost ({exc}); it is not published until it is reset"
            )
    for gpu in sorted(gpus, key=lambda g: g.pci_bus_id):
        if gpu.minor in seen_minors:
            raise DiscoveryError(
                f"GPUs {seen_minors[gpu.minor]} and {gpu.uuid} both report minor {gpu.minor}; "
                "device names would collide - check the driver installation"
            )
        seen_minors[gpu.minor] = gpu.uuid
        full = full_gpu_device(gpu, system, sysfs_root=sysfs_root, warnings=warnings)
        if gpu.mig_capable and mig_hook is not None:
            part = mig_hook(gpu, system, full)
            devices.extend(part.devices)
            counter_sets.extend(part.counter_sets)
            warnings.extend(part.warnings)
        elif gpu.mig_enabled:
            warnings.append(
                f"GPU {gpu.minor} ({gpu.uuid}) has MIG mode enabled but MIG support is off in this "
                "plugin, so nothing is published for it; disable MIG mode (nvidia-smi -i "
                f"{gpu.uuid} -mig 0) or enable MIG support"
            )
        else:
            devices.append(full)
    for warning in warnings:
        log.warning("discovery warning", node=node_name, warning=warning)
    if not devices:
        raise DiscoveryError(
            f"node {node_name} has {count} GPU(s) but none can be published: " + "; ".join(warnings)
        )
    log.info("discovered devices", node=node_name, gpus=len(gpus), devices=len(devices))
    return Inventory(devices=tuple(devices), counter_sets=tuple(counter_sets), warnings=tuple(warnings))


def full_gpu_device(
    gpu: GpuInfo, system: SystemInfo, *, sysfs_root: Path | None = None, warnings: list[str] | None = None
) -> AllocatableDevice:
    """The ``gpu-<minor>`` device for a whole GPU, attributes exactly as NVIDIA publishes them."""
    problems = warnings if warnings is not None else []
    attrs: dict[str, AttributeValue] = {
        "type": "gpu",
        "uuid": gpu.uuid,
        "productName": gpu.product_name,
        "brand": gpu.brand,
        "architecture": gpu.architecture,
        "cudaComputeCapability": Version(
            f"{gpu.cuda_compute_capability[0]}.{gpu.cuda_compute_capability[1]}.0"
        ),
    }
    driver = semver_of(system.driver_version)
    if driver is None:
        problems.append(
            f"driver version {system.driver_version!r} is not a version number; attribute driverVersion "
            "is left out (selectors on it will not match)"
        )
    else:
        attrs["driverVersion"] = driver
    attrs["cudaDriverVersion"] = cuda_driver_version(system.cuda_driver_version)
    attrs[ATTR_PCI_BUS_ID] = gpu.pci_bus_id
    if sysfs_root is not None:
        root = pcie_root(gpu.pci_bus_id, sysfs_root)
        if root is None:
            log.info(
                "pcie root not resolvable", gpu=gpu.uuid, pci_bus_id=gpu.pci_bus_id, sysfs=str(sysfs_root)
            )
        else:
            attrs[ATTR_PCIE_ROOT] = root
    numa = sysfs_numa_node(gpu.pci_bus_id, sysfs_root) if sysfs_root is not None else None
    if numa is None:
        numa = gpu.numa_node
    if numa is not None and numa >= 0:
        attrs[ATTR_NUMA_NODE] = numa
    capacity = {} if gpu.memory_bytes is None else {"memory": gpu.memory_bytes}
    return AllocatableDevice(
        name=f"gpu-{gpu.minor}",
        kind="gpu",
        gpu_uuid=gpu.uuid,
        gpu_minor=gpu.minor,
        attributes=attrs,
        capacity=capacity,
    )


def semver_of(text: str) -> Version | None:
    """``"580.126.20"`` -> 580.126.20; ``"550.54.05"`` -> 550.54.5; ``"470.82"`` -> 470.82.0.

    Leading zeros are dropped and missing parts become 0, as the Go semver parser NVIDIA
    uses does; anything else that is not 1-3 numbers gives None.
    """
    parts = text.strip().split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    numbers = [int(p) for p in parts] + [0] * (3 - len(parts))
    return Version(".".join(str(n) for n in numbers))


def cuda_driver_version(value: int) -> Version:
    """NVML's integer CUDA driver version (13000, 12040) as a version (13.0.0, 12.4.0)."""
    return Version(f"{value // 1000}.{(value % 1000) // 10}.0")


def pcie_root(pci_bus_id: str, sysfs_root: Path) -> str | None:
    """``pci<domain>:<bus>`` of the root complex above the device, from its sysfs path.

    ``<sysfs>/bus/pci/devices/<BDF>`` links into ``<sysfs>/devices/pci0000:00/.../<BDF>``; the
    first component under ``devices`` is the root. None when that cannot be resolved.
    """
    link = sysfs_root / "bus" / "pci" / "devices" / pci_bus_id
    try:
        target = link.resolve(strict=True)
        devices = (sysfs_root / "devices").resolve(strict=True)
        first = target.relative_to(devices).parts[0]
    except (OSError, RuntimeError, ValueError, IndexError):
        return None
    return first if _PCIE_ROOT.match(first) else None


def sysfs_numa_node(pci_bus_id: str, sysfs_root: Path) -> int | None:
    """The device's ``numa_node`` from sysfs; None when absent, unreadable or -1."""
    try:
        value = int((sysfs_root / "bus" / "pci" / "devices" / pci_bus_id / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None
