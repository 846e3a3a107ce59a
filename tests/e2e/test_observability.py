"""Metrics and Events of the running plugin, on the real control plane.

The plugin runs with ``--metrics-port 0`` next to a kubelet emulator: after a prepare that fails
(a config the GPU cannot take) and one that succeeds, ``/metrics`` shows NVIDIA's request and
error counters, the per-stage histograms, what is published and prepared; an injected XID shows
up as a health event and a taint; and Prometheus' own ``promtool check metrics`` accepts the
exposition. The failed prepare leaves one events.k8s.io Event on the ResourceClaim with the
message the kubelet got, however often the kubelet retries; the taint leaves one on the Node, and
a checkpoint found corrupt at start-up (moved aside) leaves a ``CheckpointQuarantined`` Event.
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from driver.inventory import DRIVER_NAME
from tests.e2e.test_device_taints import inject, taints, uuid_of
from tests.e2e.test_scenario_02 import (
    await_on,
    claim_and_pod,
    is_running,
    list_pods,
    namespace_doc,
    read_claim,
)
from tests.ground import peers
from tests.ground.node import NodeFactory, SimulatedNode, get_json

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

RETRIES = 3  # the kubelet backs off between retries of a failed prepare
# A long Event interval: every retry of the kubelet in this test falls inside it.
METRICS = ("--metrics-port", "0", "--recovery-poll-interval", "0.5", "--event-min-interval", "3600")
# MigDeviceConfig on a full GPU: refused per claim, naming the fix.
BAD_CONFIG = {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "MigDeviceConfig"}
MPS = {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": {"strategy": "MPS"}}


def metrics_port(node: SimulatedNode) -> int | None:
    for e in node.plugin_events():
        if e.get("event") == "metrics server listening":
            return int(e["port"])
    return None


def scrape(node: SimulatedNode) -> str:
    port = await_on(node, lambda: metrics_port(node), "the plugin's metrics server")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
    return text


def scrape_where(node: SimulatedNode, name: str, want: float, **labels: str) -> str | None:
    """A scrape in which ``name{labels}`` is ``want`` (None otherwise)."""
    text = scrape(node)
    return text if value(text, name, **labels) == want else None


def value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def events_about(node: SimulatedNode, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
    doc = get_json(node.api, f"/apis/events.k8s.io/v1/namespaces/{namespace}/events")
    return [
        e
        for e in doc.get("items") or []
        if (e.get("regarding") or {}).get("kind") == kind and (e.get("regarding") or {}).get("name") == name
    ]


def one_gpu(config: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}
    }
    if config is not None:
        spec["devices"]["config"] = [
            {"requests": ["gpu"], "opaque": {"driver": DRIVER_NAME, "parameters": config}}
        ]
    return spec


def test_metrics_and_events_after_prepares_and_a_fault(node_factory: NodeFactory) -> None:
    ns = "observe"
    node = node_factory("observe-l4", "l4-x2", extra_args=METRICS)
    text = scrape(node)
    assert value(text, "nvidia_dra_requests_total", operation="prepare", driver=DRIVER_NAME) == 0
    assert value(text, "gpu_dra_published_devices", kind="gpu") == 2

    node_factory.apply([namespace_doc(ns)])
    node_factory.apply(claim_and_pod("broken", ns, node.name, one_gpu(BAD_CONFIG)))
    broken = read_claim(node.api, ns, "broken")
    # The kubelet retries; wait until it has failed several times, then look at the Events.
    await_on(
        node,
        lambda: (
            sum(1 for c in node.emulator.calls if c.error and "broken" in str(c.claims)) >= RETRIES or None
        ),
        f"{RETRIES} failed prepares of the broken claim",
        timeout=240,
    )
    kubelet_error = next(iter(node.emulator.pod_errors.values()))
    events = await_on(
        node, lambda: events_about(node, ns, "ResourceClaim", "broken"), "an Event on the claim"
    )
    assert len(events) == 1, events  # rate-limited: one, however often the kubelet retried
    (event,) = events
    assert (event["type"], event["reason"]) == ("Warning", "PrepareFailed")
    assert event["regarding"]["uid"] == broken["metadata"]["uid"]
    assert event["note"] in kubelet_error  # the same words the kubelet (and the pod) got
    assert "MigDeviceConfig" in event["note"]

    node_factory.apply(claim_and_pod("fine", ns, node.name, one_gpu(MPS)))
    await_on(node, lambda: any(is_running(p) for p in list_pods(node.api, ns, "fine")), "the good pod to run")
    fine_uid = read_claim(node.api, ns, "fine")["metadata"]["uid"]
    text = await_on(
        node, lambda: scrape_where(node, "gpu_dra_mps_daemons", 1), "one MPS daemon in the metrics"
    )
    assert (value(text, "nvidia_dra_requests_total", operation="prepare") or 0) >= 1
    assert (value(text, "nvidia_dra_node_prepare_errors_total", error_type="prepare_devices") or 0) >= RETRIES
    assert value(text, "nvidia_dra_prepared_devices", device_type="gpu", node=node.name) == 1
    assert value(text, "gpu_dra_prepared_claims") == 1
    for stage in ("claim_get", "lock_wait", "mps_start", "cdi_write", "checkpoint_write"):
        assert (value(text, "gpu_dra_prepare_stage_duration_seconds_count", stage=stage) or 0) >= 1, stage
    # Millisecond buckets: a full-GPU prepare's CDI write lands well below NVIDIA's first 50 ms bucket.
    assert (
        value(text, "gpu_dra_prepare_stage_duration_seconds_bucket", stage="cdi_write", le="0.025") or 0
    ) >= 1
    assert (value(text, "gpu_dra_slice_publish_attempts_total") or 0) >= 1

    # The claim's MPS control daemon dies: a Node Event, and the gauge counts it out.
    (record,) = [r for r in node.checkpoint()[fine_uid].sharing if r.get("kind") == "mps"]
    os.kill(int(record["pid"]), signal.SIGKILL)
    died = await_on(
        node,
        lambda: [
            e for e in events_about(node, "default", "Node", node.name) if e["reason"] == "MPSDaemonDied"
        ],
        "an MPSDaemonDied Event on the Node",
    )
    assert str(record["pid"]) in died[0]["note"]
    await_on(node, lambda: value(scrape(node), "gpu_dra_mps_daemons") == 0, "the MPS gauge to drop to 0")

    # A fatal XID on the GPU the broken claim did not get: health event, taint, Node Event.
    sick = uuid_of(node, "gpu-0")
    inject(node, sick, xid=48, recoveryAction=1)
    await_on(node, lambda: "gpu-0" in taints(node), "the XID taint on gpu-0")
    node_events = await_on(
        node,
        lambda: [
            e for e in events_about(node, "default", "Node", node.name) if e["reason"] == "DeviceTaintSet"
        ],
        "a DeviceTaintSet Event on the Node",
    )
    assert "gpu.nvidia.com/xid=48:NoSchedule" in node_events[0]["note"]

    text = await_on(
        node, lambda: scrape_where(node, "gpu_dra_health_events_total", 1, xid="48"), "the XID in the metrics"
    )
    assert value(text, "gpu_dra_device_taints", key="gpu.nvidia.com/xid", effect="NoSchedule") == 1

    lint = subprocess.run(
        [str(peers.promtool_path()), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert lint.returncode == 0, f"promtool check metrics: {lint.stdout}{lint.stderr}"


def test_a_quarantined_checkpoint_is_an_event_on_the_node(node_factory: NodeFactory) -> None:
    node = node_factory("observe-cp", "l4-x2", start=False)
    node.state_dir.mkdir(parents=True, exist_ok=True)
    (node.state_dir / "checkpoint.json").write_text('{"checksum": "0", "data": {"not": "a checkpoint"}}')
    node.start()
    events = await_on(
        node,
        lambda: [
            e
            for e in events_about(node, "default", "Node", node.name)
            if e["reason"] == "CheckpointQuarantined"
        ],
        "a CheckpointQuarantined Event on the Node",
    )
    assert events[0]["type"] == "Warning"
    assert "moved aside" in events[0]["note"]
    assert list(node.state_dir.glob("checkpoint.json.corrupt-*"))
