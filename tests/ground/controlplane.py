"""A real Kubernetes control plane on loopback for end-to-end tests.

Why: the driver's contract is with a real API server and scheduler (ResourceSlice validation,
allocation by the DRA scheduler plugin, RBAC on the chart's permissions). This module starts the
Go-built etcd, kube-apiserver, kube-scheduler and kube-controller-manager in a work directory, on
free loopback ports, with their own CA, service-account signing key and an admin client cert, and
stops them again - also when a test crashes (process groups, parent-death signal, atexit).

The API server authorizes as a real cluster does (``--authorization-mode=Node,RBAC`` with the
NodeRestriction admission plugin), so real kubelets (tests.ground.realkubelet) work under node
restriction, and so does the plugin beside them.

What it does not do: run a kubelet, or node lifecycle unless asked (``node_lifecycle=True``, for
clusters whose nodes are all real kubelets: nodes made with `create_node` never heartbeat and would
be tainted and evicted), networking, or anything a pod needs to actually run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml
from kubernetes import client as kclient

from tests.ground.peers import k8s_bin_dir

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 90.0
STOP_GRACE_S = 5.0
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Controllers the scenarios need; node lifecycle and everything about volumes/networking stay off.
CONTROLLERS = (
    "resourceclaim-controller",
    "deployment-controller",
    "replicaset-controller",
    "job-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",
    "device-taint-eviction-controller",
)

# On 1.34/1.35 these DRA features are alpha (off); on 1.36 they are beta and on by default.
_PRE_136_GATES = (
    "DRAPartitionableDevices",
    "DRADeviceTaints",
    "DRAPrioritizedList",
    "DRAConsumableCapacity",
    "ResourceHealthStatus",  # the kubelet's allocatedResourcesStatus from the DRA health stream
)
# DeviceTaintRule has a gate of its own since 1.35 (split from DRADeviceTaints); on 1.36 it is
# beta but off by default, and the seeds' DeviceTaintRule manifests need it.
_TAINT_RULES_GATE = "DRADeviceTaintRules"


class ControlPlaneError(RuntimeError):
    """The control plane failed to start or answer; the message names the log files."""


def _minor(version: str) -> int:
    parts = version.lstrip("v").split(".")
    if len(parts) < 2 or parts[0] != "1" or not parts[1].isdigit():
        raise ValueError(f"Kubernetes version {version!r} is not of the form v1.N.P")
    return int(parts[1])


def feature_gates(version: str) -> list[str]:
    """`--feature-gates` entries for a version (same for all components)."""
    minor = _minor(version)
    gates = [f"{g}=true" for g in _PRE_136_GATES] if minor < 36 else []
    if minor >= 35:
        gates.append(f"{_TAINT_RULES_GATE}=true")
    return gates


def merge_feature_gates(gates: Sequence[str], extra: Mapping[str, bool] | None) -> list[str]:
    """``gates`` (``Name=value`` entries) with ``extra`` appended; a name in both takes ``extra``'s value."""
    merged: dict[str, str] = {}
    for entry in gates:
        name, _, value = entry.partition("=")
        merged[name] = value
    for name, enabled in (extra or {}).items():
        merged[name] = "true" if enabled else "false"
    return [f"{name}={value}" for name, value in merged.items()]


def runtime_config(version: str) -> list[str]:
    """`--runtime-config` entries: the resource.k8s.io versions users' manifests are written in.

    The beta versions are off by default since v1 went GA, yet seed manifests (and clusters
    upgraded from 1.32/1.33) still use them, and DeviceTaintRule is served in v1beta2 on 1.36.
    """
    served = ["resource.k8s.io/v1beta1=true", "resource.k8s.io/v1beta2=true"]
    if _minor(version) < 36:
        # DeviceTaintRule lives in v1alpha3 while DRADeviceTaints is alpha.
        served.append("resource.k8s.io/v1alpha3=true")
    return served


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature; good enough on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed in {cwd}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Pki:
    """File paths of the control plane's credentials."""

    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    admin_crt: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def make_pki(d: Path) -> Pki:
    """A CA, an apiserver serving cert, an admin (system:masters) client cert, an SA key pair."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3",
        "-subj",
        "/CN=gpu-dra-test-ca",
        cwd=d,
    )
    (d / "server.ext").write_text(
        # 10.96.0.1 is the in-cluster address of the kubernetes Service: pods of a real node reach
        # the API server there (tests.ground.netrelay) with their unmodified in-cluster config.
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in (
        ("server", "/CN=kube-apiserver", "server.ext"),
        ("admin", "/O=system:masters/CN=gpu-dra-test-admin", "client.ext"),
    ):
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=d)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "3", "-extfile", ext, "-out", f"{name}.crt", cwd=d,
        )  # fmt: skip
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=d)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    return Pki(
        ca_crt=d / "ca.crt",
        ca_key=d / "ca.key",
        server_crt=d / "server.crt",
        server_key=d / "server.key",
        admin_crt=d / "admin.crt",
        admin_key=d / "admin.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
    )


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGKILL it if the test process dies without cleaning up.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class ControlPlane:
    """A running control plane; `stop()` ends every process it started."""

    version: str
    server: str
    kubeconfig: Path
    workdir: Path
    pki: Pki
    start_seconds: float = 0.0
    _procs: list[_Proc] = field(default_factory=list, repr=False)

    # -- clients -----------------------------------------------------------------------------

    def client_configuration(self) -> kclient.Configuration:
        cfg = kclient.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.pki.ca_crt)
        cfg.cert_file = str(self.pki.admin_crt)
        cfg.key_file = str(self.pki.admin_key)
        cfg.verify_ssl = True
        return cfg

    def api_client(self) -> kclient.ApiClient:
        """A new admin (system:masters) client."""
        return kclient.ApiClient(self.client_configuration())

    # -- objects -----------------------------------------------------------------------------

    def create_node(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """A Node with capacity set through the status subresource, Ready and without taints."""
        api: Any = self.api_client()
        core: Any = kclient.CoreV1Api(api)
        try:
            all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
            core.create_node(
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}}
            )
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"}
            status = {
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "gpu-dra test ground: no kubelet, node is simulated",
                            "lastHeartbeatTime": now,
                            "lastTransitionTime": now,
                        }
                    ],
                    "addresses": [{"type": "Hostname", "address": name}],
                    "nodeInfo": {
                        "kubeletVersion": self.version,
                        "architecture": "amd64",
                        "operatingSystem": "linux",
                        "bootID": "",
                        "containerRuntimeVersion": "",
                        "kernelVersion": "",
                        "kubeProxyVersion": "",
                        "machineID": "",
                        "osImage": "",
                        "systemUUID": "",
                    },
                }
            }
            core.patch_node_status(name, status)
            # Admission (TaintNodesByCondition) puts not-ready:NoSchedule on every new node; the
            # node lifecycle controller, which is not running here, would lift it once Ready.
            core.patch_node(name, {"spec": {"taints": []}})
            node = core.read_node(name)
            out: dict[str, Any] = api.sanitize_for_serialization(node)
            return out
        finally:
            api.close()

    def create_namespace(self, name: str, timeout_s: float = 30.0) -> None:
        """A namespace whose `default` ServiceAccount exists (pods are rejected before that)."""
        api: Any = self.api_client()
        try:
            core: Any = kclient.CoreV1Api(api)
            core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    core.read_namespaced_service_account("default", name)
                    return
                except kclient.ApiException as e:
                    if e.status != 404 or time.monotonic() > deadline:
                        raise ControlPlaneError(
                            f"ServiceAccount {name}/default did not appear within {timeout_s}s; is the "
                            f"serviceaccount controller up? see {self.workdir}/kube-controller-manager.log"
                        ) from e
                time.sleep(0.1)
        finally:
            api.close()

    def service_account_token(
        self, namespace: str, name: str, bound_pod: str | None = None, expiration_s: int = 3600
    ) -> str:
        """A TokenRequest token; bound to `bound_pod` (already on a node) it names that node."""
        api: Any = self.api_client()
        try:
            core: Any = kclient.CoreV1Api(api)
            spec: dict[str, Any] = {"audiences": [], "expirationSeconds": expiration_s}
            if bound_pod is not None:
                pod = core.read_namespaced_pod(bound_pod, namespace)
                spec["boundObjectRef"] = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": bound_pod,
                    "uid": pod.metadata.uid,
                }
            tr = core.create_namespaced_service_account_token(
                name,
                namespace,
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
            token: str = tr.status.token
            return token
        finally:
            api.close()

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """A kubeconfig file that authenticates with `token` (e.g. a ServiceAccount's)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self._kubeconfig({"token": token})))
        return path

    def _kubeconfig(self, user: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.pki.ca_crt)},
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
            "current-context": "test",
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def logs_hint(self) -> str:
        return f"control plane {self.version} logs: {self.workdir}/*.log"

    def stop(self) -> None:
        """Stops every process, newest first (SIGTERM, SIGKILL after a grace period); logs stay."""
        # One at a time: the apiserver shuts down quickly only while etcd still answers.
        for p in reversed(self._procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
                try:
                    p.popen.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    log.warning("control plane process ignored SIGTERM", name=p.name, grace_s=STOP_GRACE_S)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.popen.pid, signal.SIGKILL)
                    p.popen.wait()
        self._procs.clear()
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        log.info("control plane stopped", version=self.version, logs=str(self.workdir))

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for the parent-death signal
            )
        proc = _Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def _fail(self, what: str) -> ControlPlaneError:
        tails = []
        for p in self._procs:
            lines = p.log_path.read_text(errors="replace").splitlines()[-15:] if p.log_path.exists() else []
            state = "running" if p.popen.poll() is None else f"exited {p.popen.returncode}"
            tails.append(f"--- {p.name} ({state}), {p.log_path}:\n" + "\n".join(lines))
        self.stop()
        return ControlPlaneError(f"{what}; {self.logs_hint()}\n" + "\n".join(tails))

    def _wait_ready(self, proc: _Proc, url: str, ssl_ctx: ssl.SSLContext, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise self._fail(f"{proc.name} exited with {proc.popen.returncode} during start-up")
            try:
                with urllib.request.urlopen(url, context=ssl_ctx, timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.1)
        raise self._fail(f"{proc.name} not ready at {url} within {START_TIMEOUT_S}s (last: {last})")


def _admin_ssl(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    ctx.load_cert_chain(str(pki.admin_crt), str(pki.admin_key))
    return ctx


def _self_signed_ok() -> ssl.SSLContext:
    # kube-scheduler/controller-manager serve health on a throwaway self-signed cert.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def start_control_plane(
    workdir: Path,
    version: str = "v1.36.3",
    extra_feature_gates: Mapping[str, bool] | None = None,
    *,
    node_lifecycle: bool = False,
    extra_controllers: Sequence[str] = (),
    apiserver_args: Sequence[str] = (),
) -> ControlPlane:
    """Starts etcd, kube-apiserver, kube-scheduler, kube-controller-manager; waits until ready.

    ``node_lifecycle`` adds the node-lifecycle controller (not-ready taints, eviction from dead
    nodes): only for clusters whose nodes are all real kubelets.

    ``extra_controllers`` run besides :data:`CONTROLLERS` (a real node needs
    ``daemonset-controller``); ``apiserver_args`` are appended to kube-apiserver's flags (a real
    node's egress selector).

    ``extra_feature_gates`` go to apiserver, scheduler and controller-manager after the
    version's own gates, overriding any of the same name (e.g. ``{"DRAPartitionableDevices":
    False}`` for a server that drops partitionable-device fields).
    """
    t0 = time.monotonic()
    bin_dir = k8s_bin_dir(version)
    workdir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(workdir / "pki")
    api_port, etcd_port, etcd_peer, sched_port, kcm_port = (free_port() for _ in range(5))
    server = f"https://127.0.0.1:{api_port}"
    cp = ControlPlane(
        version=version, server=server, kubeconfig=workdir / "admin.kubeconfig", workdir=workdir, pki=pki
    )
    cp.kubeconfig.write_text(
        yaml.safe_dump(
            cp._kubeconfig({"client-certificate": str(pki.admin_crt), "client-key": str(pki.admin_key)})
        )
    )
    atexit.register(cp.stop)
    gates = merge_feature_gates(feature_gates(version), extra_feature_gates)
    gate_flags = [f"--feature-gates={','.join(gates)}"] if gates else []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        etcd = cp._spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={workdir / 'etcd-data'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",  # test data; fsync only slows the shared disk
                "--log-level=warn",
            ],
        )
        cp._wait_ready(etcd, f"http://127.0.0.1:{etcd_port}/health", _self_signed_ok(), deadline)
        runtime = runtime_config(version)
        apiserver = cp._spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={pki.server_crt}",
                f"--tls-private-key-file={pki.server_key}",
                f"--client-ca-file={pki.ca_crt}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                # The API server's client identity towards kubelets (exec, logs): the admin cert.
                f"--kubelet-client-certificate={pki.admin_crt}",
                f"--kubelet-client-key={pki.admin_key}",
                *([f"--runtime-config={','.join(runtime)}"] if runtime else []),
                *gate_flags,
                *apiserver_args,
                "--v=1",
            ],
        )
        cp._wait_ready(apiserver, f"{server}/readyz", _admin_ssl(pki), deadline)
        common = [
            f"--kubeconfig={cp.kubeconfig}",
            f"--authentication-kubeconfig={cp.kubeconfig}",
            f"--authorization-kubeconfig={cp.kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            *gate_flags,
            "--v=1",
        ]
        sched = cp._spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                *common,
                f"--secure-port={sched_port}",
                f"--cert-dir={workdir / 'sched-certs'}",
            ],
        )
        controllers = [
            *CONTROLLERS,
            *(["node-lifecycle-controller"] if node_lifecycle else []),
            *extra_controllers,
        ]
        kcm = cp._spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                *common,
                f"--secure-port={kcm_port}",
                f"--cert-dir={workdir / 'kcm-certs'}",
                f"--controllers={','.join(controllers)}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_crt}",
                "--use-service-account-credentials=false",
                "--concurrent-gc-syncs=5",
            ],
        )
        cp._wait_ready(sched, f"https://127.0.0.1:{sched_port}/healthz", _self_signed_ok(), deadline)
        cp._wait_ready(kcm, f"https://127.0.0.1:{kcm_port}/healthz", _self_signed_ok(), deadline)
    except BaseException:
        cp.stop()
        raise
    cp.start_seconds = time.monotonic() - t0
    log.info(
        "control plane ready",
        version=version,
        server=server,
        seconds=round(cp.start_seconds, 2),
        logs=str(workdir),
    )
    return cp
