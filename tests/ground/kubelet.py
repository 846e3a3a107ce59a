"""A kubelet stand-in for the DRA side of a node, for what the real kubelet cannot do in a test.

Why: the e2e nodes run the real kubelet (tests.ground.realkubelet). This emulator stays for
kubelet-side fault injection (calls a kubelet would not make, on demand, in-process) and for a
v1beta1-only 1.32 kubelet where none is built. It plays the kubelet's part of the DRA protocol
as written down in shared/spec/kubelet-dra-protocol.md, independently of the plugin (it imports
nothing of the driver except the generated wire stubs):

* plugin registration: it watches a registry dir (recursively; only Unix sockets; names
  starting with "." ignored), dials each socket, calls GetInfo with a 1 s deadline, checks the
  type is "DRAPlugin", picks the first of the plugin's supported services that this kubelet
  version knows and answers NotifyRegistrationStatus; failed registrations are retried with
  the kubelet's back-off; removing the socket file deregisters that instance;
* instance choice: the most recently registered instance whose gRPC connection is up, else
  the most recent one;
* NodePrepareResources / NodeUnprepareResources with the kubelet's response checks and
  error texts, over the v1 or v1beta1 service chosen at registration;
* pod-driven mode: pods bound to its node get their ResourceClaims prepared (one batch per
  driver per pod, claims prepared once however many pods share them), the CDI device ids a
  container would get are recorded, the pod is marked Running; when the last pod using a
  claim terminates the claim is unprepared and the pod force-deleted;
* ResourceSlice wiping: the start-up wipe of all of the node's slices, and the wipe of one
  driver's slices after it has had no connected instance for `wipe_delay_s`.

What it does not do: run containers, talk CRI, checkpoint its claim cache across restarts,
watch resource health, or report node status. Threads, not asyncio, so tests drive it simply.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog

from driver.kubeletapi import (
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    registration_pb2,
    registration_pb2_grpc,
)

log = structlog.get_logger(__name__)

DRA_PLUGIN_TYPE = "DRAPlugin"
SERVICE_V1 = "v1.DRAPlugin"
SERVICE_V1BETA1 = "v1beta1.DRAPlugin"
KUBELET_134_SERVICES: tuple[str, ...] = (SERVICE_V1, SERVICE_V1BETA1)
KUBELET_132_SERVICES: tuple[str, ...] = (SERVICE_V1BETA1,)

GET_INFO_TIMEOUT_S = 1.0
NOTIFY_TIMEOUT_S = 5.0
DIAL_TIMEOUT_S = 10.0
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 120.0
WIPE_RETRY_INITIAL_S = 1.0
WIPE_RETRY_MAX_S = 300.0

PROBE_METHOD = "/gpu_dra.tests.KubeletEmulator/Connect"

PREPARE = "NodePrepareResources"
UNPREPARE = "NodeUnprepareResources"

# (namespace, uid, name) of a ResourceClaim, exactly what the kubelet puts on the wire.
ClaimRef = tuple[str, str, str]


class KubeletError(Exception):
    """A call failed the way it fails in the kubelet; the message is the kubelet's text.

    `partial` holds the per-claim results that were valid before the failure was found.
    """

    def __init__(self, message: str, partial: dict[str, list[PreparedDevice]] | None = None) -> None:
        super().__init__(message)
        self.partial: dict[str, list[PreparedDevice]] = partial or {}


@dataclass(frozen=True)
class Registration:
    """One registration attempt as the kubelet saw it; `error` is "" when it was accepted."""

    driver: str
    endpoint: str
    service: str
    registered_at: float
    socket_path: Path
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class PreparedDevice:
    """One device of a prepared claim, as the kubelet stores it from the response."""

    request_names: tuple[str, ...]
    pool_name: str
    device_name: str
    cdi_device_ids: tuple[str, ...]
    share_id: str | None = None


@dataclass(frozen=True)
class CallRecord:
    """One NodePrepareResources / NodeUnprepareResources call and how it ended."""

    method: str
    driver: str
    service: str
    endpoint: str
    claims: tuple[ClaimRef, ...]
    error: str
    at: float


@dataclass(frozen=True)
class WipeRecord:
    """One ResourceSlice DeleteCollection; driver None = the start-up wipe of all drivers."""

    driver: str | None
    field_selector: str
    sent: bool
    error: str
    at: float


@dataclass
class _Instance:
    record: Registration
    channel: grpc.Channel
    seq: int
    state: grpc.ChannelConnectivity = grpc.ChannelConnectivity.IDLE
    last_nudge: float = 0.0
    on_state: Callable[[grpc.ChannelConnectivity], None] | None = None

    @property
    def connected(self) -> bool:
        return self.state is grpc.ChannelConnectivity.READY


@dataclass
class _SocketState:
    ident: tuple[int, int]
    instance: _Instance | None = None
    in_flight: bool = False
    next_try: float = 0.0
    backoff: float = RETRY_INITIAL_S


@dataclass
class _ClaimInfo:
    """The kubelet's claim info cache entry: one per claim on the node."""

    namespace: str
    name: str
    uid: str
    drivers: tuple[str, ...]
    pods: set[str] = field(default_factory=set)
    devices: dict[str, list[PreparedDevice]] = field(default_factory=dict)
    prepared: bool = False


@dataclass
class _PodState:
    namespace: str
    name: str
    claim_names: dict[str, str] = field(default_factory=dict)  # pod claim name -> ResourceClaim name
    running: bool = False
    finished: bool = False


def _go_code(code: grpc.StatusCode) -> str:
    return "".join(part.capitalize() for part in code.name.split("_"))


def _rpc_error_text(err: grpc.RpcError) -> str:
    # Channel-level RpcErrors are also grpc.Call objects; the stubs do not say so.
    call: Any = err
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = call.details() if hasattr(call, "details") else str(err)
    return f"rpc error: code = {_go_code(code)} desc = {details}"


def _json(resp: Any) -> Any:
    """Body of a `_preload_content=False` call (a urllib3 response; the client's types say otherwise)."""
    return json.loads(resp.data)


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KubeletEmulator:
    """The DRA half of a kubelet for one node; see the module docstring for what it covers."""

    def __init__(
        self,
        node_name: str,
        api_client: Any | None,
        registry_dir: Path,
        *,
        known_services: Sequence[str] = KUBELET_134_SERVICES,
        wipe_delay_s: float = 30.0,
        call_timeout_s: float = 45.0,
        poll_interval_s: float = 0.05,
    ) -> None:
        self.node_name = node_name
        self.api_client = api_client
        self.registry_dir = Path(registry_dir)
        self.known_services = tuple(known_services)
        self.wipe_delay_s = wipe_delay_s
        self.call_timeout_s = call_timeout_s
        self.poll_interval_s = poll_interval_s

        self.registrations: list[Registration] = []
        self.calls: list[CallRecord] = []
        self.wipes: list[WipeRecord] = []
        self.pod_cdi_devices: dict[str, dict[str, list[str]]] = {}
        self.pod_errors: dict[str, str] = {}
        self.sync_errors: list[str] = []

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._sockets: dict[Path, _SocketState] = {}
        self._instances: dict[str, list[_Instance]] = {}
        self._seq = 0
        self._pending_wipes: dict[str, float] = {}
        self._wiped_since_connect: set[str] = set()
        self._claims: dict[str, _ClaimInfo] = {}
        self._pods: dict[str, _PodState] = {}
        self._sync_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._handshakes: list[threading.Thread] = []
        self._pod_sync_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start watching the registry dir; sockets already there are picked up at once."""
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        t = threading.Thread(target=self._watch_loop, name=f"kubelet-watch-{self.node_name}", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("kubelet emulator started", node=self.node_name, registry_dir=str(self.registry_dir))

    def stop(self) -> None:
        """Stop all threads and close plugin connections; records stay readable."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        for t in self._handshakes:
            t.join(timeout=5)
        self._handshakes.clear()
        if self._pod_sync_thread is not None:
            self._pod_sync_thread.join(timeout=5)
            self._pod_sync_thread = None
        with self._lock:
            for insts in self._instances.values():
                for inst in insts:
                    self._close_instance(inst)
            self._instances.clear()
            self._sockets.clear()
            self._pending_wipes.clear()
            self._changed.notify_all()
        log.info("kubelet emulator stopped", node=self.node_name)

    def __enter__(self) -> KubeletEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until `predicate()` holds (checked on every state change and every 50 ms)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"kubelet emulator on {self.node_name}: timed out after {timeout}s waiting for "
                        f"{what}; check the plugin's log and emulator.registrations / calls / pod_errors"
                    )
                self._changed.wait(min(left, 0.05))

    def wait_registered(self, driver: str, timeout: float = 10) -> Registration:
        """Wait until `driver` has a registered instance; returns the one the kubelet would use."""
        self.wait_for(lambda: bool(self._instances.get(driver)), timeout, f"driver {driver} to register")
        rec = self.plugin_for(driver)
        assert rec is not None
        return rec

    def instances(self, driver: str) -> list[Registration]:
        """Currently registered instances of `driver`, in registration order."""
        with self._lock:
            return [i.record for i in self._instances.get(driver, [])]

    def is_connected(self, driver: str) -> bool:
        with self._lock:
            return any(i.connected for i in self._instances.get(driver, []))

    def plugin_for(self, driver: str) -> Registration | None:
        """The instance the kubelet would call: newest with a live connection, else newest."""
        inst = self._pick(driver)
        return inst.record if inst else None

    @property
    def pending_wipes(self) -> dict[str, float]:
        """driver -> monotonic deadline of a scheduled disconnect wipe."""
        with self._lock:
            return dict(self._pending_wipes)

    @property
    def prepared_claims(self) -> set[str]:
        with self._lock:
            return {uid for uid, ci in self._claims.items() if ci.prepared}

    def claim_pods(self, claim_uid: str) -> set[str]:
        """Pod UIDs the claim info cache holds for a claim (empty if unknown)."""
        with self._lock:
            ci = self._claims.get(claim_uid)
            return set(ci.pods) if ci else set()

    def claim_devices(self, claim_uid: str) -> list[PreparedDevice]:
        """Devices recorded for a claim, all drivers (driver name order)."""
        with self._lock:
            ci = self._claims.get(claim_uid)
            if ci is None:
                return []
            return [d for drv in sorted(ci.devices) for d in ci.devices[drv]]

    def running_pods(self) -> set[str]:
        with self._lock:
            return {uid for uid, p in self._pods.items() if p.running and not p.finished}

    # ------------------------------------------------------------------ registration watcher

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._scan_once()
                self._tick_connections()
            except Exception as err:
                log.exception("kubelet emulator watcher tick failed", error=str(err))
            self._stop.wait(self.poll_interval_s)

    def _scan_sockets(self) -> dict[Path, tuple[int, int]]:
        found: dict[Path, tuple[int, int]] = {}
        for root, dirs, files in os.walk(self.registry_dir, followlinks=False):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(root) / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                if stat.S_ISSOCK(st.st_mode):
                    found[path] = (st.st_ino, st.st_mtime_ns)
        return found

    def _scan_once(self) -> None:
        found = self._scan_sockets()
        now = time.monotonic()
        with self._lock:
            for path in list(self._sockets):
                if found.get(path) != self._sockets[path].ident:
                    # Removed or re-created: the old registration ends either way.
                    self._deregister_path(path)
            for path, ident in found.items():
                sock = self._sockets.get(path)
                if sock is None:
                    sock = _SocketState(ident=ident)
                    self._sockets[path] = sock
                if sock.instance is not None or sock.in_flight or now < sock.next_try:
                    continue
                sock.in_flight = True
                t = threading.Thread(
                    target=self._handshake, args=(path, ident), name=f"kubelet-reg-{path.name}", daemon=True
                )
                t.start()
                self._handshakes = [h for h in self._handshakes if h.is_alive()]
                self._handshakes.append(t)

    def _deregister_path(self, path: Path) -> None:
        sock = self._sockets.pop(path)
        inst = sock.instance
        if inst is None:
            return
        insts = self._instances.get(inst.record.driver, [])
        if inst in insts:
            insts.remove(inst)
        if not insts:
            self._instances.pop(inst.record.driver, None)
        self._close_instance(inst)
        log.info("plugin deregistered", driver=inst.record.driver, socket=str(path))
        self._changed.notify_all()

    def _close_instance(self, inst: _Instance) -> None:
        if inst.on_state is not None:
            try:
                inst.channel.unsubscribe(inst.on_state)
            except Exception as err:
                log.debug("unsubscribe failed", error=str(err))
        inst.channel.close()
        inst.state = grpc.ChannelConnectivity.SHUTDOWN

    def _handshake(self, path: Path, ident: tuple[int, int]) -> None:
        ok = False
        try:
            ok = self._register(path, ident)
        except Exception as err:
            log.exception("plugin registration crashed", socket=str(path), error=str(err))
        finally:
            with self._lock:
                sock = self._sockets.get(path)
                if sock is not None and sock.ident == ident:
                    sock.in_flight = False
                    if not ok:
                        sock.next_try = time.monotonic() + sock.backoff
                        sock.backoff = min(sock.backoff * 2, RETRY_MAX_S)
                self._changed.notify_all()

    def _register(self, path: Path, ident: tuple[int, int]) -> bool:
        channel = grpc.insecure_channel(f"unix:{path}")
        try:
            ready = grpc.channel_ready_future(channel)
            deadline = time.monotonic() + DIAL_TIMEOUT_S
            while True:
                try:
                    ready.result(timeout=0.1)
                    break
                except grpc.FutureTimeoutError:
                    if self._stop.is_set() or time.monotonic() > deadline:
                        ready.cancel()
                        log.warning("plugin registration dial failed", socket=str(path))
                        return False
            stub = registration_pb2_grpc.RegistrationStub(channel)
            try:
                info = stub.GetInfo(registration_pb2.InfoRequest(), timeout=GET_INFO_TIMEOUT_S)
            except grpc.RpcError as err:
                log.warning("plugin GetInfo failed", socket=str(path), error=_rpc_error_text(err))
                return False
            error, service, endpoint = self._validate(path, info)
            record = Registration(
                driver=info.name,
                endpoint=endpoint,
                service=service,
                registered_at=time.time(),
                socket_path=path,
                error=error,
            )
            with self._lock:
                sock = self._sockets.get(path)
                if sock is None or sock.ident != ident or self._stop.is_set():
                    return False  # the socket went away while we talked to it
                self.registrations.append(record)
                if not error:
                    sock.instance = self._add_instance(record)
                self._changed.notify_all()
            self._notify(stub, path, record)
            return not error
        finally:
            channel.close()

    def _validate(self, path: Path, info: registration_pb2.PluginInfo) -> tuple[str, str, str]:
        """(error, chosen service, endpoint) in the kubelet's order of checks."""
        endpoint = info.endpoint or str(path)
        if info.type != DRA_PLUGIN_TYPE:
            return (
                "RegisterPlugin error -- no handler registered for plugin type: "
                f"{info.type} at socket {path}",
                "",
                endpoint,
            )
        if not info.name:
            return (
                "RegisterPlugin error -- plugin validation failed with err: empty driver name",
                "",
                endpoint,
            )
        service = next((s for s in info.supported_versions if s in self.known_services), "")
        if not service:
            return (
                "RegisterPlugin error -- plugin validation failed with err: none of the services "
                f"supported by the plugin {info.name} ({list(info.supported_versions)}) are supported "
                f"by the kubelet ({list(self.known_services)})",
                "",
                endpoint,
            )
        with self._lock:
            for insts in self._instances.values():
                for inst in insts:
                    if inst.record.endpoint == endpoint:
                        return (
                            "RegisterPlugin error -- plugin registration failed with err: endpoint "
                            f"{endpoint} already registered for DRA driver plugin {inst.record.driver}",
                            "",
                            endpoint,
                        )
        return "", service, endpoint

    def _notify(self, stub: registration_pb2_grpc.RegistrationStub, path: Path, record: Registration) -> None:
        status = registration_pb2.RegistrationStatus(plugin_registered=record.ok, error=record.error)
        try:
            stub.NotifyRegistrationStatus(status, timeout=NOTIFY_TIMEOUT_S)
        except grpc.RpcError as err:
            # The kubelet only logs this; an accepted registration stands.
            log.info(
                "plugin NotifyRegistrationStatus returned an error",
                socket=str(path),
                error=_rpc_error_text(err),
            )
        if record.ok:
            log.info(
                "plugin registered", driver=record.driver, endpoint=record.endpoint, service=record.service
            )
        else:
            log.warning(
                "plugin registration rejected", driver=record.driver, socket=str(path), error=record.error
            )

    def _add_instance(self, record: Registration) -> _Instance:
        self._seq += 1
        channel = grpc.insecure_channel(f"unix:{record.endpoint}")
        inst = _Instance(record=record, channel=channel, seq=self._seq)

        def on_state(state: grpc.ChannelConnectivity) -> None:
            with self._lock:
                inst.state = state
                self._changed.notify_all()

        inst.on_state = on_state
        self._instances.setdefault(record.driver, []).append(inst)
        self._pending_wipes.pop(record.driver, None)
        self._wiped_since_connect.discard(record.driver)
        channel.subscribe(on_state, try_to_connect=True)
        return inst

    def _pick(self, driver: str) -> _Instance | None:
        with self._lock:
            insts = sorted(self._instances.get(driver, []), key=lambda i: i.seq, reverse=True)
            for inst in insts:
                if inst.connected:
                    return inst
            return insts[0] if insts else None

    # ------------------------------------------------------------------ connections and wiping

    def _tick_connections(self) -> None:
        now = time.monotonic()
        due: list[str] = []
        with self._lock:
            drivers = set(self._instances) | set(self._pending_wipes)
            drivers |= {r.driver for r in self.registrations if r.ok}
            for driver in drivers:
                insts = self._instances.get(driver, [])
                for inst in insts:
                    # gRPC leaves a dropped channel IDLE; the kubelet asks it to reconnect.
                    if (
                        inst.state
                        in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
                        and now - inst.last_nudge > 0.2
                    ):
                        inst.last_nudge = now
                        self._nudge(inst)
                if any(i.connected for i in insts):
                    if self._pending_wipes.pop(driver, None) is not None:
                        log.info("slice wipe cancelled, driver reconnected", driver=driver)
                        self._changed.notify_all()
                    self._wiped_since_connect.discard(driver)
                    continue
                if driver in self._wiped_since_connect:
                    continue
                if driver not in self._pending_wipes:
                    self._pending_wipes[driver] = now + self.wipe_delay_s
                    log.info(
                        "slice wipe scheduled, driver not connected", driver=driver, delay_s=self.wipe_delay_s
                    )
                    self._changed.notify_all()
                elif now >= self._pending_wipes[driver]:
                    del self._pending_wipes[driver]
                    self._wiped_since_connect.add(driver)
                    due.append(driver)
        for driver in due:
            threading.Thread(
                target=self._wipe_driver_with_retry,
                args=(driver,),
                name=f"kubelet-wipe-{driver}",
                daemon=True,
            ).start()

    @staticmethod
    def _nudge(inst: _Instance) -> None:
        # Python gRPC has no public Connect(); an RPC makes an IDLE channel dial. The method does
        # not exist, so a live plugin answers UNIMPLEMENTED without running any of its code.
        # (subscribe(try_to_connect=True) would also dial, but races with channel.close().)
        probe = inst.channel.unary_unary(PROBE_METHOD, request_serializer=None, response_deserializer=None)
        probe.future(b"", timeout=1.0)

    def _wipe_driver_with_retry(self, driver: str) -> None:
        selector = f"spec.nodeName={self.node_name},spec.driver={driver}"
        delay = WIPE_RETRY_INITIAL_S
        while not self._stop.is_set():
            with self._lock:
                if any(i.connected for i in self._instances.get(driver, [])):
                    return  # reconnected meanwhile: the kubelet cancels the wipe
            if self._delete_slices(driver, selector):
                return
            self._stop.wait(delay)
            delay = min(delay * 2, WIPE_RETRY_MAX_S)

    def wipe_node_slices(self) -> None:
        """The kubelet's start-up wipe: delete every ResourceSlice of this node, all drivers."""
        if not self._delete_slices(None, f"spec.nodeName={self.node_name}"):
            raise KubeletError(
                f"deleting ResourceSlices of node {self.node_name} failed: {self.wipes[-1].error}"
            )

    def _delete_slices(self, driver: str | None, selector: str) -> bool:
        error = ""
        sent = self.api_client is not None
        if self.api_client is not None:
            from kubernetes import client as k8s

            try:
                k8s.ResourceV1Api(self.api_client).delete_collection_resource_slice(
                    field_selector=selector, _preload_content=False
                )
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        with self._lock:
            self.wipes.append(WipeRecord(driver, selector, sent, error, time.time()))
            self._changed.notify_all()
        if error:
            log.warning("ResourceSlice wipe failed", selector=selector, error=error)
        else:
            log.info("ResourceSlices wiped", selector=selector, sent=sent)
        return not error

    # ------------------------------------------------------------------ DRA calls

    def prepare(self, driver: str, claims: Sequence[ClaimRef]) -> dict[str, list[PreparedDevice]]:
        """One NodePrepareResources call, checked as the kubelet checks it."""
        inst, resp = self._call(PREPARE, driver, claims)
        requested = {uid: (ns, uid, name) for ns, uid, name in claims}
        results: dict[str, list[PreparedDevice]] = {}
        self._check_unknown(inst, PREPARE, claims, resp.claims.keys(), results)
        for _ns, uid, name in claims:
            if uid not in resp.claims:
                continue
            entry = resp.claims[uid]
            if entry.error:
                raise self._fail(
                    inst,
                    PREPARE,
                    claims,
                    f"{PREPARE} failed for ResourceClaim {name}: {entry.error}",
                    results,
                )
            results[uid] = [
                PreparedDevice(
                    request_names=tuple(d.request_names),
                    pool_name=d.pool_name,
                    device_name=d.device_name,
                    cdi_device_ids=tuple(d.cdi_device_ids),
                    share_id=(
                        d.share_id if isinstance(d, dra_v1_pb2.Device) and d.HasField("share_id") else None
                    ),
                )
                for d in entry.devices
            ]
        skipped = len(requested) - len(results)
        if skipped:
            raise self._fail(inst, PREPARE, claims, f"{PREPARE} skipped {skipped} ResourceClaims", results)
        self._log_call(inst, PREPARE, claims, "")
        return results

    def unprepare(self, driver: str, claims: Sequence[ClaimRef]) -> None:
        """One NodeUnprepareResources call, checked as the kubelet checks it."""
        inst, resp = self._call(UNPREPARE, driver, claims)
        requested = {uid: (ns, uid, name) for ns, uid, name in claims}
        self._check_unknown(inst, UNPREPARE, claims, resp.claims.keys(), {})
        answered = 0
        for ns, uid, name in claims:
            if uid not in resp.claims:
                continue
            answered += 1
            entry = resp.claims[uid]
            if entry.error:
                raise self._fail(
                    inst, UNPREPARE, claims, f"{UNPREPARE} failed for claim {ns}/{name}: {entry.error}"
                )
        skipped = len(requested) - answered
        if skipped:
            raise self._fail(inst, UNPREPARE, claims, f"{UNPREPARE} skipped {skipped} ResourceClaims")
        self._log_call(inst, UNPREPARE, claims, "")

    def _call(self, method: str, driver: str, claims: Sequence[ClaimRef]) -> tuple[_Instance, Any]:
        inst = self._pick(driver)
        if inst is None:
            msg = f"{method}: DRA driver {driver} is not registered with the kubelet on {self.node_name}"
            with self._lock:
                self.calls.append(CallRecord(method, driver, "", "", tuple(claims), msg, time.time()))
                self._changed.notify_all()
            raise KubeletError(msg)
        v1 = inst.record.service == SERVICE_V1
        pb: Any = dra_v1_pb2 if v1 else dra_v1beta1_pb2
        grpc_mod: Any = dra_v1_pb2_grpc if v1 else dra_v1beta1_pb2_grpc
        wire_claims = [pb.Claim(namespace=ns, uid=uid, name=name) for ns, uid, name in claims]
        stub = grpc_mod.DRAPluginStub(inst.channel)
        try:
            if method == PREPARE:
                resp = stub.NodePrepareResources(
                    pb.NodePrepareResourcesRequest(claims=wire_claims), timeout=self.call_timeout_s
                )
            else:
                resp = stub.NodeUnprepareResources(
                    pb.NodeUnprepareResourcesRequest(claims=wire_claims), timeout=self.call_timeout_s
                )
        except grpc.RpcError as err:
            raise self._fail(inst, method, claims, f"{method}: {_rpc_error_text(err)}") from err
        return inst, resp

    def _check_unknown(
        self,
        inst: _Instance,
        method: str,
        claims: Sequence[ClaimRef],
        keys: Iterable[str],
        partial: dict[str, list[PreparedDevice]],
    ) -> None:
        requested = {uid for _ns, uid, _name in claims}
        for uid in keys:
            if uid not in requested:
                raise self._fail(
                    inst, method, claims, f"{method} returned result for unknown claim UID {uid}", partial
                )

    def _fail(
        self,
        inst: _Instance,
        method: str,
        claims: Sequence[ClaimRef],
        msg: str,
        partial: dict[str, list[PreparedDevice]] | None = None,
    ) -> KubeletError:
        self._log_call(inst, method, claims, msg)
        log.warning("DRA call failed", method=method, driver=inst.record.driver, error=msg)
        return KubeletError(msg, partial)

    def _log_call(self, inst: _Instance, method: str, claims: Sequence[ClaimRef], error: str) -> None:
        with self._lock:
            self.calls.append(
                CallRecord(
                    method,
                    inst.record.driver,
                    inst.record.service,
                    inst.record.endpoint,
                    tuple(claims),
                    error,
                    time.time(),
                )
            )
            self._changed.notify_all()

    def diagnostics(self) -> list[str]:
        """Lines a failing test shows: registrations, the last calls, pod and sync errors."""
        return [
            f"kubelet emulator, services {list(self.known_services)}",
            f"registrations: {[(r.service, r.error or 'ok') for r in self.registrations]}",
            f"calls: {[(c.method, [n for _, _, n in c.claims], c.error or 'ok') for c in self.calls[-10:]]}",
            f"pod errors: {self.pod_errors}",
            f"sync errors: {self.sync_errors[-3:]}",
        ]

    # ------------------------------------------------------------------ pod-driven mode

    def start_pod_sync(self, interval: float = 0.2) -> None:
        """Run sync_pods() every `interval` seconds until stop()."""
        if self.api_client is None:
            raise ValueError("pod-driven mode needs an api_client; pass one to KubeletEmulator()")

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.sync_pods()
                except Exception as err:
                    with self._lock:
                        self.sync_errors.append(f"{type(err).__name__}: {err}")
                    log.warning("pod sync failed", node=self.node_name, error=str(err))
                self._stop.wait(interval)

        self._pod_sync_thread = threading.Thread(
            target=loop, name=f"kubelet-pods-{self.node_name}", daemon=True
        )
        self._pod_sync_thread.start()

    def sync_pods(self) -> None:
        """One pass over the pods bound to this node: prepare new ones, clean up finished ones."""
        if self.api_client is None:
            raise ValueError("pod-driven mode needs an api_client; pass one to KubeletEmulator()")
        with self._sync_lock:
            pods = self._list_pods()
            seen: set[str] = set()
            for pod in pods:
                meta = pod["metadata"]
                uid = meta["uid"]
                seen.add(uid)
                phase = pod.get("status", {}).get("phase", "")
                try:
                    if meta.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
                        self._sync_terminated(pod)
                    else:
                        self._sync_active(pod)
                except KubeletError as err:
                    with self._lock:
                        self.pod_errors[uid] = str(err)
                        self._changed.notify_all()
            for uid in [u for u in self._pods if u not in seen]:
                try:
                    self._pod_gone(uid)
                except KubeletError as err:
                    with self._lock:
                        self.pod_errors[uid] = str(err)

    def complete_pod(self, namespace: str, name: str, exit_code: int = 0) -> None:
        """Pretend all containers of a pod exited (phase Succeeded or Failed), as for a Job."""
        from kubernetes import client as k8s

        core = k8s.CoreV1Api(self.api_client)
        pod = _json(core.read_namespaced_pod(name, namespace, _preload_content=False))
        now = _now_rfc3339()
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"terminated": {"exitCode": exit_code, "startedAt": now, "finishedAt": now}},
            }
            for c in pod["spec"]["containers"]
        ]
        body = {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [
                    {"type": "Ready", "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"},
                    {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
                ],
                "containerStatuses": statuses,
            }
        }
        core.patch_namespaced_pod_status(
            name,
            namespace,
            body,
            _content_type="application/strategic-merge-patch+json",
            _preload_content=False,
        )

    def _list_pods(self) -> list[dict[str, Any]]:
        from kubernetes import client as k8s

        resp = k8s.CoreV1Api(self.api_client).list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node_name}", _preload_content=False
        )
        items: list[dict[str, Any]] = _json(resp).get("items") or []
        return items

    def _read_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        try:
            resp = k8s.ResourceV1Api(self.api_client).read_namespaced_resource_claim(
                name, namespace, _preload_content=False
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise KubeletError(f"fetch ResourceClaim {namespace}/{name}: {err.status} {err.reason}") from err
        claim: dict[str, Any] = _json(resp)
        return claim

    @staticmethod
    def _pod_claim_names(pod: dict[str, Any], strict: bool) -> dict[str, str]:
        """pod claim name -> ResourceClaim name; template claims via resourceClaimStatuses."""
        out: dict[str, str] = {}
        statuses = {
            s["name"]: s.get("resourceClaimName")
            for s in pod.get("status", {}).get("resourceClaimStatuses") or []
        }
        for rc in pod["spec"].get("resourceClaims") or []:
            if rc.get("resourceClaimName"):
                out[rc["name"]] = rc["resourceClaimName"]
            elif rc["name"] in statuses:
                if statuses[rc["name"]]:
                    out[rc["name"]] = str(statuses[rc["name"]])
                # A status entry without a name means no claim is needed.
            elif strict:
                raise KubeletError(
                    f"waiting for the ResourceClaim of pod claim {rc['name']} of pod "
                    f"{pod['metadata']['namespace']}/{pod['metadata']['name']}: "
                    "no resourceClaimStatuses entry yet"
                )
        return out

    def _sync_active(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns, pod_name, pod_uid = meta["namespace"], meta["name"], meta["uid"]
        with self._lock:
            state = self._pods.get(pod_uid)
            if state is not None and state.running:
                return
            if state is None:
                state = self._pods[pod_uid] = _PodState(namespace=ns, name=pod_name)
        claim_names = self._pod_claim_names(pod, strict=True)
        template_claims = {
            rc["name"] for rc in pod["spec"].get("resourceClaims") or [] if not rc.get("resourceClaimName")
        }
        infos: list[_ClaimInfo] = []
        for pod_claim, claim_name in claim_names.items():
            claim = self._read_claim(ns, claim_name)
            if claim is None:
                raise KubeletError(f"fetch ResourceClaim {ns}/{claim_name}: not found")
            cuid = claim["metadata"]["uid"]
            if pod_claim in template_claims and not any(
                o.get("uid") == pod_uid and o.get("controller")
                for o in claim["metadata"].get("ownerReferences") or []
            ):
                raise KubeletError(f"ResourceClaim {ns}/{claim_name} was not created for pod {pod_name}")
            status = claim.get("status") or {}
            allocation = status.get("allocation")
            if not allocation:
                raise KubeletError(f"ResourceClaim {ns}/{claim_name} is not allocated")
            if not any(r.get("uid") == pod_uid for r in status.get("reservedFor") or []):
                raise KubeletError(
                    f"pod {pod_name} ({pod_uid}) is not allowed to use ResourceClaim {claim_name} ({cuid})"
                )
            results = (allocation.get("devices") or {}).get("results") or []
            drivers = tuple(sorted({r["driver"] for r in results}))
            with self._lock:
                info = self._claims.get(cuid)
                if info is None:
                    info = self._claims[cuid] = _ClaimInfo(
                        namespace=ns, name=claim_name, uid=cuid, drivers=drivers
                    )
                info.pods.add(pod_uid)
                state.claim_names[pod_claim] = claim_name
                infos.append(info)
        batches: dict[str, list[ClaimRef]] = {}
        with self._lock:
            for info in infos:
                if info.prepared:
                    continue
                for drv in info.drivers:
                    ref = (info.namespace, info.uid, info.name)
                    if ref not in batches.setdefault(drv, []):
                        batches[drv].append(ref)
        for drv in sorted(batches):
            try:
                results_by_uid = self.prepare(drv, batches[drv])
            except KubeletError as err:
                raise KubeletError(f"prepare dynamic resources: {err}", err.partial) from err
            with self._lock:
                for cuid, devices in results_by_uid.items():
                    self._claims[cuid].devices[drv] = devices
        with self._lock:
            for info in infos:
                info.prepared = True
            self.pod_cdi_devices[pod_uid] = self._cdi_for_pod(pod, state)
        self._mark_running(pod)
        with self._lock:
            state.running = True
            self.pod_errors.pop(pod_uid, None)
            self._changed.notify_all()
        log.info("pod running", pod=f"{ns}/{pod_name}", uid=pod_uid, claims=sorted(claim_names.values()))

    def _cdi_for_pod(self, pod: dict[str, Any], state: _PodState) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        containers = (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
        by_name = {(ci.namespace, ci.name): ci for ci in self._claims.values()}
        for c in containers:
            ids: list[str] = []
            for ref in (c.get("resources") or {}).get("claims") or []:
                claim_name = state.claim_names.get(ref["name"])
                info = by_name.get((state.namespace, claim_name)) if claim_name else None
                if info is None:
                    continue
                want = ref.get("request") or ""
                for drv in sorted(info.devices):
                    for dev in info.devices[drv]:
                        names = dev.request_names
                        if not want or not names or want in names or want.split("/")[0] in names:
                            ids.extend(dev.cdi_device_ids)
            out[c["name"]] = ids
        return out

    def _mark_running(self, pod: dict[str, Any]) -> None:
        from kubernetes import client as k8s

        now = _now_rfc3339()
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "started": True,
                "state": {"running": {"startedAt": now}},
            }
            for c in pod["spec"]["containers"]
        ]
        body = {
            "status": {
                "phase": "Running",
                "startTime": now,
                "hostIP": "127.0.0.1",
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": now}
                    for t in ("Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": statuses,
            }
        }
        k8s.CoreV1Api(self.api_client).patch_namespaced_pod_status(
            pod["metadata"]["name"],
            pod["metadata"]["namespace"],
            body,
            _content_type="application/strategic-merge-patch+json",
            _preload_content=False,
        )

    def _sync_terminated(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        pod_uid = meta["uid"]
        with self._lock:
            state = self._pods.get(pod_uid)
            if state is None:
                state = self._pods[pod_uid] = _PodState(namespace=meta["namespace"], name=meta["name"])
            if not state.claim_names:
                state.claim_names = self._pod_claim_names(pod, strict=False)
            already = state.finished
        if not already:
            self._unprepare_for_pod(pod_uid, state)
        if meta.get("deletionTimestamp"):
            self._force_delete(meta["namespace"], meta["name"], pod_uid)
            with self._lock:
                self._pods.pop(pod_uid, None)
                self.pod_cdi_devices.pop(pod_uid, None)
                self._changed.notify_all()

    def _pod_gone(self, pod_uid: str) -> None:
        with self._lock:
            state = self._pods.get(pod_uid)
        if state is None:
            return
        if not state.finished:
            self._unprepare_for_pod(pod_uid, state)
        with self._lock:
            self._pods.pop(pod_uid, None)
            self.pod_cdi_devices.pop(pod_uid, None)
            self._changed.notify_all()

    def _unprepare_for_pod(self, pod_uid: str, state: _PodState) -> None:
        batches: dict[str, list[ClaimRef]] = {}
        done: list[_ClaimInfo] = []
        with self._lock:
            by_name = {(ci.namespace, ci.name): ci for ci in self._claims.values()}
            for claim_name in state.claim_names.values():
                info = by_name.get((state.namespace, claim_name))
                if info is None:
                    continue
                info.pods.discard(pod_uid)
                if info.pods:
                    continue  # another pod on this node still uses it
                done.append(info)
                for drv in info.drivers:
                    ref = (info.namespace, info.uid, info.name)
                    if ref not in batches.setdefault(drv, []):
                        batches[drv].append(ref)
        for drv in sorted(batches):
            try:
                self.unprepare(drv, batches[drv])
            except KubeletError as err:
                raise KubeletError(f"unprepare dynamic resources: {err}") from err
        with self._lock:
            for info in done:
                if not info.pods:
                    self._claims.pop(info.uid, None)
            state.finished = True
            state.running = False
            self.pod_errors.pop(pod_uid, None)
            self._changed.notify_all()
        if batches:
            log.info("pod resources unprepared", pod=f"{state.namespace}/{state.name}", uid=pod_uid)

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        body = k8s.V1DeleteOptions(grace_period_seconds=0, preconditions=k8s.V1Preconditions(uid=uid))
        try:
            k8s.CoreV1Api(self.api_client).delete_namespaced_pod(
                name, namespace, grace_period_seconds=0, body=body, _preload_content=False
            )
        except ApiException as err:
            if err.status not in (404, 409):
                raise KubeletError(f"deleting pod {namespace}/{name}: {err.status} {err.reason}") from err
        log.info("pod deleted", pod=f"{namespace}/{name}", uid=uid)
