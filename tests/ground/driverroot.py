"""A fake NVIDIA driver root for tests: dev nodes, driver libraries, binaries, /proc files.

Why: CDI edits are built from what the driver installed on the node. Tests need a tree with the
same layout as a real driver install - ``dev/nvidia<N>`` and the control nodes, versioned
libraries with their soname and dev symlinks, ``usr/bin`` tools, GSP firmware, and the
``proc/devices`` / ``proc/driver/nvidia/capabilities`` files MIG device nodes are built from.

Device nodes are real character devices (major 195 etc.) when the process may ``mknod`` them,
else empty regular files; :attr:`FakeDriverRoot.char_devices` says which. Binaries are
placeholder scripts that exit 0; other test helpers replace them (``bin_dir``) with stand-ins
such as an ``nvidia-smi`` that talks to the fake GPU state.

What it does not do: fake NVML, or create anything outside ``root``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DRIVER_VERSION = "580.126.20"
NVIDIA_MAJOR = 195
UVM_MAJOR = 509
CAPS_MAJOR = 239
LIB_SUBDIR = "usr/lib/x86_64-linux-gnu"

# (library base name, soname major) as a driver install lays them out.
LIBRARIES = (
    ("libcuda.so", "1"),
    ("libnvidia-ml.so", "1"),
    ("libnvidia-ptxjitcompiler.so", "1"),
    ("libnvidia-nvvm.so", "4"),
    ("libnvidia-encode.so", "1"),
    ("libnvcuvid.so", "1"),
    ("libnvidia-opticalflow.so", "1"),
    ("libnvidia-cfg.so", "1"),
    ("libnvidia-allocator.so", "1"),
    ("libcudadebugger.so", "1"),
)
BINARIES = (
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
    "nvidia-cdi-hook",
)
FIRMWARE = ("gsp_ga10x.bin", "gsp_tu10x.bin")


def gi_cap_minor(gpu_minor: int, gi_id: int) -> int:
    """The nvidia-caps minor of a GPU instance (the driver's fixed table: 3 + 135*gpu + 9*gi)."""
    return 3 + 135 * gpu_minor + 9 * gi_id


def ci_cap_minor(gpu_minor: int, gi_id: int, ci_id: int) -> int:
    """The nvidia-caps minor of a compute instance inside GPU instance ``gi_id``."""
    return gi_cap_minor(gpu_minor, gi_id) + 1 + ci_id


def _access_text(minor: int, mode: int) -> str:
    return f"DeviceFileMinor: {minor}\nDeviceFileMode: {mode}\nDeviceFileModify: 1\n"


@dataclass
class FakeDriverRoot:
    """Paths of a fake driver root (all under ``root``; ``root`` doubles as the dev root)."""

    root: Path
    driver_version: str
    gpu_minors: tuple[int, ...]
    char_devices: bool
    dev_dir: Path = field(init=False)
    lib_dir: Path = field(init=False)
    bin_dir: Path = field(init=False)
    proc_dir: Path = field(init=False)
    firmware_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dev_dir = self.root / "dev"
        self.lib_dir = self.root / LIB_SUBDIR
        self.bin_dir = self.root / "usr" / "bin"
        self.proc_dir = self.root / "proc"
        self.firmware_dir = self.root / "lib" / "firmware" / "nvidia" / self.driver_version

    @property
    def hook_path(self) -> Path:
        """The placeholder ``nvidia-cdi-hook`` in :attr:`bin_dir`."""
        return self.bin_dir / "nvidia-cdi-hook"

    def node(self, name: str) -> Path:
        """The fake node for container path ``/dev/...`` (``name`` with or without ``/dev/``)."""
        return self.dev_dir / name.removeprefix("/dev/")

    def remove_node(self, name: str) -> None:
        """Delete a node (fault injection: a node the driver failed to create)."""
        self.node(name).unlink()

    def cap_dir(self, gpu_minor: int) -> Path:
        """``proc/driver/nvidia/capabilities/gpu<minor>``."""
        return self.proc_dir / "driver" / "nvidia" / "capabilities" / f"gpu{gpu_minor}"

    def add_mig_caps(self, gpu_minor: int, gi_id: int, ci_id: int) -> tuple[int, int]:
        """Create the capability files a MIG device (gi, ci) has while it exists; return the minors."""
        gi_minor = gi_cap_minor(gpu_minor, gi_id)
        ci_minor = ci_cap_minor(gpu_minor, gi_id, ci_id)
        gi_dir = self.cap_dir(gpu_minor) / "mig" / f"gi{gi_id}"
        (gi_dir / f"ci{ci_id}").mkdir(parents=True, exist_ok=True)
        (gi_dir / "access").write_text(_access_text(gi_minor, 0o444))
        (gi_dir / f"ci{ci_id}" / "access").write_text(_access_text(ci_minor, 0o444))
        return gi_minor, ci_minor

    def remove_mig_caps(self, gpu_minor: int, gi_id: int, ci_id: int | None = None) -> None:
        """Remove a CI's capability files (or the whole GI's, with ``ci_id`` None)."""
        gi_dir = self.cap_dir(gpu_minor) / "mig" / f"gi{gi_id}"
        target = gi_dir if ci_id is None else gi_dir / f"ci{ci_id}"
        for path in sorted(target.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()


def _make_node(path: Path, major: int, minor: int, mode: int = 0o666) -> bool:
    """Create a character device; fall back to an empty file. Return whether it is a real node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        path.chmod(mode)  # mknod applies the umask; real nodes carry the driver's mode
        return True
    except OSError:
        path.write_bytes(b"")
        path.chmod(mode)
        return False


def _write_exec(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def make_fake_driver_root(
    root: Path,
    gpu_minors: Iterable[int],
    driver_version: str = DEFAULT_DRIVER_VERSION,
    *,
    modeset: bool = True,
) -> FakeDriverRoot:
    """Lay out a fake driver install with GPUs ``gpu_minors`` under ``root`` (created if needed)."""
    minors = tuple(sorted(set(gpu_minors)))
    root.mkdir(parents=True, exist_ok=True)
    probe = root / "dev" / ".mknod-probe"
    char_devices = _make_node(probe, NVIDIA_MAJOR, 255)
    probe.unlink()
    fake = FakeDriverRoot(
        root=root, driver_version=driver_version, gpu_minors=minors, char_devices=char_devices
    )

    for minor in minors:
        _make_node(fake.node(f"nvidia{minor}"), NVIDIA_MAJOR, minor)
    _make_node(fake.node("nvidiactl"), NVIDIA_MAJOR, 255)
    if modeset:
        _make_node(fake.node("nvidia-modeset"), NVIDIA_MAJOR, 254)
    _make_node(fake.node("nvidia-uvm"), UVM_MAJOR, 0)
    _make_node(fake.node("nvidia-uvm-tools"), UVM_MAJOR, 1)
    (fake.dev_dir / "nvidia-caps").mkdir(exist_ok=True)
    (fake.dev_dir / "nvidia-caps").chmod(0o755)
    _make_node(fake.node("nvidia-caps/nvidia-cap1"), CAPS_MAJOR, 1, 0o400)
    _make_node(fake.node("nvidia-caps/nvidia-cap2"), CAPS_MAJOR, 2, 0o444)

    fake.lib_dir.mkdir(parents=True, exist_ok=True)
    for base, soname_major in LIBRARIES:
        real = fake.lib_dir / f"{base}.{driver_version}"
        real.write_bytes(b"")
        soname = fake.lib_dir / f"{base}.{soname_major}"
        with contextlib.suppress(FileNotFoundError):
            soname.unlink()
        soname.symlink_to(real.name)
    dev_link = fake.lib_dir / "libcuda.so"
    with contextlib.suppress(FileNotFoundError):
        dev_link.unlink()
    dev_link.symlink_to("libcuda.so.1")

    for name in BINARIES:
        _write_exec(fake.bin_dir / name, "#!/bin/sh\nexit 0\n")

    fake.firmware_dir.mkdir(parents=True, exist_ok=True)
    for name in FIRMWARE:
        (fake.firmware_dir / name).write_bytes(b"")

    proc = fake.proc_dir
    (proc / "driver" / "nvidia").mkdir(parents=True, exist_ok=True)
    (proc / "devices").write_text(
        "Character devices:\n  1 mem\n  4 tty\n"
        f"{NVIDIA_MAJOR} nvidia-frontend\n{CAPS_MAJOR} nvidia-caps\n{UVM_MAJOR} nvidia-uvm\n"
        "\nBlock devices:\n  7 loop\n  8 sd\n"
    )
    (proc / "driver" / "nvidia" / "version").write_text(
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver_version}  Release Build  (dvs@U16)\n"
        "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
    )
    mig = proc / "driver" / "nvidia" / "capabilities" / "mig"
    mig.mkdir(parents=True, exist_ok=True)
    (mig / "config").write_text(_access_text(1, 0o400))
    (mig / "monitor").write_text(_access_text(2, 0o444))
    for minor in minors:
        fake.cap_dir(minor).joinpath("mig").mkdir(parents=True, exist_ok=True)
    lines = ["config 1", "monitor 2"]
    for minor in minors:
        for gi in range(15):
            lines.append(f"gpu{minor}/gi{gi}/access {gi_cap_minor(minor, gi)}")
            lines.extend(f"gpu{minor}/gi{gi}/ci{ci}/access {ci_cap_minor(minor, gi, ci)}" for ci in range(8))
    (proc / "driver" / "nvidia-caps").mkdir(parents=True, exist_ok=True)
    (proc / "driver" / "nvidia-caps" / "mig-minors").write_text("\n".join(lines) + "\n")
    return fake
