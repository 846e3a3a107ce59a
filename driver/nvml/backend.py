"""The driver's one NVML session, over nvidia-ml-py or over the fake with the same surface.

:class:`Nvml` owns a *pynvml-like module*: the real ``pynvml`` (loading ``libnvidia-ml.so.1``
from the driver root, a real driver or NVIDIA's mock library) or the module built by
:func:`driver.nvml.fakepynvml.make_fake_pynvml`. Because both have the same function names,
arguments and return shapes, the code here runs unchanged over either.

Rules kept here and nowhere else:

* NVML is initialised once per session (``nvmlInitWithFlags(NVML_INIT_FLAG_NO_GPUS)`` as
  NVIDIA's driver does, plain ``nvmlInit`` where that is missing) and shut down once.
* Every call goes through :meth:`Nvml.call`: one lock, and ``NVMLError`` becomes
  :class:`driver.errors.NvmlError` (op + code, the original chained).
* Handles are cached by UUID (they stay valid for the session).

Calls block; the daemon runs them in worker threads, never on a gRPC thread holding a lock.
MIG is not handled here: ``driver.nvml.mig`` uses :attr:`Nvml.module`, :meth:`Nvml.handle`
and :meth:`Nvml.call`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from driver.errors import ConfigError, NvmlError
from driver.nvml.fakestate import STATE_ENV, FakeState
from driver.nvml.types import GpuInfo, SystemInfo, architecture_name, brand_name, normalize_pci_bus_id

log = structlog.get_logger(__name__)

T = TypeVar("T")

LIBRARY_NAME = "libnvidia-ml.so.1"
# Where NVIDIA's driver looks for the library under the driver root (nvidia-compat 1.5).
LIBRARY_DIRS = (
    "",
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
)

# Return codes that mean "this GPU does not have that", not "the call broke".
_NOT_SUPPORTED = 3
_FUNCTION_NOT_FOUND = 13
_ABSENT_CODES = (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND)


def find_library(driver_root: Path) -> Path | None:
    """``libnvidia-ml.so.1`` under ``driver_root`` (symlinks resolved, regular files only)."""
    for directory in LIBRARY_DIRS:
        candidate = driver_root / directory / LIBRARY_NAME
        try:
            resolved = candidate.resolve(strict=True)
        except (FileNotFoundError, RuntimeError):
            continue
        if resolved.is_file():
            return resolved
    return None


class Nvml:
    """One NVML session over a pynvml-like module."""

    def __init__(self, module: Any, *, description: str = "nvml") -> None:
        """Adopt ``module`` and initialise NVML on it.

        Raises:
            NvmlError: NVML could not be initialised (driver not loaded, library missing...).
        """
        self.module = module
        self.description = description
        self._lock = threading.RLock()
        self._handles: dict[str, Any] = {}
        self._open = False
        self._init()

    @classmethod
    def open(
        cls,
        backend: Literal["real", "fake"],
        driver_root: Path | None = None,
        *,
        fake_topology: str | Path | None = None,
        fake_state: Path | None = None,
        node_name: str = "",
    ) -> Nvml:
        """Start a session on the real NVML library or on the fake.

        Args:
            backend: "real" loads ``libnvidia-ml.so.1`` (from ``driver_root``'s library
                directories when given and found there, else the loader's search path);
                "fake" builds the file-backed fake.
            driver_root: the host driver root as mounted in the container (real backend).
            fake_topology: topology name or file (fake backend; defaults to the one the state
                file was made for).
            fake_state: the fake's state file (fake backend; defaults to ``$GPU_DRA_FAKE_NVML_STATE``).
            node_name: seeds the fake GPUs' UUIDs so simulated nodes differ.

        Raises:
            ConfigError: the fake is missing its state file or topology.
            NvmlError: NVML could not be loaded or initialised.
        """
        if backend == "fake":
            return cls._open_fake(fake_topology, fake_state, node_name)
        if backend != "real":
            raise ConfigError(f"unknown NVML backend {backend!r}; use 'real' or 'fake'")
        import pynvml

        library = find_library(driver_root) if driver_root is not None else None
        if driver_root is not None and library is None:
            log.warning(
                "nvml library not under driver root", driver_root=str(driver_root), library=LIBRARY_NAME
            )
        if library is not None:
            _preload(pynvml, library)
        return cls(pynvml, description=f"nvidia-ml-py ({library or LIBRARY_NAME})")

    @classmethod
    def _open_fake(cls, topology: str | Path | None, state: Path | None, node_name: str) -> Nvml:
        from driver.nvml.fakepynvml import make_fake_pynvml

        if state is None:
            env = os.environ.get(STATE_ENV)
            if not env:
                raise ConfigError(
                    f"the fake NVML backend needs a state file: pass fake_state or set {STATE_ENV}"
                )
            state = Path(env)
        if topology is None:
            topology = FakeState(state).read().get("topology")
            if topology is None:
                raise ConfigError(
                    f"the fake NVML backend needs a topology: pass fake_topology "
                    f"(state file {state} names none)"
                )
        module = make_fake_pynvml(topology, state, node_name)
        return cls(module, description=f"fake nvml ({module.fake.topology.name}, state {state})")

    # --- the one way in -------------------------------------------------------------------

    def call(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` under the session lock; NVMLError becomes NvmlError(op, code).

        Raises:
            NvmlError: the call failed; ``code`` is the NVML return code.
        """
        with self._lock:
            try:
                return fn(*args)
            except self.module.NVMLError as exc:
                code = getattr(exc, "value", None)
                raise NvmlError(op, code, _describe(exc)) from exc

    def _optional(self, op: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Like :meth:`call`, but NOT_SUPPORTED / FUNCTION_NOT_FOUND give None."""
        try:
            return self.call(op, fn, *args)
        except NvmlError as exc:
            if exc.code in _ABSENT_CODES:
                return None
            raise

    # --- session --------------------------------------------------------------------------

    def _init(self) -> None:
        m = self.module
        try:
            self.call("nvmlInitWithFlags", m.nvmlInitWithFlags, m.NVML_INIT_FLAG_NO_GPUS)
        except NvmlError as exc:
            if exc.code != _FUNCTION_NOT_FOUND:
                raise
            self.call("nvmlInit", m.nvmlInit)
        self._open = True
        log.info("nvml session open", backend=self.description)

    def shutdown(self) -> None:
        """End the session (idempotent). Errors are logged, not raised: we are leaving anyway."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._handles.clear()
            try:
                self.call("nvmlShutdown", self.module.nvmlShutdown)
            except NvmlError as exc:
                log.warning("nvml shutdown failed", error=str(exc))

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.shutdown()

    # --- queries --------------------------------------------------------------------------

    def system(self) -> SystemInfo:
        """Driver and CUDA driver versions."""
        m = self.module
        driver = self.call("nvmlSystemGetDriverVersion", m.nvmlSystemGetDriverVersion)
        cuda = self.call("nvmlSystemGetCudaDriverVersion", m.nvmlSystemGetCudaDriverVersion)
        return SystemInfo(driver_version=_text(driver), cuda_driver_version=int(cuda))

    def device_count(self) -> int:
        """How many full GPUs NVML sees (MIG devices not counted)."""
        return int(self.call("nvmlDeviceGetCount", self.module.nvmlDeviceGetCount))

    def gpu(self, index: int) -> GpuInfo:
        """Everything discovery needs about GPU ``index``; caches its handle by UUID.

        Raises:
            NvmlError: a required query failed (optional ones just read as None).
        """
        m = self.module
        handle = self.call("nvmlDeviceGetHandleByIndex", m.nvmlDeviceGetHandleByIndex, index)
        uuid = _text(self.call("nvmlDeviceGetUUID", m.nvmlDeviceGetUUID, handle))
        with self._lock:
            self._handles[uuid] = handle
        minor = int(self.call("nvmlDeviceGetMinorNumber", m.nvmlDeviceGetMinorNumber, handle))
        name = _text(self.call("nvmlDeviceGetName", m.nvmlDeviceGetName, handle))
        pci = self.call("nvmlDeviceGetPciInfo", m.nvmlDeviceGetPciInfo, handle)
        try:
            bus_id = normalize_pci_bus_id(pci.busId)
        except ValueError as exc:
            raise NvmlError("nvmlDeviceGetPciInfo", None, str(exc)) from exc
        memory = self._optional("nvmlDeviceGetMemoryInfo", m.nvmlDeviceGetMemoryInfo, handle)
        brand = self._optional("nvmlDeviceGetBrand", m.nvmlDeviceGetBrand, handle)
        arch = self._optional("nvmlDeviceGetArchitecture", m.nvmlDeviceGetArchitecture, handle)
        cc = self.call("nvmlDeviceGetCudaComputeCapability", m.nvmlDeviceGetCudaComputeCapability, handle)
        numa = self._optional("nvmlDeviceGetNumaNodeId", m.nvmlDeviceGetNumaNodeId, handle)
        mig = self._optional("nvmlDeviceGetMigMode", m.nvmlDeviceGetMigMode, handle)
        virt = self._optional("nvmlDeviceGetVirtualizationMode", m.nvmlDeviceGetVirtualizationMode, handle)
        arch_id = 0xFFFFFFFF if arch is None else int(arch)
        return GpuInfo(
            index=index,
            minor=minor,
            uuid=uuid,
            product_name=name,
            brand=brand_name(0 if brand is None else int(brand)),
            architecture=architecture_name(arch_id),
            architecture_id=arch_id,
            cuda_compute_capability=(int(cc[0]), int(cc[1])),
            memory_bytes=None if memory is None else int(memory.total),
            pci_bus_id=bus_id,
            pci_device_id=int(pci.pciDeviceId) or None,
            numa_node=None if numa is None or int(numa) < 0 else int(numa),
            mig_capable=mig is not None,
            mig_mode_current=None if mig is None else bool(mig[0]),
            mig_mode_pending=None if mig is None else bool(mig[1]),
            virtualization_mode=None if virt is None else int(virt),
        )

    def gpus(self) -> list[GpuInfo]:
        """Every full GPU, in NVML index order."""
        return [self.gpu(i) for i in range(self.device_count())]

    def handle(self, uuid: str) -> Any:
        """The NVML handle of the GPU (or MIG device) with this UUID.

        Raises:
            NvmlError: no such device (code NOT_FOUND) or NVML failed.
        """
        with self._lock:
            cached = self._handles.get(uuid)
            if cached is not None:
                return cached
            handle = self.call("nvmlDeviceGetHandleByUUID", self.module.nvmlDeviceGetHandleByUUID, uuid)
            if uuid.startswith("GPU-"):
                # MIG handles die with their instance; only full GPUs are worth keeping.
                self._handles[uuid] = handle
            return handle


def _preload(pynvml: Any, library: Path) -> None:
    """Make nvidia-ml-py use ``library`` instead of searching for ``libnvidia-ml.so.1``."""
    with pynvml.libLoadLock:
        if pynvml.nvmlLib is None:
            try:
                pynvml.nvmlLib = ctypes.CDLL(str(library))
            except OSError as exc:
                raise NvmlError(
                    "load",
                    12,
                    f"cannot load {library}: {exc}; check the driver root and the library's dependencies",
                ) from exc
        else:
            log.warning("nvml library already loaded", wanted=str(library))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - str() of NVMLError may call into a broken library
        return type(exc).__name__
