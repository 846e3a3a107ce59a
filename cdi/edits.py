"""CDI container edits for NVIDIA GPUs, built the way NVIDIA's container toolkit builds them.

Three builders, matching what NVIDIA's DRA driver puts in a claim's spec:

* :func:`common_edits` - spec-level: control nodes (``/dev/nvidiactl``, ``/dev/nvidia-uvm``,
  ``/dev/nvidia-uvm-tools``, ``/dev/nvidia-modeset`` when present), the driver's libraries,
  binaries, firmware and IPC sockets as read-only bind mounts, the ``nvidia-cdi-hook`` hooks
  (create-symlinks, enable-cuda-compat, update-ldcache, disable-device-node-modification) and
  the env ``NVIDIA_VISIBLE_DEVICES=void`` / ``NVIDIA_CTK_LIBCUDA_DIR``;
* :func:`gpu_edits` - one full GPU: ``/dev/nvidia<minor>``;
* :func:`mig_edits` - one MIG device: the parent's node plus its GI and CI capability nodes,
  which carry type/major/minor/mode so the runtime creates them in the container.

Host paths: the plugin usually sees the driver at a mount point (``/driver-root``) while the
runtime, which reads the spec on the host, needs host paths. Pass ``host_driver_root`` /
``host_dev_root`` and every ``hostPath`` is rewritten; container paths
stay as they are. :func:`rewrite_host_root` does the same for edits from elsewhere (e.g.
``nvidia-ctk cdi generate`` output).

A node a container needs that is missing raises :class:`cdi.errors.DeviceNodeMissingError`; no
edits are returned, so no incomplete spec can be built from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path, PurePosixPath

from cdi.driverroot import (
    CONTROL_NODES_OPTIONAL,
    CONTROL_NODES_REQUIRED,
    DriverFiles,
    char_major,
    discover_driver_files,
    gpu_node,
    node_path,
    read_mig_caps,
    require_device_node,
    require_gpu_node,
)
from cdi.spec import ContainerEdits, DeviceNode, Hook, Mount

BIND_OPTIONS = ("ro", "nosuid", "nodev", "bind")
SOCKET_OPTIONS = ("ro", "nosuid", "nodev", "bind", "noexec")
HOOK_ENV = ("NVIDIA_CTK_DEBUG=false",)
HOOK_POINT = "createContainer"

# Development symlinks NVIDIA's toolkit adds next to the libraries (link target :: link path):
# applications dlopen("libcuda.so") without a version.
_DEV_SYMLINKS = (
    ("libcuda.so", "libcuda.so.1", "libcuda.so"),
    ("libnvidia-opticalflow.so", "libnvidia-opticalflow.so.1", "libnvidia-opticalflow.so"),
)


def host_path(path: Path, plugin_root: Path, host_root: str | None) -> str:
    """``path`` (under ``plugin_root`` as the plugin sees it) as the host sees it."""
    if host_root is None:
        return path.as_posix()
    rel = path.relative_to(plugin_root).as_posix()
    base = host_root.rstrip("/")
    return f"{base}/{rel}" if rel != "." else (base or "/")


def rewrite_host_root(edits: ContainerEdits, from_root: str, to_root: str) -> ContainerEdits:
    """Replace the prefix ``from_root`` of every host path in ``edits`` with ``to_root``.

    Host paths are device-node ``hostPath`` values and mount ``hostPath`` values; container
    paths, env and hook paths are left alone (the hook path is already a host path chosen by flag).
    """
    src = PurePosixPath(from_root)

    def move(value: str) -> str:
        p = PurePosixPath(value)
        if p != src and src not in p.parents:
            return value
        rel = p.relative_to(src).as_posix()
        base = to_root.rstrip("/")
        return f"{base}/{rel}" if rel != "." else (base or "/")

    return ContainerEdits(
        env=edits.env,
        device_nodes=tuple(
            replace(n, host_path=move(n.host_path if n.host_path is not None else n.path))
            for n in edits.device_nodes
        ),
        mounts=tuple(replace(m, host_path=move(m.host_path)) for m in edits.mounts),
        hooks=edits.hooks,
    )


def cdi_hook(hook_path: str, name: str, *args: str) -> Hook:
    """A ``createContainer`` hook running ``nvidia-cdi-hook <name> ...`` (or ``nvidia-ctk hook ...``)."""
    prog = PurePosixPath(hook_path).name
    argv = (prog, "hook", name, *args) if prog == "nvidia-ctk" else (prog, name, *args)
    return Hook(hook_name=HOOK_POINT, path=hook_path, args=argv, env=HOOK_ENV)


def _node(dev_root: Path, node: str, host_dev_root: str | None) -> DeviceNode:
    return DeviceNode(path=node, host_path=host_path(node_path(dev_root, node), dev_root, host_dev_root))


def control_node_edits(dev_root: Path, host_dev_root: str | None = None) -> ContainerEdits:
    """The control device nodes every GPU container gets (missing required ones raise)."""
    nodes: list[DeviceNode] = []
    for node in sorted((*CONTROL_NODES_REQUIRED, *CONTROL_NODES_OPTIONAL)):
        if node in CONTROL_NODES_REQUIRED:
            require_device_node(dev_root, node)
        elif not node_path(dev_root, node).exists():
            continue
        nodes.append(_node(dev_root, node, host_dev_root))
    return ContainerEdits(device_nodes=tuple(nodes))


def driver_file_edits(
    files: DriverFiles, hook_path: str, host_driver_root: str | None = None
) -> ContainerEdits:
    """Mounts, hooks and env for the driver's user-space files in ``files``."""

    def mount(path: Path, options: Iterable[str]) -> Mount:
        return Mount(
            host_path=host_path(path, files.root, host_driver_root),
            container_path=files.container_path(path),
            options=tuple(options),
        )

    mounts = [mount(p, BIND_OPTIONS) for p in (*files.libraries, *files.binaries, *files.firmware)]
    mounts += [mount(p, SOCKET_OPTIONS) for p in files.ipc_sockets]

    env: list[str] = ["NVIDIA_VISIBLE_DEVICES=void"]
    libcuda = files.library("libcuda.so")
    if libcuda is not None:
        # Read inside the container (by the cuda-compat hook and by users), so a container path.
        env.append(f"NVIDIA_CTK_LIBCUDA_DIR={files.container_path(libcuda.parent)}")

    links: list[str] = []
    for stem, target, link in _DEV_SYMLINKS:
        lib = files.library(stem)
        if lib is not None:
            links += ["--link", f"{target}::{PurePosixPath(files.container_path(lib)).parent / link}"]
    folders = sorted({PurePosixPath(files.container_path(lib)).parent.as_posix() for lib in files.libraries})

    hooks: list[Hook] = []
    if links:
        hooks.append(cdi_hook(hook_path, "create-symlinks", *links))
    hooks.append(cdi_hook(hook_path, "enable-cuda-compat", f"--host-driver-version={files.version}"))
    hooks.append(cdi_hook(hook_path, "update-ldcache", *(a for f in folders for a in ("--folder", f))))
    hooks.append(cdi_hook(hook_path, "disable-device-node-modification"))
    return ContainerEdits(env=tuple(env), mounts=tuple(mounts), hooks=tuple(hooks))


def common_edits(
    driver_root: Path,
    dev_root: Path,
    hook_path: str,
    *,
    host_driver_root: str | None = None,
    host_dev_root: str | None = None,
    driver_version: str | None = None,
) -> ContainerEdits:
    """Spec-level edits every GPU of a claim shares: control nodes, driver files, hooks, env.

    ``driver_root``/``dev_root`` are as the plugin sees them; ``host_*_root`` as the host sees
    them (None: the same). ``hook_path`` is the host path of ``nvidia-cdi-hook`` (or
    ``nvidia-ctk``).
    """
    files = discover_driver_files(driver_root, driver_version)
    return control_node_edits(dev_root, host_dev_root).merged(
        driver_file_edits(files, hook_path, host_driver_root)
    )


def gpu_edits(dev_root: Path, minor: int, *, host_dev_root: str | None = None) -> ContainerEdits:
    """Edits of one full GPU: its ``/dev/nvidia<minor>`` node (which must exist)."""
    require_gpu_node(dev_root, minor)
    return ContainerEdits(device_nodes=(_node(dev_root, gpu_node(minor), host_dev_root),))


def mig_edits(
    dev_root: Path,
    proc_root: Path,
    parent_minor: int,
    gi_id: int,
    ci_id: int,
    *,
    host_dev_root: str | None = None,
) -> ContainerEdits:
    """Edits of one MIG device: the parent GPU's node plus its GI and CI capability nodes.

    The capability nodes' minors and modes come from ``<proc_root>/driver/nvidia/capabilities``
    and their major from ``<proc_root>/devices``; they need not exist on the host. Their
    ``hostPath`` lies under the same dev root as the GPU node's, so a spec never mixes the dev
    root's nodes with the host's own ``/dev``.
    """
    parent = gpu_edits(dev_root, parent_minor, host_dev_root=host_dev_root)
    major = char_major(proc_root, "nvidia-caps")
    caps = read_mig_caps(proc_root, parent_minor, gi_id, ci_id)
    cap_nodes = []
    for cap in caps:
        on_host = host_path(node_path(dev_root, cap.node), dev_root, host_dev_root)
        cap_nodes.append(
            DeviceNode(
                path=cap.node,
                host_path=on_host if on_host != cap.node else None,
                type="c",
                major=major,
                minor=cap.minor,
                file_mode=cap.mode,
            )
        )
    return ContainerEdits(device_nodes=parent.device_nodes + tuple(cap_nodes))
