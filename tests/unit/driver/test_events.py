"""Events: the objects sent (events.k8s.io/v1 on the claim and the node), the rate limit, best effort;
the MPS watch reporting a dead daemon once."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import pytest

from driver.checkpoint import PreparedClaim
from driver.events import EventRecorder, RateLimit
from driver.kubeletplugin.claims import ClaimRef
from driver.mpswatch import MpsWatch, alive
from driver.taints import DeviceTaint, TaintChange
from sharing.mps import _proc_start_time


class FakeKube:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail
        self.sent = threading.Event()

    def create_event(self, namespace: str, event: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError('events.events.k8s.io is forbidden: cannot create resource "events"')
        self.events.append((namespace, event))
        self.sent.set()
        return event

    def get_node(self, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "uid": "node-uid-1"}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(recorder: EventRecorder, kube: FakeKube, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(kube.events) + recorder.dropped < count and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def recorder() -> Any:
    kube = FakeKube()
    clock = Clock()
    rec = EventRecorder(kube, "node-a", RateLimit(min_interval_s=60, burst=5, refill_s=10, clock=clock))
    rec.start()
    yield rec, kube, clock
    rec.stop()


REF = ClaimRef(namespace="ns", uid="uid-1", name="claim-a")


def test_a_failed_prepare_is_an_event_on_the_claim_with_the_kubelets_message(recorder: Any) -> None:
    rec, kube, _ = recorder
    rec.finished("prepare", REF, 0.1, ValueError("x"), "invalid opaque device config: fix it")
    rec.finished("prepare", REF, 0.1, None, "")  # a success says nothing
    drain(rec, kube, 1)
    [(namespace, event)] = kube.events
    assert namespace == "ns"
    assert event["apiVersion"] == "events.k8s.io/v1"
    assert event["regarding"] == {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "name": "claim-a",
        "namespace": "ns",
        "uid": "uid-1",
    }
    assert (event["type"], event["reason"], event["action"]) == (
        "Warning",
        "PrepareFailed",
        "PrepareResources",
    )
    assert event["note"] == "invalid opaque device config: fix it"
    assert event["reportingController"] == "gpu.nvidia.com/kubelet-plugin"
    assert event["eventTime"].endswith("Z")


def test_a_retry_loop_sends_one_event_per_interval_and_counts_the_rest(recorder: Any) -> None:
    rec, kube, clock = recorder
    for _ in range(50):
        rec.claim_failed("prepare", REF, "boom")
    drain(rec, kube, 1)
    assert len(kube.events) == 1
    clock.now += 61
    rec.claim_failed("prepare", REF, "boom")
    drain(rec, kube, 2)
    assert len(kube.events) == 2
    assert "49 more like this held back" in kube.events[1][1]["note"]


def test_the_shared_bucket_caps_a_burst_of_different_events(recorder: Any) -> None:
    rec, kube, clock = recorder
    for i in range(20):
        rec.claim_failed("prepare", ClaimRef("ns", f"uid-{i}", f"c-{i}"), "boom")
    drain(rec, kube, 5)
    assert len(kube.events) == 5  # the burst
    clock.now += 10  # one token back
    rec.claim_failed("prepare", ClaimRef("ns", "uid-new", "c-new"), "boom")
    drain(rec, kube, 6)
    assert len(kube.events) == 6


def test_node_events_carry_the_nodes_uid_and_group_taint_changes(recorder: Any) -> None:
    rec, kube, _ = recorder
    rec.checkpoint_quarantined("checkpoint was corrupt (bad checksum); moved aside to /x.corrupt-1")
    xid = DeviceTaint("gpu.nvidia.com/xid", "48", "NoSchedule")
    rec.taints_changed([TaintChange("gpu-0", xid, True), TaintChange("gpu-0-mig-1g5gb-19-0", xid, True)])
    rec.mps_daemon_died("uid-1-abc", "ns/claim-a", 4242)
    drain(rec, kube, 3)
    by_reason = {e["reason"]: (ns, e) for ns, e in kube.events}
    assert set(by_reason) == {"CheckpointQuarantined", "DeviceTaintSet", "MPSDaemonDied"}
    for ns, event in by_reason.values():
        assert ns == "default"
        assert event["regarding"] == {
            "apiVersion": "v1",
            "kind": "Node",
            "name": "node-a",
            "uid": "node-uid-1",
        }
    assert "gpu-0, gpu-0-mig-1g5gb-19-0" in by_reason["DeviceTaintSet"][1]["note"]
    assert "gpu.nvidia.com/xid=48:NoSchedule" in by_reason["DeviceTaintSet"][1]["note"]
    assert "4242" in by_reason["MPSDaemonDied"][1]["note"]


def test_a_refused_event_is_logged_and_dropped_never_raised() -> None:
    kube = FakeKube(fail=True)
    rec = EventRecorder(kube, "node-a")
    rec.start()
    try:
        rec.claim_failed("unprepare", REF, "boom")
        drain(rec, kube, 1)
        assert rec.dropped == 1
        assert rec.sent == 0
    finally:
        rec.stop()


def claim_with_mps(pid: int, start_time: int | None) -> PreparedClaim:
    return PreparedClaim(
        uid="uid-1",
        namespace="ns",
        name="claim-a",
        state="PrepareCompleted",
        devices=[],
        sharing=[{"kind": "mps", "groupId": "uid-1-abc", "pid": pid, "startTime": start_time}],
        started_at=0.0,
    )


def test_the_mps_watch_reports_a_dead_daemon_once() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        start = _proc_start_time(proc.pid)
        assert alive(proc.pid, start)
        assert not alive(proc.pid, (start or 0) + 1)  # a recycled pid is not the daemon
        died: list[tuple[str, str, int | None]] = []
        claims = [claim_with_mps(proc.pid, start)]
        watch = MpsWatch(lambda: claims, lambda *a: died.append(a))
        assert watch.check() == 1
        proc.kill()
        proc.wait()
        assert watch.check() == 0
        assert watch.check() == 0
        assert died == [("uid-1-abc", "ns/claim-a", proc.pid)]
        assert watch.running == 0
    finally:
        proc.kill()
        proc.wait()
