"""Prometheus metrics at ``/metrics``: NVIDIA's six request metrics plus what a GPU node operator needs.

Why it exists: an operator needs to see prepare latency and failures, what the node publishes and
holds, and GPU faults, without reading logs. NVIDIA's names and labels are kept so their
dashboards work unchanged:

* ``nvidia_dra_requests_total{driver,operation}`` - successful prepares/unprepares (per claim);
* ``nvidia_dra_request_duration_seconds{driver,operation}`` - histogram;
* ``nvidia_dra_requests_inflight{driver,operation}``;
* ``nvidia_dra_prepared_devices{node,driver,device_type}`` - ``gpu`` / ``mig``, from the checkpoint;
* ``nvidia_dra_node_prepare_errors_total{driver,error_type}`` and
  ``nvidia_dra_node_unprepare_errors_total{driver,error_type}`` - ``lock_acquire``,
  ``prepare_devices`` / ``unprepare_devices``.

Ours (``gpu_dra_``): per-stage histograms ``gpu_dra_prepare_stage_duration_seconds{stage}`` and
``gpu_dra_unprepare_stage_duration_seconds{stage}`` (claim_get, lock_wait, mig_create,
mig_destroy, mps_start, mps_stop, timeslice_set, timeslice_reset, cdi_write, cdi_delete,
checkpoint_write), ``gpu_dra_published_devices{kind}``, ``gpu_dra_prepared_claims``,
``gpu_dra_mps_daemons``, ``gpu_dra_slice_publish_attempts_total`` /
``gpu_dra_slice_publish_errors_total``, ``gpu_dra_health_events_total{xid}`` (``kind`` for a lost
or unmonitored GPU) and ``gpu_dra_device_taints{key,effect}``.

Histogram buckets start at 0.5 ms: a full-GPU prepare takes a few milliseconds, which NVIDIA's
buckets (from 50 ms) put all in the first bucket.

The prepare path marks its stages with :func:`stage` and :func:`operation`, which cost nothing
until :meth:`Metrics.install` points them at a registry; ``prometheus_client`` is imported only
then (after the plugin registered with the kubelet), so it stays off the start-up path.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from driver.health import Fault
    from driver.taints import TaintChange

log = structlog.get_logger(__name__)

#: Seconds; resolves the sub-millisecond stages of a full-GPU prepare up to slow MIG and MPS starts.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OPERATIONS = ("prepare", "unprepare")

_operation: contextvars.ContextVar[str] = contextvars.ContextVar("gpu_dra_operation", default="")
_sink: Callable[[str, str, float], None] | None = None


@contextlib.contextmanager
def operation(name: str) -> Iterator[None]:
    """The stages timed inside this block belong to ``name`` (prepare or unprepare)."""
    token = _operation.set(name)
    try:
        yield
    finally:
        _operation.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one stage of the current operation (nothing happens outside an operation or before install)."""
    sink, op = _sink, _operation.get()
    if sink is None or not op:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        sink(op, name, time.perf_counter() - started)


def error_type(operation_name: str, exc: BaseException) -> str:
    """NVIDIA's ``error_type`` label for a failed claim."""
    from driver.errors import LockBusyError

    if isinstance(exc, LockBusyError):
        return "lock_acquire"
    return f"{operation_name}_devices"


class Metrics:
    """The registry and every metric of one plugin; :meth:`install` makes :func:`stage` record into it.

    Args:
        driver, node: label values.
        state: callables read at scrape time (so the figures are never stale):
            ``published`` -> device kinds of the published inventory, ``prepared`` -> the
            checkpoint's device kinds per claim, ``mps_daemons`` -> MPS daemons running.
    """

    def __init__(
        self,
        driver: str,
        node: str,
        *,
        published: Callable[[], Iterable[str]] = tuple,
        prepared: Callable[[], Iterable[Iterable[str]]] = tuple,
        mps_daemons: Callable[[], int] = lambda: 0,
        publishing: Callable[[], tuple[int, Mapping[str, int]]] = lambda: (0, {}),
    ) -> None:
        import prometheus_client as prom

        prom.disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: unused by dashboards
        self.driver = driver
        self.node = node
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ("driver", "operation")
        self.requests = prom.Counter(
            "nvidia_dra_requests", "Successful prepare/unprepare requests, per claim.", labels, registry=r
        )
        self.duration = prom.Histogram(
            "nvidia_dra_request_duration_seconds",
            "Time to prepare/unprepare one claim, claim GET included.",
            labels,
            buckets=BUCKETS,
            registry=r,
        )
        self.inflight = prom.Gauge(
            "nvidia_dra_requests_inflight", "Claims being prepared/unprepared now.", labels, registry=r
        )
        self.prepare_errors = prom.Counter(
            "nvidia_dra_node_prepare_errors", "Failed claim prepares.", ("driver", "error_type"), registry=r
        )
        self.unprepare_errors = prom.Counter(
            "nvidia_dra_node_unprepare_errors",
            "Failed claim unprepares.",
            ("driver", "error_type"),
            registry=r,
        )
        self.stages = {
            op: prom.Histogram(
                f"gpu_dra_{op}_stage_duration_seconds",
                f"Time of each stage of a claim {op}.",
                ("stage",),
                buckets=BUCKETS,
                registry=r,
            )
            for op in OPERATIONS
        }
        self.health_events = prom.Counter(
            "gpu_dra_health_events",
            "GPU faults seen: xid is the XID number, or gpu-lost / unmonitored.",
            ("xid",),
            registry=r,
        )
        self.taints = prom.Gauge(
            "gpu_dra_device_taints", "Device taints published now.", ("key", "effect"), registry=r
        )
        for op in OPERATIONS:  # present at zero from the start, as NVIDIA's are
            self.requests.labels(driver, op)
            self.duration.labels(driver, op)
            self.inflight.labels(driver, op)
        self.prepare_errors.labels(driver, "prepare_devices")
        self.unprepare_errors.labels(driver, "unprepare_devices")
        r.register(
            _StateCollector(
                driver,
                node,
                published=published,
                prepared=prepared,
                mps_daemons=mps_daemons,
                publishing=publishing,
            )
        )
        self._server: Any = None
        self._thread: Any = None

    # -- recording ------------------------------------------------------------------------------

    def install(self) -> None:
        """Point :func:`stage` at this registry."""
        global _sink  # noqa: PLW0603 - the one switch that turns stage timing on
        _sink = self._observe_stage

    def uninstall(self) -> None:
        global _sink  # noqa: PLW0603
        if _sink == self._observe_stage:
            _sink = None

    def _observe_stage(self, op: str, name: str, seconds: float) -> None:
        hist = self.stages.get(op)
        if hist is not None:
            hist.labels(name).observe(seconds)

    def started(self, op: str) -> None:
        """A claim's prepare/unprepare began (the ``RequestObserver`` side)."""
        self.inflight.labels(self.driver, op).inc()

    def finished(
        self, op: str, ref: object, seconds: float, error: BaseException | None, message: str = ""
    ) -> None:
        self.inflight.labels(self.driver, op).dec()
        if error is None:
            self.requests.labels(self.driver, op).inc()
            self.duration.labels(self.driver, op).observe(seconds)
            return
        errors = self.prepare_errors if op == "prepare" else self.unprepare_errors
        errors.labels(self.driver, error_type(op, error)).inc()

    def faults_seen(self, faults: Iterable[Fault]) -> None:
        for fault in faults:
            self.health_events.labels(str(fault.xid) if fault.xid is not None else fault.kind.value).inc()

    def taints_now(self, current: Mapping[str, Iterable[Any]], _changes: Iterable[TaintChange] = ()) -> None:
        counts: dict[tuple[str, str], int] = {}
        for taints in current.values():
            for t in taints:
                counts[(t.key, t.effect)] = counts.get((t.key, t.effect), 0) + 1
        self.taints.clear()
        for (key, effect), n in counts.items():
            self.taints.labels(key, effect).set(n)

    # -- serving --------------------------------------------------------------------------------

    def serve(self, port: int, address: str = "") -> int:
        """Serve ``/metrics`` on ``port`` (0: any free one); returns the port."""
        import prometheus_client as prom

        addr = address or "0.0.0.0"  # noqa: S104 - scraped over the pod network
        self._server, self._thread = prom.start_http_server(port, addr=addr, registry=self.registry)
        bound = int(self._server.server_port)
        log.info("metrics server listening", port=bound, path="/metrics")
        return bound

    def stop(self) -> None:
        self.uninstall()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def exposition(self) -> bytes:
        """The text format of everything, as a scrape gets it."""
        import prometheus_client as prom

        data: bytes = prom.generate_latest(self.registry)
        return data


class _StateCollector:
    """Gauges read from the plugin's state at scrape time."""

    def __init__(
        self,
        driver: str,
        node: str,
        *,
        published: Callable[[], Iterable[str]],
        prepared: Callable[[], Iterable[Iterable[str]]],
        mps_daemons: Callable[[], int],
        publishing: Callable[[], tuple[int, Mapping[str, int]]],
    ) -> None:
        self._publishing = publishing
        self._driver = driver
        self._node = node
        self._published = published
        self._prepared = prepared
        self._mps = mps_daemons

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kinds: dict[str, int] = {}
        for kind in self._published():
            kinds[kind] = kinds.get(kind, 0) + 1
        published = GaugeMetricFamily(
            "gpu_dra_published_devices", "Devices this node publishes, by kind.", labels=("kind",)
        )
        for kind in sorted(kinds):
            published.add_metric((kind,), kinds[kind])
        yield published
        device_types: dict[str, int] = {"gpu": 0, "mig": 0}
        claims = 0
        for claim_kinds in self._prepared():
            claims += 1
            for kind in claim_kinds:
                key = "mig" if kind.startswith("mig") else kind if kind in device_types else "unknown"
                device_types[key] = device_types.get(key, 0) + 1
        devices = GaugeMetricFamily(
            "nvidia_dra_prepared_devices",
            "Devices of prepared claims, by type (from the checkpoint).",
            labels=("node", "driver", "device_type"),
        )
        for kind in sorted(device_types):
            devices.add_metric((self._node, self._driver, kind), device_types[kind])
        yield devices
        yield GaugeMetricFamily("gpu_dra_prepared_claims", "Claims prepared on this node.", value=claims)
        yield GaugeMetricFamily(
            "gpu_dra_mps_daemons", "MPS control daemons running for claims.", value=self._mps()
        )
        attempts, errors = self._publishing()
        yield CounterMetricFamily(
            "gpu_dra_slice_publish_attempts", "ResourceSlice sync attempts since start.", value=attempts
        )
        failed = CounterMetricFamily(
            "gpu_dra_slice_publish_errors", "Failed ResourceSlice sync attempts, by error.", labels=["reason"]
        )
        for reason in sorted(errors):
            failed.add_metric((reason,), errors[reason])
        yield failed
