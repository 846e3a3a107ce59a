"""Edits built from a (fake) driver root: what NVIDIA's toolkit would give a GPU container."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cdi.driverroot import char_major, detect_driver_version, discover_driver_files, read_cap_access
from cdi.edits import common_edits, gpu_edits, mig_edits, rewrite_host_root
from cdi.errors import DeviceNodeMissingError, DriverRootError
from cdi.spec import ContainerEdits, DeviceNode, Mount
from tests.ground.driverroot import FakeDriverRoot, make_fake_driver_root

HOOK = "/var/lib/kubelet/plugins/gpu.nvidia.com/nvidia-cdi-hook"
LIBDIR = "/usr/lib/x86_64-linux-gnu"


def hook_args(edits: ContainerEdits) -> dict[str, list[str]]:
    return {h.args[1]: list(h.args[2:]) for h in edits.hooks}


def test_fake_root_layout(fake_root: FakeDriverRoot) -> None:
    if fake_root.char_devices:
        st = fake_root.node("nvidia1").stat()
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (195, 1)
        assert stat.S_IMODE(st.st_mode) == 0o666
    assert (fake_root.lib_dir / "libcuda.so.1").resolve() == fake_root.lib_dir / "libcuda.so.580.126.20"
    assert os.access(fake_root.bin_dir / "nvidia-smi", os.X_OK)
    assert detect_driver_version(fake_root.root) == "580.126.20"


def test_fake_root_falls_back_to_plain_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mknod(*_: object) -> None:
        raise PermissionError("mknod not permitted")

    monkeypatch.setattr("os.mknod", no_mknod)
    fake = make_fake_driver_root(tmp_path, [3])
    assert fake.char_devices is False
    assert fake.node("nvidia3").is_file()
    # Discovery only needs the nodes to exist.
    assert gpu_edits(tmp_path, 3).device_nodes[0].path == "/dev/nvidia3"


def test_common_edits_match_toolkit_layout(fake_root: FakeDriverRoot) -> None:
    root = fake_root.root
    edits = common_edits(root, root, HOOK)
    nodes = {n.path: n for n in edits.device_nodes}
    assert list(nodes) == [
        "/dev/nvidia-modeset",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "/dev/nvidiactl",
    ]
    assert nodes["/dev/nvidiactl"].host_path == str(root / "dev/nvidiactl")
    mounts = {m.container_path: m for m in edits.mounts}
    for lib in ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so"):
        m = mounts[f"{LIBDIR}/{lib}.580.126.20"]
        assert m.host_path == str(root / f"usr/lib/x86_64-linux-gnu/{lib}.580.126.20")
        assert m.options == ("ro", "nosuid", "nodev", "bind")
    assert f"{LIBDIR}/libcuda.so.1" not in mounts  # symlinks are made by hooks, not mounted
    for binary in ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control"):
        assert f"/usr/bin/{binary}" in mounts
    assert "/usr/bin/nvidia-cdi-hook" not in mounts
    assert "/lib/firmware/nvidia/580.126.20/gsp_ga10x.bin" in mounts
    assert edits.env == ("NVIDIA_VISIBLE_DEVICES=void", f"NVIDIA_CTK_LIBCUDA_DIR={LIBDIR}")
    assert all(h.hook_name == "createContainer" and h.path == HOOK for h in edits.hooks)
    assert all(h.args[0] == "nvidia-cdi-hook" and h.env == ("NVIDIA_CTK_DEBUG=false",) for h in edits.hooks)
    args = hook_args(edits)
    assert list(args) == [
        "create-symlinks",
        "enable-cuda-compat",
        "update-ldcache",
        "disable-device-node-modification",
    ]
    assert args["create-symlinks"][:2] == ["--link", f"libcuda.so.1::{LIBDIR}/libcuda.so"]
    assert args["update-ldcache"] == ["--folder", LIBDIR]
    assert args["enable-cuda-compat"] == ["--host-driver-version=580.126.20"]


def test_nvidia_ctk_as_hook_binary(fake_root: FakeDriverRoot) -> None:
    edits = common_edits(fake_root.root, fake_root.root, "/usr/bin/nvidia-ctk")
    assert edits.hooks[0].args[:3] == ("nvidia-ctk", "hook", "create-symlinks")


def test_modeset_and_sockets_are_optional(tmp_path: Path) -> None:
    fake = make_fake_driver_root(tmp_path, [0], modeset=False)
    sock_dir = tmp_path / "run" / "nvidia-persistenced"
    sock_dir.mkdir(parents=True)
    (sock_dir / "socket").write_text("")
    edits = common_edits(fake.root, fake.root, HOOK)
    assert "/dev/nvidia-modeset" not in [n.path for n in edits.device_nodes]
    sock = next(m for m in edits.mounts if m.container_path == "/run/nvidia-persistenced/socket")
    assert "noexec" in sock.options


def test_host_root_rewrite(fake_root: FakeDriverRoot) -> None:
    root = fake_root.root
    edits = common_edits(root, root, HOOK, host_driver_root="/run/nvidia/driver", host_dev_root="/")
    assert {n.host_path for n in edits.device_nodes} >= {"/dev/nvidiactl", "/dev/nvidia-uvm"}
    cuda = next(m for m in edits.mounts if m.container_path.endswith("libcuda.so.580.126.20"))
    assert cuda.host_path == f"/run/nvidia/driver{LIBDIR}/libcuda.so.580.126.20"
    assert cuda.container_path == f"{LIBDIR}/libcuda.so.580.126.20"
    assert gpu_edits(root, 1, host_dev_root="/").device_nodes[0] == DeviceNode("/dev/nvidia1", "/dev/nvidia1")


def test_rewrite_host_root_only_moves_paths_under_the_root() -> None:
    edits = ContainerEdits(
        env=("A=/driver-root/x",),
        device_nodes=(DeviceNode("/dev/nvidia0", "/driver-root/dev/nvidia0"), DeviceNode("/dev/null")),
        mounts=(Mount("/driver-root/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi"), Mount("/other", "/o")),
    )
    out = rewrite_host_root(edits, "/driver-root", "/")
    assert out.device_nodes[0].host_path == "/dev/nvidia0"
    assert out.device_nodes[1].host_path == "/dev/null"
    assert out.mounts[0].host_path == "/usr/bin/nvidia-smi"
    assert out.mounts[0].container_path == "/usr/bin/nvidia-smi"
    assert out.mounts[1].host_path == "/other"
    assert out.env == edits.env
    assert rewrite_host_root(edits, "/driver-root", "/host").mounts[0].host_path == "/host/usr/bin/nvidia-smi"


@pytest.mark.parametrize(
    ("node", "fix"),
    [("nvidia-uvm", "nvidia-modprobe -u -c=0"), ("nvidiactl", "nvidia-modprobe"), ("nvidia-uvm-tools", "-u")],
)
def test_missing_control_node_names_node_and_fix(fake_root: FakeDriverRoot, node: str, fix: str) -> None:
    fake_root.remove_node(node)
    with pytest.raises(DeviceNodeMissingError) as err:
        common_edits(fake_root.root, fake_root.root, HOOK)
    assert err.value.node == f"/dev/{node}"
    assert f"/dev/{node} is missing" in str(err.value)
    assert fix in str(err.value)
    assert "dev root" in str(err.value)


def test_gpu_edits(fake_root: FakeDriverRoot) -> None:
    edits = gpu_edits(fake_root.root, 1)
    assert edits == ContainerEdits(device_nodes=(DeviceNode("/dev/nvidia1", str(fake_root.node("nvidia1"))),))


def test_missing_gpu_node(fake_root: FakeDriverRoot) -> None:
    with pytest.raises(DeviceNodeMissingError, match=r"/dev/nvidia7 is missing.*nvidia-modprobe -c=7"):
        gpu_edits(fake_root.root, 7)


def test_missing_libraries_are_a_clear_error(fake_root: FakeDriverRoot) -> None:
    (fake_root.lib_dir / "libcuda.so.580.126.20").unlink()
    with pytest.raises(DriverRootError, match=r"libcuda\.so\.580\.126\.20 not found"):
        discover_driver_files(fake_root.root)
    with pytest.raises(DriverRootError, match="no libnvidia-ml"):
        detect_driver_version(fake_root.root / "empty")


def test_same_library_through_two_dirs_is_mounted_once(fake_root: FakeDriverRoot) -> None:
    (fake_root.root / "lib").mkdir(exist_ok=True)
    (fake_root.root / "lib" / "x86_64-linux-gnu").symlink_to("../usr/lib/x86_64-linux-gnu")
    files = discover_driver_files(fake_root.root)
    names = [p.name for p in files.libraries]
    assert len(names) == len(set(names))


def test_mig_edits(fake_root: FakeDriverRoot) -> None:
    gi_minor, ci_minor = fake_root.add_mig_caps(1, 11, 0)
    assert (gi_minor, ci_minor) == (237, 238)
    edits = mig_edits(fake_root.root, fake_root.proc_dir, 1, 11, 0)
    assert edits.device_nodes == (
        DeviceNode("/dev/nvidia1", str(fake_root.node("nvidia1"))),
        # Under the same dev root as the GPU node, not the host's own /dev.
        DeviceNode(
            "/dev/nvidia-caps/nvidia-cap237",
            str(fake_root.node("nvidia-caps/nvidia-cap237")),
            type="c",
            major=239,
            minor=237,
            file_mode=0o444,
        ),
        DeviceNode(
            "/dev/nvidia-caps/nvidia-cap238",
            str(fake_root.node("nvidia-caps/nvidia-cap238")),
            type="c",
            major=239,
            minor=238,
            file_mode=0o444,
        ),
    )


def test_mig_edits_h200_example_minors(tmp_path: Path) -> None:
    # NVIDIA's driver on an H200 gave gi 11 / ci 0 on GPU 0 the nodes nvidia-cap102 and nvidia-cap103.
    fake = make_fake_driver_root(tmp_path, [0])
    fake.add_mig_caps(0, 11, 0)
    minors = [n.minor for n in mig_edits(tmp_path, fake.proc_dir, 0, 11, 0).device_nodes[1:]]
    assert minors == [102, 103]


def test_mig_edits_for_absent_instance(fake_root: FakeDriverRoot) -> None:
    with pytest.raises(DriverRootError, match=r"gi=2 ci=0 on GPU minor 0 does not exist"):
        mig_edits(fake_root.root, fake_root.proc_dir, 0, 2, 0)
    fake_root.add_mig_caps(0, 2, 0)
    fake_root.remove_mig_caps(0, 2, 0)
    with pytest.raises(DriverRootError, match="compute instance capability file"):
        mig_edits(fake_root.root, fake_root.proc_dir, 0, 2, 0)


def test_proc_parsing_errors(tmp_path: Path) -> None:
    (tmp_path / "devices").write_text(
        "Character devices:\n195 nvidia-frontend\n\nBlock devices:\n239 nvidia-caps\n"
    )
    with pytest.raises(DriverRootError, match="no character device 'nvidia-caps'"):
        char_major(tmp_path, "nvidia-caps")
    assert char_major(tmp_path, "nvidia-frontend") == 195
    with pytest.raises(DriverRootError, match="cannot read"):
        char_major(tmp_path / "absent", "nvidia-caps")
    bad = tmp_path / "access"
    bad.write_text("DeviceFileMinor: x\n")
    with pytest.raises(DriverRootError, match="DeviceFileMinor"):
        read_cap_access(bad)
