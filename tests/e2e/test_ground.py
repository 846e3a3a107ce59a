"""Self-tests of the test ground, with no plugin involved.

Why: every later end-to-end test trusts these parts; when one of them is broken (a peer that does
not build, an API server without DRA, a scheduler that does not allocate, a mock NVML that
pynvml cannot load), this file says so directly instead of a driver test failing obscurely.

What it does not do: test the kubelet emulator (its own tests do) or anything of gpu-dra itself.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kclient
from kubernetes import config as kconfig

from tests.ground import peers
from tests.ground.controlplane import ControlPlane

DRIVER = "gpu.nvidia.com"
WAIT_S = 60.0


def _wait(what: str, probe: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def _slice(node: str, gpu_uuid: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{DRIVER}"},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {
                    "name": "gpu-0",
                    "attributes": {
                        "type": {"string": "gpu"},
                        "uuid": {"string": gpu_uuid},
                        "productName": {"string": "NVIDIA H100 80GB HBM3"},
                        "architecture": {"string": "Hopper"},
                        "cudaComputeCapability": {"version": "9.0.0"},
                        "driverVersion": {"version": "550.54.15"},
                    },
                    "capacity": {"memory": {"value": "80Gi"}},
                }
            ],
        },
    }


def _claim_and_pod(ns: str, name: str, node_selector: str, cel: str) -> tuple[dict[str, Any], dict[str, Any]]:
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpu",
                        "exactly": {
                            "deviceClassName": "ground-gpu",
                            "selectors": [{"cel": {"expression": cel}}],
                        },
                    }
                ]
            }
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node_selector},
            "automountServiceAccountToken": False,
            "containers": [
                {"name": "c", "image": "registry.invalid/none:0", "resources": {"claims": [{"name": "gpu"}]}}
            ],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
        },
    }
    return claim, pod


@pytest.fixture(scope="module")
def dra_node(control_plane: ControlPlane, kube_client: kclient.ApiClient) -> tuple[str, str]:
    """A node with one hand-written GPU ResourceSlice and a DeviceClass for the driver."""
    node = f"ground-{uuid.uuid4().hex[:6]}"
    control_plane.create_node(node, labels={"gpu-dra/ground": "true"})
    custom: Any = kclient.CustomObjectsApi(kube_client)
    gpu_uuid = f"GPU-{uuid.uuid4()}"
    custom.create_cluster_custom_object("resource.k8s.io", "v1", "resourceslices", _slice(node, gpu_uuid))
    try:
        custom.create_cluster_custom_object(
            "resource.k8s.io",
            "v1",
            "deviceclasses",
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": "ground-gpu"},
                "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRIVER}'"}}]},
            },
        )
    except kclient.ApiException as e:
        if e.status != 409:
            raise
    return node, gpu_uuid


@pytest.mark.e2e
def test_node_is_schedulable_without_kubelet(control_plane: ControlPlane) -> None:
    node = control_plane.create_node(f"plain-{uuid.uuid4().hex[:6]}")
    assert node["status"]["allocatable"]["pods"] == "110"
    assert not node["spec"].get("taints")


@pytest.mark.e2e
def test_apiserver_stores_hand_written_resource_slice(
    kube_client: kclient.ApiClient, dra_node: tuple[str, str]
) -> None:
    node, gpu_uuid = dra_node
    custom: Any = kclient.CustomObjectsApi(kube_client)
    got = custom.list_cluster_custom_object(
        "resource.k8s.io", "v1", "resourceslices", field_selector=f"spec.nodeName={node}"
    )
    [item] = got["items"]
    assert item["spec"]["driver"] == DRIVER
    assert item["spec"]["pool"]["name"] == node
    assert item["spec"]["devices"][0]["attributes"]["uuid"]["string"] == gpu_uuid


@pytest.mark.e2e
def test_apiserver_rejects_invalid_resource_slice(
    kube_client: kclient.ApiClient, dra_node: tuple[str, str]
) -> None:
    node, _ = dra_node
    bad = _slice(node, "GPU-x")
    bad["metadata"]["name"] = f"{node}-bad"
    bad["spec"]["devices"][0]["name"] = "Not_A_DNS_Label"
    custom: Any = kclient.CustomObjectsApi(kube_client)
    with pytest.raises(kclient.ApiException) as e:
        custom.create_cluster_custom_object("resource.k8s.io", "v1", "resourceslices", bad)
    assert e.value.status == 422


@pytest.mark.e2e
def test_scheduler_allocates_matching_claim(
    control_plane: ControlPlane, kube_client: kclient.ApiClient, dra_node: tuple[str, str]
) -> None:
    node, _ = dra_node
    ns = f"ground-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    claim, pod = _claim_and_pod(
        ns, "match", node, "device.attributes['gpu.nvidia.com'].productName.startsWith('NVIDIA H100')"
    )
    custom: Any = kclient.CustomObjectsApi(kube_client)
    core: Any = kclient.CoreV1Api(kube_client)
    custom.create_namespaced_custom_object("resource.k8s.io", "v1", ns, "resourceclaims", claim)
    core.create_namespaced_pod(ns, pod)

    bound = _wait("pod to be bound", lambda: core.read_namespaced_pod("match", ns).spec.node_name)
    assert bound == node
    got = custom.get_namespaced_custom_object("resource.k8s.io", "v1", ns, "resourceclaims", "match")
    [result] = got["status"]["allocation"]["devices"]["results"]
    assert (result["driver"], result["pool"], result["device"], result["request"]) == (
        DRIVER,
        node,
        "gpu-0",
        "gpu",
    )
    assert got["status"]["reservedFor"][0]["name"] == "match"

    # Free the device for other tests: the claim is released once the pod is gone.
    core.delete_namespaced_pod("match", ns, grace_period_seconds=0)
    custom.delete_namespaced_custom_object("resource.k8s.io", "v1", ns, "resourceclaims", "match")


@pytest.mark.e2e
def test_scheduler_leaves_pod_pending_when_selector_does_not_match(
    control_plane: ControlPlane, kube_client: kclient.ApiClient, dra_node: tuple[str, str]
) -> None:
    node, _ = dra_node
    ns = f"ground-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    claim, pod = _claim_and_pod(
        ns, "nomatch", node, "device.attributes['gpu.nvidia.com'].productName == 'NVIDIA B200'"
    )
    custom: Any = kclient.CustomObjectsApi(kube_client)
    core: Any = kclient.CoreV1Api(kube_client)
    custom.create_namespaced_custom_object("resource.k8s.io", "v1", ns, "resourceclaims", claim)
    core.create_namespaced_pod(ns, pod)

    # The scheduler records its verdict as a PodScheduled=False condition; wait for that rather
    # than for time to pass.
    def unschedulable() -> Any:
        conds = core.read_namespaced_pod("nomatch", ns).status.conditions or []
        return [c for c in conds if c.type == "PodScheduled" and c.status == "False"]

    [cond] = _wait("PodScheduled=False", unschedulable)
    assert cond.reason == "Unschedulable"
    assert core.read_namespaced_pod("nomatch", ns).spec.node_name is None
    got = custom.get_namespaced_custom_object("resource.k8s.io", "v1", ns, "resourceclaims", "nomatch")
    assert "allocation" not in got.get("status", {})


@pytest.mark.e2e
def test_service_account_token_bound_to_pod_names_its_node(
    control_plane: ControlPlane, kube_client: kclient.ApiClient, dra_node: tuple[str, str], tmp_path: Path
) -> None:
    node, _ = dra_node
    ns = f"ground-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    core: Any = kclient.CoreV1Api(kube_client)
    core.create_namespaced_pod(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "tok"},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "c", "image": "x"}],
            },
        },
    )
    token = control_plane.service_account_token(ns, "default", bound_pod="tok")
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["kubernetes.io"]["node"]["name"] == node
    assert claims["kubernetes.io"]["pod"]["name"] == "tok"

    # The token authenticates, and RBAC gives a bare ServiceAccount nothing.
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig")
    cfg = kclient.Configuration()
    load: Any = kconfig.load_kube_config
    load(config_file=str(kubeconfig), client_configuration=cfg)
    with kclient.ApiClient(cfg) as sa_api:
        sa_core: Any = kclient.CoreV1Api(sa_api)
        with pytest.raises(kclient.ApiException) as e:
            sa_core.list_node()
        assert e.value.status == 403
        assert f"system:serviceaccount:{ns}:default" in str(e.value.body)


@pytest.mark.e2e
def test_helm_renders_and_lints_a_trivial_chart(tmp_path: Path) -> None:
    helm = peers.helm_path()
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: tiny\nversion: 0.1.0\ndescription: ground self-test\n"
    )
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: ConfigMap
            metadata:
              name: {{ .Release.Name }}-cm
            data:
              greeting: {{ .Values.greeting | quote }}
            """
        )
    )
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp_path / "hc"), "HELM_CONFIG_HOME": str(tmp_path / "hcfg"),
           "HELM_DATA_HOME": str(tmp_path / "hd")}  # fmt: skip
    lint = subprocess.run(
        [str(helm), "lint", str(chart)], capture_output=True, text=True, env=env, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = subprocess.run(
        [str(helm), "template", "rel", str(chart), "--set", "greeting=hi"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "name: rel-cm" in out
    assert 'greeting: "hi"' in out

    (chart / "templates" / "broken.yaml").write_text("{{ .Values.greeting | nosuchfunc }}\n")
    bad = subprocess.run(
        [str(helm), "lint", str(chart)], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode != 0


@pytest.mark.e2e
def test_cdi_library_resolves_a_spec(tmp_path: Path) -> None:
    cdi = peers.cdi_path()
    spec = {
        "cdiVersion": "0.6.0",
        "kind": "k8s.gpu.nvidia.com/claim",
        "devices": [{"name": "abc-gpu-0", "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}}],
        "containerEdits": {"deviceNodes": [{"path": "/dev/null"}]},
    }
    (tmp_path / "k8s.gpu.nvidia.com-claim_abc.json").write_text(json.dumps(spec))
    ok = subprocess.run([str(cdi), "validate", str(tmp_path)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    out = subprocess.run(
        [str(cdi), "inject", "--spec-dirs", str(tmp_path), "k8s.gpu.nvidia.com/claim=abc-gpu-0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    oci = json.loads(out)
    assert "NVIDIA_VISIBLE_DEVICES=0" in oci["process"]["env"]
    missing = subprocess.run(
        [str(cdi), "inject", "--spec-dirs", str(tmp_path), "k8s.gpu.nvidia.com/claim=nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0


_NVML_PROBE = """
import json, pynvml as n
n.nvmlInit()
out = {"count": n.nvmlDeviceGetCount(), "driver": n.nvmlSystemGetDriverVersion(),
       "cuda": n.nvmlSystemGetCudaDriverVersion(), "gpus": []}
for i in range(out["count"]):
    h = n.nvmlDeviceGetHandleByIndex(i)
    out["gpus"].append({"name": n.nvmlDeviceGetName(h), "uuid": n.nvmlDeviceGetUUID(h),
        "memory": n.nvmlDeviceGetMemoryInfo(h).total, "cc": list(n.nvmlDeviceGetCudaComputeCapability(h)),
        "bus": n.nvmlDeviceGetPciInfo(h).busId, "arch": n.nvmlDeviceGetArchitecture(h)})
n.nvmlShutdown()
print(json.dumps(out))
"""


def _probe_nvml(env_extra: dict[str, str]) -> dict[str, Any]:
    # A child process: LD_LIBRARY_PATH is read by the loader at start-up, and pynvml keeps the
    # library it loaded for the life of the process.
    proc = subprocess.run(
        [sys.executable, "-c", _NVML_PROBE],
        env={**os.environ, **env_extra},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.mocknvml
def test_nvidia_ml_py_reads_mock_nvml_h100_profile() -> None:
    got = _probe_nvml(peers.mocknvml_env("dgxh100"))
    assert got["count"] == 8
    assert got["driver"] == "550.54.15"
    assert got["cuda"] == 12040
    first = got["gpus"][0]
    assert first["name"] == "NVIDIA H100 80GB HBM3"
    assert first["memory"] == 80 * 1024**3
    assert first["cc"] == [9, 0]
    assert first["arch"] == 9  # NVML_DEVICE_ARCH_HOPPER
    assert first["uuid"].startswith("GPU-")
    assert len({g["uuid"] for g in got["gpus"]}) == 8
    assert [g["bus"] for g in got["gpus"][:2]] == ["00000000:00:00.0", "00000000:01:00.0"]
    # UUIDs are stable across processes, as on a real node.
    assert _probe_nvml(peers.mocknvml_env("dgxh100"))["gpus"] == got["gpus"]


@pytest.mark.mocknvml
def test_mock_nvml_without_config_reports_no_driver() -> None:
    env = peers.mocknvml_env("dgxh100")
    env["MOCK_NVML_CONFIG"] = ""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pynvml as n\ntry:\n n.nvmlInit()\nexcept n.NVMLError as e:\n print(type(e).__name__)",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "NVMLError_DriverNotLoaded"
    assert "MOCK_NVML_CONFIG" in proc.stderr
