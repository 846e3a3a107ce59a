# HARNESS-READY
"""A GPU node for end-to-end tests: fake GPUs, the real plugin process, the real kubelet.

Why: the scenarios must show that gpu-dra serves users' manifests unchanged against a real API
server, scheduler and kubelet. A :class:`SimulatedNode` is everything a GPU node contributes: a
fake NVML topology and its state file, a fake driver root with the ``nvidia-smi`` /
``nvidia-cuda-mps-control`` stand-ins, the real ``python -m driver plugin`` process, and a kubelet
preparing what the scheduler allocated. That kubelet is the real one over a fake CRI runtime
(tests.ground.realkubelet; it registers the Node itself; a node asking for a v1beta1-only kubelet
gets the pinned 1.32 release) unless a test asks for the emulator (tests.ground.kubelet), which
only tests that inject kubelet-side faults should do. The plugin authenticates
with a token of the Helm chart's ServiceAccount bound to a placeholder Pod on its node (the token
then carries the node name), so the chart's RBAC and admission policy are exercised by every e2e
test.

Also here: applying and deleting manifests of any kind over plain REST, and a polling ``wait_for``.

What it does not do: run containers, start the control plane (``tests.ground.controlplane``),
or decide what a test asserts.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
import yaml
from kubernetes import client as kclient

from driver.checkpoint import PreparedClaim, decode
from driver.inventory import DRIVER_NAME
from driver.nvml.topology import load_topology
from tests.ground import peers
from tests.ground.controlplane import ControlPlane
from tests.ground.driverroot import FakeDriverRoot, make_fake_driver_root
from tests.ground.kubelet import KUBELET_132_SERVICES, KUBELET_134_SERVICES, KubeletEmulator
from tests.ground.realkubelet import RealKubelet
from tests.ground.standins import install_standins, read_gpu_state, read_journal

log = structlog.get_logger(__name__)

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "gpu-dra"
SCENARIOS = REPO / "tests" / "data" / "scenarios"

#: Release and namespace of the chart objects the simulated nodes run with. The release name
#: differs from the one tests/e2e/test_chart.py installs, so their cluster-scoped names never clash.
RELEASE = "e2e"
NAMESPACE = "gpu-dra-e2e"

#: ``kubelet=`` choices of a node: Kubernetes' kubelet over fakecri, or our kubelet emulator.
REAL_KUBELET = "real"
EMULATED_KUBELET = "emulator"

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
CLEANUP_TIMEOUT_S = 90.0
TOKEN_EXPIRATION_S = 24 * 3600
LOG_TAIL_LINES = 60

# Inherited variables that would configure the plugin behind the harness's back (flags win over
# their environment twins, but not every flag is passed).
_SCRUBBED_ENV = (
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    "NODE_NAME",
    "FEATURE_GATES",
    "NO_PUBLISH",
    "FAKE_CLAIMS_DIR",
    "FAKE_STATE",
    "FAKE_TOPOLOGY",
    "POD_UID",
    "STATE_DIR",
    "MIG_MODE",
    "ALLOW_MIG_MODE_CHANGE",
    "GPU_DRA_FAKE_NVML_STATE",
)


class HarnessError(RuntimeError):
    """The test ground could not reach the state a test needs; the message says where to look."""


# -- waiting -----------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    Raises:
        TimeoutError: naming ``what`` and the last falsy value (or exception) seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# -- REST for objects of any kind --------------------------------------------------------------

_discovery: dict[tuple[str, str], dict[str, tuple[str, bool]]] = {}
_discovery_lock = threading.Lock()


def request_json(
    api: kclient.ApiClient,
    method: str,
    path: str,
    body: Any = None,
    query: Sequence[tuple[str, str]] = (),
) -> Any:
    """One request with the client's credentials; the decoded JSON body (ApiException on errors)."""
    client: Any = api
    serialized = client.param_serialize(
        method,
        path,
        query_params=list(query),
        header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = client.call_api(*serialized)
    data = resp.read()
    if not 200 <= resp.status < 300:
        kclient.ApiException.from_response(http_resp=resp, body=data.decode("utf-8", "replace"), data=None)
    return json.loads(data) if data else None


def _group_path(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def _kind_info(api: kclient.ApiClient, api_version: str, kind: str) -> tuple[str, bool]:
    """(plural resource name, namespaced) of ``kind`` from the server's discovery."""
    key = (str(api.configuration.host), api_version)
    with _discovery_lock:
        kinds = _discovery.get(key)
    if kinds is None:
        doc = request_json(api, "GET", _group_path(api_version))
        kinds = {
            r["kind"]: (r["name"], bool(r["namespaced"])) for r in doc["resources"] if "/" not in r["name"]
        }
        with _discovery_lock:
            _discovery[key] = kinds
    if kind not in kinds:
        raise HarnessError(
            f"the API server does not serve kind {kind} in {api_version}; check the manifest's apiVersion"
        )
    return kinds[kind]


def object_path(api: kclient.ApiClient, obj: Mapping[str, Any], with_name: bool = True) -> str:
    """The REST path of ``obj`` (its collection when ``with_name`` is False)."""
    plural, namespaced = _kind_info(api, obj["apiVersion"], obj["kind"])
    base = _group_path(obj["apiVersion"])
    if namespaced:
        base += f"/namespaces/{obj['metadata'].get('namespace') or 'default'}"
    base += f"/{plural}"
    return f"{base}/{obj['metadata']['name']}" if with_name else base


def _load_docs(yaml_text_or_path: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(yaml_text_or_path, Path):
        text = yaml_text_or_path.read_text()
    elif isinstance(yaml_text_or_path, str):
        text = yaml_text_or_path
    else:
        return [json.loads(json.dumps(d)) for d in yaml_text_or_path]
    return [d for d in yaml.safe_load_all(text) if d]


def apply_manifests(
    api_client: kclient.ApiClient, yaml_text_or_path: str | Path | Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Create every object of a manifest (YAML text, a file, or dicts), in order; return them as stored.

    A new Namespace is waited for until its ``default`` ServiceAccount exists (pods are refused
    before). Namespaced objects without a namespace go to ``default``. The server's refusal is
    raised as the client's ApiException, unchanged, so tests can assert on it.
    """
    created: list[dict[str, Any]] = []
    for doc in _load_docs(yaml_text_or_path):
        obj = dict(doc)
        obj["metadata"] = dict(obj.get("metadata") or {})
        _, namespaced = _kind_info(api_client, obj["apiVersion"], obj["kind"])
        if namespaced:
            obj["metadata"].setdefault("namespace", "default")
        stored = request_json(api_client, "POST", object_path(api_client, obj, with_name=False), body=obj)
        created.append(stored)
        if obj["kind"] == "Namespace" and obj["apiVersion"] == "v1":
            name = obj["metadata"]["name"]
            sa_path = f"/api/v1/namespaces/{name}/serviceaccounts/default"
            wait_for(
                functools.partial(_exists, api_client, sa_path),
                30,
                f"ServiceAccount {name}/default (is the serviceaccount controller running?)",
            )
    return created


def _exists(api: kclient.ApiClient, path: str) -> bool:
    try:
        request_json(api, "GET", path)
    except kclient.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _gone(api: kclient.ApiClient, path: str) -> bool:
    return not _exists(api, path)


def delete_manifests(
    api_client: kclient.ApiClient,
    objects: Sequence[Mapping[str, Any]],
    wait: bool = True,
    timeout: float = CLEANUP_TIMEOUT_S,
) -> None:
    """Delete ``objects`` newest first (dependents in the background); with ``wait``, until all are gone.

    Deleting a Deployment or Job takes its pods with it; pods bound to a simulated node are
    finished by that node's kubelet emulator, so keep the nodes running until this returns.
    """
    paths = []
    for obj in reversed(list(objects)):
        path = object_path(api_client, obj)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            request_json(api_client, "DELETE", path, body=body)
        except kclient.ApiException as exc:
            if exc.status != 404:
                raise
        paths.append(
            (path, f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}")
        )
    if wait:
        for path, what in paths:
            wait_for(functools.partial(_gone, api_client, path), timeout, f"{what} to be deleted")


def scenario_path(name: str) -> Path:
    """``tests/data/scenarios/<name>/manifests.yaml``; ``name`` may be the number prefix ("01")."""
    direct = SCENARIOS / name / "manifests.yaml"
    if direct.is_file():
        return direct
    matches = sorted(SCENARIOS.glob(f"{name}-*/manifests.yaml"))
    if len(matches) != 1:
        known = ", ".join(sorted(p.name for p in SCENARIOS.iterdir() if p.is_dir()))
        raise HarnessError(f"no single scenario named {name!r} under {SCENARIOS}; known: {known}")
    return matches[0]


# -- the chart's cluster objects ---------------------------------------------------------------


@dataclass(frozen=True)
class ClusterObjects:
    """What :func:`install_cluster_objects` put on a control plane."""

    namespace: str
    service_account: str
    objects: tuple[dict[str, Any], ...]
    device_classes: tuple[dict[str, Any], ...]


_installed: dict[str, ClusterObjects] = {}
_install_lock = threading.Lock()


def render_chart(
    control_plane: ControlPlane, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """``helm template`` of deploy/helm/gpu-dra with default values for the control plane's version."""
    home = control_plane.workdir / "helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    argv = [
        str(peers.helm_path()), "template", release, str(CHART), "--namespace", namespace,
        "--kube-version", control_plane.version,
    ]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise HarnessError(f"helm template of {CHART} failed ({proc.returncode}): {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def install_cluster_objects(control_plane: ControlPlane, *, device_classes: bool = True) -> ClusterObjects:
    """Once per control plane: the chart's ServiceAccount, RBAC, admission policy (and DeviceClasses).

    The DaemonSet is left out (simulated nodes start the plugin themselves). With
    ``device_classes=False`` the classes are only rendered (returned in ``device_classes``);
    :func:`ensure_device_classes` creates them for one test. That keeps them off the cluster
    between tests, where tests/e2e/test_chart.py installs the chart with the same class names.
    """
    with _install_lock:
        done = _installed.get(control_plane.server)
        if done is not None:
            if device_classes:
                with control_plane.api_client() as api:
                    ensure_device_classes(api, done)
            return done
        rendered = render_chart(control_plane)
        classes = tuple(o for o in rendered if o["kind"] == "DeviceClass")
        objects = tuple(o for o in rendered if o["kind"] not in ("DeviceClass", "DaemonSet"))
        sa = next(o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount")
        try:
            control_plane.create_namespace(NAMESPACE)
        except kclient.ApiException as exc:
            if exc.status != 409:
                raise
        with control_plane.api_client() as api:
            for obj in objects:
                try:
                    apply_manifests(api, [{**obj, "metadata": {**obj["metadata"], "namespace": NAMESPACE}}])
                except kclient.ApiException as exc:
                    if exc.status != 409:
                        raise
            done = ClusterObjects(NAMESPACE, sa, objects, classes)
            if device_classes:
                ensure_device_classes(api, done)
        _installed[control_plane.server] = done
        log.info(
            "chart objects installed",
            namespace=NAMESPACE,
            service_account=sa,
            kinds=sorted({o["kind"] for o in objects}),
        )
        return done


def ensure_device_classes(api: kclient.ApiClient, objects: ClusterObjects) -> list[dict[str, Any]]:
    """Create the chart's DeviceClasses that do not exist yet; return the ones created here."""
    created: list[dict[str, Any]] = []
    for cls in objects.device_classes:
        try:
            created.extend(apply_manifests(api, [cls]))
        except kclient.ApiException as exc:
            if exc.status != 409:
                raise
    return created


# -- the node ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Runs in the child before exec: the plugin must not outlive a crashed test process. Linux
    # sends the signal when the *thread* that forked the child ends, so plugins are started from
    # long-lived threads only (never from a thread pool).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def v1beta1_kubelet_version() -> str | None:
    """The release of the real v1beta1-only kubelet (pins.env K8S_KUBELET_V1BETA1), if pinned."""
    return peers.pins().get("K8S_KUBELET_V1BETA1") or None


def kubelet_for(kubelet_services: Sequence[str], kubelet: str | None) -> str:
    """The kubelet a node gets: ``kubelet`` if given, else the real one: the primary release for
    DRA v1 (``KUBELET_134_SERVICES``), the pinned 1.32 release for v1beta1 only; the emulator for
    any other service list, or v1beta1 only when no 1.32 kubelet is pinned."""
    if kubelet is not None:
        if kubelet not in (REAL_KUBELET, EMULATED_KUBELET):
            raise ValueError(f"kubelet={kubelet!r}: pick {REAL_KUBELET!r} or {EMULATED_KUBELET!r}")
        return kubelet
    services = tuple(kubelet_services)
    if services == KUBELET_134_SERVICES or (services == KUBELET_132_SERVICES and v1beta1_kubelet_version()):
        return REAL_KUBELET
    return EMULATED_KUBELET


class SimulatedNode:
    """A GPU node: fake NVML topology + fake driver root (with nvidia-smi / nvidia-cuda-mps-control
    stand-ins) + the real ``gpu-dra plugin`` process + a kubelet (real by default, see the module
    docstring), against the real control plane."""

    def __init__(
        self,
        control_plane: ControlPlane,
        name: str,
        topology: str,
        workdir: Path,
        *,
        kubelet_services: Sequence[str] = KUBELET_134_SERVICES,
        kubelet: str | None = None,
        kubelet_version: str | None = None,
        mig_mode: str = "dynamic",
        allow_mig_mode_change: bool = False,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        pod_uid: str | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.name = name
        self.topology = topology
        self.workdir = Path(workdir)
        self.kubelet_services = tuple(kubelet_services)
        self.kubelet_kind = kubelet_for(self.kubelet_services, kubelet)
        self.mig_mode = mig_mode
        self.allow_mig_mode_change = allow_mig_mode_change
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.pod_uid = pod_uid
        self.gpu_minors = tuple(g.minor for g in load_topology(topology).gpus)

        # Unix socket paths are limited to 108 bytes: sockets (and MPS pipes) live in a short dir.
        self.socket_base = Path(tempfile.mkdtemp(prefix="gsn-", dir="/tmp"))
        self.mps_root = self.socket_base / "mps"
        self.cdi_root = self.workdir / "cdi"
        self.state_dir = self.workdir / "state"
        self.fake_state = self.workdir / "fake-nvml.json"
        self.plugin_log = self.workdir / "plugin.log"
        self.kubeconfig = self.workdir / "plugin.kubeconfig"
        self.driver_root: FakeDriverRoot | None = None
        self.cluster_objects: ClusterObjects | None = None
        self.placeholder_pod = f"gpu-dra-plugin-{name}"
        self.node: dict[str, Any] | None = None
        self.api = control_plane.api_client()
        self.kubelet: RealKubelet | KubeletEmulator
        if self.kubelet_kind == REAL_KUBELET:
            if kubelet_version is None and self.kubelet_services == KUBELET_132_SERVICES:
                kubelet_version = v1beta1_kubelet_version()
            self.kubelet = RealKubelet(
                control_plane,
                name,
                self.socket_base,
                self.workdir / "kubelet",
                labels={"nvidia.com/gpu.present": "true"},
                version=kubelet_version,
            )
            self.registry_dir = self.kubelet.registry_dir
            self.plugins_dir = self.kubelet.plugins_dir
        else:
            self.registry_dir = self.socket_base / "reg"
            self.plugins_dir = self.socket_base / "plug"
            self.kubelet = KubeletEmulator(
                name, self.api, self.registry_dir, known_services=self.kubelet_services
            )
        self._proc: subprocess.Popen[bytes] | None = None
        self._retired: list[subprocess.Popen[bytes]] = []
        self._started = False
        self._t0 = time.monotonic()
        self._registrations_before = 0

    def __repr__(self) -> str:
        return f"SimulatedNode({self.name!r}, {self.topology!r}, kubelet={self.kubelet_kind})"

    @property
    def emulator(self) -> RealKubelet | KubeletEmulator:
        """The node's kubelet (:attr:`kubelet`) under its old name; both record alike."""
        return self.kubelet

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> SimulatedNode:
        """Node object, driver root, plugin process; returns once registered and slices are published."""
        return self.launch().wait_ready()

    def launch(self) -> SimulatedNode:
        """The first half of :meth:`start`: everything up to starting the plugin, without waiting.

        Call it from a thread that outlives the node (the main thread): the plugin gets SIGKILL
        when the thread that started it ends, so a crashed test leaves no plugin behind.
        """
        self._t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_objects = install_cluster_objects(self.control_plane, device_classes=False)
        self._started = True
        if isinstance(self.kubelet, RealKubelet):
            self.kubelet.start()
            self.node = self.kubelet.wait_node_ready(self.api)
        else:
            self.node = self.control_plane.create_node(self.name, labels={"nvidia.com/gpu.present": "true"})
        self.driver_root = make_fake_driver_root(self.workdir / "driver-root", self.gpu_minors)
        install_standins(self.driver_root.bin_dir, self.fake_state)
        self._write_kubeconfig()
        if isinstance(self.kubelet, KubeletEmulator):
            self.kubelet.start()
        self._registrations_before = self._ok_registrations()
        self.start_plugin(wait=False)
        return self

    def wait_ready(self) -> SimulatedNode:
        """The second half of :meth:`start`: registered, pool published, the kubelet syncing pods."""
        self._wait_registered(self._registrations_before)
        self.wait_published()
        if isinstance(self.kubelet, KubeletEmulator):
            self.kubelet.start_pod_sync()
        log.info(
            "simulated node ready",
            node=self.name,
            topology=self.topology,
            kubelet=self.kubelet_kind,
            seconds=round(time.monotonic() - self._t0, 2),
        )
        return self

    def _write_kubeconfig(self) -> None:
        assert self.cluster_objects is not None
        ns, sa = self.cluster_objects.namespace, self.cluster_objects.service_account
        core: Any = kclient.CoreV1Api(self.api)
        core.create_namespaced_pod(
            ns,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": self.placeholder_pod,
                    "labels": {"app.kubernetes.io/component": "kubelet-plugin"},
                },
                "spec": {
                    "nodeName": self.name,
                    "serviceAccountName": sa,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 0,
                    # Nothing runs it: it only gives the plugin's token its node.
                    "containers": [{"name": "plugin", "image": "registry.invalid/gpu-dra:simulated"}],
                },
            },
        )
        token = self.control_plane.service_account_token(
            ns, sa, bound_pod=self.placeholder_pod, expiration_s=TOKEN_EXPIRATION_S
        )
        self.control_plane.kubeconfig_for_token(token, self.kubeconfig)

    def plugin_argv(self) -> list[str]:
        assert self.driver_root is not None
        root = str(self.driver_root.root)
        argv = [
            sys.executable, "-m", "driver", "plugin",
            "--node-name", self.name,
            "--kubeconfig", str(self.kubeconfig),
            "--namespace", NAMESPACE,
            "--nvml-backend", "fake",
            "--fake-topology", self.topology,
            "--fake-state", str(self.fake_state),
            "--cdi-root", str(self.cdi_root),
            "--kubelet-registrar-directory-path", str(self.registry_dir),
            "--kubelet-plugins-directory-path", str(self.plugins_dir),
            "--state-dir", str(self.state_dir),
            "--driver-root", root,
            "--container-driver-root", root,
            "--dev-root", root,
            "--proc-root", str(self.driver_root.proc_dir),
            "--mps-root", str(self.mps_root),
            "--mig-mode", self.mig_mode,
            "--allow-mig-mode-change", "true" if self.allow_mig_mode_change else "false",
            "--log-format", "json",
        ]  # fmt: skip
        if self.pod_uid:
            argv += ["--pod-uid", self.pod_uid]
        return argv + list(self.extra_args)

    def start_plugin(self, wait: bool = True) -> None:
        """Start the plugin process (again, same state dirs); ``wait``: until the kubelet registered it."""
        if self._proc is not None and self._proc.poll() is None:
            raise HarnessError(f"the plugin on {self.name} is already running (pid {self._proc.pid})")
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.update(self.env)
        before = self._ok_registrations()
        with self.plugin_log.open("ab") as out:
            out.write(
                f"---- harness: starting plugin on {self.name} at {time.strftime('%H:%M:%S')}\n".encode()
            )
            out.flush()
            self._proc = subprocess.Popen(
                self.plugin_argv(),
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for the parent-death signal
            )
        if wait:
            self._wait_registered(before)

    def start_successor(self, pod_uid: str) -> subprocess.Popen[bytes] | None:
        """A rolling update: a new plugin instance (``--pod-uid``) beside the running one.

        Returns once the kubelet registered it; from then on it is this node's plugin
        (``kill_plugin``, ``plugin_pid`` act on it). The old process is returned for the test to
        end; :meth:`stop` ends it too.
        """
        old = self._proc
        if old is not None:
            self._retired.append(old)
        self.pod_uid = pod_uid
        self._proc = None
        self.start_plugin()
        return old

    def _ok_registrations(self) -> int:
        return len([r for r in self.kubelet.registrations if r.ok])

    def _wait_registered(self, before: int) -> None:
        self._wait_plugin(
            lambda: self._ok_registrations() > before and self.kubelet.is_connected(DRIVER_NAME),
            f"the plugin to register with the {self.kubelet_kind} kubelet",
        )

    def _wait_plugin(
        self, predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self._proc is not None and self._proc.poll() is not None:
                raise HarnessError(
                    f"the plugin on {self.name} exited with {self._proc.returncode} "
                    f"while waiting for {what}\n" + self.diagnostics()
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"timed out after {timeout}s waiting for {what} on {self.name}\n{self.diagnostics()}"
                )
            time.sleep(0.05)

    def wait_published(self, timeout: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Wait until this node's pool is complete (one generation, all slices) and names every full GPU."""
        want = {f"gpu-{m}" for m in self.gpu_minors}
        found: list[dict[str, Any]] = []

        def complete() -> bool:
            nonlocal found
            slices = [s for s in self.slices() if s["spec"]["driver"] == DRIVER_NAME]
            if not slices:
                return False
            pools = {
                (s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"]) for s in slices
            }
            if len(pools) != 1 or next(iter(pools))[1] != len(slices):
                return False
            names = {d["name"] for s in slices for d in s["spec"].get("devices") or []}
            found = slices
            return want <= names

        self._wait_plugin(complete, f"ResourceSlices naming {sorted(want)}", timeout)
        return found

    @property
    def plugin_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def plugin_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill_plugin(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the plugin; for SIGKILL/SIGTERM/SIGINT wait until it has exited."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("plugin ignored signal, killing", node=self.name, signal=sig)
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """Stop plugin and kubelet, delete the placeholder pod, the Node and its slices. Idempotent."""
        self.kill_plugin(signal.SIGTERM)
        for old in self._retired:
            if old.poll() is None:
                old.terminate()
                try:
                    old.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    old.kill()
                    old.wait()
        self.kubelet.stop()
        if self._started:
            self._started = False
            core: Any = kclient.CoreV1Api(self.api)
            ns = self.cluster_objects.namespace if self.cluster_objects else NAMESPACE
            with contextlib.suppress(kclient.ApiException):
                core.delete_namespaced_pod(self.placeholder_pod, ns, grace_period_seconds=0)
            with contextlib.suppress(kclient.ApiException):
                core.delete_node(self.name)
            res: Any = kclient.ResourceV1Api(self.api)
            # The garbage collector would remove them too, but a re-created node of the same name
            # in the next test must not meet the old pool.
            with contextlib.suppress(kclient.ApiException):
                res.delete_collection_resource_slice(field_selector=f"spec.nodeName={self.name}")
            wait_for(lambda: not self.slices(), 30, f"ResourceSlices of {self.name} to be deleted")
            wait_for(
                lambda: not _exists(self.api, f"/api/v1/nodes/{self.name}"),
                30,
                f"Node {self.name} to be deleted",
            )
        shutil.rmtree(self.socket_base, ignore_errors=True)
        log.info("simulated node stopped", node=self.name)

    def close(self) -> None:
        """Stop and release the API client."""
        self.stop()
        closer: Any = self.api.close
        closer()

    # -- views ----------------------------------------------------------------------------------

    def identity(self) -> tuple[str, list[str]]:
        """(user name, node-name claim) the API server sees for the plugin's token (TokenReview)."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        token = config["users"][0]["user"]["token"]
        review = request_json(
            self.api,
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
        )
        user = review["status"].get("user") or {}
        nodes = (user.get("extra") or {}).get("authentication.kubernetes.io/node-name") or []
        return str(user.get("username", "")), list(nodes)

    def checkpoint(self) -> dict[str, PreparedClaim]:
        """The plugin's checkpoint (claims by UID); empty when none was written yet."""
        path = self.state_dir / "checkpoint.json"
        if not path.exists():
            return {}
        _, claims = decode(path.read_text())
        return claims

    def cdi_spec_path(self, claim_uid: str) -> Path:
        from cdi.names import claim_spec_filename

        return self.cdi_root / claim_spec_filename(claim_uid)

    def cdi_spec(self, claim_uid: str) -> dict[str, Any] | None:
        """The claim's CDI spec as written by the plugin, parsed; None when there is none."""
        path = self.cdi_spec_path(claim_uid)
        if not path.exists():
            return None
        spec: dict[str, Any] = json.loads(path.read_text())
        return spec

    def gpu_state(self) -> dict[str, Any]:
        """``gpus`` of the fake NVML state file (computeMode, timeslice, mig ... by UUID)."""
        return read_gpu_state(self.fake_state)

    def journal(self) -> list[dict[str, Any]]:
        """What the nvidia-smi / nvidia-cuda-mps-control stand-ins were asked, oldest first."""
        return read_journal(self.fake_state)

    def slices(self) -> list[dict[str, Any]]:
        """This node's ResourceSlices (all drivers) as the API server has them."""
        doc = request_json(
            self.api,
            "GET",
            "/apis/resource.k8s.io/v1/resourceslices",
            query=[("fieldSelector", f"spec.nodeName={self.name}")],
        )
        items: list[dict[str, Any]] = doc.get("items") or []
        return items

    def plugin_events(self) -> list[dict[str, Any]]:
        """The plugin's JSON log lines, parsed (other lines skipped)."""
        if not self.plugin_log.exists():
            return []
        out = []
        for line in self.plugin_log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.plugin_log.exists():
            return "(no plugin log yet)"
        return "\n".join(self.plugin_log.read_text(errors="replace").splitlines()[-lines:])

    def diagnostics(self, lines: int = LOG_TAIL_LINES) -> str:
        """Plugin state and log tail plus the kubelet's records: what a failing test should show."""
        if self._proc is None:
            state = "not started"
        elif self._proc.poll() is None:
            state = f"running (pid {self._proc.pid})"
        else:
            state = f"exited {self._proc.returncode}"
        parts = [
            f"node {self.name} ({self.topology}, {self.kubelet_kind} kubelet); plugin {state}",
            f"workdir {self.workdir}; plugin log {self.plugin_log}",
            *self.kubelet.diagnostics(),
            f"--- last {lines} lines of the plugin log:",
            self.log_tail(lines),
        ]
        return "\n".join(parts)


def start_nodes(nodes: Sequence[SimulatedNode]) -> list[SimulatedNode]:
    """Start several nodes at once: all plugins are launched first, then waited for.

    No threads: a plugin dies with the thread that started it (see :meth:`SimulatedNode.launch`).
    If one node fails, all of them are stopped.
    """
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
    except BaseException:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()
        raise
    return list(nodes)


# -- a test's (or the demo's) set of nodes and objects -----------------------------------------


@dataclass(frozen=True)
class Cluster:
    """A control plane with the chart's objects installed (the e2e ``cluster`` fixture)."""

    control_plane: ControlPlane
    api: kclient.ApiClient
    objects: ClusterObjects


def start_cluster_objects(control_plane: ControlPlane, api: kclient.ApiClient) -> Cluster:
    return Cluster(control_plane, api, install_cluster_objects(control_plane, device_classes=False))


class NodeFactory:
    """Creates simulated nodes and applies manifests for one test; :meth:`cleanup` undoes all of it.

    While it lives, every other Node is cordoned, so the scheduler only sees this test's nodes
    (leftover nodes of other tests may still publish GPUs); they are uncordoned at cleanup.
    The chart's DeviceClasses exist while it lives (created here unless they already existed).
    """

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        *,
        kubelet_services: Sequence[str] = KUBELET_134_SERVICES,
        kubelet: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.api = cluster.api
        self.workdir = Path(workdir)
        self.kubelet_services = tuple(kubelet_services)
        #: ``kubelet=`` for new nodes (None: the real kubelet unless ``kubelet_services`` asks for 1.32).
        self.kubelet = kubelet
        self.nodes: list[SimulatedNode] = []
        self.applied: list[dict[str, Any]] = []
        self._fenced = self._cordon_others()
        self._classes = ensure_device_classes(self.api, cluster.objects)

    def node(self, name: str, topology: str, **kwargs: Any) -> SimulatedNode:
        """A node registered for cleanup, not started yet."""
        kwargs.setdefault("kubelet_services", self.kubelet_services)
        kwargs.setdefault("kubelet", self.kubelet)
        node = SimulatedNode(self.cluster.control_plane, name, topology, self.workdir / name, **kwargs)
        self.nodes.append(node)
        return node

    def __call__(self, name: str, topology: str, *, start: bool = True, **kwargs: Any) -> SimulatedNode:
        """A node registered for cleanup, started unless ``start=False``."""
        node = self.node(name, topology, **kwargs)
        return node.start() if start else node

    def start_all(self, specs: Sequence[tuple[str, str]], **kwargs: Any) -> list[SimulatedNode]:
        """Nodes (name, topology) started in parallel, all with the same keyword arguments."""
        return start_nodes([self.node(name, topology, **kwargs) for name, topology in specs])

    def by_name(self, name: str) -> SimulatedNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no simulated node {name!r}; have {[n.name for n in self.nodes]}")

    def apply(self, manifests: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:func:`apply_manifests`, remembering the objects for cleanup."""
        docs = _load_docs(manifests)
        created: list[dict[str, Any]] = []
        try:
            for doc in docs:
                created.extend(apply_manifests(self.api, [doc]))
        finally:
            self.applied.extend(created)
        return created

    def delete(self, objects: Sequence[Mapping[str, Any]], wait: bool = True) -> None:
        """:func:`delete_manifests` of objects applied here (forgotten for cleanup)."""
        keys = {_key(o) for o in objects}
        self.applied = [o for o in self.applied if _key(o) not in keys]
        delete_manifests(self.api, objects, wait=wait)

    def diagnostics(self) -> str:
        return "\n\n".join(n.diagnostics() for n in self.nodes)

    # -- cleanup --------------------------------------------------------------------------------

    def _cordon_others(self) -> list[str]:
        core: Any = kclient.CoreV1Api(self.api)
        fenced = []
        for node in core.list_node().items:
            if not node.spec.unschedulable:
                core.patch_node(node.metadata.name, {"spec": {"unschedulable": True}})
                fenced.append(node.metadata.name)
        if fenced:
            log.info("cordoned nodes of other tests", nodes=fenced)
        return fenced

    def _allocated_on_our_pools(self) -> list[str]:
        pools = {n.name for n in self.nodes}
        doc = request_json(self.api, "GET", "/apis/resource.k8s.io/v1/resourceclaims")
        held = []
        for claim in doc.get("items") or []:
            results = (((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}).get(
                "results"
            ) or []
            if any(r.get("pool") in pools for r in results):
                held.append(f"{claim['metadata']['namespace']}/{claim['metadata']['name']}")
        return held

    def _pods_on_our_nodes(self) -> list[tuple[str, str]]:
        out = []
        for node in self.nodes:
            doc = request_json(
                self.api, "GET", "/api/v1/pods", query=[("fieldSelector", f"spec.nodeName={node.name}")]
            )
            for pod in doc.get("items") or []:
                meta = pod["metadata"]
                if meta["name"] != node.placeholder_pod:
                    out.append((meta["namespace"], meta["name"]))
        return out

    def cleanup(self) -> None:
        """Delete what was applied (waiting, while the nodes still finish their pods), then the nodes."""
        errors: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(f"{what}: {type(exc).__name__}: {exc}")

        step("deleting applied objects", lambda: delete_manifests(self.api, self.applied))
        self.applied = []
        step(
            "waiting for pods on the simulated nodes to go",
            lambda: wait_for(
                lambda: not self._pods_on_our_nodes(), 60, "pods on the simulated nodes to be deleted"
            ),
        )
        for ns, name in self._safe(self._pods_on_our_nodes):
            step(
                f"force-deleting pod {ns}/{name}",
                functools.partial(
                    request_json,
                    self.api,
                    "DELETE",
                    f"/api/v1/namespaces/{ns}/pods/{name}",
                    query=[("gracePeriodSeconds", "0")],
                ),
            )
        step(
            "waiting for claims allocated on the simulated nodes to go",
            lambda: wait_for(
                lambda: not self._allocated_on_our_pools(),
                60,
                "claims allocated on the simulated nodes to be freed",
            ),
        )
        for node in self.nodes:
            step(f"stopping node {node.name}", node.close)
        self.nodes = []
        step("deleting DeviceClasses", lambda: delete_manifests(self.api, self._classes))
        core: Any = kclient.CoreV1Api(self.api)
        for name in self._fenced:
            step(
                f"uncordoning {name}",
                functools.partial(core.patch_node, name, {"spec": {"unschedulable": False}}),
            )
        self._fenced = []
        if errors:
            raise HarnessError("cleanup of the simulated nodes failed:\n" + "\n".join(errors))

    @staticmethod
    def _safe(fn: Callable[[], list[T]]) -> list[T]:
        try:
            return fn()
        except Exception:
            return []


def _key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace") or "", meta["name"])


# -- reading what the cluster did ----------------------------------------------------------------


def get_json(api: kclient.ApiClient, path: str, query: Sequence[tuple[str, str]] = ()) -> Any:
    """GET ``path`` (e.g. ``/api/v1/namespaces/ns/pods/name``) as JSON."""
    return request_json(api, "GET", path, query=query)


def list_pods(api: kclient.ApiClient, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
    query = [("labelSelector", label_selector)] if label_selector else []
    items: list[dict[str, Any]] = (
        get_json(api, f"/api/v1/namespaces/{namespace}/pods", query).get("items") or []
    )
    return items


def wait_for_pod(
    api: kclient.ApiClient,
    namespace: str,
    label_selector: str,
    condition: Callable[[dict[str, Any]], object],
    *,
    timeout: float,
    what: str,
) -> dict[str, Any]:
    """Wait until exactly one pod matches ``label_selector`` and ``condition`` holds for it."""

    def probe() -> dict[str, Any] | None:
        pods = list_pods(api, namespace, label_selector)
        return pods[0] if len(pods) == 1 and condition(pods[0]) else None

    return wait_for(probe, timeout, what)


def pod_phase_on(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(node name or "", phase) of a pod."""
    return (pod.get("spec", {}).get("nodeName") or "", (pod.get("status") or {}).get("phase") or "")


def unschedulable_message(pod: Mapping[str, Any]) -> str:
    """The scheduler's message when it found no node for the pod ("" otherwise)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return str(cond.get("message") or "unschedulable")
    return ""


def pod_claim(api: kclient.ApiClient, pod: Mapping[str, Any], pod_claim_name: str) -> dict[str, Any] | None:
    """The ResourceClaim behind a pod's claim entry (named, or made from a template); None if not yet."""
    ns = pod["metadata"]["namespace"]
    name = None
    for entry in pod["spec"].get("resourceClaims") or []:
        if entry["name"] == pod_claim_name and entry.get("resourceClaimName"):
            name = entry["resourceClaimName"]
    for status in (pod.get("status") or {}).get("resourceClaimStatuses") or []:
        if status["name"] == pod_claim_name and status.get("resourceClaimName"):
            name = status["resourceClaimName"]
    if name is None:
        return None
    claim: dict[str, Any] = get_json(api, f"/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims/{name}")
    return claim


def allocation_results(claim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``status.allocation.devices.results`` of a claim ([] when not allocated)."""
    results: list[dict[str, Any]] = (
        ((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}
    ).get("results") or []
    return results


def slice_device(node: SimulatedNode, device: str) -> dict[str, Any]:
    """The published entry of ``device`` in the node's pool."""
    for s in node.slices():
        for d in s["spec"].get("devices") or []:
            if d["name"] == device:
                found: dict[str, Any] = d
                return found
    raise HarnessError(f"device {device} is not in the ResourceSlices of {node.name}")


def cdi_inject(spec_dir: Path, *device_ids: str) -> dict[str, Any]:
    """The OCI spec the CDI project's library makes from ``spec_dir`` for ``device_ids``."""
    proc = subprocess.run(
        [str(peers.cdi_path()), "inject", "--spec-dirs", str(spec_dir), *device_ids],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise HarnessError(
            f"cdi inject {' '.join(device_ids)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    oci: dict[str, Any] = json.loads(proc.stdout)
    return oci
