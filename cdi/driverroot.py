"""What the NVIDIA driver installed on a node: user-space files, device nodes, MIG capability files.

NVIDIA's container toolkit gives a GPU container the driver's version-suffixed user-space
libraries, a handful of binaries, GSP firmware and IPC sockets, all found under the *driver root*
(``/`` for a host install, ``/run/nvidia/driver`` under the GPU operator), plus device nodes
under the *dev root* (the directory holding ``dev/``; usually the same). This module finds those
files as the plugin sees them (often through a mount such as ``/driver-root``); turning them into
CDI edits, with host paths, is :mod:`cdi.edits`.

Device nodes are checked for existence only - a node that is a plain file (a test tree) passes.
MIG capability nodes are not looked up in ``/dev``: the runtime creates them from the numbers
in ``/proc/driver/nvidia/capabilities``, which is what :func:`read_cap_access` reads.

What it does not do: parse the driver root's ldcache, find graphics (Vulkan/EGL/X) files, or DRM
nodes; NVIDIA's toolkit adds those for display work, which GPU compute containers do not need.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from cdi.errors import DeviceNodeMissingError, DriverRootError

log = structlog.get_logger(__name__)

# Library directories searched in this order; the first hit of a file wins (merged-/usr systems
# reach the same file through lib and usr/lib).
LIB_DIRS = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib",
    "lib",
)
BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin", "usr/local/bin")
BINARIES = (
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
    "nvidia-imex",
    "nvidia-imex-ctl",
)
IPC_SOCKETS = ("run/nvidia-persistenced/socket", "run/nvidia-fabricmanager/socket")
FIRMWARE_DIRS = ("lib/firmware/nvidia", "usr/lib/firmware/nvidia")
# Without these two a CUDA container cannot start; everything else is best effort.
REQUIRED_LIBRARIES = ("libcuda.so", "libnvidia-ml.so")

NVIDIA_MAJOR = 195
CONTROL_NODES_REQUIRED = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
CONTROL_NODES_OPTIONAL = ("/dev/nvidia-modeset",)

_VERSION_RE = re.compile(r"^libnvidia-ml\.so\.(\d+\.\d+(?:\.\d+)?)$")
_CUDA_VERSION_RE = re.compile(r"^libcuda\.so\.(\d+\.\d+(?:\.\d+)?)$")

_UVM_FIX = "load nvidia-uvm and create its nodes (run `nvidia-modprobe -u -c=0` on the host)"
_NODE_FIXES = {
    "/dev/nvidiactl": "load the NVIDIA kernel module and create the node (run `nvidia-modprobe` on the host)",
    "/dev/nvidia-uvm": _UVM_FIX,
    "/dev/nvidia-uvm-tools": _UVM_FIX,
}


@dataclass(frozen=True, slots=True)
class DriverFiles:
    """The driver's user-space files under ``root`` (paths as the plugin sees them)."""

    root: Path
    version: str
    libraries: tuple[Path, ...]
    binaries: tuple[Path, ...]
    firmware: tuple[Path, ...]
    ipc_sockets: tuple[Path, ...]

    def container_path(self, path: Path) -> str:
        """Where ``path`` appears in a container: the same place relative to ``/``."""
        return "/" + path.relative_to(self.root).as_posix()

    def library(self, stem: str) -> Path | None:
        """The mounted library whose name starts with ``stem`` + ``.`` (e.g. ``libcuda.so``), if any."""
        for lib in self.libraries:
            if lib.name.startswith(stem + "."):
                return lib
        return None


def _same_file_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _existing_lib_dirs(driver_root: Path) -> list[Path]:
    return [driver_root / d for d in LIB_DIRS if (driver_root / d).is_dir()]


def detect_driver_version(driver_root: Path) -> str:
    """The driver version from ``libnvidia-ml.so.<version>`` (or ``libcuda.so.<version>``)."""
    for pattern in (_VERSION_RE, _CUDA_VERSION_RE):
        for lib_dir in _existing_lib_dirs(driver_root):
            for entry in sorted(lib_dir.iterdir()):
                match = pattern.match(entry.name)
                if match and entry.is_file():
                    return match.group(1)
    raise DriverRootError(
        f"no libnvidia-ml.so.<version> or libcuda.so.<version> under driver root {driver_root} "
        f"(searched {', '.join(LIB_DIRS)}); point the driver root flag at the directory the NVIDIA driver "
        "is installed in ('/' for a host install, '/run/nvidia/driver' under the GPU operator)"
    )


def discover_driver_files(driver_root: Path, driver_version: str | None = None) -> DriverFiles:
    """Find the libraries, binaries, firmware and IPC sockets a GPU container gets."""
    version = driver_version or detect_driver_version(driver_root)
    seen: set[tuple[int, int]] = set()
    libraries: list[Path] = []
    suffix = f".so.{version}"
    for lib_dir in _existing_lib_dirs(driver_root):
        for entry in sorted(lib_dir.iterdir()):
            if not entry.name.endswith(suffix) or not entry.is_file():
                continue
            key = _same_file_key(entry)
            if key in seen:
                continue
            seen.add(key)
            libraries.append(entry)
    for stem in REQUIRED_LIBRARIES:
        if not any(lib.name == f"{stem}.{version}" for lib in libraries):
            raise DriverRootError(
                f"{stem}.{version} not found under driver root {driver_root} "
                f"(searched {', '.join(LIB_DIRS)}); "
                "the driver's user-space part is missing or of another version - reinstall the driver or "
                "point the driver root flag at where it is installed"
            )

    binaries: list[Path] = []
    for name in BINARIES:
        for bin_dir in BIN_DIRS:
            candidate = driver_root / bin_dir / name
            if candidate.is_file():
                binaries.append(candidate)
                break
    if not any(b.name == "nvidia-smi" for b in binaries):
        log.warning("nvidia-smi not found in driver root", driver_root=str(driver_root), searched=BIN_DIRS)

    firmware: list[Path] = []
    for fw_dir in FIRMWARE_DIRS:
        ver_dir = driver_root / fw_dir / version
        if ver_dir.is_dir():
            firmware.extend(sorted(p for p in ver_dir.glob("gsp*.bin") if p.is_file()))
            break

    sockets = [driver_root / s for s in IPC_SOCKETS if (driver_root / s).exists()]
    return DriverFiles(
        root=driver_root,
        version=version,
        libraries=tuple(libraries),
        binaries=tuple(binaries),
        firmware=tuple(firmware),
        ipc_sockets=tuple(sockets),
    )


def node_path(dev_root: Path, node: str) -> Path:
    """Where the plugin finds container node ``node`` (``/dev/...``) under ``dev_root``."""
    return dev_root / node.lstrip("/")


def require_device_node(dev_root: Path, node: str, fix: str | None = None) -> Path:
    """The plugin-side path of ``node``; raise :class:`DeviceNodeMissingError` if it is absent."""
    path = node_path(dev_root, node)
    if not os.path.lexists(path):
        raise DeviceNodeMissingError(node, path, fix or _NODE_FIXES.get(node, "create the node on the host"))
    return path


def gpu_node(minor: int) -> str:
    """``/dev/nvidia<minor>``: the node of one full GPU."""
    return f"/dev/nvidia{minor}"


def require_gpu_node(dev_root: Path, minor: int) -> Path:
    """The plugin-side path of ``/dev/nvidia<minor>``, which must exist."""
    return require_device_node(
        dev_root,
        gpu_node(minor),
        f"create it (run `nvidia-modprobe -c={minor}` on the host), or check that GPU minor {minor} still "
        "exists (`nvidia-smi -q | grep Minor`)",
    )


def char_major(proc_root: Path, name: str) -> int:
    """The character-device major of driver ``name`` (e.g. ``nvidia-caps``) from ``<proc>/devices``."""
    path = proc_root / "devices"
    try:
        text = path.read_text()
    except OSError as exc:
        raise DriverRootError(f"cannot read {path} ({exc}); mount the host's /proc into the plugin") from exc
    in_char = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":"):
            in_char = stripped == "Character devices:"
            continue
        parts = stripped.split()
        if in_char and len(parts) == 2 and parts[1] == name and parts[0].isdigit():
            return int(parts[0])
    raise DriverRootError(
        f"{path} lists no character device {name!r}; load the NVIDIA kernel module with MIG support "
        "(`nvidia-modprobe -f /proc/driver/nvidia/capabilities/mig/config` on the host)"
    )


@dataclass(frozen=True, slots=True)
class CapAccess:
    """One NVIDIA capability file: the minor and mode of its ``/dev/nvidia-caps/nvidia-cap<minor>`` node."""

    minor: int
    mode: int
    modify: bool

    @property
    def node(self) -> str:
        return f"/dev/nvidia-caps/nvidia-cap{self.minor}"


def read_cap_access(path: Path) -> CapAccess:
    """Parse a capability file: ``DeviceFileMinor: N``, ``DeviceFileMode: M``, ``DeviceFileModify: 0|1``."""
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        return CapAccess(
            minor=int(fields["DeviceFileMinor"]),
            mode=int(fields["DeviceFileMode"]),
            modify=fields.get("DeviceFileModify", "0") == "1",
        )
    except (KeyError, ValueError) as exc:
        raise DriverRootError(
            f"capability file {path} lacks a numeric DeviceFileMinor/DeviceFileMode ({exc}); "
            "the driver's /proc layout is not the one this plugin knows - report the file's content"
        ) from exc


def mig_cap_files(proc_root: Path, parent_minor: int, gi_id: int, ci_id: int) -> tuple[Path, Path]:
    """The GI and CI capability files of one MIG device under ``<proc>/driver/nvidia/capabilities``."""
    gi_dir = proc_root / "driver" / "nvidia" / "capabilities" / f"gpu{parent_minor}" / "mig" / f"gi{gi_id}"
    return gi_dir / "access", gi_dir / f"ci{ci_id}" / "access"


def read_mig_caps(proc_root: Path, parent_minor: int, gi_id: int, ci_id: int) -> tuple[CapAccess, CapAccess]:
    """The GI and CI capabilities of a MIG device; a missing file means the instance does not exist."""
    gi_file, ci_file = mig_cap_files(proc_root, parent_minor, gi_id, ci_id)
    out: list[CapAccess] = []
    for what, path in (("GPU instance", gi_file), ("compute instance", ci_file)):
        try:
            out.append(read_cap_access(path))
        except FileNotFoundError as exc:
            raise DriverRootError(
                f"{what} capability file {path} is missing: MIG device gi={gi_id} ci={ci_id} on GPU minor "
                f"{parent_minor} does not exist (create it first; list with `nvidia-smi mig -lgi -i "
                f"{parent_minor}`), or the plugin does not see the host's /proc"
            ) from exc
    return out[0], out[1]
