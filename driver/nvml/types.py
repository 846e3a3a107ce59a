"""Plain values read from NVML: what a GPU is, and what the node's driver is.

These are the only NVML-derived types the rest of the driver sees; the pynvml module, its
handles and its ctypes structs stay behind :mod:`driver.nvml.backend`. The string tables
render NVML enums the way NVIDIA's go-nvlib does (``GetArchitectureAsString``,
``GetBrandAsString``), because those strings are published as device attributes and users'
CEL selectors match on them.

Nothing here calls NVML or knows about Kubernetes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# NVML_DEVICE_ARCH_* -> go-nvlib's string. 11 is T23X (Orin) in nvml.h; 13 (Rubin) is newer
# than go-nvlib's table, so we name it rather than fail on it.
ARCHITECTURE_NAMES: dict[int, str] = {
    2: "Kepler",
    3: "Maxwell",
    4: "Pascal",
    5: "Volta",
    6: "Turing",
    7: "Ampere",
    8: "Ada Lovelace",
    9: "Hopper",
    10: "Blackwell",
    11: "Orin",
    13: "Rubin",
    0xFFFFFFFF: "Unknown",
}

ARCH_HOPPER = 9
ARCH_UNKNOWN = 0xFFFFFFFF

# NVML_BRAND_* -> go-nvlib's string.
BRAND_NAMES: dict[int, str] = {
    0: "Unknown",
    1: "Quadro",
    2: "Tesla",
    3: "NVS",
    4: "Grid",
    5: "GeForce",
    6: "Titan",
    7: "NvidiaVApps",
    8: "NvidiaVPC",
    9: "NvidiaVCS",
    10: "NvidiaVWS",
    11: "NvidiaCloudGaming",
    12: "QuadroRTX",
    13: "NvidiaRTX",
    14: "Nvidia",
    15: "GeForceRTX",
    16: "TitanRTX",
}

VIRTUALIZATION_MODE_VGPU = 2  # NVML_GPU_VIRTUALIZATION_MODE_VGPU: a vGPU inside a guest VM

_BDF = re.compile(r"^([0-9a-f]{1,8}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


def architecture_name(arch: int) -> str:
    """go-nvlib's name for an ``NVML_DEVICE_ARCH_*`` value ("Unknown" for values it lacks)."""
    return ARCHITECTURE_NAMES.get(arch, "Unknown")


def brand_name(brand: int) -> str:
    """go-nvlib's name for an ``NVML_BRAND_*`` value ("Unknown" for values it lacks)."""
    return BRAND_NAMES.get(brand, "Unknown")


def normalize_pci_bus_id(raw: str | bytes) -> str:
    """NVML's bus id ("00000000:65:00.0", any case, str or bytes) as sysfs spells it: "0000:65:00.0".

    Raises:
        ValueError: the text is not a PCI address.
    """
    text = (raw.decode() if isinstance(raw, bytes) else raw).strip().rstrip("\x00").lower()
    match = _BDF.match(text)
    if match is None:
        raise ValueError(f"NVML reported PCI bus id {text!r}, which is not DDDD:BB:DD.F; check the driver")
    domain, bus, dev, fn = match.groups()
    return f"{int(domain, 16):04x}:{bus}:{dev}.{fn}"


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """The node's NVIDIA driver as NVML reports it."""

    driver_version: str  # e.g. "580.126.20" (not necessarily semver)
    cuda_driver_version: int  # e.g. 13000 for CUDA 13.0


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One physical GPU (never a MIG device), read once from NVML.

    ``None`` means NVML said NOT_SUPPORTED (or the value is unknown), never "zero".
    """

    index: int
    minor: int
    uuid: str
    product_name: str
    brand: str
    architecture: str
    architecture_id: int
    cuda_compute_capability: tuple[int, int]
    memory_bytes: int | None
    pci_bus_id: str  # "0000:65:00.0"
    pci_device_id: int | None  # e.g. 0x20B010DE
    numa_node: int | None
    mig_capable: bool
    mig_mode_current: bool | None  # None when not MIG capable
    mig_mode_pending: bool | None
    virtualization_mode: int | None

    @property
    def mig_enabled(self) -> bool:
        """MIG mode is on right now (what decides full GPU vs. MIG devices)."""
        return bool(self.mig_mode_current)

    @property
    def is_vgpu_guest(self) -> bool:
        """This GPU is a vGPU seen from inside a VM (cannot repartition MIG)."""
        return self.virtualization_mode == VIRTUALIZATION_MODE_VGPU

    @property
    def mig_toggle_without_reset(self) -> bool:
        """Hopper and later switch MIG mode without a GPU reset; Ampere needs one."""
        return self.architecture_id != ARCH_UNKNOWN and self.architecture_id >= ARCH_HOPPER
