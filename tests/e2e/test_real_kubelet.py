"""gpu-dra under the real kubelet: the node stays off the host, and the kubelet's own lifecycle.

Why: what the plugin must survive is what a real kubelet does, not our reading of it. On a node
of tests.ground.realkubelet (Kubernetes' kubelet over fakecri) these tests show: the kubelet runs
as its node under node restriction and leaves the host as it was; it restarts without preparing
a running pod again (wipe, re-register, republish); it wipes the slices of a plugin that stopped
(after its 30 s grace); a plugin killed under a running pod comes back and unprepares cleanly; a
newer plugin instance (pod-UID sockets, as in a rolling update) takes over the kubelet's calls;
and an XID injected on the fake GPU reaches the pod's ``allocatedResourcesStatus`` through the
kubelet's health stream.

What it does not do: run containers (fakecri keeps records), or test the emulator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kclient

from driver.inventory import DRIVER_NAME
from driver.nvml.fakestate import FakeState
from tests.ground.kubelet import PREPARE, SERVICE_V1, UNPREPARE
from tests.ground.node import NodeFactory, SimulatedNode, get_json, pod_claim, wait_for
from tests.ground.realkubelet import KUBELET_SYSCTLS, RealKubelet

pytestmark = [pytest.mark.e2e, pytest.mark.real_kubelet, pytest.mark.timeout(300)]

WAIT_S = 90.0
# The kubelet wipes a driver's slices 30 s after its last instance went away.
WIPE_WAIT_S = 30.0 + WAIT_S


def one_gpu_pod(ns: str, name: str = "worker") -> list[dict[str, Any]]:
    """A namespace, a claim template for one full GPU and a pod using it."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": "one-gpu", "namespace": ns},
            "spec": {
                "spec": {
                    "devices": {
                        "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]
                    }
                }
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": "registry.invalid/cuda:12",
                        "resources": {"claims": [{"name": "gpu"}]},
                    }
                ],
                "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}],
                "terminationGracePeriodSeconds": 1,
            },
        },
    ]


def real(node: SimulatedNode) -> RealKubelet:
    assert isinstance(node.kubelet, RealKubelet), f"{node} does not run the real kubelet"
    return node.kubelet


def running_pod(factory: NodeFactory, node: SimulatedNode, ns: str, name: str = "worker") -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        pod: dict[str, Any] = get_json(factory.api, f"/api/v1/namespaces/{ns}/pods/{name}")
        ok = pod["spec"].get("nodeName") == node.name and pod["status"].get("phase") == "Running"
        return pod if ok else None

    return wait_for(probe, WAIT_S, f"pod {ns}/{name} to run on {node.name}")


def claim_uid(factory: NodeFactory, pod: dict[str, Any]) -> tuple[str, str]:
    claim = pod_claim(factory.api, pod, "gpu")
    assert claim is not None
    return claim["metadata"]["uid"], claim["metadata"]["name"]


def prepares(node: SimulatedNode) -> list[Any]:
    return [c for c in node.kubelet.calls if c.method == PREPARE]


def as_node(kubelet: RealKubelet, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    """The HTTP status of one request with the kubelet's own credentials."""
    ctx = ssl.create_default_context(cafile=str(kubelet.control_plane.pki.ca_crt))
    ctx.load_cert_chain(str(kubelet.pki_dir / "node.crt"), str(kubelet.pki_dir / "node.key"))
    req = urllib.request.Request(  # noqa: S310 - the control plane's https URL
        kubelet.control_plane.server + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/merge-patch+json"},
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _host_state() -> dict[str, Any]:
    return {
        "sysctls": {name: Path(f"/proc/sys/{name}").read_text() for name in KUBELET_SYSCTLS},
        "paths": {p: Path(p).exists() for p in ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods")},
    }


def test_the_kubelet_runs_as_its_node_and_leaves_the_host_alone(node_factory: NodeFactory) -> None:
    before = _host_state()
    node = node_factory("rk-host", "h100-80gb-x1")
    kubelet = real(node)
    assert node.node is not None
    info = node.node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == node.control_plane.version
    assert info["containerRuntimeVersion"].startswith("fakeRuntime://")
    assert node.node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert not [
        t for t in node.node["spec"].get("taints") or [] if t["key"].startswith("node.kubernetes.io/")
    ]
    # The kubelet registered over v1 and opened the health stream on the plugin's socket.
    reg = kubelet.plugin_for(DRIVER_NAME)
    assert reg is not None and reg.service == SERVICE_V1
    wait_for(lambda: kubelet.health_streams, WAIT_S, "the kubelet to open the DRA health stream")
    # The Node authorizer and NodeRestriction apply to it, as in a real cluster.
    assert as_node(kubelet, "GET", "/api/v1/namespaces/kube-system/secrets/any") == 403
    restricted = {"metadata": {"labels": {"node-restriction.kubernetes.io/pool": "x"}}}
    assert as_node(kubelet, "PATCH", f"/api/v1/nodes/{node.name}", restricted) == 403
    assert as_node(kubelet, "GET", f"/api/v1/nodes/{node.name}") == 200

    # Inside its namespace the kubelet sees the tunables it wants; the host keeps its own.
    holder = kubelet.holder
    assert holder is not None
    inside = subprocess.run(
        ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--", "cat", "/proc/sys/vm/overcommit_memory"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert inside.stdout.strip() == KUBELET_SYSCTLS["vm/overcommit_memory"]
    assert (kubelet.var_dir / "log" / "containers").is_dir()
    # Its working dir is an empty one of its own: with the fake CRI's empty LogPath the kubelet's
    # container-log clean-up removes what "*" matches in its cwd (at "/" it deleted the host's /bin).
    pid = kubelet.kubelet_pid
    assert pid is not None
    cwd = Path(f"/proc/{pid}/cwd").readlink()
    assert cwd.is_relative_to(kubelet.log_dir), cwd
    assert not list(cwd.iterdir())
    assert _host_state() == before

    node.stop()
    assert not kubelet.kubelet_running
    assert holder.poll() is not None
    assert _host_state() == before


def test_kubelet_restart_republishes_without_preparing_the_running_pod_again(
    node_factory: NodeFactory,
) -> None:
    node = node_factory("rk-restart", "a100-40gb-x8")
    kubelet = real(node)
    ns = f"rk-{uuid.uuid4().hex[:6]}"
    node_factory.apply(one_gpu_pod(ns))
    pod = running_pod(node_factory, node, ns)
    uid, _ = claim_uid(node_factory, pod)
    assert len(prepares(node)) == 1
    (sandbox,) = [
        r["sandbox"]
        for r in kubelet.cri_requests("RunPodSandbox")
        if r["pod"]["uid"] == pod["metadata"]["uid"]
    ]
    slices_before = {s["metadata"]["name"] for s in node.slices()}
    wipes_before = len(kubelet.wipes)
    regs_before = len(kubelet.registrations)

    kubelet.stop_kubelet()
    journal_at = len(kubelet.cri_requests())
    kubelet.start_kubelet()
    # The restarted kubelet wipes the node's slices, the plugin registers again and republishes.
    wait_for(lambda: len(kubelet.wipes) > wipes_before, WAIT_S, "the restarted kubelet's slice wipe")
    wait_for(lambda: len(kubelet.registrations) > regs_before, WAIT_S, "the plugin to register again")
    published = node.wait_published()
    assert not {s["metadata"]["name"] for s in published} & slices_before, "old slices survived the wipe"
    # The restarted kubelet synced the running pod (it asked the runtime for its sandbox, which
    # comes after the DRA step of a pod sync) without preparing its claim again.
    wait_for(
        lambda: [
            r
            for r in kubelet.cri_requests()[journal_at:]
            if r["method"] == "PodSandboxStatus" and r.get("sandbox") == sandbox
        ],
        WAIT_S,
        "the restarted kubelet to sync the running pod",
    )
    running_pod(node_factory, node, ns)
    assert len(prepares(node)) == 1, prepares(node)
    assert node.checkpoint()[uid].state == "PrepareCompleted"
    assert uid in kubelet.prepared_claims()


def test_the_kubelet_wipes_the_slices_of_a_stopped_plugin(node_factory: NodeFactory) -> None:
    node = node_factory("rk-stop", "h100-80gb-x1")
    kubelet = real(node)
    assert node.slices()
    node.kill_plugin(signal.SIGTERM)
    t0 = time.monotonic()
    wait_for(lambda: not node.slices(), WIPE_WAIT_S, "the kubelet to wipe the stopped plugin's slices")
    waited = time.monotonic() - t0
    assert any(w.driver == DRIVER_NAME for w in kubelet.wipes), kubelet.wipes
    assert waited > 20, f"the slices went after {waited:.1f}s, before the kubelet's 30 s grace"
    # Started again, the plugin registers and publishes once more.
    node.start_plugin()
    node.wait_published()


def test_a_plugin_killed_under_a_running_pod_recovers_and_unprepares(node_factory: NodeFactory) -> None:
    node = node_factory("rk-crash", "a100-40gb-x8")
    ns = f"rk-{uuid.uuid4().hex[:6]}"
    objects = node_factory.apply(one_gpu_pod(ns))
    pod = running_pod(node_factory, node, ns)
    uid, name = claim_uid(node_factory, pod)
    node.kill_plugin(signal.SIGKILL)
    node.start_plugin()
    node.wait_published()
    assert node.checkpoint()[uid].state == "PrepareCompleted"
    assert node.cdi_spec(uid) is not None

    pod_obj = next(o for o in objects if o["kind"] == "Pod")
    node_factory.delete([pod_obj])
    wait_for(lambda: uid not in node.checkpoint(), WAIT_S, "the claim to leave the plugin's checkpoint")
    unprepares = wait_for(
        lambda: [c for c in node.kubelet.calls if c.method == UNPREPARE], WAIT_S, "the kubelet's unprepare"
    )
    assert [(c.claims, c.error) for c in unprepares] == [(((ns, uid, name),), "")]
    assert node.cdi_spec(uid) is None
    assert len(prepares(node)) == 1


def test_a_newer_plugin_instance_takes_over_the_kubelets_calls(node_factory: NodeFactory) -> None:
    """A rolling update as the chart does it (maxSurge 1): the new pod's plugin starts beside the
    old one with its own pod-UID sockets; the kubelet calls the newer instance, and the old one
    leaving takes no slices with it."""
    old_uid, new_uid = str(uuid.uuid4()), str(uuid.uuid4())
    node = node_factory("rk-roll", "a100-40gb-x8", pod_uid=old_uid)
    kubelet = real(node)
    ns = f"rk-{uuid.uuid4().hex[:6]}"
    node_factory.apply(one_gpu_pod(ns, "before"))
    before = running_pod(node_factory, node, ns, "before")
    (first,) = prepares(node)
    assert old_uid in first.endpoint

    old = node.start_successor(new_uid)
    assert old is not None and old.poll() is None
    assert len(kubelet.instances(DRIVER_NAME)) == 2, "both instances must be registered side by side"
    reg = kubelet.plugin_for(DRIVER_NAME)
    assert reg is not None and new_uid in reg.endpoint
    node_factory.apply(one_gpu_pod(ns, "after")[2:])
    running_pod(node_factory, node, ns, "after")
    assert [new_uid in c.endpoint for c in prepares(node)] == [False, True]

    # The old instance goes: the kubelet drops it, keeps the node's slices, calls the new one.
    old.terminate()
    old.wait(timeout=30)
    wait_for(lambda: len(kubelet.instances(DRIVER_NAME)) == 1, WAIT_S, "the kubelet to drop the old instance")
    assert node.slices()
    uid, name = claim_uid(node_factory, before)
    node_factory.delete(
        [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "before", "namespace": ns}}]
    )
    unprepares = wait_for(
        lambda: [c for c in kubelet.calls if c.method == UNPREPARE], WAIT_S, "the kubelet's unprepare"
    )
    assert [(c.claims, new_uid in c.endpoint, c.error) for c in unprepares] == [
        (((ns, uid, name),), True, "")
    ]
    assert not [w for w in kubelet.wipes if w.driver == DRIVER_NAME]


def test_an_injected_xid_reaches_the_pods_allocated_resources_status(node_factory: NodeFactory) -> None:
    node = node_factory("rk-health", "h100-80gb-x1")
    kubelet = real(node)
    ns = f"rk-{uuid.uuid4().hex[:6]}"
    node_factory.apply(one_gpu_pod(ns))
    pod = running_pod(node_factory, node, ns)
    wait_for(lambda: kubelet.health_streams, WAIT_S, "the kubelet to open the DRA health stream")
    gpu_uuid = next(iter(node.gpu_state()))
    with FakeState(node.fake_state).edit() as doc:
        doc.setdefault("health", {})[gpu_uuid] = {"xid": 79}

    def unhealthy() -> list[dict[str, Any]] | None:
        current = get_json(node_factory.api, f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
        statuses = (current["status"].get("containerStatuses") or [{}])[0].get(
            "allocatedResourcesStatus"
        ) or []
        found = [r for s in statuses for r in s.get("resources") or [] if r.get("health") == "Unhealthy"]
        return found or None

    found = wait_for(unhealthy, WAIT_S, "the pod's allocatedResourcesStatus to show the GPU Unhealthy")
    (resource,) = found
    # The kubelet names the resource by the CDI id the container got.
    uid, _ = claim_uid(node_factory, pod)
    assert [resource["resourceID"]] == kubelet.pod_cdi_devices[pod["metadata"]["uid"]]["app"]
    assert resource["resourceID"].startswith(f"k8s.gpu.nvidia.com/claim={uid}-")
    assert "XID 79" in resource["message"], resource


def test_on_a_cluster_of_real_kubelets_the_node_lifecycle_controller_lifts_the_not_ready_taint(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Own control plane with the node-lifecycle controller (the session's has none: its nodes
    made by ``create_node`` never heartbeat). Nothing lifts the taint here but the controller,
    and a kubelet that stops heartbeating gets the unreachable taint."""
    from tests.ground import peers
    from tests.ground.controlplane import start_control_plane

    work = tmp_path_factory.mktemp("lifecycle")
    cp = start_control_plane(work / "cp", version=peers.k8s_version(), node_lifecycle=True)
    run = Path(tempfile.mkdtemp(prefix="grk-", dir="/tmp"))  # short: Unix socket path limit
    kubelet = RealKubelet(cp, "rk-lifecycle", run, work / "kubelet", untaint=False)
    api: Any = cp.api_client()
    core: Any = kclient.CoreV1Api(api)
    try:
        kubelet.start()
        kubelet.wait_node_ready(api)

        def taint_keys() -> set[str]:
            return {t.key for t in core.read_node("rk-lifecycle").spec.taints or []}

        wait_for(lambda: not taint_keys(), WAIT_S, "the controller to lift node.kubernetes.io/not-ready")
        kubelet.stop_kubelet(signal.SIGKILL)
        # No heartbeat for the grace period (40-50 s): the controller marks the node unreachable.
        wait_for(
            lambda: "node.kubernetes.io/unreachable" in taint_keys(),
            WAIT_S,
            "the controller to taint the silent node unreachable",
        )
    finally:
        kubelet.stop()
        api.close()
        cp.stop()
        shutil.rmtree(run, ignore_errors=True)


_CHILD = """
import json, sys, tempfile
from pathlib import Path
from tests.ground.controlplane import ControlPlane, Pki
from tests.ground.realkubelet import RealKubelet
spec = json.loads(sys.argv[1])
pki = Pki(**{k: Path(v) for k, v in spec["pki"].items()})
cp = ControlPlane(spec["version"], spec["server"], Path(spec["kubeconfig"]), Path(spec["workdir"]), pki)
kubelet = RealKubelet(cp, spec["node"], Path(spec["run"]), Path(spec["logs"]))
kubelet.start()
print(json.dumps([kubelet.holder.pid, kubelet._cri.pid, kubelet._kubelet.pid]), flush=True)
sys.stdin.read()
"""


def test_a_killed_test_process_takes_the_kubelet_and_its_namespace_with_it(
    control_plane: Any, tmp_path: Path
) -> None:
    """SIGKILL of the process that started the node: no kubelet, fakecri or holder survives it
    (the parent-death signal), so no mount namespace is left behind either."""
    run = Path(tempfile.mkdtemp(prefix="grk-", dir="/tmp"))
    spec = {
        "version": control_plane.version,
        "server": control_plane.server,
        "kubeconfig": str(control_plane.kubeconfig),
        "workdir": str(control_plane.workdir),
        "pki": {k: str(v) for k, v in vars(control_plane.pki).items()},
        "node": "rk-orphan",
        "run": str(run),
        "logs": str(tmp_path / "kubelet"),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    pids: list[int] = []
    try:
        assert child.stdout is not None
        # The child's logs go to stdout too; its one JSON list is the pids.
        line = b""
        while not line.startswith(b"[") and child.poll() is None:
            line = child.stdout.readline()
        pids = json.loads(line or b"[]")
        assert len(pids) == 3, "the child did not start the kubelet"
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        child.kill()
        child.wait(timeout=30)

        def all_gone() -> bool:
            return not any(_alive(pid) for pid in pids)

        wait_for(all_gone, WAIT_S, f"kubelet, fakecri and holder {pids} to die with their parent")
        pids = []  # gone: their numbers may belong to someone else's processes by now
    finally:
        if child.poll() is None:
            child.kill()
        for pid in pids:  # only if the test failed: nothing may outlive it
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(kclient.ApiException):
            api: Any = control_plane.api_client()
            try:
                kclient.CoreV1Api(api).delete_node("rk-orphan")
            finally:
                api.close()
        shutil.rmtree(run, ignore_errors=True)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
