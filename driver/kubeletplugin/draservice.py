"""The DRA node service the kubelet calls: NodePrepareResources / NodeUnprepareResources, v1 and v1beta1.

For every claim in a call: fetch it from the :class:`~driver.kubeletplugin.claims.ClaimSource`
(outside any lock; the GET is the slow part), check it is allocated and has the UID the kubelet
named, then hand it to the :class:`ClaimPreparer` (``driver.state.DeviceState`` in the daemon).
Every claim UID gets an entry in the reply; one bad claim yields that claim's ``error`` and never a
failed RPC. (The Go helper fails the whole call when a GET or the UID check fails; per-claim errors
let the kubelet start the pods whose claims are fine.) Claims of one call run in parallel.

v1beta1 is served by converting to and from v1, as the Go helper's wrapper does; it lacks
``share_id``. Subrequest names are cut to their request (``req/sub`` -> ``req``) because the kubelet
matches container ``resources.claims[].request`` against the top-level name.

Why a synchronous ``grpc.server`` with a thread pool and not ``grpc.aio``: everything a claim
touches below this layer blocks (the Kubernetes client, flock, fsync, NVML), so an event loop
would only hand each call to a thread anyway; gRPC's C core does the HTTP/2 I/O without the GIL.

This module knows nothing about GPUs, CDI or checkpoints.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import structlog

from driver.errors import ClaimError
from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc, dra_v1beta1_pb2, dra_v1beta1_pb2_grpc
from driver.kubeletplugin.claims import Claim, ClaimRef, ClaimSource, check_claim_ref, fetch_allocated
from driver.kubeletplugin.sockets import MAX_SOCKET_PATH
from driver.metrics import operation, stage

log = structlog.get_logger(__name__)

_request_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class PreparedDevice:
    """One device of a prepared claim, as the kubelet is told about it."""

    request_names: tuple[str, ...]
    pool: str
    device: str
    cdi_device_ids: tuple[str, ...]
    share_id: str | None = None


class RequestObserver(Protocol):
    """Hears about each claim's prepare/unprepare: its start, and its outcome with the kubelet's message."""

    def started(self, op: str) -> None: ...

    def finished(
        self, op: str, ref: ClaimRef, seconds: float, error: Exception | None, message: str
    ) -> None: ...


class ClaimPreparer(Protocol):
    """The driver behind the service. Both calls must be idempotent and safe to run concurrently."""

    def prepare(self, claim: Claim) -> Sequence[PreparedDevice]:
        """Prepare an allocated claim (v1 JSON shape) and return its devices.

        Raises:
            ClaimError: the claim cannot be prepared; the message goes to the kubelet as is.
        """
        ...

    def unprepare(self, ref: ClaimRef) -> None:
        """Undo what prepare did for ``ref.uid``; an unknown claim is a success.

        Raises:
            ClaimError: the claim cannot be unprepared now; the kubelet retries.
        """
        ...


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """The reply for one claim: devices, or an error text."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


def base_request_name(name: str) -> str:
    """``req/sub`` -> ``req``: the name the kubelet matches container requests against."""
    return name.split("/", 1)[0]


def _dedupe(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _ambiguous_uid(uid: str, names: Sequence[str], rpc: str) -> str:
    shown = ", ".join(n if len(n) <= 80 else n[:80] + "..." for n in names[:4])
    what = "prepared" if rpc == "NodePrepareResources" else "unprepared"
    return (
        f"claim UID {uid[:128]} was sent {len(names)} times in one call under different names ({shown}); "
        f"nothing was {what} for it in this call - one UID names one claim; check what is calling the plugin"
    )


#: Longest error text sent to the kubelet (it lands in the pod's events).
MAX_ERROR_CHARS = 2048


def _error_text(exc: BaseException, what: str, ref: ClaimRef) -> str:
    if isinstance(exc, ClaimError):
        text = str(exc)
    else:
        text = f"internal error while {what} claim {ref}: {type(exc).__name__}: {exc}; see the plugin log"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "... [cut]"


@dataclass
class DraService:
    """Version-neutral core of the DRA node service (what the v1 and v1beta1 servicers call)."""

    preparer: ClaimPreparer
    source: ClaimSource
    max_parallel_claims: int = 8
    #: Told about every claim's start and outcome (metrics, Events); set once the daemon has them.
    observer: RequestObserver | None = None
    _pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.max_parallel_claims, thread_name_prefix="claim")

    def close(self) -> None:
        """Stop the per-claim worker threads (after the gRPC server stopped); queued work is
        dropped, running work is not waited for (the server's grace was its time to finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def prepare(self, refs: Sequence[ClaimRef]) -> dict[str, ClaimOutcome]:
        """Prepare every claim; the result has one entry per claim UID."""
        return self._each(refs, self._prepare_one, rpc="NodePrepareResources")

    def unprepare(self, refs: Sequence[ClaimRef]) -> dict[str, ClaimOutcome]:
        """Unprepare every claim; the result has one entry per claim UID (empty error = done)."""
        return self._each(refs, self._unprepare_one, rpc="NodeUnprepareResources")

    def _each(
        self, refs: Sequence[ClaimRef], one: Callable[[ClaimRef, str, int], ClaimOutcome], rpc: str
    ) -> dict[str, ClaimOutcome]:
        if not refs:
            return {}  # the kubelet's (and our health check's) liveness probe: answer at once
        request_id = next(_request_ids)
        # The reply has one entry per UID, so a UID sent twice gets one answer: the same reference
        # twice is done once; one UID under two names is refused before anything is done, so the
        # single entry tells the truth about both.
        by_uid: dict[str, list[ClaimRef]] = {}
        for ref in refs:
            by_uid.setdefault(ref.uid, []).append(ref)
        outcomes: dict[str, ClaimOutcome] = {}
        todo: list[ClaimRef] = []
        for uid, same in by_uid.items():
            names = sorted({f"{r.namespace}/{r.name}" for r in same})
            if len(names) > 1:
                outcomes[uid] = ClaimOutcome(error=_ambiguous_uid(uid, names, rpc))
                log.warning(
                    "claim UID sent under several names; refused", claim_uid=uid, names=names, rpc=rpc
                )
            else:
                todo.append(same[0])
        if len(todo) == 1:
            outcomes[todo[0].uid] = one(todo[0], rpc, request_id)
        elif todo:
            futures = [self._pool.submit(one, ref, rpc, request_id) for ref in todo]
            for ref, fut in zip(todo, futures, strict=True):
                outcomes[ref.uid] = fut.result()
        return {uid: outcomes[uid] for uid in by_uid}

    def _prepare_one(self, ref: ClaimRef, rpc: str, request_id: int) -> ClaimOutcome:
        observer = self.observer
        with (
            structlog.contextvars.bound_contextvars(claim=str(ref), rpc=rpc, request_id=request_id),
            operation("prepare"),
        ):
            started = time.perf_counter()
            if observer is not None:
                observer.started("prepare")
            try:
                with stage("claim_get"):
                    claim = fetch_allocated(self.source, ref)
                fetched = time.perf_counter()
                devices = self.preparer.prepare(claim)
            except Exception as exc:  # noqa: BLE001 - the claim boundary: every failure becomes its error
                self._log_failure(exc, "prepare failed")
                message = _error_text(exc, "preparing", ref)
                if observer is not None:
                    observer.finished("prepare", ref, time.perf_counter() - started, exc, message)
                return ClaimOutcome(error=message)
            done = time.perf_counter()
            if observer is not None:
                observer.finished("prepare", ref, done - started, None, "")
            log.info(
                "claim prepared",
                devices=[d.device for d in devices],
                get_ms=round((fetched - started) * 1000, 3),
                prepare_ms=round((done - fetched) * 1000, 3),
            )
            return ClaimOutcome(
                devices=tuple(
                    PreparedDevice(
                        request_names=_dedupe([base_request_name(n) for n in d.request_names]),
                        pool=d.pool,
                        device=d.device,
                        cdi_device_ids=d.cdi_device_ids,
                        share_id=d.share_id,
                    )
                    for d in devices
                )
            )

    def _unprepare_one(self, ref: ClaimRef, rpc: str, request_id: int) -> ClaimOutcome:
        observer = self.observer
        with (
            structlog.contextvars.bound_contextvars(claim=str(ref), rpc=rpc, request_id=request_id),
            operation("unprepare"),
        ):
            started = time.perf_counter()
            if observer is not None:
                observer.started("unprepare")
            try:
                check_claim_ref(ref)
                self.preparer.unprepare(ref)
            except Exception as exc:  # noqa: BLE001 - the claim boundary: every failure becomes its error
                self._log_failure(exc, "unprepare failed")
                message = _error_text(exc, "unpreparing", ref)
                if observer is not None:
                    observer.finished("unprepare", ref, time.perf_counter() - started, exc, message)
                return ClaimOutcome(error=message)
            if observer is not None:
                observer.finished("unprepare", ref, time.perf_counter() - started, None, "")
            log.info("claim unprepared", unprepare_ms=round((time.perf_counter() - started) * 1000, 3))
            return ClaimOutcome()

    @staticmethod
    def _log_failure(exc: Exception, event: str) -> None:
        if isinstance(exc, ClaimError):
            log.warning(event, error=str(exc), error_type=type(exc).__name__)
        else:
            log.error(event, error_type=type(exc).__name__, exc_info=exc)


def _refs(claims: Sequence[dra_v1_pb2.Claim] | Sequence[dra_v1beta1_pb2.Claim]) -> list[ClaimRef]:
    return [ClaimRef(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]


class V1Servicer(dra_v1_pb2_grpc.DRAPluginServicer):
    """``k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin``."""

    def __init__(self, service: DraService) -> None:
        self._service = service

    def NodePrepareResources(
        self, request: dra_v1_pb2.NodePrepareResourcesRequest, context: grpc.ServicerContext
    ) -> dra_v1_pb2.NodePrepareResourcesResponse:
        """Prepare each claim; one entry per claim UID."""
        response = dra_v1_pb2.NodePrepareResourcesResponse()
        for uid, outcome in self._service.prepare(_refs(request.claims)).items():
            entry = response.claims[uid]  # creates the entry even when it stays empty
            if outcome.error:
                entry.error = outcome.error
                continue
            for d in outcome.devices:
                device = entry.devices.add(
                    request_names=d.request_names,
                    pool_name=d.pool,
                    device_name=d.device,
                    cdi_device_ids=d.cdi_device_ids,
                )
                if d.share_id:
                    device.share_id = d.share_id
        return response

    def NodeUnprepareResources(
        self, request: dra_v1_pb2.NodeUnprepareResourcesRequest, context: grpc.ServicerContext
    ) -> dra_v1_pb2.NodeUnprepareResourcesResponse:
        """Unprepare each claim; one entry per claim UID, empty error = success."""
        response = dra_v1_pb2.NodeUnprepareResourcesResponse()
        for uid, outcome in self._service.unprepare(_refs(request.claims)).items():
            response.claims[uid].error = outcome.error
        return response


class V1Beta1Servicer(dra_v1beta1_pb2_grpc.DRAPluginServicer):
    """``k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin`` (kubelet 1.32/1.33): v1 without share_id."""

    def __init__(self, service: DraService) -> None:
        self._service = service

    def NodePrepareResources(
        self, request: dra_v1beta1_pb2.NodePrepareResourcesRequest, context: grpc.ServicerContext
    ) -> dra_v1beta1_pb2.NodePrepareResourcesResponse:
        """Prepare each claim; one entry per claim UID."""
        response = dra_v1beta1_pb2.NodePrepareResourcesResponse()
        for uid, outcome in self._service.prepare(_refs(request.claims)).items():
            entry = response.claims[uid]
            if outcome.error:
                entry.error = outcome.error
                continue
            for d in outcome.devices:
                entry.devices.add(
                    request_names=d.request_names,
                    pool_name=d.pool,
                    device_name=d.device,
                    cdi_device_ids=d.cdi_device_ids,
                )
        return response

    def NodeUnprepareResources(
        self, request: dra_v1beta1_pb2.NodeUnprepareResourcesRequest, context: grpc.ServicerContext
    ) -> dra_v1beta1_pb2.NodeUnprepareResourcesResponse:
        """Unprepare each claim; one entry per claim UID, empty error = success."""
        response = dra_v1beta1_pb2.NodeUnprepareResourcesResponse()
        for uid, outcome in self._service.unprepare(_refs(request.claims)).items():
            response.claims[uid].error = outcome.error
        return response


def unix_target(path: Path) -> str:
    """The gRPC address of a Unix socket at ``path``.

    Raises:
        ValueError: ``path`` is too long for a Unix socket address.
    """
    absolute = path.absolute()
    if len(str(absolute).encode()) > MAX_SOCKET_PATH:
        raise ValueError(
            f"socket path {absolute} is longer than {MAX_SOCKET_PATH} bytes, the Unix socket limit; "
            "use a shorter --kubelet-plugins-directory-path / --kubelet-registrar-directory-path"
        )
    return f"unix://{absolute}"


def serve(
    socket_path: Path,
    register: Sequence[Callable[[grpc.Server], None]],
    max_workers: int = 16,
) -> grpc.Server:
    """Start a gRPC server on ``socket_path`` with the given ``add_*_to_server`` callbacks.

    The socket accepts connections when this returns.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"grpc-{socket_path.stem}"),
        options=[("grpc.so_reuseport", 0)],
    )
    for add in register:
        add(server)
    server.add_insecure_port(unix_target(socket_path))
    server.start()
    return server


def dra_handlers(service: DraService) -> list[Callable[[grpc.Server], None]]:
    """The callbacks that add the v1 and v1beta1 DRA servicers to a server."""
    v1 = V1Servicer(service)
    v1beta1 = V1Beta1Servicer(service)
    return [
        lambda s: dra_v1_pb2_grpc.add_DRAPluginServicer_to_server(v1, s),
        lambda s: dra_v1beta1_pb2_grpc.add_DRAPluginServicer_to_server(v1beta1, s),
    ]
