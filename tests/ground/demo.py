"""``make demo``: gpu-dra on a fake 8x A100 node with the real kubelet, against a local control plane.

Why: the quickest way for a person to see the driver do its job end to end - the real API server
and scheduler allocate GPUs for unchanged user manifests (scenarios 01 and 06), the real plugin
process prepares them for the real kubelet (over a fake container runtime; as root, in a private
mount namespace), and the result is printed: for each pod its
node, devices and CDI ids, then the CDI spec one claim got. ``--keep`` leaves it all running
and prints how to look around.

What it does not do: build the peers (``make demo`` runs tests/peers/build.sh first), run
containers, or check anything (the e2e tests do).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import structlog
import yaml

from driver.inventory import DRIVER_NAME
from tests.ground import peers
from tests.ground.controlplane import ControlPlane, start_control_plane
from tests.ground.kubelet import PREPARE
from tests.ground.node import (
    NodeFactory,
    SimulatedNode,
    allocation_results,
    list_pods,
    pod_claim,
    pod_phase_on,
    scenario_path,
    start_cluster_objects,
    wait_for,
)

NODE = "gpu-a100"
TOPOLOGY = "a100-40gb-x8"
SCENARIOS = ("01-attribute-selection", "06-shared-inference")
WAIT_S = 90.0


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str, t0: float) -> None:
    say(f"[{time.monotonic() - t0:5.1f}s] {text}")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def scenario_pods(factory: NodeFactory, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods in the applied objects' namespaces, in the order the scenarios were applied."""
    namespaces = list(
        dict.fromkeys(o["metadata"]["namespace"] for o in objects if o["metadata"].get("namespace"))
    )
    pods = [p for ns in namespaces for p in list_pods(factory.api, ns)]
    return [p for p in pods if not p["metadata"]["name"].startswith("gpu-dra-plugin-")]


def pod_rows(
    factory: NodeFactory, node: SimulatedNode, pods: list[dict[str, Any]]
) -> tuple[list[list[str]], str]:
    """One row per pod claim; also the UID of the first claim (whose spec is shown)."""
    rows: list[list[str]] = []
    first_uid = ""
    for pod in pods:
        meta = pod["metadata"]
        node_name, phase = pod_phase_on(pod)
        cdi = node.kubelet.pod_cdi_devices.get(meta["uid"], {})
        for entry in pod["spec"].get("resourceClaims") or []:
            claim = pod_claim(factory.api, pod, entry["name"])
            claim_name = claim["metadata"]["name"] if claim else "(none yet)"
            devices = ", ".join(f"{r['pool']}/{r['device']}" for r in allocation_results(claim or {})) or "-"
            ids = sorted({i for container_ids in cdi.values() for i in container_ids})
            rows.append(
                [
                    f"{meta['namespace']}/{meta['name']}",
                    f"{node_name or '-'} ({phase})",
                    claim_name,
                    devices,
                    "\n".join(ids) or "-",
                ]
            )
            if claim and not first_uid:
                first_uid = claim["metadata"]["uid"]
    # Long CDI ids get their own lines under the row.
    flat: list[list[str]] = []
    for row in rows:
        ids = row[4].split("\n")
        flat.append([*row[:4], ids[0]])
        flat += [["", "", "", "", extra] for extra in ids[1:]]
    return flat, first_uid


def explore_hint(cp: ControlPlane, workdir: Path) -> str:
    return f"""
The cluster keeps running (Ctrl-C stops it). Work directory: {workdir}
  API server:  {cp.server}
  KUBECONFIG:  {cp.kubeconfig}   (admin, client certificate)

kubectl is not built by tests/peers/build.sh. Any kubectl >= 1.34 from your package manager works:
  KUBECONFIG={cp.kubeconfig} kubectl get pods,resourceclaims,resourceslices -A
With the project's Python client:
  KUBECONFIG={cp.kubeconfig} .venv/bin/python -c "from kubernetes import client, config; \\
config.load_kube_config(); \\
print([s.metadata.name for s in client.ResourceV1Api().list_resource_slice().items])"
With curl:
  curl --cacert {cp.pki.ca_crt} --cert {cp.pki.admin_crt} --key {cp.pki.admin_key} \\
    {cp.server}/apis/resource.k8s.io/v1/resourceclaims
Plugin log: {workdir}/nodes/{NODE}/plugin.log   CDI specs: {workdir}/nodes/{NODE}/cdi
"""


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-dra-demo-", dir="/tmp"))
    )
    version = args.k8s_version or peers.k8s_version()
    say(f"gpu-dra demo: Kubernetes {version} control plane + simulated node {NODE} ({TOPOLOGY})")
    cp = start_control_plane(workdir / "controlplane", version=version)
    step(f"control plane ready at {cp.server}", t0)
    api = cp.api_client()
    factory: NodeFactory | None = None
    try:
        cluster = start_cluster_objects(cp, api)
        factory = live = NodeFactory(cluster, workdir / "nodes")
        node = factory(NODE, TOPOLOGY)
        gpus = sorted(
            {
                d["name"]
                for s in node.slices()
                for d in s["spec"].get("devices") or []
                if d["name"].count("-") == 1
            }
        )
        kind = node.kubelet_kind
        step(f"plugin registered with the {kind} kubelet; ResourceSlices publish {len(gpus)} GPUs", t0)
        objects: list[dict[str, Any]] = []
        for name in SCENARIOS:
            objects += factory.apply(scenario_path(name))
            step(f"applied scenario {name}", t0)

        def all_running() -> list[dict[str, Any]] | None:
            pods = scenario_pods(live, objects)
            want = 3  # 01: one Deployment replica; 06: two pods
            if len(pods) == want and all(pod_phase_on(p)[1] == "Running" for p in pods):
                return pods
            return None

        pods = wait_for(all_running, WAIT_S, "the scenarios' pods to be scheduled, prepared and running")
        step("all pods scheduled by the real scheduler and prepared by the plugin", t0)
        rows, uid = pod_rows(factory, node, pods)
        say()
        say(table(rows, ["POD", "NODE (PHASE)", "CLAIM", "DEVICES", "CDI DEVICE IDS"]))
        prepares = [c for c in node.kubelet.calls if c.method == PREPARE]
        say()
        registration = node.kubelet.plugin_for(DRIVER_NAME)
        service = registration.service if registration else "?"
        claims = {uid for c in prepares for _, uid, _ in c.claims}
        say(
            f"{len(prepares)} NodePrepareResources calls over DRA {service} for {len(claims)} claims "
            f"(the {node.kubelet_kind} kubelet may ask once per pod for the claim both 06 pods share; "
            "the plugin prepares it once)."
        )
        spec = node.cdi_spec(uid)
        say()
        say(f"CDI spec of claim {uid} ({node.cdi_spec_path(uid)}):")
        # YAML with short lists inline reads far easier than indented JSON (the file itself is JSON).
        say(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=160).rstrip())
        if args.keep:
            say(explore_hint(cp, workdir))
            stopped = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stopped.set())
            signal.signal(signal.SIGTERM, lambda *_: stopped.set())
            stopped.wait()
        return 0
    finally:
        say("stopping ...")
        if factory is not None:
            # The control plane goes away with everything in it: only the processes need stopping.
            for n in factory.nodes:
                n.kill_plugin(signal.SIGTERM)
                n.kubelet.stop()
                shutil.rmtree(n.socket_base, ignore_errors=True)
        closer: Any = api.close
        closer()
        cp.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
            step("stopped", t0)
        else:
            step(f"stopped; logs and state kept in {workdir}", t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.ground.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep", action="store_true", help="leave the cluster running until Ctrl-C and say how to explore it"
    )
    parser.add_argument("--k8s-version", help="control plane version (default: the primary pin)")
    parser.add_argument(
        "--workdir", help="keep logs and state here (default: a temporary dir, removed at the end)"
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
