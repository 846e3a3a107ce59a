"""The Helm chart against the pinned helm and a real API server.

Why: a chart that lints can still render objects the API server refuses (a CEL typo in the
admission policy, a DeviceClass field the version does not know), and `helm install` can still
fail on ownership or ordering. Here the pinned helm lints and renders the chart for the default
and for non-default values, the real API server accepts every rendered object (server-side
apply, dry run), and one release is installed, upgraded and uninstalled.

What it does not do: run the DaemonSet's pods (there is no kubelet; the DaemonSet controller is
off) or check what the policy and RBAC allow (tests/e2e/test_node_restriction.py does).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient
from kubernetes import dynamic

from tests.ground import peers
from tests.ground.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "gpu-dra"
FIELD_MANAGER = "gpu-dra-chart-test"
WAIT_S = 30.0


@dataclass(frozen=True)
class Helm:
    """The pinned helm binary, pointed at one control plane, with its own cache/config dirs."""

    binary: Path
    kubeconfig: Path
    home: Path
    kube_version: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "KUBECONFIG": str(self.kubeconfig),
        }
        proc = subprocess.run(
            [str(self.binary), *args], env=env, capture_output=True, text=True, check=False, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def template(self, release: str, namespace: str, sets: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The rendered objects (comments and empty documents dropped)."""
        out = self.run(
            "template", release, str(CHART), "--namespace", namespace,
            "--kube-version", self.kube_version, *_set_flags(sets),
        ).stdout  # fmt: skip
        return [doc for doc in yaml.safe_load_all(out) if doc]


def _set_flags(sets: Sequence[str]) -> list[str]:
    # --set-json keeps types exact (booleans stay booleans, "" stays a string).
    flags: list[str] = []
    for item in sets:
        flags += ["--set-json", item]
    return flags


def make_helm(control_plane: ControlPlane, home: Path) -> Helm:
    return Helm(peers.helm_path(), control_plane.kubeconfig, home, control_plane.version)


@pytest.fixture(scope="module")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return make_helm(control_plane, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def dyn(kube_client: kclient.ApiClient) -> Any:
    return dynamic.DynamicClient(kube_client)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def namespace(control_plane: ControlPlane) -> str:
    ns = f"chart-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    return ns


# name -> --set-json items. Each variant changes something a cluster really differs in.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "custom-dirs-static-mig": [
        'kubeletDirs={"registrar":"/var/lib/k0s/kubelet/plugins_registry","plugins":"/var/lib/k0s/kubelet/plugins"}',
        'nvidiaDriverRoot="/run/nvidia/driver"',
        'cdiRoot="/etc/cdi"',
        'stateDir="/var/lib/gpu-dra"',
        'plugin.migMode="static"',
        "plugin.allowMigModeChange=true",
        'plugin.featureGates={"MPSSupport":true,"TimeSlicingSettings":true}',
        'plugin.extraArgs=["--healthcheck-port=51515"]',
        'plugin.nodeSelector={"gpu":"yes"}',
        'plugin.priorityClassName=""',
        'plugin.podAnnotations={"example.com/a":"b"}',
        'imagePullSecrets=[{"name":"regcred"}]',
        'image={"repository":"registry.example.com/gpu-dra","tag":"0.1.0-rc1","pullPolicy":"Always"}',
        "deviceClasses.gpuExtendedResource=true",
    ],
    "no-policy-named-sa-no-er": [
        "admissionPolicy.enabled=false",
        'serviceAccount.name="gpu-plugin"',
        "deviceClasses.gpuExtendedResource=false",
        'fullnameOverride="gpu"',
    ],
    "bring-your-own-sa-and-rbac": [
        "serviceAccount.create=false",
        'serviceAccount.name="existing-sa"',
        "rbac.create=false",
        "deviceClasses.create=false",
    ],
}


def _kinds(objs: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objs}


def _one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _env(ds: dict[str, Any]) -> dict[str, Any]:
    container = ds["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _dry_run_apply(dyn: Any, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    kwargs: dict[str, Any] = {"namespace": namespace} if resource.namespaced else {}
    result = dyn.server_side_apply(
        resource,
        body=obj,
        name=obj["metadata"]["name"],
        field_manager=FIELD_MANAGER,
        force_conflicts=True,
        dry_run="All",
        **kwargs,
    )
    out: dict[str, Any] = result.to_dict()
    return out


# -- lint and render ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint(helm: Helm, variant: str) -> None:
    proc = helm.run(
        "lint", str(CHART), "--strict", "--kube-version", helm.kube_version, *_set_flags(VARIANTS[variant])
    )
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_are_accepted_by_the_api_server(
    helm: Helm, dyn: Any, namespace: str, variant: str
) -> None:
    objs = helm.template("chart-test", namespace, VARIANTS[variant])
    assert "DaemonSet" in _kinds(objs)
    for obj in objs:
        applied = _dry_run_apply(dyn, obj, namespace)
        assert applied["kind"] == obj["kind"]
        assert applied["metadata"]["name"] == obj["metadata"]["name"]
        # The server keeps every field we send: a dropped field means a gate is off or the field is
        # unknown at this version, and the plugin or the cluster would not get what the chart says.
        if obj["kind"] in ("DeviceClass", "ValidatingAdmissionPolicy", "ClusterRole"):
            for key in ("spec", "rules"):
                if key not in obj:
                    continue
                want = obj[key]
                if obj["kind"] == "DeviceClass" and _minor(helm.kube_version) < 36 and key == "spec":
                    # Before 1.36 DRAExtendedResource is off: a forced mapping is dropped, as the
                    # values documentation says ("auto" does not render it there).
                    want = {k: v for k, v in want.items() if k != "extendedResourceName"}
                    assert "extendedResourceName" not in applied[key]
                assert _subset(want, applied[key]), f"server dropped fields of {obj['kind']}.{key}"


def _minor(version: str) -> int:
    return int(version.lstrip("v").split(".")[1])


def _subset(want: Any, got: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _subset(v, got[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(want) == len(got) and all(map(_subset, want, got))
    return bool(want == got)


def test_default_render(helm: Helm) -> None:
    objs = helm.template("rel", "gpu-system")
    assert _kinds(objs) == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "DeviceClass",
        "DaemonSet",
    }
    sa = _one(objs, "ServiceAccount")["metadata"]
    assert (sa["name"], sa["namespace"]) == ("rel-gpu-dra-kubelet-plugin", "gpu-system")

    ds = _one(objs, "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["name"]
    container = pod["containers"][0]
    assert container["command"] == ["gpu-dra", "plugin"]
    assert "args" not in container
    assert container["image"] == "ghcr.io/gpu-dra/gpu-dra:0.1.0"
    env = _env(ds)
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["STATE_DIR"] == "/var/lib/kubelet/plugins/gpu.nvidia.com"
    assert env["DRIVER_ROOT_CTR_PATH"] == "/driver-root"
    assert "FEATURE_GATES" not in env
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 51516}  # the kubelet's own probe, no exec
    assert env["HEALTHCHECK_PORT"] == "51516"
    assert env["HEALTHCHECK_ADDRESS"] == "$(POD_IP)"
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["MPS_ROOT"] == "/run/nvidia/mps"  # the plugin's own --mps-root default
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # Sockets and CDI specs are read by the kubelet and the runtime on the host: same path inside.
    for name in ("registrar", "plugins", "cdi", "state", "mps", "host-dev"):
        assert mounts[name] == host_paths[name], name
    assert host_paths["driver-root"] == "/"

    role = _one(objs, "ClusterRole")
    assert sorted(
        (r["apiGroups"][0], r["resources"][0], tuple(sorted(r["verbs"]))) for r in role["rules"]
    ) == [
        ("", "nodes", ("get",)),
        ("events.k8s.io", "events", ("create",)),
        ("resource.k8s.io", "resourceclaims", ("get",)),
        ("resource.k8s.io", "resourceslices", ("create", "delete", "list", "update", "watch")),
    ]
    binding = _one(objs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": "gpu-system"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]

    policy = _one(objs, "ValidatingAdmissionPolicy")
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert (
        condition.strip()
        == 'request.userInfo.username == "system:serviceaccount:gpu-system:rel-gpu-dra-kubelet-plugin"'
    )
    assert _one(objs, "ValidatingAdmissionPolicyBinding")["spec"]["policyName"] == policy["metadata"]["name"]

    gpu = _one(objs, "DeviceClass", "gpu.nvidia.com")
    mig = _one(objs, "DeviceClass", "mig.nvidia.com")
    assert gpu["spec"]["selectors"][0]["cel"]["expression"] == (
        "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'"
    )
    assert mig["spec"]["selectors"][0]["cel"]["expression"] == (
        "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'mig'"
    )
    assert "extendedResourceName" not in mig["spec"]


def test_non_default_render(helm: Helm) -> None:
    objs = helm.template("rel", "gpu-system", VARIANTS["custom-dirs-static-mig"])
    ds = _one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(ds)
    assert env["KUBELET_REGISTRAR_DIRECTORY_PATH"] == "/var/lib/k0s/kubelet/plugins_registry"
    assert env["KUBELET_PLUGINS_DIRECTORY_PATH"] == "/var/lib/k0s/kubelet/plugins"
    assert env["STATE_DIR"] == "/var/lib/gpu-dra"
    assert env["NVIDIA_DRIVER_ROOT"] == "/run/nvidia/driver"
    assert env["CDI_ROOT"] == "/etc/cdi"
    assert env["MIG_MODE"] == "static"
    assert env["ALLOW_MIG_MODE_CHANGE"] == "true"
    assert env["FEATURE_GATES"] == "MPSSupport=true,TimeSlicingSettings=true"
    assert container["args"] == ["--healthcheck-port=51515"]
    assert container["image"] == "registry.example.com/gpu-dra:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"gpu": "yes"}
    assert "priorityClassName" not in pod
    assert ds["spec"]["template"]["metadata"]["annotations"] == {"example.com/a": "b"}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert host_paths["registrar"] == "/var/lib/k0s/kubelet/plugins_registry"
    assert host_paths["plugins"] == "/var/lib/k0s/kubelet/plugins"
    assert host_paths["state"] == "/var/lib/gpu-dra"
    assert host_paths["driver-root"] == "/run/nvidia/driver"
    assert _one(objs, "DeviceClass", "gpu.nvidia.com")["spec"]["extendedResourceName"] == "nvidia.com/gpu"

    objs = helm.template("rel", "gpu-system", VARIANTS["no-policy-named-sa-no-er"])
    assert not {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} & _kinds(objs)
    assert _one(objs, "ServiceAccount")["metadata"]["name"] == "gpu-plugin"
    assert _one(objs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == "gpu-plugin"
    assert _one(objs, "DaemonSet")["metadata"]["name"] == "gpu-kubelet-plugin"
    assert _one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "gpu-plugin"
    assert "extendedResourceName" not in _one(objs, "DeviceClass", "gpu.nvidia.com")["spec"]

    objs = helm.template("rel", "gpu-system", VARIANTS["bring-your-own-sa-and-rbac"])
    assert _kinds(objs) == {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "DaemonSet"}
    assert _one(objs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"
    assert (
        "system:serviceaccount:gpu-system:existing-sa"
        in (_one(objs, "ValidatingAdmissionPolicy")["spec"]["matchConditions"][0]["expression"])
    )


def test_health_and_metrics_values_render(helm: Helm) -> None:
    objs = helm.template("rel", "gpu-system")
    ds = _one(objs, "DaemonSet")
    env = _env(ds)
    assert env["METRICS_PORT"] == "8080"
    assert env["GPU_LOST_TAINT_EFFECT"] == "NoSchedule"
    assert env["RECOVERY_POLL_INTERVAL"] == "10"
    assert "NVMLDeviceHealthCheck" not in str(env.get("FEATURE_GATES", ""))  # on: the plugin's default
    ports = {p["name"]: p["containerPort"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == 8080
    assert not {"ServiceMonitor", "Service"} & _kinds(objs)  # off by default: needs prometheus-operator

    objs = helm.template(
        "rel",
        "gpu-system",
        [
            'metrics={"enabled":true,"port":9400,"serviceMonitor":{"enabled":true,"interval":"15s","labels":{"release":"prom"}}}',
            'health={"taints":false,"gpuLostTaintEffect":"NoExecute","additionalXidsToIgnore":"48","recoveryPollInterval":5}',
        ],
    )
    env = _env(_one(objs, "DaemonSet"))
    assert env["METRICS_PORT"] == "9400"
    assert env["FEATURE_GATES"] == "NVMLDeviceHealthCheck=false"
    assert (env["GPU_LOST_TAINT_EFFECT"], env["ADDITIONAL_XIDS_TO_IGNORE"]) == ("NoExecute", "48")
    service, monitor = _one(objs, "Service"), _one(objs, "ServiceMonitor")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()

    objs = helm.template(
        "rel",
        "gpu-system",
        [
            'metrics={"enabled":false,"port":8080,"serviceMonitor":{"enabled":true,"interval":"30s","labels":{}}}'
        ],
    )
    env = _env(_one(objs, "DaemonSet"))
    assert "METRICS_PORT" not in env
    assert "ServiceMonitor" not in _kinds(objs)


def test_extended_resource_follows_the_server_version(helm: Helm) -> None:
    def er(version: str) -> str | None:
        objs = Helm(helm.binary, helm.kubeconfig, helm.home, version).template("rel", "ns")
        gpu = _one(objs, "DeviceClass", "gpu.nvidia.com")
        assert gpu["apiVersion"] == "resource.k8s.io/v1"
        value: str | None = gpu["spec"].get("extendedResourceName")
        return value

    assert er("v1.35.2") is None
    assert er("v1.36.0") == "nvidia.com/gpu"
    # Below the README's floor (1.34) the chart refuses to install, saying so.
    old = Helm(helm.binary, helm.kubeconfig, helm.home, "v1.33.1")
    refused = old.run(
        "template", "rel", str(CHART), "--namespace", "ns", "--kube-version", "v1.33.1", check=False
    )
    assert refused.returncode != 0
    assert "chart requires kubeVersion: >=1.34.0-0" in refused.stderr


@pytest.mark.parametrize(
    ("item", "complaint"),
    [
        ('plugin.migMode="dynamc"', "value must be one of 'dynamic', 'static'"),
        ('nvidiaDriverRoot="run/nvidia/driver"', "nvidiaDriverRoot"),
        ('kubeletDirs.plugins="var/lib/kubelet/plugins"', "kubeletDirs/plugins"),
        ("plugin.migMod=1", "additional properties 'migMod' not allowed"),
        ('plugin.featureGates={"DynamicMig":true}', "invalid propertyName 'DynamicMig'"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, item: str, complaint: str) -> None:
    for command in ("template", "lint"):
        args = [command, *(["rel"] if command == "template" else []), str(CHART)]
        proc = helm.run(*args, "--kube-version", helm.kube_version, "--set-json", item, check=False)
        assert proc.returncode != 0, f"helm {command} accepted {item}"
        assert "values don't meet the specifications of the schema" in proc.stdout + proc.stderr
        assert complaint in proc.stdout + proc.stderr


# -- install, upgrade, uninstall -------------------------------------------------------------------


def _wait(what: str, probe: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def _gone(read: Callable[[], Any]) -> bool:
    return not _exists(read)


def _exists(read: Callable[[], Any]) -> bool:
    try:
        read()
    except kclient.ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


@dataclass(frozen=True)
class Installed:
    release: str
    namespace: str
    objects: list[dict[str, Any]]


@pytest.fixture(scope="module")
def installed(helm: Helm) -> Iterator[Installed]:
    """One release of the chart with default values, uninstalled at the end of the module."""
    release, ns = "gpu-dra", f"gpu-dra-{uuid.uuid4().hex[:6]}"
    helm.run("install", release, str(CHART), "--namespace", ns, "--create-namespace")
    manifest = helm.run("get", "manifest", release, "--namespace", ns).stdout
    try:
        yield Installed(release, ns, [d for d in yaml.safe_load_all(manifest) if d])
    finally:
        helm.run("uninstall", release, "--namespace", ns, check=False)


def _readers(kube_client: kclient.ApiClient, inst: Installed) -> dict[str, Callable[[], Any]]:
    core: Any = kclient.CoreV1Api(kube_client)
    rbac: Any = kclient.RbacAuthorizationV1Api(kube_client)
    apps: Any = kclient.AppsV1Api(kube_client)
    adm: Any = kclient.AdmissionregistrationV1Api(kube_client)
    res: Any = kclient.ResourceV1Api(kube_client)
    readers: dict[str, Callable[[], Any]] = {}
    for obj in inst.objects:
        name, kind = obj["metadata"]["name"], obj["kind"]
        read: Callable[[], Any] = {
            "ServiceAccount": lambda n=name: core.read_namespaced_service_account(n, inst.namespace),
            "ClusterRole": lambda n=name: rbac.read_cluster_role(n),
            "ClusterRoleBinding": lambda n=name: rbac.read_cluster_role_binding(n),
            "ValidatingAdmissionPolicy": lambda n=name: adm.read_validating_admission_policy(n),
            "ValidatingAdmissionPolicyBinding": lambda n=name: adm.read_validating_admission_policy_binding(
                n
            ),
            "DeviceClass": lambda n=name: res.read_device_class(n),
            "DaemonSet": lambda n=name: apps.read_namespaced_daemon_set(n, inst.namespace),
        }[kind]
        readers[f"{kind}/{name}"] = read
    return readers


def test_install_creates_every_object(kube_client: kclient.ApiClient, installed: Installed) -> None:
    readers = _readers(kube_client, installed)
    assert len(readers) == 8
    for key, read in readers.items():
        assert _exists(read), f"{key} was not created by helm install"
    apps: Any = kclient.AppsV1Api(kube_client)
    ds = apps.read_namespaced_daemon_set("gpu-dra-kubelet-plugin", installed.namespace)
    assert ds.spec.update_strategy.rolling_update.max_surge == 1
    assert ds.spec.update_strategy.rolling_update.max_unavailable == 0
    assert ds.metadata.labels["app.kubernetes.io/managed-by"] == "Helm"


def test_gpu_device_class_maps_the_extended_resource(
    control_plane: ControlPlane, kube_client: kclient.ApiClient, installed: Installed
) -> None:
    # Raw objects: a typed client model would drop fields it does not know.
    custom: Any = kclient.CustomObjectsApi(kube_client)
    gpu = custom.get_cluster_custom_object("resource.k8s.io", "v1", "deviceclasses", "gpu.nvidia.com")
    mig = custom.get_cluster_custom_object("resource.k8s.io", "v1", "deviceclasses", "mig.nvidia.com")
    minor = int(control_plane.version.lstrip("v").split(".")[1])
    if minor >= 36:
        assert gpu["spec"].get("extendedResourceName") == "nvidia.com/gpu"
    else:
        assert "extendedResourceName" not in gpu["spec"]
    assert "extendedResourceName" not in mig["spec"]


def test_upgrade_changes_the_daemonset_and_keeps_the_rest(
    helm: Helm, kube_client: kclient.ApiClient, installed: Installed
) -> None:
    apps: Any = kclient.AppsV1Api(kube_client)
    before = apps.read_namespaced_daemon_set("gpu-dra-kubelet-plugin", installed.namespace)
    helm.run(
        "upgrade", installed.release, str(CHART), "--namespace", installed.namespace,
        "--set-json", 'plugin.logLevel="debug"', "--set-json", 'plugin.featureGates={"MPSSupport":true}',
    )  # fmt: skip
    after = apps.read_namespaced_daemon_set("gpu-dra-kubelet-plugin", installed.namespace)
    env = {e.name: e.value for e in after.spec.template.spec.containers[0].env}
    assert env["LOG_LEVEL"] == "debug"
    assert env["FEATURE_GATES"] == "MPSSupport=true"
    assert after.metadata.uid == before.metadata.uid, "upgrade must update the DaemonSet in place"
    assert after.metadata.generation == before.metadata.generation + 1
    status = json.loads(helm.run("status", installed.release, "-n", installed.namespace, "-o", "json").stdout)
    assert (status["version"], status["info"]["status"]) == (2, "deployed")
    for key, read in _readers(kube_client, installed).items():
        assert _exists(read), f"{key} disappeared on upgrade"


def test_uninstall_removes_every_object(
    helm: Helm, kube_client: kclient.ApiClient, installed: Installed
) -> None:
    readers = _readers(kube_client, installed)
    helm.run("uninstall", installed.release, "--namespace", installed.namespace)
    for key, read in readers.items():
        _wait(f"{key} to be deleted by helm uninstall", functools.partial(_gone, read))
    listed = helm.run("list", "--all", "-n", installed.namespace, "-o", "json").stdout
    assert json.loads(listed) == []


NVIDIA_VALUES = Path(__file__).resolve().parents[1] / "data" / "chart" / "nvidia-values.yaml"


def test_a_values_file_written_for_nvidias_chart_installs_mapped(helm: Helm) -> None:
    """NVIDIA's keys that mean the same thing are mapped; the others are listed as ignored."""
    out = helm.run(
        "template", "rel", str(CHART), "--namespace", "gpu-system", "--kube-version", helm.kube_version,
        "-f", str(NVIDIA_VALUES),
    ).stdout  # fmt: skip
    ds = _one([d for d in yaml.safe_load_all(out) if d], "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(ds)
    assert pod["priorityClassName"] == "gpu-critical"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "dedicated"]
    assert container["image"] == "registry.example.com/gpu-dra/gpu-dra:0.1.0"
    assert container["resources"] == {"requests": {"cpu": "50m", "memory": "128Mi"}}
    assert env["FEATURE_GATES"] == "DynamicMIG=true,MPSSupport=true,TimeSlicingSettings=true"
    assert env["LOG_LEVEL"] == "debug"  # logVerbosity 6
    assert env["NVIDIA_CDI_HOOK_PATH"] == "/usr/local/nvidia/toolkit/nvidia-cdi-hook"
    assert env["NVIDIA_DRIVER_ROOT"] == "/run/nvidia/driver"
    health = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert health == int(env["HEALTHCHECK_PORT"]) == container["startupProbe"]["grpc"]["port"]
    # Their update strategy has no meaning here: seamless upgrades need the surge.
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}

    notes = helm.run(
        "install",
        "rel",
        str(CHART),
        "--namespace",
        "gpu-system",
        "--dry-run=server",
        "-f",
        str(NVIDIA_VALUES),
    ).stdout
    ignored = notes.split("have no meaning for gpu-dra and were ignored:", 1)[1]
    listed = {
        line.strip().removeprefix("- ") for line in ignored.splitlines() if line.strip().startswith("- ")
    }
    assert listed == {
        "allowDefaultNamespace",
        "controller",
        "gpuResourcesEnabledOverride",
        "resources",
        "webhook",
        "kubeletPlugin.updateStrategy",
        "kubeletPlugin.containers.computeDomains",
    }
    assert "exec ds/rel-gpu-dra-kubelet-plugin -- gpu-dra doctor" in notes
    assert "<plugin pod>" not in notes


def test_notes_of_a_plain_install_name_the_daemonset(helm: Helm) -> None:
    notes = helm.run("install", "rel", str(CHART), "--namespace", "gpu-system", "--dry-run=server").stdout
    assert "kubectl -n gpu-system exec ds/rel-gpu-dra-kubelet-plugin -- gpu-dra doctor" in notes
    assert "no meaning for gpu-dra" not in notes
