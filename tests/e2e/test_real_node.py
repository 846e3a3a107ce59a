"""What users install, running: the plugin's own image under the chart on a real node.

Why: the product is an image, a chart and a DaemonSet. Here containerd + runc run the image
built from deploy/container/Dockerfile (tests.ground.images), ``helm install`` puts the chart's
DaemonSet on a node of the real kubelet (tests.ground.realnode), its pod becomes Ready through
its own probes, registers through its pod-UID socket and publishes the simulated GPUs; busybox
workloads show the device nodes and environment their claim's CDI spec injected, a
``helm upgrade`` to another image tag replaces the plugin under running workloads, and
``gpu-dra doctor`` passes inside the plugin's pod (exec through the API server and the kubelet).

The tests share one node and run in file order (install first); each says what it needs from
the ones before. The node's teardown must leave nothing on the host (checked at the end).

What it does not do: MPS (its control daemon is started through the host's PID namespace and
systemd, which the test node does not have).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient
from kubernetes.stream import stream
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from driver.inventory import DRIVER_NAME
from driver.nvml.backend import Nvml
from driver.nvml.fakestate import FakeState
from tests.e2e.test_chart import Helm
from tests.ground import images, peers
from tests.ground.controlplane import ControlPlane
from tests.ground.driverroot import FakeDriverRoot
from tests.ground.node import (
    CHART,
    apply_manifests,
    delete_manifests,
    get_json,
    list_pods,
    scenario_path,
    wait_for,
)
from tests.ground.realnode import RealNode, bring_up, lay_out_fake_driver, missing_capabilities

pytestmark = [pytest.mark.e2e, pytest.mark.real_runtime, pytest.mark.slow, pytest.mark.timeout(600)]

NODE = "gpu-node-0"
RELEASE = "gpu-dra"
NAMESPACE = "gpu-dra"
TOPOLOGY = "a100-40gb-x8"
GPUS = 8
DRIVER_ROOT = "/var/lib/gpu-dra-test/driver"
PLUGIN_LABEL = "app.kubernetes.io/name=gpu-dra"
WAIT_S = 120.0
#: Where the fake MIG keeps its capability files: writable (the driver root is mounted read-only),
#: on the state dir's host path, which the container sees at the same path.
MIG_ROOT = "fake-mig-root"
#: A workload that shows what the runtime gave it, then stays up.
SHOW = (
    "ls -ld /dev/nvidia* /dev/nvidia-caps/* 2>/dev/null; echo ---env; env | sort; echo ---end; "
    "exec sleep 3600"
)
#: The GPU the fake state puts in MIG mode before the plugin starts (the others stay full GPUs).
MIG_GPU = 7


@dataclass
class Ground:
    cp: ControlPlane
    node: RealNode
    api: kclient.ApiClient
    helm: Helm
    driver: FakeDriverRoot
    plugin_images: dict[str, images.Image]
    busybox: images.Image
    #: scenario 02's objects, left running for the upgrade test.
    applied_02: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.node.plugins_dir / DRIVER_NAME

    @property
    def simulated_gpu_flags(self) -> list[str]:
        """The plugin's flags for this simulated node (chart extraArgs)."""
        proc = self.state_dir / MIG_ROOT / "proc"
        return ["--nvml-backend=fake", f"--fake-topology={TOPOLOGY}", f"--proc-root={proc}"]

    def values(self, tag: str) -> list[str]:
        """--set-json values: the local image, the node's kubelet dirs, a simulated GPU node."""
        img = self.plugin_images[tag]
        repo, _, tag_ = img.ref.rpartition(":")
        return [
            f"image={json.dumps({'repository': repo, 'tag': tag_, 'pullPolicy': 'Never'})}",
            f"nvidiaDriverRoot={json.dumps(DRIVER_ROOT)}",
            "kubeletDirs="
            + json.dumps({"registrar": str(self.node.registry_dir), "plugins": str(self.node.plugins_dir)}),
            "plugin.extraArgs=" + json.dumps(self.simulated_gpu_flags),
            'plugin.featureGates={"TimeSlicingSettings": true}',
            'plugin.logLevel="debug"',
        ]


def _helm_args(ground: Ground, verb: str, tag: str) -> list[str]:
    args = [verb, RELEASE, str(CHART), "--namespace", NAMESPACE]
    for item in ground.values(tag):
        args += ["--set-json", item]
    return args


@pytest.fixture(scope="module")
def ground(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ground]:
    reason = missing_capabilities()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    plugin_images = {
        "a": images.plugin_image("a"),
        "b": images.plugin_image("b", {"gpu-dra.test/variant": "b"}),
    }
    images.pause_image()
    busybox = images.busybox_image()
    t_images = time.monotonic() - t0
    # Unix socket paths are short-limited: the node's dirs live under a short /tmp name.
    base = Path(tempfile.mkdtemp(prefix="gn", dir="/tmp"))
    drivers: list[FakeDriverRoot] = []

    def lay_out(node: RealNode) -> None:
        driver = lay_out_fake_driver(node, GPUS, DRIVER_ROOT)
        _seed_fake_gpus(node.plugins_dir / DRIVER_NAME, driver)
        drivers.append(driver)

    cp, node, proxy = bring_up(
        base,
        tmp_path_factory.mktemp("realnode"),
        node_name=NODE,
        labels={"nvidia.com/gpu.present": "true"},
        node_images=list(plugin_images.values()),
        before_start=lay_out,
    )
    api = cp.api_client()
    try:
        helm = Helm(peers.helm_path(), cp.kubeconfig, node.log_dir.parent / "helm", cp.version)
        print(f"\nreal node up in {time.monotonic() - t0:.1f}s (images {t_images:.1f}s)")
        yield Ground(cp, node, api, helm, drivers[0], plugin_images, busybox)
    finally:
        node.stop()
        api.close()  # type: ignore[no-untyped-call]
        cp.stop()
        proxy.close()
        left = node.leftovers()
        shutil.rmtree(base, ignore_errors=True)
    assert left == [], f"the real node left this on the host: {left}"


def _seed_fake_gpus(state_dir: Path, driver: FakeDriverRoot) -> None:
    """The fake GPUs' state before the plugin starts: GPU MIG_GPU in MIG mode (an A100 never
    toggles it at run time), MIG capability files kept under a writable copy of the driver's proc."""
    mig_root = state_dir / MIG_ROOT
    shutil.copytree(driver.proc_dir, mig_root / "proc", symlinks=True)
    state = state_dir / "fake-nvml.json"
    Nvml.open("fake", fake_topology=TOPOLOGY, fake_state=state, node_name=NODE).shutdown()
    with FakeState(state).edit() as doc:
        doc["driverRoot"] = str(mig_root)
        (uuid,) = [u for u, g in doc["gpus"].items() if int(g["minor"]) == MIG_GPU]
        doc["gpus"][uuid]["mig"] = {"current": True, "pending": True}


def _plugin_pods(ground: Ground) -> list[dict[str, Any]]:
    return list_pods(ground.api, NAMESPACE, PLUGIN_LABEL)


def _ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _slices(ground: Ground) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(
        ground.api, "/apis/resource.k8s.io/v1/resourceslices", [("fieldSelector", f"spec.nodeName={NODE}")]
    )["items"]
    return [s for s in items if s["spec"]["driver"] == DRIVER_NAME]


def _pod_log(ground: Ground, pod: dict[str, Any]) -> str:
    core: Any = kclient.CoreV1Api(ground.api)
    text: str = core.read_namespaced_pod_log(pod["metadata"]["name"], pod["metadata"]["namespace"])
    return text


def _shown(log: str) -> tuple[set[str], dict[str, str]]:
    """(device node paths listed, environment) from a SHOW workload's log."""
    devs_part, _, rest = log.partition("---env")
    env_part = rest.partition("---end")[0]
    # Character devices only (ls -ld also lists the /dev/nvidia-caps directory itself).
    devs = {line.split()[-1] for line in devs_part.splitlines() if line.startswith("c")}
    env = dict(line.split("=", 1) for line in env_part.strip().splitlines() if "=" in line)
    return devs, env


def _workload(manifest: Path, namespace: bool = True) -> list[dict[str, Any]]:
    """A scenario's manifests with its containers replaced by the busybox SHOW workload
    (without its Namespace when ``namespace`` is False: another scenario's is still there)."""
    docs = [
        d for d in yaml.safe_load_all(manifest.read_text()) if d and (namespace or d["kind"] != "Namespace")
    ]
    for doc in docs:
        if doc["kind"] in ("Deployment", "Pod", "Job"):
            spec = doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]
            for c in spec["containers"]:
                c["image"] = images.BUSYBOX_REF
                c["imagePullPolicy"] = "Never"
                c["command"] = ["sh", "-c", SHOW]
                c.pop("ports", None)
                c.pop("resources", None) if not c.get("resources", {}).get("claims") else c["resources"].pop(
                    "requests", None
                )
            spec["terminationGracePeriodSeconds"] = 1
    return docs


def _running(ground: Ground, namespace: str, selector: str, count: int) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        pods = list_pods(ground.api, namespace, selector)
        ok = [p for p in pods if _ready(p) and "---end" in _pod_log(ground, p)]
        return ok if len(ok) == count and len(pods) == count else None

    return wait_for(probe, WAIT_S, f"{count} running pod(s) {selector} in {namespace}", interval=0.5)


def _claim_uid(ground: Ground, pod: dict[str, Any]) -> str:
    ns = pod["metadata"]["namespace"]
    status = (pod.get("status") or {}).get("resourceClaimStatuses") or []
    names = [s["resourceClaimName"] for s in status if s.get("resourceClaimName")]
    names += [
        c["resourceClaimName"] for c in pod["spec"].get("resourceClaims") or [] if c.get("resourceClaimName")
    ]
    claim = get_json(ground.api, f"/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims/{names[0]}")
    return str(claim["metadata"]["uid"])


def _cdi_spec(ground: Ground, claim_uid: str) -> dict[str, Any] | None:
    for path in ground.node.host_path("/var/run/cdi").glob("*.json"):
        if claim_uid in path.name:
            spec: dict[str, Any] = json.loads(path.read_text())
            return spec
    return None


def _expected(spec: dict[str, Any]) -> tuple[set[str], dict[str, str]]:
    """Device nodes under /dev/nvidia* and env the claim's CDI spec injects (all its devices)."""
    edits = [spec.get("containerEdits") or {}, *(d.get("containerEdits") or {} for d in spec["devices"])]
    nodes = {n["path"] for e in edits for n in e.get("deviceNodes") or []}
    env = dict(kv.split("=", 1) for e in edits for kv in e.get("env") or [])
    return {n for n in nodes if n.startswith("/dev/nvidia")}, env


# -- the tests, in order ---------------------------------------------------------------------


def _dependency_closure(name: str) -> set[str]:
    """Normalised names of ``name`` and everything it requires without extras (this environment's view)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        dist = canonicalize_name(todo.pop())
        if dist in seen:
            continue
        seen.add(dist)
        for req in importlib.metadata.requires(dist) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def test_the_image_installs_the_wheel_and_its_dependencies_only() -> None:
    """The image's venv holds exactly the wheel's dependency closure (no extras, nothing else)."""
    reason = missing_capabilities()
    if reason:
        pytest.skip(reason)
    img = images.plugin_image("a")
    with tarfile.open(img.archive) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(outer.extractfile(_blob(index["manifests"][0]["digest"])))  # type: ignore[arg-type]
        top = outer.extractfile(_blob(manifest["layers"][-1]["digest"]))
        assert top is not None
        with tarfile.open(fileobj=top, mode="r:gz") as layer:
            names = layer.getnames()
    site = "opt/gpu-dra/lib/python3.11/site-packages/"
    dists = {
        canonicalize_name(n[len(site) :].split("/")[0].removesuffix(".dist-info").rsplit("-", 1)[0])
        for n in names
        if n.startswith(site) and n[len(site) :].split("/")[0].endswith(".dist-info")
    }
    want = _dependency_closure("gpu-dra") | {"pip", "setuptools"}  # what `python -m venv` seeds on 3.11
    assert dists == want, (sorted(dists - want), sorted(want - dists))
    assert "opt/gpu-dra/bin/gpu-dra" in names
    assert not any(n.startswith(("tmp/wheels", "src/", "tests/")) for n in names), "build inputs leaked in"


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def test_helm_install_plugin_ready_registered_and_publishing(ground: Ground) -> None:
    t0 = time.monotonic()
    ground.helm.run(*_helm_args(ground, "install", "a"), "--create-namespace")
    pod = wait_for(
        lambda: next((p for p in _plugin_pods(ground) if _ready(p)), None),
        WAIT_S,
        "the plugin's DaemonSet pod to become Ready through its probes",
        interval=0.5,
    )
    ready_s = time.monotonic() - t0
    assert pod["spec"]["nodeName"] == NODE
    assert pod["spec"]["containers"][0]["image"] == ground.plugin_images["a"].ref
    uid = pod["metadata"]["uid"]
    reg = wait_for(
        lambda: ground.node.plugin_for(DRIVER_NAME), WAIT_S, "the kubelet to register gpu.nvidia.com"
    )
    assert uid in Path(reg.endpoint).name, f"registered endpoint {reg.endpoint} is not the pod's UID socket"

    def published() -> list[dict[str, Any]] | None:
        s = _slices(ground)
        return s if sum(len(x["spec"].get("devices") or []) for x in s) >= GPUS else None

    slices = wait_for(published, WAIT_S, "the plugin's ResourceSlices")
    names = {d["name"] for s in slices for d in s["spec"].get("devices") or []}
    full = {f"gpu-{i}" for i in range(GPUS) if i != MIG_GPU}
    assert full <= names and f"gpu-{MIG_GPU}" not in names, sorted(names)
    assert any(n.startswith(f"gpu-{MIG_GPU}-mig-") for n in names), sorted(names)
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0
    print(f"plugin pod Ready {ready_s:.1f}s after helm install")


def test_scenario_01_workload_sees_exactly_its_claims_devices(ground: Ground) -> None:
    docs = _workload(scenario_path("01"))
    applied = apply_manifests(ground.api, docs)
    try:
        (pod,) = _running(ground, "gpu-demo", "app=gpu-demo-app", 1)
        uid = _claim_uid(ground, pod)
        spec = _cdi_spec(ground, uid)
        assert spec is not None, f"no CDI spec for claim {uid} in the node's /var/run/cdi"
        want_devs, want_env = _expected(spec)
        devs, env = _shown(_pod_log(ground, pod))
        assert devs == want_devs, (devs, spec)
        assert want_env.items() <= env.items(), (want_env, env)
        gpus = {n for n in want_devs if re.fullmatch(r"/dev/nvidia\d+", n)}
        assert len(gpus) == 1, f"one GPU requested, the spec gives {gpus}"
    finally:
        delete_manifests(ground.api, applied, wait=True, timeout=WAIT_S)
    wait_for(
        lambda: _cdi_spec(ground, uid) is None, WAIT_S, f"NodeUnprepareResources to remove claim {uid}'s spec"
    )


def test_scenario_02_shared_claim_two_pods_same_gpu(ground: Ground) -> None:
    docs = _workload(scenario_path("02"))
    for d in docs:
        if d["kind"] == "Deployment":
            d["spec"]["replicas"] = 2
    applied = apply_manifests(ground.api, docs)
    try:
        pods = _running(ground, "gpu-demo", "app=gpu-demo-app", 2)
        uids = {_claim_uid(ground, p) for p in pods}
        assert len(uids) == 1, "both replicas must share the one claim"
        spec = _cdi_spec(ground, uids.pop())
        assert spec is not None
        want_devs, want_env = _expected(spec)
        for p in pods:
            devs, env = _shown(_pod_log(ground, p))
            assert devs == want_devs
            assert want_env.items() <= env.items()
        gpus = {n for n in want_devs if re.fullmatch(r"/dev/nvidia\d+", n)}
        assert len(gpus) == 1, f"the shared claim names one GPU, its spec gives {gpus}"
    finally:
        ground.applied_02 = applied


def test_mig_claim_workload_sees_its_mig_device(ground: Ground) -> None:
    docs = _workload(scenario_path("04"), namespace=False)  # scenario 02's still runs for the upgrade
    for d in docs:
        if d["kind"] == "Deployment":
            d["spec"]["replicas"] = 1
    applied = apply_manifests(ground.api, docs)
    try:
        (pod,) = _running(ground, "gpu-demo", "app=gpu-demo-mig", 1)
        uid = _claim_uid(ground, pod)
        spec = _cdi_spec(ground, uid)
        assert spec is not None
        want_devs, want_env = _expected(spec)
        assert f"/dev/nvidia{MIG_GPU}" in want_devs
        caps = {n for n in want_devs if n.startswith("/dev/nvidia-caps/")}
        assert len(caps) == 2, f"a MIG device has a GI and a CI capability node: {want_devs}"
        devs, env = _shown(_pod_log(ground, pod))
        assert devs == want_devs, (devs, spec)
        assert want_env.items() <= env.items()
        state = json.loads((ground.state_dir / "fake-nvml.json").read_text())
        (gpu,) = [g for g in state["gpus"].values() if int(g["minor"]) == MIG_GPU]
        assert len(gpu["mig"].get("gis") or {}) == 1, "the claim's GPU instance exists on the fake GPU"
    finally:
        delete_manifests(ground.api, applied, wait=True, timeout=WAIT_S)
    wait_for(
        lambda: _cdi_spec(ground, uid) is None, WAIT_S, f"NodeUnprepareResources to remove claim {uid}'s spec"
    )
    state = json.loads((ground.state_dir / "fake-nvml.json").read_text())
    (gpu,) = [g for g in state["gpus"].values() if int(g["minor"]) == MIG_GPU]
    assert not gpu["mig"].get("gis"), "unprepare must destroy the claim's MIG instance"


def test_kubectl_exec_doctor_passes_in_the_plugin_pod(ground: Ground) -> None:
    (pod,) = [p for p in _plugin_pods(ground) if _ready(p)]
    core: Any = kclient.CoreV1Api(ground.api)
    resp = stream(
        core.connect_get_namespaced_pod_exec,
        pod["metadata"]["name"],
        NAMESPACE,
        # The plugin's simulated-GPU flags are chart extraArgs of `gpu-dra plugin` only (everything
        # else reaches doctor through the env twins the chart sets), so doctor is told them too.
        command=["gpu-dra", "doctor", *ground.simulated_gpu_flags],
        stderr=True,
        stdout=True,
        stdin=False,
        tty=False,
        _preload_content=False,
    )
    resp.run_forever(timeout=60)
    out = resp.read_stdout() + resp.read_stderr()
    code = resp.returncode
    resp.close()
    assert code == 0, out
    assert "verdict: healthy" in out, out


def test_helm_upgrade_to_another_tag_under_running_workloads(ground: Ground) -> None:
    applied = ground.applied_02
    assert applied, "needs scenario 02's workloads from the test before"
    before = {p["metadata"]["uid"]: p for p in list_pods(ground.api, "gpu-demo", "app=gpu-demo-app")}
    assert len(before) == 2
    (old,) = [p for p in _plugin_pods(ground) if _ready(p)]
    calls_before = len(ground.node.calls)
    ground.helm.run(*_helm_args(ground, "upgrade", "b"))
    new = wait_for(
        lambda: next(
            (
                p
                for p in _plugin_pods(ground)
                if p["spec"]["containers"][0]["image"] == ground.plugin_images["b"].ref and _ready(p)
            ),
            None,
        ),
        WAIT_S,
        "the upgraded plugin pod to become Ready",
        interval=0.5,
    )
    wait_for(
        lambda: (
            (r := ground.node.plugin_for(DRIVER_NAME)) is not None and new["metadata"]["uid"] in r.endpoint
        ),
        WAIT_S,
        "the kubelet to register the new plugin pod",
    )
    wait_for(
        lambda: all(p["metadata"]["uid"] != old["metadata"]["uid"] for p in _plugin_pods(ground)),
        WAIT_S,
        "the old plugin pod to be gone",
    )
    after = {p["metadata"]["uid"]: p for p in list_pods(ground.api, "gpu-demo", "app=gpu-demo-app")}
    assert after.keys() == before.keys(), "workload pods were replaced by the upgrade"
    for p in after.values():
        (cs,) = p["status"]["containerStatuses"]
        assert cs["restartCount"] == 0 and cs["ready"], cs
    prepares = [
        c for c in ground.node.calls[calls_before:] if c.method.endswith("NodePrepareResources") and c.claims
    ]
    assert prepares == [], f"the upgrade made the kubelet prepare claims again: {prepares}"
    delete_manifests(ground.api, applied, wait=True, timeout=WAIT_S)
