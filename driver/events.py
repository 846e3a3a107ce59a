"""Kubernetes Events (events.k8s.io/v1) for what a person must see without reading the plugin's log.

On the ResourceClaim: a failed prepare or unprepare, with the same message the kubelet gets. On
the Node: a checkpoint moved aside as corrupt (quarantined), a device taint set or cleared, an
MPS control daemon of a prepared claim that died.

Rate-limited, because the kubelet retries a failed prepare every few hundred milliseconds at
first: the same (object, reason) is sent at most once per ``min_interval_s`` (the next one says
how many were held back), and all Events share a token bucket (``burst``, one more every
``refill_s``). Sending happens on a thread of its own from a bounded queue, so neither a prepare
nor the health monitor ever waits for the API server; an Event that cannot be sent is logged and
dropped (Events are best effort by design).

What it does not do: decide what is worth an Event (the daemon wires the hooks) or retry forever.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

if TYPE_CHECKING:
    from driver.kubeletplugin.claims import ClaimRef
    from driver.taints import TaintChange

log = structlog.get_logger(__name__)

JsonDict = dict[str, Any]
CONTROLLER = "gpu.nvidia.com/kubelet-plugin"
NODE_EVENT_NAMESPACE = "default"  # where the kubelet puts Events about Nodes, too
MAX_NOTE = 1024  # the API server refuses longer notes


class EventApi(Protocol):
    """What the recorder calls (``driver.kube.Kube`` provides it)."""

    def create_event(self, namespace: str, event: JsonDict) -> JsonDict: ...

    def get_node(self, name: str) -> JsonDict: ...


@dataclass(frozen=True, slots=True)
class Regarding:
    """The object an Event is about."""

    api_version: str
    kind: str
    name: str
    namespace: str = ""
    uid: str = ""

    def to_dict(self) -> JsonDict:
        out: JsonDict = {"apiVersion": self.api_version, "kind": self.kind, "name": self.name}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.uid:
            out["uid"] = self.uid
        return out


class RateLimit:
    """Per-key spacing plus a shared token bucket; ``allow`` says whether to send now."""

    def __init__(
        self,
        min_interval_s: float = 60.0,
        burst: int = 20,
        refill_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._min_interval = min_interval_s
        self._burst = burst
        self._refill = refill_s
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def allow(self, key: tuple[str, str]) -> tuple[bool, int]:
        """(send now?, how many of this key were held back since the last one sent)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._refill)
            self._stamp = now
            last = self._last.get(key)
            if (last is not None and now - last < self._min_interval) or self._tokens < 1:
                self._held[key] = self._held.get(key, 0) + 1
                return False, 0
            self._tokens -= 1
            self._last[key] = now
            if len(self._last) > 4096:  # old keys say nothing any more
                cutoff = now - self._min_interval
                self._last = {k: t for k, t in self._last.items() if t >= cutoff}
            return True, self._held.pop(key, 0)


class EventRecorder:
    """Queues Events and sends them from a background thread.

    Args:
        kube: the API facade.
        node_name: this node (``reportingInstance``, and the Node Events are about).
        limit: the rate limit (see :class:`RateLimit`).
    """

    def __init__(self, kube: EventApi, node_name: str, limit: RateLimit | None = None) -> None:
        self._kube = kube
        self._node = node_name
        self._limit = limit or RateLimit()
        self._queue: queue.Queue[JsonDict | None] = queue.Queue(maxsize=100)
        self._node_uid = ""
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    # -- what happens -----------------------------------------------------------------------------

    def claim_failed(self, operation: str, ref: ClaimRef, message: str) -> None:
        """A prepare/unprepare of ``ref`` failed with ``message`` (what the kubelet got)."""
        reason = "PrepareFailed" if operation == "prepare" else "UnprepareFailed"
        action = "PrepareResources" if operation == "prepare" else "UnprepareResources"
        regarding = Regarding("resource.k8s.io/v1", "ResourceClaim", ref.name, ref.namespace, ref.uid)
        self.emit(regarding, "Warning", reason, action, message)

    def node_event(self, event_type: str, reason: str, action: str, note: str) -> None:
        """An Event about this node (the Node's UID is filled in by the sender)."""
        self.emit(Regarding("v1", "Node", self._node), event_type, reason, action, note)

    def checkpoint_quarantined(self, note: str) -> None:
        self.node_event("Warning", "CheckpointQuarantined", "StartPlugin", note)

    def taints_changed(self, changes: Sequence[TaintChange]) -> None:
        """One Event per taint set or cleared, grouped by taint over the devices it touched."""
        grouped: dict[tuple[bool, str], list[str]] = {}
        for change in changes:
            grouped.setdefault((change.set, str(change.taint)), []).append(change.device)
        for (was_set, taint), devices in sorted(grouped.items()):
            shown = ", ".join(devices[:8]) + (f" and {len(devices) - 8} more" if len(devices) > 8 else "")
            if was_set:
                self.node_event(
                    "Warning",
                    "DeviceTaintSet",
                    "TaintDevice",
                    f"taint {taint} set on {shown}: new claims avoid these devices unless they tolerate it; "
                    "see `gpu-dra taints` on the node",
                )
            else:
                self.node_event(
                    "Normal", "DeviceTaintCleared", "UntaintDevice", f"taint {taint} cleared on {shown}"
                )

    def mps_daemon_died(self, group_id: str, claim: str, pid: int | None) -> None:
        self.node_event(
            "Warning",
            "MPSDaemonDied",
            "WatchMPS",
            f"MPS control daemon {group_id} (pid {pid}) of claim {claim} is gone: its pods cannot start "
            "CUDA work; delete the claim's pods so it is unprepared and prepared again",
        )

    # -- the RequestObserver side (driver.kubeletplugin.draservice) -------------------------------

    def started(self, op: str) -> None:
        """Nothing to say when a request starts."""

    def finished(self, op: str, ref: ClaimRef, seconds: float, error: Exception | None, message: str) -> None:
        if error is not None:
            self.claim_failed(op, ref, message)

    # -- sending ----------------------------------------------------------------------------------

    def emit(self, regarding: Regarding, event_type: str, reason: str, action: str, note: str) -> None:
        """Queue one Event, subject to the rate limit."""
        send, held = self._limit.allow((regarding.uid or f"{regarding.kind}/{regarding.name}", reason))
        if not send:
            return
        if held:
            note = f"{note} ({held} more like this held back by the plugin's Event rate limit)"
        now = datetime.datetime.now(datetime.UTC)
        event: JsonDict = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                # The server appends 5 characters; the prefix alone must already be a DNS subdomain.
                "generateName": f"{regarding.name[:200]}-",
                "namespace": regarding.namespace or NODE_EVENT_NAMESPACE,
            },
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": CONTROLLER,
            "reportingInstance": f"{CONTROLLER}-{self._node}"[:128],
            "action": action,
            "reason": reason,
            "type": event_type,
            "note": note[:MAX_NOTE],
            "regarding": regarding.to_dict(),
        }
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.warning("event queue full; event dropped", reason=reason, regarding=regarding.name)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            regarding = event["regarding"]
            try:
                if regarding["kind"] == "Node" and not regarding.get("uid"):
                    if not self._node_uid:
                        self._node_uid = str(self._kube.get_node(self._node)["metadata"]["uid"])
                    regarding["uid"] = self._node_uid
                self._kube.create_event(event["metadata"]["namespace"], event)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - Events are best effort; the log has it all
                self.dropped += 1
                forbidden = getattr(exc, "status", None) == 403
                log.warning(
                    "sending an event failed",
                    reason=event["reason"],
                    regarding=f"{regarding['kind']}/{regarding['name']}",
                    error=str(exc),
                    fix="grant the plugin's ClusterRole events create (events.k8s.io)"
                    if forbidden
                    else "see the error; Events are best effort and the plugin goes on",
                )
