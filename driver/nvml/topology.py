"""Simulated machines for the fake NVML: which GPUs a node has and what NVML says about them.

A topology file (``driver/nvml/topologies/<name>.yaml``) fixes the static facts of a node:
product names, memory totals, PCI addresses, NUMA nodes, minors, driver versions, MIG
capability. :func:`load_topology` validates one and returns a frozen :class:`Topology`.
What changes at run time (compute mode, MIG mode and instances) lives in the state file
(:mod:`driver.nvml.fakestate`), never here.

GPU UUIDs are derived from the topology name, a node seed (the node name) and the GPU index,
so one topology simulated on two nodes gives two sets of UUIDs, and a restart gives the same.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from driver.errors import ConfigError

TOPOLOGY_DIR = Path(__file__).parent / "topologies"

# NVML enum names accepted in topology files (values from nvml.h / pynvml).
_ARCH = {
    "NVML_DEVICE_ARCH_KEPLER": 2,
    "NVML_DEVICE_ARCH_MAXWELL": 3,
    "NVML_DEVICE_ARCH_PASCAL": 4,
    "NVML_DEVICE_ARCH_VOLTA": 5,
    "NVML_DEVICE_ARCH_TURING": 6,
    "NVML_DEVICE_ARCH_AMPERE": 7,
    "NVML_DEVICE_ARCH_ADA": 8,
    "NVML_DEVICE_ARCH_HOPPER": 9,
    "NVML_DEVICE_ARCH_BLACKWELL": 10,
    "NVML_DEVICE_ARCH_RUBIN": 13,
}
_BRAND = {"NVML_BRAND_TESLA": 2, "NVML_BRAND_QUADRO": 1, "NVML_BRAND_GEFORCE": 5, "NVML_BRAND_NVIDIA": 14}
_VIRT = {"none": 0, "passthrough": 1, "vgpu": 2}

# Fixed namespace so UUIDs are stable across releases of this code.
_UUID_NAMESPACE = uuid.UUID("6d1f0b0e-3c55-4d59-9a57-0d6b7e9b2f31")


@dataclass(frozen=True, slots=True)
class TopologyGpu:
    """Static facts of one simulated GPU."""

    index: int
    minor: int
    product_name: str
    brand: int  # NVML_BRAND_*
    architecture: int  # NVML_DEVICE_ARCH_*
    cuda_compute_capability: tuple[int, int]
    memory_bytes: int | None  # None: nvmlDeviceGetMemoryInfo says NOT_SUPPORTED
    pci_bus_id: str  # "0000:07:00.0"
    pci_device_id: int
    pci_subsystem_id: int
    numa_node: int | None  # None: nvmlDeviceGetNumaNodeId says NOT_SUPPORTED
    mig_capable: bool
    mig_mode: bool  # initial MIG mode (current == pending)
    mig_profile_table: str | None  # key into driver/nvml/data/mig-profiles.yaml "gpus"
    virtualization_mode: int  # NVML_GPU_VIRTUALIZATION_MODE_*


@dataclass(frozen=True, slots=True)
class Topology:
    """One simulated node."""

    name: str
    driver_version: str
    cuda_driver_version: int
    nvml_version: str
    gpus: tuple[TopologyGpu, ...]

    def gpu_uuid(self, index: int, node_seed: str) -> str:
        """The UUID GPU ``index`` has on the node seeded with ``node_seed`` ("GPU-<uuid>")."""
        return "GPU-" + str(uuid.uuid5(_UUID_NAMESPACE, f"{self.name}/{node_seed}/{index}"))


def available_topologies() -> list[str]:
    """Names of the topologies shipped with the driver."""
    return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml"))


def load_topology(name_or_path: str | Path) -> Topology:
    """Load a shipped topology by name (``a100-40gb-x8``) or any topology file by path.

    Raises:
        ConfigError: unknown name, unreadable file or invalid content.
    """
    path = Path(name_or_path)
    if not (path.suffix in {".yaml", ".yml"} or path.is_file()):
        path = TOPOLOGY_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown fake NVML topology {str(name_or_path)!r}; "
                f"use one of {', '.join(available_topologies())} or a path to a topology YAML file"
            )
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read fake NVML topology {path}: {exc}; fix or replace the file") from exc
    try:
        return _parse(doc, path)
    except KeyError as exc:
        raise ConfigError(
            f"fake NVML topology {path} lacks the field {exc.args[0]!r}; add it, comparing with a "
            "built-in topology (`gpu-dra topologies` lists them)"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"fake NVML topology {path} is invalid: {exc}; fix it, comparing with a built-in topology "
            "(`gpu-dra topologies` lists them)"
        ) from exc


def _enum(table: dict[str, int], value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    if value not in table:
        raise ValueError(f"{what} {value!r} is not one of {sorted(table)}")
    return table[value]


def _parse(doc: Any, path: Path) -> Topology:
    if not isinstance(doc, dict):
        raise TypeError("top level must be a mapping")
    defaults: dict[str, Any] = dict(doc.get("gpu", {}))
    gpus: list[TopologyGpu] = []
    for index, entry in enumerate(doc["gpus"]):
        spec = {**defaults, **(entry or {})}
        cc = spec["cuda_compute_capability"]
        memory = spec.get("memory_bytes")
        numa = spec.get("numa_node")
        gpus.append(
            TopologyGpu(
                index=index,
                minor=int(spec.get("minor", index)),
                product_name=str(spec["product_name"]),
                brand=_enum(_BRAND, spec["brand"], "brand"),
                architecture=_enum(_ARCH, spec["architecture"], "architecture"),
                cuda_compute_capability=(int(cc[0]), int(cc[1])),
                memory_bytes=None if memory is None else int(memory),
                pci_bus_id=str(spec["pci_bus_id"]).lower(),
                pci_device_id=int(spec["pci_device_id"]),
                pci_subsystem_id=int(spec.get("pci_subsystem_id", 0)),
                numa_node=None if numa is None else int(numa),
                mig_capable=bool(spec.get("mig_capable", False)),
                mig_mode=bool(spec.get("mig_mode", False)),
                mig_profile_table=spec.get("mig_profile_table"),
                virtualization_mode=_enum(
                    _VIRT, spec.get("virtualization_mode", "none"), "virtualization_mode"
                ),
            )
        )
    if not gpus:
        raise ValueError("a topology needs at least one GPU")
    for attr in ("minor", "pci_bus_id"):
        values = [getattr(g, attr) for g in gpus]
        if len(set(values)) != len(values):
            raise ValueError(f"GPU {attr} values must be unique, got {values}")
    if any(g.mig_mode and not g.mig_capable for g in gpus):
        raise ValueError("mig_mode: true needs mig_capable: true")
    return Topology(
        name=str(doc.get("name", path.stem)),
        driver_version=str(doc["driver_version"]),
        cuda_driver_version=int(doc["cuda_driver_version"]),
        nvml_version=str(
            doc.get("nvml_version", f"{int(doc['cuda_driver_version']) // 1000}.{doc['driver_version']}")
        ),
        gpus=tuple(gpus),
    )
