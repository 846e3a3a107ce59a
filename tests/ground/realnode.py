"""A real node: containerd + runc + CNI under the real kubelet, in namespaces of its own.

Why: the product is an image, a chart and a DaemonSet; only a node that runs containers shows
that the plugin's own image starts under its chart's probes, registers through its pod-UID
socket and that workloads see the devices their claim's CDI spec injects. A :class:`RealNode` is
the real kubelet of :class:`tests.ground.realkubelet.RealKubelet` with containerd (built from its
Go module, tests/peers/build.sh) as its runtime instead of the fake CRI.

How it stays off the host (everything runs as root):

* A holder process (``unshare --mount --net --pid``) owns private mount, network and PID
  namespaces; it lays out the node's root and enters it with ``pivot_root``. Not ``chroot``:
  under a chroot, runc's exec (exec probes, ``kubectl exec``) lands at the namespace's real root,
  the host's ``/``.
  containerd, the kubelet and every container start inside it (``nsenter``).
* The node's root: the host's ``/usr`` read-only; ``/etc`` an overlay over the host's (the node's
  config files - containerd, CNI, CDI - land in its upper dir); its own ``/var/lib``, ``/var/log``,
  ``/run``, ``/tmp`` and ``/dev`` (the basic nodes plus the fake driver's NVIDIA character
  devices, made with mknod); ``/proc``, ``/sys`` and the cgroup hierarchy; the kernel tunables the
  kubelet checks bind-mounted read-only from files (as RealKubelet does). The directories the
  harness shares with the node (run and log dirs, the control plane's CA, the peer binaries)
  appear inside at the same absolute paths, so every path in the kubelet's config means the same
  thing on both sides.
* Network: loopback, one veth pair inside the namespace for the node's address (10.200.0.2, the
  default route, so the kubelet picks it), the CNI ``bridge`` + ``host-local`` plugins for pods
  (10.88.0.0/16), and 10.96.0.1 on loopback where :class:`tests.ground.netrelay.Relay` serves the
  API server to pods; the API server reaches the kubelet through the control plane's
  :class:`tests.ground.netrelay.EgressProxy`. The host gains no interface, route or address.
* The holder's PID namespace has an init that dies with it, and the holder dies with the test
  process (parent-death signal): nothing of the node outlives a killed test run but empty cgroup
  dirs (swept at the next start). Containers' cgroups are ``/k8s.io/<id>`` (the kubelet runs
  without QoS cgroups); stop kills what is in them and removes them, then ends containerd, its
  shims and the holder, and deletes the node's root. :meth:`leftovers` says what of the node is
  still on the host (tests assert it is nothing).

What it does not do: pull images (``import_image`` loads OCI archives from tests.ground.images),
run more than one node per control plane address plan, or offer a pod network across nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import yaml
from kubernetes import client as kclient

from tests.ground import peers
from tests.ground.controlplane import ControlPlane
from tests.ground.driverroot import FakeDriverRoot
from tests.ground.images import Image
from tests.ground.netrelay import EgressProxy, Relay
from tests.ground.realkubelet import KUBELET_SYSCTLS, KubeletNodeError, RealKubelet

log = structlog.get_logger(__name__)

NODE_IP = "10.200.0.2"
NODE_GATEWAY = "10.200.0.1"
SERVICE_IP = "10.96.0.1"
POD_SUBNET = "10.88.0.0/16"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
START_TIMEOUT_S = 60.0

#: The basic device nodes of the node's /dev (name, major, minor, mode).
_DEV_NODES = (
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("kmsg", 1, 11, 0o644),
    ("tty", 5, 0, 0o666),
)


def missing_capabilities() -> str | None:
    """Why a real node cannot run here, or None: root, namespaces, overlay, veth, mknod."""
    if os.geteuid() != 0:
        return "the real node needs root (mount and network namespaces, mknod, cgroups)"
    for tool in ("unshare", "nsenter", "ip", "mount", "gcc"):
        if shutil.which(tool) is None:
            return f"the real node needs {tool} on PATH"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the real node needs overlayfs (containerd's snapshotter and the node's /etc)"
    probe = subprocess.run(
        ["unshare", "--mount", "--net", "--", "sh", "-c",
         "ip link add v0 type veth peer name v1 && ip link add b0 type bridge && "
         "mount -t tmpfs t /mnt && mknod /mnt/n c 1 3"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        return (
            "the real node needs CAP_SYS_ADMIN/NET_ADMIN/MKNOD with veth and bridge support: "
            + probe.stderr.strip()[-300:]
        )
    return None


def _mknod(path: Path, major: int, minor: int, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
    path.chmod(mode)


class RealNode(RealKubelet):
    """A kubelet + containerd node in private namespaces; see the module docstring."""

    def __init__(
        self,
        control_plane: ControlPlane,
        node_name: str,
        base_dir: Path,
        log_dir: Path,
        *,
        egress: EgressProxy,
        labels: Mapping[str, str] | None = None,
        extra_dev: Path | None = None,
        version: str | None = None,
    ) -> None:
        """``base_dir`` must be short (Unix socket paths); ``extra_dev``: a directory whose
        character devices (the fake driver's ``dev``) are copied into the node's /dev."""
        # "r": the kubelet's plugin sockets live under it, and Unix socket paths are short-limited.
        super().__init__(control_plane, node_name, base_dir / "r", log_dir, labels=labels, version=version)
        self.base_dir = Path(base_dir)
        self.root = self.base_dir / "root"
        self.etc_upper = self.base_dir / "etc" / "upper"
        self.etc_work = self.base_dir / "etc" / "work"
        self.egress = egress
        self.extra_dev = extra_dev
        self.containerd_log = self.log_dir / "containerd.log"
        self.cgroup_parent = f"/gpu-dra-node-{node_name}"
        self._containerd: subprocess.Popen[bytes] | None = None
        self._init_pid = 0  # host PID of the node's PID-namespace init (the holder's child)
        self._container_ids: set[str] = set()
        self._relays: list[Relay] = []
        self._bins = {
            "containerd": peers.containerd_bin_dir(),
            "runc": peers.runc_path().parent,
            "cni": peers.cni_bin_dir(),
            "kubelet": peers.kubelet_bin_dir(self.version),
        }

    # -- paths as the host sees them -----------------------------------------------------------

    def host_path(self, node_path: str | Path) -> Path:
        """Where the node's ``node_path`` lies on the host (for the node's own dirs, not shared ones)."""
        p = Path(node_path)
        rel = p.relative_to("/")
        if rel.parts[:1] == ("etc",):
            return self.etc_upper / Path(*rel.parts[1:])
        if rel.parts[:2] in (("var", "lib"), ("var", "log")):
            return self.var_dir / Path(*rel.parts[1:])
        if rel.parts[:2] == ("var", "run"):
            return self.root / "run" / Path(*rel.parts[2:])
        return self.root / rel

    @property
    def netns(self) -> Path:
        assert self._init_pid
        return Path(f"/proc/{self._init_pid}/ns/net")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Lay out the root, start holder, relays, containerd and the kubelet (not yet Ready)."""
        sweep_stale_cgroups()
        try:
            self._make_dirs()
            self._write_pki()
            self._write_config()
            self._lay_out_root()
            self._start_holder()
            self._start_relays()
            self._start_cri()
            self._register_node()
            self.start_kubelet()
        except BaseException:
            self.stop()
            raise

    def _register_node(self) -> None:
        """Create the Node object up front, as a provisioner would.

        The kubelet starts its CSI plugin with a bounded wait for its Node; with a real runtime,
        the kubelet registers only once the runtime's first status round has completed (seconds
        longer than over fakecri), and under load the wait can run out, which leaves the node
        NotReady for good ("failed to initialize CSINode"). The kubelet adopts an existing Node.
        """
        api = self.control_plane.api_client()
        try:
            core: Any = kclient.CoreV1Api(api)
            labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux", **self.labels}
            core.create_node(
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
            )
        finally:
            api.close()  # type: ignore[no-untyped-call]

    def _write_config(self) -> None:
        super()._write_config()
        config = yaml.safe_load(self.config_path.read_text())
        config.update(
            {
                "address": NODE_IP,
                "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
                "imageServiceEndpoint": f"unix://{CONTAINERD_SOCKET}",
                # Pods' cgroups under one parent of this node: stop() finds and removes them.
                "cgroupRoot": self.cgroup_parent,
                "resolvConf": "/etc/resolv.conf",
                # Containers' logs outlive the node (its run dir is removed at stop).
                "podLogsDir": str(self.log_dir / "pods"),
            }
        )
        self.config_path.write_text(yaml.safe_dump(config))

    def _shared(self) -> list[Path]:
        """Host dirs the node sees at the same absolute path."""
        dirs = [self.run_dir, self.log_dir, self.control_plane.pki.ca_crt.parent]
        dirs += [self._bins["containerd"], self._bins["runc"], self._bins["kubelet"]]
        return list(dict.fromkeys(d.resolve() for d in dirs))

    def _lay_out_root(self) -> None:
        r = self.root
        for sub in (
            "usr",
            "etc",
            "proc",
            "sys",
            "dev/pts",
            "dev/shm",
            "run",
            "tmp",
            "root",
            "opt/cni/bin",
            "var/lib",
            "var/log",
        ):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "tmp").chmod(0o1777)
        for link in ("bin", "sbin", "lib", "lib64"):
            if Path(f"/{link}").is_symlink() and not (r / link).exists():
                (r / link).symlink_to(Path(f"/{link}").readlink())
        (r / "var" / "run").symlink_to("../run")
        for p in self._shared():
            (r / p.relative_to("/")).mkdir(parents=True, exist_ok=True)
        dev = r / "dev"
        for name, major, minor, mode in _DEV_NODES:
            _mknod(dev / name, major, minor, mode)
        for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
            (dev / name).symlink_to(target)
        if self.extra_dev is not None:
            self.copy_devices(self.extra_dev)
        for d in (
            self.etc_upper / "cni" / "net.d",
            self.etc_upper / "containerd",
            self.etc_upper / "cdi",
            self.etc_work,
        ):
            d.mkdir(parents=True, exist_ok=True)
        (self.etc_upper / "cni" / "net.d" / "10-gpu-dra-node.conflist").write_text(
            json.dumps(self._cni_config(), indent=1)
        )
        (self.etc_upper / "containerd" / "config.toml").write_text(self._containerd_config())
        (self.root / "run" / "cdi").mkdir(parents=True, exist_ok=True)

    def copy_devices(self, src_dev: Path) -> None:
        """Make the character devices under ``src_dev`` in the node's /dev (same names, numbers, modes)."""
        for path in sorted(src_dev.rglob("*")):
            st = path.lstat()
            if stat.S_ISCHR(st.st_mode):
                rel = path.relative_to(src_dev)
                _mknod(
                    self.root / "dev" / rel,
                    os.major(st.st_rdev),
                    os.minor(st.st_rdev),
                    stat.S_IMODE(st.st_mode),
                )

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "gpu-dra-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                }
            ],
        }

    def _containerd_config(self) -> str:
        pause_tag = (peers.pause_dir() / "TAG").read_text().strip()
        runc = self._bins["runc"] / "runc"
        return f"""version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.k8s.io/pause:{pause_tag}"

[plugins."io.containerd.cri.v1.runtime"]
  # No CAP_SYS_RESOURCE here: never lower a process's oom_score_adj below the runtime's own.
  restrict_oom_score_adj = true
  cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "{runc}"
      SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
"""

    def _start_holder(self) -> None:
        r = self.root
        sysctl_dir = self.log_dir / "sysctl"
        sysctl_dir.mkdir(parents=True, exist_ok=True)
        lines = ["set -e", f"R='{r}'", 'mount --bind "$R" "$R"']
        lines += ['mount --bind /usr "$R/usr"', 'mount -o remount,bind,ro "$R/usr"']
        overlay = f"lowerdir=/etc,upperdir='{self.etc_upper}',workdir='{self.etc_work}'"
        lines.append(f'mount -t overlay overlay -o {overlay} "$R/etc"')
        for f in ("resolv.conf", "hosts"):
            if Path("/etc", f).is_file():
                lines.append(f'mount --bind -o ro /etc/{f} "$R/etc/{f}"')
        lines.append(f"mount --bind '{self.var_dir / 'lib'}' \"$R/var/lib\"")
        lines.append(f"mount --bind '{self.var_dir / 'log'}' \"$R/var/log\"")
        for p in self._shared():
            lines.append(f"mount --bind '{p}' \"$R{p}\"")
        lines.append(f"mount --bind -o ro '{self._bins['cni']}' \"$R/opt/cni/bin\"")
        lines.append('mount -t proc proc "$R/proc"')
        for name, value in KUBELET_SYSCTLS.items():
            src = sysctl_dir / name.replace("/", ".")
            src.write_text(value + "\n")
            lines.append(f"mount --bind '{src}' \"$R/proc/sys/{name}\"")
            lines.append(f'mount -o remount,bind,ro "$R/proc/sys/{name}"')
        lines += [
            'mount -t sysfs sysfs "$R/sys"',
            'mount --rbind /sys/fs/cgroup "$R/sys/fs/cgroup"',
            'mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"',
            'mount -t tmpfs -o mode=1777,size=64m shm "$R/dev/shm"',
            "ip link set lo up",
            f"ip addr add {SERVICE_IP}/32 dev lo",
            "ip link add gdn0 type veth peer name gdn1",
            f"ip addr add {NODE_IP}/24 dev gdn0",
            "ip link set gdn1 up",
            "ip link set gdn0 up",
            f"ip route add default via {NODE_GATEWAY} dev gdn0 onlink",
            'cd "$R"',
            "mkdir -p .oldroot",
            "pivot_root . .oldroot",
            "cd /",
            "umount -l /.oldroot",
            "rmdir /.oldroot",
            # As on a systemd host: the node's mounts are shared (among the node's own namespaces
            # only; the unshare made them private towards the host), so mountPropagation works.
            "mount --make-rshared /",
            "echo ready",
            "exec sleep infinity",
        ]
        from tests.ground.realkubelet import _die_with_parent

        # A PID namespace too, whose init dies with unshare (--kill-child): if the test process is
        # killed, the parent-death signal ends unshare and with it every process of the node
        # (containerd's shims and the containers included), so the namespaces and mounts go.
        self._holder = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--net",
                "--pid",
                "--kill-child=SIGKILL",
                "--propagation",
                "private",
                "sh",
                "-c",
                "\n".join(lines),
            ],
            stdout=subprocess.PIPE,
            stderr=(self.log_dir / "holder.log").open("ab"),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for the parent-death signal
        )
        assert self._holder.stdout is not None
        ready = self._holder.stdout.readline()
        self._holder.stdout.close()
        children = Path(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            self._init_pid = int(children.read_text().split()[0])
        if ready.strip() != b"ready" or not self._init_pid:
            self._holder.wait(timeout=5)
            raise KubeletNodeError(
                f"the namespaces of node {self.node_name} could not be set up "
                f"(exit {self._holder.returncode}); see {self.log_dir}/holder.log: "
                + (self.log_dir / "holder.log").read_text(errors="replace")[-2000:]
            )

    def _start_relays(self) -> None:
        api = self.control_plane.server.rsplit(":", 1)
        api_port = int(api[1])
        target = ("127.0.0.1", api_port)
        self._relays.append(Relay(self.netns, ("127.0.0.1", api_port), target))
        self._relays.append(Relay(self.netns, (SERVICE_IP, 443), target))
        self.egress.route(self.netns, NODE_IP, self.node_name)

    def _node_env(self) -> dict[str, str]:
        path = ":".join(str(p) for p in (self._bins["containerd"], self._bins["runc"]))
        return {
            "PATH": f"{path}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
        }

    def _in_namespace(self, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        assert self._holder is not None
        from tests.ground.realkubelet import _die_with_parent

        with log_path.open("ab") as out:
            out.write(
                f"---- harness: starting {Path(argv[0]).name} at {time.strftime('%H:%M:%S')}\n".encode()
            )
            out.flush()
            return subprocess.Popen(
                [
                    "nsenter",
                    f"--target={self._init_pid}",
                    "--mount",
                    "--net",
                    "--pid",
                    "--root",
                    f"--wd={self.log_dir}",
                    "--",
                    *argv,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._node_env(),
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for the parent-death signal
            )

    def _start_cri(self) -> None:
        self._containerd = self._in_namespace(
            [str(self._bins["containerd"] / "containerd"), "--config", "/etc/containerd/config.toml"],
            self.containerd_log,
        )
        sock = self.host_path(CONTAINERD_SOCKET)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._containerd.poll() is not None or time.monotonic() > deadline:
                raise KubeletNodeError(
                    f"containerd on {self.node_name} did not serve {CONTAINERD_SOCKET}; "
                    f"see {self.containerd_log}:\n" + self.containerd_log.read_text(errors="replace")[-3000:]
                )
            if sock.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)

    # -- images and containers -------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """``ctr -n k8s.io ARGS`` against this node's containerd (run from the host, over its socket)."""
        argv = [
            str(self._bins["containerd"] / "ctr"),
            "--address",
            str(self.host_path(CONTAINERD_SOCKET)),
            "-n",
            "k8s.io",
            *args,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise KubeletNodeError(f"ctr {' '.join(args)} failed on {self.node_name}: {proc.stderr.strip()}")
        return proc

    def ctr_argv_hint(self) -> str:
        """The ctr command line for this node's containerd, for people."""
        ctr = self._bins["containerd"] / "ctr"
        return f"{ctr} --address {self.host_path(CONTAINERD_SOCKET)} -n k8s.io"

    def import_image(self, image: Image) -> None:
        """``ctr -n k8s.io images import`` of an OCI archive (unpacked for the overlayfs snapshotter)."""
        self.ctr(
            "images", "import", "--platform", "linux/amd64", "--snapshotter", "overlayfs", str(image.archive)
        )
        listed = self.ctr("images", "ls", "-q").stdout.split()
        if image.ref not in listed:
            raise KubeletNodeError(f"{image.ref} is not among the images after the import: {listed}")

    # -- teardown --------------------------------------------------------------------------------

    def _cgroup_rels(self) -> list[str]:
        """This node's cgroups, relative to a hierarchy: the kubelet's cgroupRoot and one per
        container containerd made (with cgroupsPerQOS off it places them at /k8s.io/<id>)."""
        return [self.cgroup_parent.lstrip("/"), *(f"k8s.io/{cid}" for cid in sorted(self._container_ids))]

    def _cgroup_dirs(self) -> list[Path]:
        """This node's cgroups in every hierarchy that has them (v1) or the unified one."""
        base = Path("/sys/fs/cgroup")
        hierarchies = [base, *(h for h in sorted(base.iterdir()) if h.is_dir() and not h.is_symlink())]
        found = [h / rel for rel in self._cgroup_rels() for h in hierarchies if (h / rel).is_dir()]
        return list(dict.fromkeys(found))

    def _note_containers(self) -> None:
        """Remember containerd's container ids (their cgroups are removed at stop)."""
        if self._containerd is None or self._containerd.poll() is not None:
            return
        proc = self.ctr("containers", "ls", "-q", check=False, timeout=30)
        if proc.returncode == 0:
            self._container_ids.update(proc.stdout.split())

    def _kill_cgroups(self) -> None:
        dirs = self._cgroup_dirs()
        for _ in range(50):
            pids = {
                int(pid)
                for d in dirs
                for procs in d.rglob("cgroup.procs")
                for pid in procs.read_text().split()
            }
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for d in dirs:
            for sub in sorted(
                (p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()
            if d.parent.name == "k8s.io":
                with contextlib.suppress(OSError):  # other nodes' containers may still be there
                    d.parent.rmdir()

    def _mount_ns_procs(self) -> list[int]:
        """Processes in the holder's mount namespace (containerd's shims outlive containerd)."""
        if not self._init_pid:
            return []
        try:
            ns = Path(f"/proc/{self._init_pid}/ns/mnt").readlink()
        except OSError:
            return []
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self._init_pid:
                with contextlib.suppress(OSError):
                    if (entry / "ns" / "mnt").readlink() == ns:
                        out.append(int(entry.name))
        return out

    def stop(self) -> None:
        """Kubelet, containers (by cgroup), shims, containerd, relays, holder; then the node's files."""
        self._end(self._kubelet)
        self._note_containers()
        self._kill_cgroups()
        for pid in self._mount_ns_procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._end(self._containerd, signal.SIGKILL)
        for relay in self._relays:
            relay.close()
        self._relays.clear()
        self.egress.unroute(NODE_IP, self.node_name)
        self._end(self._holder, signal.SIGKILL)
        self._kill_cgroups()
        for d in (self.root, self.var_dir / "lib", self.base_dir / "etc"):
            _remove_tree(d)
        log.info("real node stopped", node=self.node_name, logs=str(self.log_dir))

    def leftovers(self) -> list[str]:
        """What of this node is still on the host: mounts, cgroups, processes, files."""
        out: list[str] = []
        base = str(self.base_dir)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if base in line or self.cgroup_parent in line:
                out.append(f"mount: {line}")
        out += [f"cgroup: {d}" for d in self._cgroup_dirs()]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
        out += [
            f"host interface: {line}"
            for line in links.splitlines()
            if re.search(r": (cni0|gdn[01])[@:]", line)
        ]
        if self.root.exists():
            out.append(f"node root still on disk: {self.root}")
        return out


def sweep_stale_cgroups() -> None:
    """Remove empty container cgroups (``/k8s.io/<id>``, ``/gpu-dra-node-*``) an earlier node left
    when its test process was killed (processes and mounts die with the node's namespaces; cgroup
    dirs do not). rmdir fails on a cgroup that still has processes, so a running container's is
    never touched."""
    base = Path("/sys/fs/cgroup")
    for hierarchy in [base, *(h for h in base.iterdir() if h.is_dir() and not h.is_symlink())]:
        for parent in [*hierarchy.glob("k8s.io"), *hierarchy.glob("gpu-dra-node-*")]:
            if not parent.is_dir():
                continue
            for d in parent.iterdir():
                if d.is_dir():
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()


def _remove_tree(path: Path) -> None:
    """rm -rf that also works on read-only dirs left by containers' layers."""
    if not path.exists() and not path.is_symlink():
        return
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, capture_output=True)


def wait_for(what: str, check: Any, timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll ``check()`` until it returns a truthy value; raise naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as exc:  # the condition is not there yet (API 404 etc.)
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise KubeletNodeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


FAKE_DRIVER_ROOT = "/var/lib/gpu-dra-test/driver"


def lay_out_fake_driver(node: RealNode, gpus: int = 8, driver_root: str = FAKE_DRIVER_ROOT) -> FakeDriverRoot:
    """A fake driver install inside the node (its nodes also in the node's /dev, the nvidia-smi
    stand-ins on the plugin's default fake state file); call before :meth:`RealNode.start`."""
    from tests.ground.driverroot import make_fake_driver_root
    from tests.ground.standins import install_standins

    driver = make_fake_driver_root(node.host_path(driver_root), range(gpus))
    install_standins(driver.bin_dir, node.plugins_dir / "gpu.nvidia.com" / "fake-nvml.json")
    node.extra_dev = driver.dev_dir
    return driver


def bring_up(
    workdir: Path,
    log_dir: Path | None = None,
    *,
    node_name: str = "gpu-node-0",
    labels: Mapping[str, str] | None = None,
    node_images: Sequence[Image] = (),
    before_start: Callable[[RealNode], object] | None = None,
) -> tuple[ControlPlane, RealNode, EgressProxy]:
    """A control plane (with the daemonset controller and the egress proxy) and one Ready real node
    with the pause and busybox images and ``node_images`` imported (default: the plugin's image as
    ``dev``): what the real_runtime tests stand on. ``workdir`` must be short (socket paths);
    ``before_start`` lays out node files (a fake driver root) before the node starts."""
    from tests.ground import images
    from tests.ground.controlplane import start_control_plane

    workdir.mkdir(parents=True, exist_ok=True)
    logs = log_dir or workdir / "logs"
    proxy = EgressProxy(workdir / "egress.sock")
    (workdir / "egress.yaml").write_text(EgressProxy.config_yaml(proxy.path))
    cp = start_control_plane(
        logs / "cp",
        version=peers.k8s_version(),
        extra_controllers=["daemonset-controller"],
        apiserver_args=[f"--egress-selector-config-file={workdir / 'egress.yaml'}"],
    )
    node = RealNode(cp, node_name, workdir / "n", logs / "node", egress=proxy, labels=labels)
    try:
        if before_start is not None:
            before_start(node)
        node.start()
        for img in (
            images.pause_image(),
            images.busybox_image(),
            *(node_images or [images.plugin_image("dev")]),
        ):
            node.import_image(img)
        api = cp.api_client()
        try:
            node.wait_node_ready(api, timeout=120)
        finally:
            api.close()  # type: ignore[no-untyped-call]
    except BaseException:
        node.stop()
        cp.stop()
        proxy.close()
        raise
    return cp, node, proxy


def main() -> int:
    """``python -m tests.ground.realnode``: bring a real node up by hand; Enter (or Ctrl-C) stops it."""
    import tempfile

    missing = missing_capabilities()
    if missing:
        print(f"cannot run a real node here: {missing}")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gn", dir="/tmp"))
    cp, node, proxy = bring_up(
        workdir, labels={"nvidia.com/gpu.present": "true"}, before_start=lay_out_fake_driver
    )
    print(
        f"node gpu-node-0 is Ready.\n"
        f"  export KUBECONFIG={cp.kubeconfig}\n"
        f"  helm: {peers.helm_path()}   ctr: {node.ctr_argv_hint()}\n"
        f"  images: {images_hint()}\n"
        f"  chart values: kubeletDirs.registrar={node.registry_dir} "
        f"kubeletDirs.plugins={node.plugins_dir} nvidiaDriverRoot={FAKE_DRIVER_ROOT}\n"
        f"  logs: {node.log_dir}\n"
        "press Enter to stop"
    )
    try:
        input()
    except (KeyboardInterrupt, EOFError):
        pass
    finally:
        node.stop()
        cp.stop()
        proxy.close()
        left = node.leftovers()
        shutil.rmtree(workdir, ignore_errors=True)
        print("stopped; left on the host:", left or "nothing")
    return 0


def images_hint() -> str:
    from tests.ground import images

    return f"{images.PLUGIN_REPOSITORY}:dev (pullPolicy Never), {images.BUSYBOX_REF}"


__all__ = ["NODE_IP", "RealNode", "bring_up", "missing_capabilities", "wait_for"]

if __name__ == "__main__":
    raise SystemExit(main())
