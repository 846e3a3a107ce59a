"""Shared pieces of the benchmarks: percentiles, a simulated node, the plugin as a process.

Why: every benchmark that measures the daemon needs the same set-up - a fake driver root, the
fake GPU state (with the stand-in tools for sharing), the plugin started with the flags a
DaemonSet would give it, its JSON log read back, a gRPC client on its DRA socket. Keeping it here
keeps each ``bench_*.py`` about what it measures.

What it does not do: assert. Benchmarks print figures; they fail only when the thing measured
cannot run at all (the plugin does not start, a prepare returns an error).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc  # noqa: E402

DRIVER = "gpu.nvidia.com"
READY_EVENT = "registration socket ready"


class BenchError(RuntimeError):
    """The benchmark could not run what it measures; the message says what broke and where to look."""


# ---- figures ----------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile of ``values`` (seconds) in milliseconds, nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k] * 1000


def line(label: str, values: Sequence[float]) -> str:
    """One figure line: p50 and p99 in milliseconds and the sample count."""
    return f"  {label:<40} p50 {pct(values, 50):8.2f} ms   p99 {pct(values, 99):8.2f} ms   (n={len(values)})"


def host_line() -> str:
    return (
        f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}"
    )


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (from /proc/<pid>/status)."""
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no VmRSS line; is the process a zombie?")


def quiet_logs() -> None:
    """Only errors from in-process driver code: the benchmark's output is its figures."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


# ---- a simulated node -------------------------------------------------------------------------


@dataclass
class FakeNode:
    """A temp tree laid out like a node: kubelet dirs, CDI root, fake driver root, fake GPU state."""

    base: Path
    node_name: str
    topology: str

    @property
    def registry(self) -> Path:
        return self.base / "reg"

    @property
    def plugins(self) -> Path:
        return self.base / "plug"

    @property
    def cdi(self) -> Path:
        return self.base / "cdi"

    @property
    def driver_root(self) -> Path:
        return self.base / "drv"

    @property
    def fake_state(self) -> Path:
        return self.base / "fake-nvml.json"

    @property
    def claims_dir(self) -> Path:
        return self.base / "claims"

    @property
    def mps_root(self) -> Path:
        return self.base / "mps"

    @property
    def reg_socket(self) -> Path:
        return self.registry / f"{DRIVER}-reg.sock"

    @property
    def dra_socket(self) -> Path:
        return self.plugins / DRIVER / "dra.sock"

    def argv(self, *extra: str) -> list[str]:
        """``gpu-dra plugin`` as a DaemonSet would run it on this node (fake NVML)."""
        return [
            sys.executable, "-m", "driver", "plugin",
            "--node-name", self.node_name,
            "--nvml-backend", "fake", "--fake-topology", self.topology,
            "--fake-state", str(self.fake_state),
            "--kubelet-registrar-directory-path", str(self.registry),
            "--kubelet-plugins-directory-path", str(self.plugins),
            "--cdi-root", str(self.cdi),
            "--driver-root", str(self.driver_root), "--dev-root", str(self.driver_root),
            "--proc-root", str(self.driver_root / "proc"),
            "--mps-root", str(self.mps_root),
            "--log-format", "json",
            *extra,
        ]  # fmt: skip

    def put_claim(self, claim: dict[str, Any]) -> None:
        """Serve ``claim`` to a plugin started with ``--fake-claims-dir``."""
        meta = claim["metadata"]
        path = self.claims_dir / meta["namespace"] / f"{meta['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(claim))


@contextlib.contextmanager
def fake_node(
    node_name: str = "bench-node", topology: str = "a100-40gb-x8", standins: bool = False
) -> Iterator[FakeNode]:
    """A :class:`FakeNode` under a short /tmp path (Unix socket limit), removed afterwards."""
    from driver.nvml.fakestate import FakeState
    from driver.nvml.topology import load_topology
    from tests.ground.driverroot import make_fake_driver_root

    base = Path(tempfile.mkdtemp(prefix="gdb-", dir="/tmp"))
    node = FakeNode(base, node_name, topology)
    try:
        node.registry.mkdir()
        topo = load_topology(topology)
        make_fake_driver_root(node.driver_root, [g.minor for g in topo.gpus])
        FakeState.create(node.fake_state, topo, node_name)
        if standins:
            from tests.ground.standins import install_standins

            install_standins(node.driver_root / "usr" / "bin", node.fake_state)
        yield node
    finally:
        shutil.rmtree(base, ignore_errors=True)


def allocated_claim(
    namespace: str, name: str, uid: str, node: str, device: str, *, config: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A v1 ResourceClaim allocated one device of ``node`` (for ``--fake-claims-dir``)."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}},
        "status": {
            "allocation": {
                "devices": {
                    "results": [{"request": "gpu", "driver": DRIVER, "pool": node, "device": device}],
                    "config": list(config),
                }
            }
        },
    }


# ---- the plugin as a process ------------------------------------------------------------------


@dataclass
class PluginProcess:
    """A running ``gpu-dra plugin``; stdout+stderr go to a file (a full pipe would stall it)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    node: FakeNode
    started: float
    _offset: int = 0
    _events: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[bytes] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log event so far (read incrementally)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for raw in chunk[:end].splitlines():
            try:
                self._events.append(json.loads(raw))
            except ValueError:
                self.bad_lines.append(raw)
        return self._events

    def wait_socket(self, timeout_s: float = 60.0) -> float:
        """Seconds from spawn until the registration socket exists (polled every millisecond)."""
        deadline = self.started + timeout_s
        while not self.node.reg_socket.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"plugin exited with {self.proc.returncode}; log: {self.tail()}")
            if time.perf_counter() > deadline:
                raise BenchError(f"no registration socket after {timeout_s}s; log: {self.tail()}")
            time.sleep(0.001)
        return time.perf_counter() - self.started

    def wait_event(self, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = next((e for e in self.events() if e.get("event") == name), None)
            if found is not None:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"plugin never logged {name!r}; log: {self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def start_plugin(
    node: FakeNode, *extra: str, env: dict[str, str] | None = None, tag: str = ""
) -> PluginProcess:
    """Spawn the plugin; the clock for :meth:`PluginProcess.wait_socket` starts at the spawn."""
    environ = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    log_path = node.base / f"plugin{tag}.log"
    with log_path.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            node.argv(*extra), cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT
        )
    return PluginProcess(proc, log_path, node, started)


# ---- the kubelet's side of the DRA socket -----------------------------------------------------


def wire(claim: dict[str, Any]) -> dra_v1_pb2.Claim:
    meta = claim["metadata"]
    return dra_v1_pb2.Claim(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


class DraClient:
    """Calls NodePrepareResources / NodeUnprepareResources (v1) as the kubelet does; raises on errors."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self._stub = dra_v1_pb2_grpc.DRAPluginStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def prepare(self, claims: Sequence[dict[str, Any]], timeout_s: float = 60.0) -> float:
        """Prepare ``claims`` in one call; return the call's wall time in seconds."""
        msgs = [wire(c) for c in claims]
        t0 = time.perf_counter()
        resp = self._stub.NodePrepareResources(
            dra_v1_pb2.NodePrepareResourcesRequest(claims=msgs), timeout=timeout_s
        )
        took = time.perf_counter() - t0
        for m in msgs:
            if resp.claims[m.uid].error:
                raise BenchError(f"prepare of {m.namespace}/{m.name} failed: {resp.claims[m.uid].error}")
        return took

    def unprepare(self, claims: Sequence[dict[str, Any]], timeout_s: float = 60.0) -> float:
        msgs = [wire(c) for c in claims]
        t0 = time.perf_counter()
        resp = self._stub.NodeUnprepareResources(
            dra_v1_pb2.NodeUnprepareResourcesRequest(claims=msgs), timeout=timeout_s
        )
        took = time.perf_counter() - t0
        for m in msgs:
            if resp.claims[m.uid].error:
                raise BenchError(f"unprepare of {m.namespace}/{m.name} failed: {resp.claims[m.uid].error}")
        return took


# ---- the real control plane -------------------------------------------------------------------


@contextlib.contextmanager
def control_plane(node_name: str, namespace: str) -> Iterator[Any]:
    """The Go-built control plane (tests/ground) with ``node_name`` as a Node and ``namespace``.

    Yields the ``tests.ground.controlplane.ControlPlane``; stops it and removes its files after.
    """
    from tests.ground.controlplane import start_control_plane

    workdir = Path(tempfile.mkdtemp(prefix="gdb-cp-", dir="/tmp"))
    cp = start_control_plane(workdir)
    try:
        cp.create_node(node_name)
        cp.create_namespace(namespace)
        yield cp
    finally:
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def create_allocated_claims(
    cp: Any, namespace: str, node_name: str, devices: Sequence[str]
) -> list[dict[str, Any]]:
    """One ResourceClaim per device, allocated to it through the status subresource (as the
    scheduler would write it); returns the stored claims."""
    from kubernetes import client as kclient

    api = cp.api_client()
    try:
        objects: Any = kclient.CustomObjectsApi(api)
        out: list[dict[str, Any]] = []
        for device in devices:
            name = f"claim-{device}"
            body = allocated_claim(namespace, name, "", node_name, device)
            del body["metadata"]["uid"]
            status = {"status": body.pop("status")}
            status["status"]["allocation"]["nodeSelector"] = {
                "nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}
                ]
            }
            objects.create_namespaced_custom_object(
                "resource.k8s.io", "v1", namespace, "resourceclaims", body
            )
            stored: dict[str, Any] = objects.patch_namespaced_custom_object_status(
                "resource.k8s.io", "v1", namespace, "resourceclaims", name, status
            )
            out.append(stored)
        return out
    finally:
        api.close()


# ---- counting file writes ---------------------------------------------------------------------

_IN_MOVED_TO = 0x00000080
_IN_CLOSE_WRITE = 0x00000008
_EVENT_HEADER = struct.Struct("iIII")


class DirWatch:
    """Counts files renamed into (or written in place in) one directory, by name, with inotify.

    Atomic writes end in a rename, so this counts the CDI specs the plugin wrote - independent of
    its logs, which is how the burst tells "prepared once" from "prepared again".
    """

    def __init__(self, directory: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise BenchError(f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}")
        wd = self._libc.inotify_add_watch(self._fd, str(directory).encode(), _IN_MOVED_TO | _IN_CLOSE_WRITE)
        if wd < 0:
            raise BenchError(f"inotify_add_watch({directory}) failed: {os.strerror(ctypes.get_errno())}")
        self.counts: dict[str, int] = {}

    def drain(self) -> dict[str, int]:
        """Read pending events; return the counts so far (name -> writes)."""
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return self.counts
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, size = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size
                name = data[offset : offset + size].rstrip(b"\0").decode()
                offset += size
                if not name.startswith("."):  # temp files of an atomic write
                    self.counts[name] = self.counts.get(name, 0) + 1

    def close(self) -> None:
        os.close(self._fd)
