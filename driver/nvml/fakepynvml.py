"""A stand-in for the ``pynvml`` module, backed by a topology file and a state file.

:func:`make_fake_pynvml` returns a module object with the same function names, arguments,
return shapes, constants and exception classes as nvidia-ml-py, so
:class:`driver.nvml.backend.Nvml` runs unchanged over it or over the real module. Return
values use nvidia-ml-py's own ctypes structs (``c_nvmlMemory_t``, ``nvmlPciInfo_t``) and
errors are nvidia-ml-py's ``NVMLError`` subclasses with the real ``.value`` codes.

Static facts come from a :class:`~driver.nvml.topology.Topology`; what changes (compute
mode, MIG mode, MIG instances) lives in a :class:`~driver.nvml.fakestate.FakeState` file,
which also carries injected faults: before every call the fake looks for a fault naming that
function (and, if the fault names one, that GPU) and raises ``NVMLError(code)`` instead.

Handles are :class:`FakeDevice` values. Only full GPUs are modelled here; MIG functions are
added by ``driver.nvml.fakemig`` when that module exists: ``fakemig.install(module, core)``
receives the module and the :class:`FakeCore` (topology, state, handle lookup, ``enter`` for
the init and fault checks; a handle with a ``parent_uuid`` attribute matches faults scoped to
that GPU) and may add functions or wrap ours (e.g. to answer ``nvmlDeviceGetHandleByUUID``
for MIG UUIDs). ``module.fake`` is the core too. This module does not simulate timing or
processes.
"""

# ruff: noqa: N802, N803  (function and argument names are pynvml's, on purpose)
from __future__ import annotations

import importlib
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml
import structlog

from driver.nvml.fakestate import COMPUTE_MODES, FakeState
from driver.nvml.topology import Topology, TopologyGpu, load_topology
from driver.nvml.types import normalize_pci_bus_id

log = structlog.get_logger(__name__)

_COMPUTE_MODE_VALUES = {"DEFAULT": 0, "PROHIBITED": 2, "EXCLUSIVE_PROCESS": 3}
_INIT_OPS = ("nvmlInit", "nvmlInitWithFlags")


@dataclass(frozen=True, slots=True)
class FakeDevice:
    """A handle to one fake full GPU (what nvmlDeviceGetHandleBy* returns)."""

    uuid: str
    index: int


class FakeCore:
    """The fake's shared machinery: topology, state file, handles, init count, faults."""

    def __init__(self, topology: Topology, state: FakeState, node_seed: str) -> None:
        self.topology = topology
        self.state = state
        self.node_seed = node_seed
        self.devices = tuple(
            FakeDevice(topology.gpu_uuid(g.index, node_seed), g.index) for g in topology.gpus
        )
        self._by_uuid = {d.uuid: d for d in self.devices}
        self._init_count = 0
        self._lock = threading.Lock()

    @staticmethod
    def error(code: int) -> Exception:
        """nvidia-ml-py's exception for NVML return ``code`` (an ``NVMLError`` subclass)."""
        exc: Exception = pynvml.NVMLError(code)
        return exc

    def enter(self, op: str, handle: Any = None) -> None:
        """Start NVML call ``op``: fail if NVML is not initialised or a fault names this call."""
        if op not in _INIT_OPS and op != "nvmlErrorString":
            with self._lock:
                if self._init_count == 0:
                    raise self.error(pynvml.NVML_ERROR_UNINITIALIZED)
        uuid = handle.uuid if isinstance(handle, FakeDevice) else getattr(handle, "parent_uuid", None)
        self._fire_fault(op, uuid)

    def device(self, handle: Any) -> FakeDevice:
        """The full GPU ``handle`` refers to (INVALID_ARGUMENT for anything else)."""
        if isinstance(handle, FakeDevice) and handle.uuid in self._by_uuid:
            return handle
        raise self.error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def device_by_uuid(self, uuid: str) -> FakeDevice | None:
        """The full GPU with this UUID, if the topology has it."""
        return self._by_uuid.get(uuid)

    def gpu(self, handle: Any) -> TopologyGpu:
        """Static facts of the GPU behind ``handle``."""
        return self.topology.gpus[self.device(handle).index]

    def gpu_state(self, handle: Any) -> dict[str, Any]:
        """The state-file entry of the GPU behind ``handle`` (a copy; change it via ``state.edit``)."""
        entry: dict[str, Any] = self.state.read().get("gpus", {}).get(self.device(handle).uuid, {})
        return entry

    def init(self, op: str) -> None:
        self.enter(op)
        with self._lock:
            self._init_count += 1

    def shutdown(self) -> None:
        self.enter("nvmlShutdown")
        with self._lock:
            self._init_count -= 1

    def _fire_fault(self, op: str, uuid: str | None) -> None:
        ops = _INIT_OPS if op in _INIT_OPS else (op,)
        if not any(_matches(f, ops, uuid) for f in self.state.read().get("faults", [])):
            return
        code: int | None = None
        with self.state.edit() as doc:
            faults: list[dict[str, Any]] = doc.get("faults", [])
            for i, fault in enumerate(faults):
                if _matches(fault, ops, uuid):
                    code = int(fault["code"])
                    if "times" in fault:
                        fault["times"] = int(fault["times"]) - 1
                        if fault["times"] <= 0:
                            del faults[i]
                    break
        if code is not None:
            log.info("fake nvml fault fired", op=op, code=code, uuid=uuid)
            raise self.error(code)


def _matches(fault: dict[str, Any], ops: tuple[str, ...], uuid: str | None) -> bool:
    if fault.get("op") not in ops:
        return False
    wanted = fault.get("uuid")
    return wanted is None or wanted == uuid


class _Api:
    """The full-GPU part of the pynvml surface; each method becomes a module function."""

    def __init__(self, core: FakeCore) -> None:
        self.core = core

    # --- init / system ------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.core.init("nvmlInit")

    def nvmlInitWithFlags(self, flags: int) -> None:
        self.core.init("nvmlInitWithFlags")

    def nvmlShutdown(self) -> None:
        self.core.shutdown()

    def nvmlErrorString(self, result: int) -> str:
        return str(pynvml.NVMLError._errcode_to_string.get(result, "Unknown Error"))

    def nvmlSystemGetDriverVersion(self) -> str:
        self.core.enter("nvmlSystemGetDriverVersion")
        return self.core.topology.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        self.core.enter("nvmlSystemGetNVMLVersion")
        return self.core.topology.nvml_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self.core.enter("nvmlSystemGetCudaDriverVersion")
        return self.core.topology.cuda_driver_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self.core.enter("nvmlSystemGetCudaDriverVersion_v2")
        return self.core.topology.cuda_driver_version

    # --- handles ------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        self.core.enter("nvmlDeviceGetCount")
        return len(self.core.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self.core.enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.core.devices):
            raise self.core.error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.core.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeDevice:
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        self.core.enter("nvmlDeviceGetHandleByUUID", self.core.device_by_uuid(text))
        device = self.core.device_by_uuid(text)
        if device is None:
            raise self.core.error(pynvml.NVML_ERROR_NOT_FOUND)
        return device

    def nvmlDeviceGetHandleByPciBusId(self, pciBusId: str | bytes) -> FakeDevice:
        self.core.enter("nvmlDeviceGetHandleByPciBusId")
        try:
            wanted = normalize_pci_bus_id(pciBusId)
        except ValueError:
            raise self.core.error(pynvml.NVML_ERROR_INVALID_ARGUMENT) from None
        for device in self.core.devices:
            if self.core.topology.gpus[device.index].pci_bus_id == wanted:
                return device
        raise self.core.error(pynvml.NVML_ERROR_NOT_FOUND)

    # --- identity -----------------------------------------------------------------------
    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self.core.enter("nvmlDeviceGetUUID", handle)
        return self.core.device(handle).uuid

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        self.core.enter("nvmlDeviceGetIndex", handle)
        return self.core.device(handle).index

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self.core.enter("nvmlDeviceGetName", handle)
        return self.core.gpu(handle).product_name

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        self.core.enter("nvmlDeviceGetMinorNumber", handle)
        # The state may renumber (NVML says a minor can change after a MIG mode switch).
        return int(self.core.gpu_state(handle).get("minor", self.core.gpu(handle).minor))

    def nvmlDeviceGetBrand(self, handle: Any) -> int:
        self.core.enter("nvmlDeviceGetBrand", handle)
        return self.core.gpu(handle).brand

    def nvmlDeviceGetArchitecture(self, handle: Any) -> int:
        self.core.enter("nvmlDeviceGetArchitecture", handle)
        return self.core.gpu(handle).architecture

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        self.core.enter("nvmlDeviceGetCudaComputeCapability", handle)
        return self.core.gpu(handle).cuda_compute_capability

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        self.core.enter("nvmlDeviceGetMemoryInfo", handle)
        total = self.core.gpu(handle).memory_bytes
        if total is None:
            raise self.core.error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if version:
            memory = pynvml.c_nvmlMemory_v2_t()
            memory.version = version
            memory.reserved = 0
        else:
            memory = pynvml.c_nvmlMemory_t()
        memory.total, memory.free, memory.used = total, total, 0
        return memory

    def nvmlDeviceGetPciInfo_v3(self, handle: Any) -> Any:
        self.core.enter("nvmlDeviceGetPciInfo_v3", handle)
        gpu = self.core.gpu(handle)
        domain, bus, rest = gpu.pci_bus_id.split(":")
        dev, _fn = rest.split(".")
        info = pynvml.nvmlPciInfo_t()
        info.domain, info.bus, info.device = int(domain, 16), int(bus, 16), int(dev, 16)
        info.pciDeviceId, info.pciSubSystemId = gpu.pci_device_id, gpu.pci_subsystem_id
        # NVML prints an 8-digit domain in busId and a 4-digit one in busIdLegacy, upper case.
        info.busId = f"{int(domain, 16):08X}:{bus.upper()}:{dev.upper()}.0".encode()
        info.busIdLegacy = f"{int(domain, 16):04X}:{bus.upper()}:{dev.upper()}.0".encode()
        return info

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        return self.nvmlDeviceGetPciInfo_v3(handle)

    def nvmlDeviceGetNumaNodeId(self, handle: Any) -> int:
        self.core.enter("nvmlDeviceGetNumaNodeId", handle)
        node = self.core.gpu(handle).numa_node
        if node is None:
            raise self.core.error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return node

    def nvmlDeviceGetVirtualizationMode(self, handle: Any) -> int:
        self.core.enter("nvmlDeviceGetVirtualizationMode", handle)
        return self.core.gpu(handle).virtualization_mode

    # --- modes --------------------------------------------------------------------------
    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        self.core.enter("nvmlDeviceGetMigMode", handle)
        if not self.core.gpu(handle).mig_capable:
            raise self.core.error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mig = self.core.gpu_state(handle).get("mig", {})
        return [int(bool(mig.get("current"))), int(bool(mig.get("pending")))]

    def nvmlDeviceGetComputeMode(self, handle: Any) -> int:
        self.core.enter("nvmlDeviceGetComputeMode", handle)
        return _COMPUTE_MODE_VALUES[self.core.gpu_state(handle).get("computeMode", "DEFAULT")]

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: list[int]) -> Any:
        """Only the GPU recovery action is modelled: ``health[<uuid>].recoveryAction`` (default 0).

        A GPU whose health entry says ``gpuLost`` answers GPU_IS_LOST, as a GPU off the bus does.
        Other fields come back NOT_SUPPORTED in their own ``nvmlReturn``, as the real call does.
        """
        self.core.enter("nvmlDeviceGetFieldValues", handle)
        uuid = self.core.device(handle).uuid
        entry = (self.core.state.read().get("health") or {}).get(uuid) or {}
        if entry.get("gpuLost"):
            raise self.core.error(pynvml.NVML_ERROR_GPU_IS_LOST)
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        for i, field_id in enumerate(fieldIds):
            values[i].fieldId = field_id
            if field_id == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION:
                values[i].nvmlReturn = pynvml.NVML_SUCCESS
                values[i].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                values[i].value.uiVal = int(entry.get("recoveryAction", 0))
            else:
                values[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceSetComputeMode(self, handle: Any, mode: int) -> None:
        self.core.enter("nvmlDeviceSetComputeMode", handle)
        names = {v: k for k, v in _COMPUTE_MODE_VALUES.items()}
        if mode not in names:
            raise self.core.error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        uuid = self.core.device(handle).uuid
        with self.core.state.edit() as doc:
            doc["gpus"][uuid]["computeMode"] = names[mode]


_API_FUNCTIONS = tuple(name for name in vars(_Api) if name.startswith("nvml"))
assert set(_COMPUTE_MODE_VALUES) == set(COMPUTE_MODES)  # noqa: S101 - the two tables must agree


def make_fake_pynvml(topology: Topology | str | Path, state_path: Path, node_seed: str) -> types.ModuleType:
    """Build a pynvml-like module for a simulated node.

    Args:
        topology: a :class:`Topology`, or a shipped topology name / topology file path.
        state_path: the state file; created from the topology if missing, reused otherwise.
        node_seed: makes the GPU UUIDs unique per simulated node (use the node name).

    Raises:
        ConfigError: unknown topology, or a state file made for another topology/node.
    """
    topo = topology if isinstance(topology, Topology) else load_topology(topology)
    state = FakeState.create(Path(state_path), topo, node_seed)
    core = FakeCore(topo, state, node_seed)
    module = types.ModuleType("gpu_dra_fake_pynvml", f"fake pynvml for topology {topo.name}")
    for name in dir(pynvml):
        value = getattr(pynvml, name)
        # Constants, error classes and ctypes structs: the same objects as nvidia-ml-py's.
        if name.startswith("NVML") or (isinstance(value, type) and name.startswith(("c_nvml", "nvml"))):
            setattr(module, name, value)
    api = _Api(core)
    for name in _API_FUNCTIONS:
        setattr(module, name, getattr(api, name))
    module.fake = core  # type: ignore[attr-defined]  # for tests and tools
    module.topology = topo  # type: ignore[attr-defined]
    _install_extensions(module, core)
    return module


def _install_extensions(module: types.ModuleType, core: FakeCore) -> None:
    try:
        fakemig = importlib.import_module("driver.nvml.fakemig")
    except ModuleNotFoundError as exc:
        if exc.name != "driver.nvml.fakemig":
            raise
        return
    fakemig.install(module, core)
