"""The real kubelet for a test node: Kubernetes' own kubelet over a fake CRI runtime, off the host.

Why: "wire-compatible with real kubelets" is only as true as the kubelet the tests stand on. This
runs ``k8s.io/kubernetes/cmd/kubelet`` (built by tests/peers/build.sh at the control plane's pin)
against the test ground's API server, with ``fakecri`` (tests/peers/fakecri: Kubernetes'
``k8s.io/cri-client/pkg/fake``) as its container runtime. So plugin registration, the choice of
DRA service, NodePrepareResources / NodeUnprepareResources, the ResourceSlice wipes, the health
stream and the CDI ids handed to CreateContainer are the kubelet's own.

How it stays off the host (it runs as root):

* A holder process (``unshare --mount --propagation private``) owns a private mount namespace;
  fakecri and the kubelet join it with ``nsenter``. Everything mounted there vanishes with it.
* Inside it, ``/var/log`` and ``/var/lib`` are bind-mounted to this node's run dir (the kubelet
  always creates ``/var/log/containers``, and its device-plugin socket dir under
  ``/var/lib/kubelet`` is fixed), and the kernel tunables the kubelet checks with
  ``protectKernelDefaults`` are bind-mounted read-only from files holding the values it wants.
  Without that the kubelet would rewrite vm.overcommit_memory and friends on the host.
* The host is cgroup v1: ``failCgroupV1: false``, no QoS cgroups, no enforced allocatable,
  cgroupfs driver; the kubelet creates no cgroups.
* Serving on loopback, free ports (the node's address is the host's: the kubelet refuses a
  loopback node IP); no read-only port; eviction and image GC out of the way;
  ``--cert-dir``, ``podLogsDir`` and ``volumePluginDir`` under the run dir.
* The kubelet authenticates as the node (``O=system:nodes, CN=system:node:<name>``, signed by
  the control plane's CA), so the API server's Node authorizer and NodeRestriction apply to it.

Every process gets SIGKILL when the test process dies (parent-death signal); :meth:`stop` ends
them in order, also after a failed start.

What the tests read back (names follow :class:`tests.ground.kubelet.KubeletEmulator`): the
kubelet's own log (``--vmodule`` raises only the DRA plugin files to the verbosity that logs
registrations, calls and wipes), its DRA checkpoint (``dra_manager_state``), and fakecri's
journal of CRI requests.

What it does not do: run containers (fakecri keeps records), networking, or create the Node
object (the kubelet registers it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
import yaml
from kubernetes import client as kclient

from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc, dra_v1beta1_pb2, dra_v1beta1_pb2_grpc
from tests.ground import peers
from tests.ground.controlplane import ControlPlane, feature_gates, free_port
from tests.ground.kubelet import (
    PREPARE,
    SERVICE_V1,
    SERVICE_V1BETA1,
    UNPREPARE,
    CallRecord,
    ClaimRef,
    KubeletError,
    PreparedDevice,
    Registration,
    WipeRecord,
)

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
CALL_TIMEOUT_S = 45.0

#: The kernel tunables the kubelet's protectKernelDefaults checks, with the values it wants.
KUBELET_SYSCTLS: Mapping[str, str] = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}

# Only the DRA plugin files log at the verbosity that shows registrations, calls and wipes
# (dra_plugin*.go since 1.33; plugin.go and registration.go in 1.32).
_VMODULE = "dra_plugin=4,dra_plugin_manager=5,plugin=4,registration=3"

_LINE = re.compile(
    r'^[IWEF]\d{4} [\d:.]+\s+\d+ (?P<file>[\w.]+):\d+\] "(?P<msg>(?:[^"\\]|\\.)*)"(?P<rest>.*)$'
)
_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
# A claim in a logged request: prototext (1.33+) or the gogo-style String() of 1.32.
_CLAIM = re.compile(r'namespace:"([^"]*)"\s+uid:"([^"]*)"\s+name:"([^"]*)"')
_CLAIM_132 = re.compile(r"&Claim\{Namespace:([^,]*),UID:([^,]*),Name:([^,]*),\}")
_ERROR_132 = re.compile(r"Error:(.*?),\},")


def kubelet_feature_gates(version: str) -> dict[str, bool]:
    """The kubelet's gates: the control plane's for 1.34+; DRA itself (beta, off) before that,
    where the later DRA gates do not exist yet and would stop the kubelet."""
    minor = int(version.lstrip("v").split(".")[1])
    if minor < 34:
        return {"DynamicResourceAllocation": True, "ResourceHealthStatus": True}
    gates = {}
    for entry in feature_gates(version):
        name, _, value = entry.partition("=")
        gates[name] = value == "true"
    return gates


class KubeletNodeError(RuntimeError):
    """The real kubelet (or its fake runtime) did not reach the state a test needs; names the logs."""


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGKILL it if the test process dies without cleaning up.
    # The setting survives exec (unshare -> sh -> sleep, nsenter -> kubelet), so one call covers it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _unquote(value: str) -> str:
    if value.startswith('"') and value.endswith('"'):
        try:
            out: str = json.loads(value)
            return out
        except ValueError:
            return value[1:-1]
    return value


@dataclass(frozen=True)
class LogLine:
    """One structured line of the kubelet's log."""

    file: str
    msg: str
    values: dict[str, str]


def parse_log_line(line: str) -> LogLine | None:
    """A klog text line as (source file, message, key/values); None for anything else."""
    m = _LINE.match(line)
    if m is None:
        return None
    values = {k: _unquote(v) for k, v in _KV.findall(m.group("rest"))}
    return LogLine(m.group("file"), _unquote(f'"{m.group("msg")}"'), values)


@dataclass
class _Records:
    """What has been read from the kubelet's log and fakecri's journal so far."""

    log_offset: int = 0
    cri_offset: int = 0
    registrations: list[Registration] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    connected: dict[str, bool] = field(default_factory=dict)
    calls: list[CallRecord] = field(default_factory=list)
    pending: list[tuple[str, str, tuple[ClaimRef, ...]]] = field(default_factory=list)
    wipes: list[WipeRecord] = field(default_factory=list)
    health_streams: list[str] = field(default_factory=list)
    pod_errors: dict[str, str] = field(default_factory=dict)  # by "namespace/name"
    registration_errors: list[str] = field(default_factory=list)
    pod_cdi_devices: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    cri_requests: list[dict[str, Any]] = field(default_factory=list)


class RealKubelet:
    """One node's kubelet and fake runtime in a private mount namespace; see the module docstring."""

    def __init__(
        self,
        control_plane: ControlPlane,
        node_name: str,
        run_dir: Path,
        log_dir: Path,
        *,
        labels: Mapping[str, str] | None = None,
        version: str | None = None,
        untaint: bool = True,
    ) -> None:
        """``run_dir`` must be short (Unix socket paths are limited to 108 bytes); logs go to ``log_dir``.

        ``untaint``: lift the not-ready taint admission puts on a new Node once it is Ready, which
        is the node-lifecycle controller's job; leave it False on a control plane that runs one.
        """
        self.control_plane = control_plane
        self.node_name = node_name
        self.run_dir = Path(run_dir)
        self.log_dir = Path(log_dir)
        self.labels = dict(labels or {})
        self.version = version or control_plane.version
        self.untaint = untaint
        self.root_dir = self.run_dir / "k"
        self.registry_dir = self.root_dir / "plugins_registry"
        self.plugins_dir = self.root_dir / "plugins"
        self.cri_socket = self.run_dir / "cri.sock"
        self.control_dir = self.run_dir / "cri-control"
        self.var_dir = self.log_dir / "var"
        self.pki_dir = self.log_dir / "pki"
        self.kubelet_log = self.log_dir / "kubelet.log"
        self.cri_log = self.log_dir / "fakecri.log"
        self.cri_journal = self.log_dir / "cri.jsonl"
        self.config_path = self.log_dir / "kubelet.yaml"
        self.kubeconfig = self.log_dir / "kubelet.kubeconfig"
        self.port = 0
        self.healthz_port = 0
        self._holder: subprocess.Popen[bytes] | None = None
        self._cri: subprocess.Popen[bytes] | None = None
        self._kubelet: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._records = _Records()
        self.kubelet_starts = 0

    def __repr__(self) -> str:
        return f"RealKubelet({self.node_name!r}, {self.version})"

    # -- lifecycle ------------------------------------------------------------------------------

    def _make_dirs(self) -> None:
        for d in (self.run_dir, self.log_dir, self.control_dir, self.var_dir / "log", self.var_dir / "lib"):
            d.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Holder, fakecri and kubelet; returns once the kubelet has started (not yet Ready)."""
        try:
            self._make_dirs()
            self._write_pki()
            self._write_config()
            self._start_holder()
            self._start_cri()
            self.start_kubelet()
        except BaseException:
            self.stop()
            raise

    def _write_pki(self) -> None:
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        ca = self.control_plane.pki
        key, csr, crt = (self.pki_dir / n for n in ("node.key", "node.csr", "node.crt"))
        ext = self.pki_dir / "client.ext"
        ext.write_text("extendedKeyUsage=clientAuth\n")
        subj = f"/O=system:nodes/CN=system:node:{self.node_name}"
        for argv in (
            ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", subj],
            ["x509", "-req", "-in", str(csr), "-CA", str(ca.ca_crt), "-CAkey", str(ca.ca_key),
             "-CAcreateserial", "-CAserial", str(self.pki_dir / "ca.srl"), "-days", "3",
             "-extfile", str(ext), "-out", str(crt)],
        ):  # fmt: skip
            proc = subprocess.run(["openssl", *argv], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise KubeletNodeError(
                    f"openssl {argv[0]} for the node certificate failed: {proc.stderr.strip()}"
                )
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.control_plane.server, "certificate-authority": str(ca.ca_crt)},
                }
            ],
            "users": [{"name": "node", "user": {"client-certificate": str(crt), "client-key": str(key)}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "node"}}],
            "current-context": "test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg))

    def _write_config(self) -> None:
        self.port, self.healthz_port = free_port(), free_port()
        gates = kubelet_feature_gates(self.version)
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.control_plane.pki.ca_crt)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.cri_socket}",
            "imageServiceEndpoint": f"unix://{self.cri_socket}",
            # cgroup v1 host; the kubelet must not create or enforce cgroups here.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            # Checks (does not set) the kernel tunables: they are bind-mounted inside the namespace.
            "protectKernelDefaults": True,
            "podLogsDir": str(self.run_dir / "pod-logs"),
            "volumePluginDir": str(self.run_dir / "volume-plugins"),
            "evictionHard": {},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "nodeStatusUpdateFrequency": "5s",
            "registerNode": True,
            "featureGates": gates,
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def _start_holder(self) -> None:
        lines = ["set -e"]
        lines.append(f"mount --bind '{self.var_dir / 'log'}' /var/log")
        lines.append(f"mount --bind '{self.var_dir / 'lib'}' /var/lib")
        sysctl_dir = self.log_dir / "sysctl"
        sysctl_dir.mkdir(parents=True, exist_ok=True)
        for name, value in KUBELET_SYSCTLS.items():
            src = sysctl_dir / name.replace("/", ".")
            src.write_text(value + "\n")
            target = f"/proc/sys/{name}"
            lines.append(f"mount --bind '{src}' {target}")
            lines.append(f"mount -o remount,bind,ro {target}")
        lines += ["echo ready", "exec sleep infinity"]
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)],
            stdout=subprocess.PIPE,
            stderr=(self.log_dir / "holder.log").open("ab"),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for the parent-death signal
        )
        assert self._holder.stdout is not None
        ready = self._holder.stdout.readline()
        self._holder.stdout.close()
        if ready.strip() != b"ready":
            self._holder.wait(timeout=5)
            raise KubeletNodeError(
                f"the mount namespace for {self.node_name}'s kubelet could not be set up (exit "
                f"{self._holder.returncode}); it needs root and unshare(1). See {self.log_dir}/holder.log: "
                + (self.log_dir / "holder.log").read_text(errors="replace")[-2000:]
            )

    def _in_namespace(self, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        assert self._holder is not None
        with log_path.open("ab") as out:
            out.write(
                f"---- harness: starting {Path(argv[0]).name} at {time.strftime('%H:%M:%S')}\n".encode()
            )
            out.flush()
            # An empty working dir of its own: with the fake CRI's empty LogPath the kubelet's log
            # clean-up globs "*" relative to its cwd and removes what it finds (nsenter --mount
            # otherwise leaves it at the namespace's "/", the host's root: it deleted /bin).
            cwd = self.log_dir / "cwd"
            cwd.mkdir(exist_ok=True)
            return subprocess.Popen(
                ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", f"--wd={cwd}", "--", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.log_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for the parent-death signal
            )

    def _start_cri(self) -> None:
        bin_dir = peers.kubelet_bin_dir(self.version)
        self._cri = self._in_namespace(
            [
                str(bin_dir / "fakecri"),
                f"--listen={self.cri_socket}",
                f"--log={self.cri_journal}",
                f"--control-dir={self.control_dir}",
                f"--image-fs={self.run_dir}",
            ],
            self.cri_log,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.cri_socket.exists():
            if self._cri.poll() is not None or time.monotonic() > deadline:
                raise KubeletNodeError(
                    f"fakecri for {self.node_name} did not serve {self.cri_socket}; see {self.cri_log}"
                )
            time.sleep(0.02)

    def start_kubelet(self) -> None:
        """Start the kubelet (again: same root dir, so it finds its checkpoints, as after a restart)."""
        if self.kubelet_running:
            raise KubeletNodeError(f"the kubelet on {self.node_name} is already running")
        bin_dir = peers.kubelet_bin_dir(self.version)
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        argv = [
            str(bin_dir / "kubelet"),
            f"--config={self.config_path}",
            f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={self.root_dir}",
            f"--cert-dir={self.pki_dir / 'serving'}",
            f"--hostname-override={self.node_name}",
            *([f"--node-labels={labels}"] if labels else []),
            "--v=2",
            f"--vmodule={_VMODULE}",
        ]
        self._kubelet = self._in_namespace(argv, self.kubelet_log)
        self.kubelet_starts += 1
        log.info(
            "real kubelet started", node=self.node_name, pid=self._kubelet.pid, log=str(self.kubelet_log)
        )

    @property
    def holder(self) -> subprocess.Popen[bytes] | None:
        """The process holding the kubelet's mount namespace (``/proc/<pid>/ns/mnt``)."""
        return self._holder

    @property
    def kubelet_running(self) -> bool:
        return self._kubelet is not None and self._kubelet.poll() is None

    @property
    def kubelet_pid(self) -> int | None:
        return self._kubelet.pid if self.kubelet_running and self._kubelet is not None else None

    def wait_node_ready(self, api: kclient.ApiClient, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the kubelet has registered its Node and reports Ready; lift the not-ready taint."""
        core: Any = kclient.CoreV1Api(api)
        deadline = time.monotonic() + timeout
        last = "no Node object yet"
        while True:
            if not self.kubelet_running:
                raise KubeletNodeError(
                    f"the kubelet on {self.node_name} exited ({self._exit_text()}) before its node "
                    f"was Ready\n{self.log_tail()}"
                )
            try:
                node = core.read_node(self.node_name)
            except kclient.ApiException as exc:
                if exc.status != 404:
                    raise
            else:
                ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
                last = f"Ready={ready[0].status} ({ready[0].message})" if ready else "no Ready condition"
                if ready and ready[0].status == "True":
                    if self.untaint and node.spec.taints:
                        # Admission put node.kubernetes.io/not-ready on the new Node; the
                        # node-lifecycle controller would lift it, and it does not run here.
                        keep = [t for t in node.spec.taints if not t.key.startswith("node.kubernetes.io/")]
                        core.patch_node(self.node_name, {"spec": {"taints": keep or None}})
                    client: Any = api
                    out: dict[str, Any] = client.sanitize_for_serialization(core.read_node(self.node_name))
                    return out
            if time.monotonic() > deadline:
                raise KubeletNodeError(
                    f"node {self.node_name} not Ready within {timeout}s (last: {last})\n" + self.log_tail()
                )
            time.sleep(0.1)

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        """Stop only the kubelet (pods' fake containers and the plugin keep running)."""
        self._end(self._kubelet, sig)

    def _end(self, proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("process ignored SIGTERM", node=self.node_name, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Kubelet, fakecri, then the holder (its namespace and mounts go with it). Idempotent."""
        self._end(self._kubelet)
        self._end(self._cri)
        self._end(self._holder, signal.SIGKILL)
        log.info("real kubelet stopped", node=self.node_name, logs=str(self.log_dir))

    def _exit_text(self) -> str:
        if self._kubelet is None:
            return "not started"
        code = self._kubelet.poll()
        return "running" if code is None else f"exit {code}"

    # -- fake runtime control -------------------------------------------------------------------

    def complete_pod(self, namespace: str, name: str, exit_code: int = 0) -> None:
        """Make every running container of the pod exit with ``exit_code`` (a finished Job's pod)."""
        api: Any = self.control_plane.api_client()
        try:
            pod: Any = kclient.CoreV1Api(api).read_namespaced_pod(name, namespace)
        finally:
            api.close()
        for container in pod.spec.containers:
            path = self.control_dir / f"exit-{pod.metadata.uid}-{container.name}"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(f"{exit_code}\n")
            tmp.rename(path)

    # -- records --------------------------------------------------------------------------------

    def _refresh(self) -> _Records:
        with self._lock:
            rec = self._records
            rec.log_offset = self._read_lines(self.kubelet_log, rec.log_offset, self._on_log_line)
            rec.cri_offset = self._read_lines(self.cri_journal, rec.cri_offset, self._on_cri_line)
            return rec

    @staticmethod
    def _read_lines(path: Path, offset: int, handle: Any) -> int:
        if not path.exists():
            return offset
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return offset
        for raw in data[: end + 1].decode(errors="replace").splitlines():
            handle(raw)
        return offset + end + 1

    def _on_log_line(self, raw: str) -> None:
        line = parse_log_line(raw)
        if line is None:
            return
        rec, v = self._records, line.values
        driver, endpoint = v.get("driverName") or v.get("pluginName", ""), v.get("endpoint", "")
        if line.msg == "Registered DRA plugin":
            rec.registrations.append(
                Registration(driver, endpoint, v.get("chosenService", ""), time.time(), Path(endpoint))
            )
        elif line.msg == "Register new DRA plugin":
            # 1.32: v1beta1 is the newest service it knows, and it tracks no connection state.
            rec.registrations.append(
                Registration(driver, endpoint, SERVICE_V1BETA1, time.time(), Path(endpoint))
            )
            rec.connected[endpoint] = True
        elif line.msg in ("Unregistered DRA plugin", "Deregister DRA plugin"):
            rec.unregistered.append(endpoint)
            rec.connected.pop(endpoint, None)
        elif line.msg == "Connection changed":
            rec.connected[endpoint] = v.get("connected") == "true"
        elif line.msg.startswith("Calling Node") and line.msg.endswith("rpc"):
            if not endpoint and rec.registrations:
                driver, endpoint = rec.registrations[-1].driver, rec.registrations[-1].endpoint
            method = PREPARE if "Prepare" in line.msg and "Unprepare" not in line.msg else UNPREPARE
            request = v.get("request", "")
            sent = tuple(
                (ns, uid, name) for ns, uid, name in _CLAIM.findall(request) + _CLAIM_132.findall(request)
            )
            rec.pending.append((method, endpoint, sent))
        elif line.msg.startswith("Done calling Node"):
            method = UNPREPARE if "Unprepare" in line.msg else PREPARE
            if not endpoint and rec.registrations:
                # 1.32 logs calls without driver and endpoint; it keeps one instance per driver.
                driver, endpoint = rec.registrations[-1].driver, rec.registrations[-1].endpoint
            found = next((p for p in rec.pending if p[0] == method and p[1] == endpoint), None)
            claims: tuple[ClaimRef, ...] = ()
            if found is not None:
                rec.pending.remove(found)
                claims = found[2]
            err = v.get("err", "")
            err = "" if err in ("<nil>", "null") else err
            if not err:
                response = v.get("response", "")
                found_errors = re.findall(r'error:"((?:[^"\\]|\\.)*)"', response) + _ERROR_132.findall(
                    response
                )
                err = "; ".join(e for e in found_errors if e)
            service = next((r.service for r in reversed(rec.registrations) if r.endpoint == endpoint), "")
            rec.calls.append(CallRecord(method, driver, service, endpoint, claims, err, time.time()))
        elif line.msg == "Deleted ResourceSlices":
            selector = v.get("fieldSelector", "")
            rec.wipes.append(
                WipeRecord(None if "driver" not in selector else driver, selector, True, "", time.time())
            )
        elif line.msg == "Successfully started WatchResources health stream":
            rec.health_streams.append(endpoint)
        elif line.msg in ("Failed to prepare dynamic resources", "Error syncing pod, skipping"):
            rec.pod_errors[v.get("pod", "")] = v.get("err", "")
        elif "RegisterPlugin error" in line.msg or "RegisterPlugin error" in v.get("err", ""):
            rec.registration_errors.append(v.get("err", line.msg))

    def _on_cri_line(self, raw: str) -> None:
        try:
            entry = json.loads(raw)
        except ValueError:
            return
        rec = self._records
        rec.cri_requests.append(entry)
        if entry.get("method") == "CreateContainer" and not entry.get("error"):
            uid = entry["pod"]["uid"]
            rec.pod_cdi_devices.setdefault(uid, {})[entry["container"]] = list(entry.get("cdi_devices") or [])

    @property
    def registrations(self) -> list[Registration]:
        """Every DRA plugin registration the kubelet accepted, oldest first."""
        return list(self._refresh().registrations)

    @property
    def registration_errors(self) -> list[str]:
        return list(self._refresh().registration_errors)

    @property
    def calls(self) -> list[CallRecord]:
        """The kubelet's NodePrepareResources / NodeUnprepareResources calls, as it logged them."""
        return list(self._refresh().calls)

    @property
    def wipes(self) -> list[WipeRecord]:
        """ResourceSlice wipes the kubelet did (start-up: driver None)."""
        return list(self._refresh().wipes)

    @property
    def health_streams(self) -> list[str]:
        """Endpoints on which the kubelet opened the DRA health stream, in order."""
        return list(self._refresh().health_streams)

    @property
    def pod_errors(self) -> dict[str, str]:
        """Pod UID -> the kubelet's last error for the pod (a failed prepare, a failed sync)."""
        by_name = dict(self._refresh().pod_errors)
        if not by_name:
            return {}
        api: Any = self.control_plane.api_client()
        try:
            pods: Any = kclient.CoreV1Api(api).list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node_name}"
            )
        finally:
            api.close()
        uids = {f"{p.metadata.namespace}/{p.metadata.name}": str(p.metadata.uid) for p in pods.items}
        return {uids[name]: err for name, err in by_name.items() if name in uids}

    @property
    def pod_cdi_devices(self) -> dict[str, dict[str, list[str]]]:
        """Pod UID -> container -> the CDI device ids the kubelet passed to CreateContainer."""
        return {k: dict(v) for k, v in self._refresh().pod_cdi_devices.items()}

    def cri_requests(self, method: str | None = None) -> list[dict[str, Any]]:
        """fakecri's journal entries (one per CRI request), optionally of one method."""
        reqs = self._refresh().cri_requests
        return [r for r in reqs if method is None or r.get("method") == method]

    def instances(self, driver: str) -> list[Registration]:
        """Registered instances of ``driver`` not unregistered since, oldest first."""
        rec = self._refresh()
        live: dict[str, Registration] = {}
        gone = list(rec.unregistered)
        for r in rec.registrations:
            if r.driver == driver:
                live[r.endpoint] = r
        # An endpoint may be registered again after it was unregistered; compare counts in order.
        for endpoint in gone:
            regs = [r for r in rec.registrations if r.endpoint == endpoint]
            if len(regs) <= gone.count(endpoint):
                live.pop(endpoint, None)
        return list(live.values())

    def is_connected(self, driver: str) -> bool:
        rec = self._refresh()
        return any(rec.connected.get(r.endpoint) for r in self.instances(driver))

    def plugin_for(self, driver: str) -> Registration | None:
        """The instance the kubelet calls: the newest connected one, else the newest."""
        live = self.instances(driver)
        rec = self._refresh()
        connected = [r for r in live if rec.connected.get(r.endpoint)]
        pick = connected or live
        return pick[-1] if pick else None

    def checkpoint(self) -> list[dict[str, Any]]:
        """The kubelet's DRA checkpoint (``ClaimInfoStateList``), [] before it wrote one."""
        path = self.root_dir / "dra_manager_state"
        if not path.exists():
            return []
        outer = json.loads(path.read_text())
        data = json.loads(outer["Data"])
        items: list[dict[str, Any]] = data.get("ClaimInfoStateList") or []
        return items

    def prepared_claims(self) -> set[str]:
        """UIDs of the claims in the kubelet's DRA checkpoint."""
        return {str(c["ClaimUID"]) for c in self.checkpoint()}

    def claim_pods(self, claim_uid: str) -> set[str]:
        for c in self.checkpoint():
            if c["ClaimUID"] == claim_uid:
                return set(c.get("PodUIDs") or {})
        return set()

    def claim_devices(self, claim_uid: str) -> list[PreparedDevice]:
        """The devices the kubelet stored for a prepared claim (from its checkpoint)."""
        out: list[PreparedDevice] = []
        for c in self.checkpoint():
            if c["ClaimUID"] != claim_uid:
                continue
            for state in (c.get("DriverState") or {}).values():
                for d in state.get("Devices") or []:
                    out.append(
                        PreparedDevice(
                            request_names=tuple(d.get("RequestNames") or ()),
                            pool_name=d["PoolName"],
                            device_name=d["DeviceName"],
                            cdi_device_ids=tuple(d.get("CDIDeviceIDs") or ()),
                            share_id=d.get("ShareID"),
                        )
                    )
        return out

    # -- direct calls ---------------------------------------------------------------------------

    def prepare(self, driver: str, claims: Sequence[ClaimRef]) -> dict[str, list[PreparedDevice]]:
        """NodePrepareResources straight to the instance the kubelet calls, over the service it chose.

        For idempotence checks: the kubelet itself calls again for a prepared claim after its own
        restart. Not part of :attr:`calls`, which are the kubelet's.
        """
        resp = self._direct(PREPARE, driver, claims)
        out: dict[str, list[PreparedDevice]] = {}
        for _ns, uid, name in claims:
            entry = resp.claims.get(uid)
            if entry is None:
                raise KubeletError(f"{PREPARE} skipped ResourceClaim {name}")
            if entry.error:
                raise KubeletError(f"{PREPARE} failed for ResourceClaim {name}: {entry.error}")
            out[uid] = [
                PreparedDevice(
                    request_names=tuple(d.request_names),
                    pool_name=d.pool_name,
                    device_name=d.device_name,
                    cdi_device_ids=tuple(d.cdi_device_ids),
                    share_id=(
                        d.share_id if isinstance(d, dra_v1_pb2.Device) and d.HasField("share_id") else None
                    ),
                )
                for d in entry.devices
            ]
        return out

    def unprepare(self, driver: str, claims: Sequence[ClaimRef]) -> None:
        """NodeUnprepareResources straight to the plugin (see :meth:`prepare`)."""
        resp = self._direct(UNPREPARE, driver, claims)
        for ns, uid, name in claims:
            entry = resp.claims.get(uid)
            if entry is None or entry.error:
                why = entry.error if entry is not None else "no answer"
                raise KubeletError(f"{UNPREPARE} failed for claim {ns}/{name}: {why}")

    def _direct(self, method: str, driver: str, claims: Sequence[ClaimRef]) -> Any:
        reg = self.plugin_for(driver)
        if reg is None:
            raise KubeletError(
                f"{method}: DRA driver {driver} is not registered with the kubelet on {self.node_name}"
            )
        v1 = reg.service == SERVICE_V1
        pb: Any = dra_v1_pb2 if v1 else dra_v1beta1_pb2
        stubs: Any = dra_v1_pb2_grpc if v1 else dra_v1beta1_pb2_grpc
        wire = [pb.Claim(namespace=ns, uid=uid, name=name) for ns, uid, name in claims]
        with grpc.insecure_channel(f"unix://{reg.endpoint}") as channel:
            stub = stubs.DRAPluginStub(channel)
            try:
                if method == PREPARE:
                    return stub.NodePrepareResources(
                        pb.NodePrepareResourcesRequest(claims=wire), timeout=CALL_TIMEOUT_S
                    )
                return stub.NodeUnprepareResources(
                    pb.NodeUnprepareResourcesRequest(claims=wire), timeout=CALL_TIMEOUT_S
                )
            except grpc.RpcError as err:
                raise KubeletError(f"{method}: {err}") from err

    # -- diagnostics ----------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        if not self.kubelet_log.exists():
            return "(no kubelet log yet)"
        tail = self.kubelet_log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.kubelet_log}:\n" + "\n".join(tail)

    def diagnostics(self) -> list[str]:
        rec = self._refresh()
        return [
            f"real kubelet {self.version} ({self._exit_text()}, started {self.kubelet_starts}x); "
            f"logs {self.kubelet_log}, CRI journal {self.cri_journal}",
            f"registrations: {[(r.endpoint.rsplit('/', 1)[-1], r.service) for r in rec.registrations]}; "
            f"errors: {rec.registration_errors[-3:]}",
            f"calls: {[(c.method, [n for _, _, n in c.claims], c.error or 'ok') for c in rec.calls[-10:]]}",
            f"pod errors: {rec.pod_errors}",
        ]
