"""Metrics: NVIDIA's names and labels, millisecond buckets, stage timing through the contextvar hook,
scrape-time gauges, and the HTTP endpoint."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from driver import metrics as m
from driver.errors import LockBusyError, PermanentClaimError
from driver.health import Fault, FaultKind
from driver.taints import DeviceTaint


@pytest.fixture
def registry() -> Iterator[m.Metrics]:
    metrics = m.Metrics(
        "gpu.nvidia.com",
        "node-a",
        published=lambda: ["gpu", "gpu", "mig-dynamic"],
        prepared=lambda: [["gpu"], ["mig-dynamic", "mig-dynamic"]],
        mps_daemons=lambda: 1,
        publishing=lambda: (2, {"ApiError": 1}),
    )
    metrics.install()
    yield metrics
    metrics.stop()


def samples(metrics: m.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_nvidias_six_metrics_exist_at_zero_with_their_labels(registry: m.Metrics) -> None:
    got = samples(registry)
    for op in ("prepare", "unprepare"):
        labels = (("driver", "gpu.nvidia.com"), ("operation", op))
        assert got[("nvidia_dra_requests_total", labels)] == 0
        assert got[("nvidia_dra_request_duration_seconds_count", labels)] == 0
        assert got[("nvidia_dra_requests_inflight", labels)] == 0
    assert (
        "nvidia_dra_node_prepare_errors_total",
        (("driver", "gpu.nvidia.com"), ("error_type", "prepare_devices")),
    ) in got
    assert (
        "nvidia_dra_node_unprepare_errors_total",
        (("driver", "gpu.nvidia.com"), ("error_type", "unprepare_devices")),
    ) in got
    assert (
        got[
            (
                "nvidia_dra_prepared_devices",
                (("device_type", "gpu"), ("driver", "gpu.nvidia.com"), ("node", "node-a")),
            )
        ]
        == 1
    )
    assert (
        got[
            (
                "nvidia_dra_prepared_devices",
                (("device_type", "mig"), ("driver", "gpu.nvidia.com"), ("node", "node-a")),
            )
        ]
        == 2
    )
    assert got[("gpu_dra_published_devices", (("kind", "gpu"),))] == 2
    assert got[("gpu_dra_published_devices", (("kind", "mig-dynamic"),))] == 1
    assert got[("gpu_dra_prepared_claims", ())] == 2
    assert got[("gpu_dra_mps_daemons", ())] == 1
    assert not any(name.endswith("_created") for name, _ in got)


def test_requests_stages_and_errors_are_counted(registry: m.Metrics) -> None:
    with m.operation("prepare"):
        registry.started("prepare")
        with m.stage("cdi_write"):
            pass
        with m.stage("lock_wait"):
            pass
        registry.finished("prepare", None, 0.003, None)
    with m.stage("cdi_write"):  # outside an operation: not recorded
        pass
    registry.started("prepare")
    registry.finished("prepare", None, 0.5, LockBusyError("busy"))
    registry.started("unprepare")
    registry.finished("unprepare", None, 0.5, PermanentClaimError("bad"))
    got = samples(registry)
    labels = (("driver", "gpu.nvidia.com"), ("operation", "prepare"))
    assert got[("nvidia_dra_requests_total", labels)] == 1
    assert got[("nvidia_dra_requests_inflight", labels)] == 0
    # 3 ms lands in the 5 ms bucket, not in NVIDIA's first (50 ms) one alone.
    assert (
        got[("nvidia_dra_request_duration_seconds_bucket", (*labels[:1], ("le", "0.0025"), labels[1]))] == 0
    )
    assert got[("nvidia_dra_request_duration_seconds_bucket", (*labels[:1], ("le", "0.005"), labels[1]))] == 1
    assert got[("gpu_dra_prepare_stage_duration_seconds_count", (("stage", "cdi_write"),))] == 1
    assert got[("gpu_dra_prepare_stage_duration_seconds_count", (("stage", "lock_wait"),))] == 1
    assert (
        got[
            (
                "nvidia_dra_node_prepare_errors_total",
                (("driver", "gpu.nvidia.com"), ("error_type", "lock_acquire")),
            )
        ]
        == 1
    )
    assert (
        got[
            (
                "nvidia_dra_node_unprepare_errors_total",
                (("driver", "gpu.nvidia.com"), ("error_type", "unprepare_devices")),
            )
        ]
        == 1
    )


def test_publish_health_and_taint_metrics(registry: m.Metrics) -> None:
    registry.faults_seen([Fault(FaultKind.XID, 48), Fault(FaultKind.GPU_LOST)])
    xid = DeviceTaint("gpu.nvidia.com/xid", "48", "NoSchedule")
    registry.taints_now({"gpu-0": (xid,), "gpu-0-mig-1g5gb-19-0": (xid,)})
    got = samples(registry)
    assert got[("gpu_dra_slice_publish_attempts_total", ())] == 2
    assert got[("gpu_dra_slice_publish_errors_total", (("reason", "ApiError"),))] == 1
    assert got[("gpu_dra_health_events_total", (("xid", "48"),))] == 1
    assert got[("gpu_dra_health_events_total", (("xid", "gpu-lost"),))] == 1
    assert got[("gpu_dra_device_taints", (("effect", "NoSchedule"), ("key", "gpu.nvidia.com/xid")))] == 2
    registry.taints_now({})
    assert (
        "gpu_dra_device_taints",
        (("effect", "NoSchedule"), ("key", "gpu.nvidia.com/xid")),
    ) not in samples(registry)


def test_the_endpoint_serves_the_exposition(registry: m.Metrics) -> None:
    port = registry.serve(0, "127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    assert "nvidia_dra_requests_total" in body
    assert "gpu_dra_prepared_claims 2.0" in body
