"""DeviceState: what preparing and unpreparing a claim does on this node, top to bottom.

Prepare, for one allocated claim:

1. keep the results whose driver is ours and look each device up in the inventory;
2. take the locks of the physical GPUs involved (claims on other GPUs run in parallel);
3. a claim already ``PrepareCompleted`` returns its recorded devices, with no side effects;
4. refuse a device another prepared claim holds (unless this result has admin access);
5. roll back what an earlier, unfinished attempt may have left (``PrepareStarted``);
6. record ``PrepareStarted`` with the planned devices *before* any side effect;
7. device actions: nothing for a full GPU or static MIG device, create a dynamic MIG device;
   then sharing per config group (time-slicing, MPS);
8. write the claim's CDI spec (common edits + per-device edits);
9. record ``PrepareCompleted``: from here on the checkpoint is what unprepare undoes.

Unprepare undoes exactly what the checkpoint recorded; an unknown claim is a success.
:meth:`DeviceState.reconcile` runs once at start-up.

This module does not talk gRPC or fetch claims (``driver.kubeletplugin``), and does not build
CDI edits or drive MIG/MPS itself: those sit behind the seams at the bottom of this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from cdi.edits import common_edits, gpu_edits, mig_edits
from cdi.errors import CdiError as CdiPackageError
from cdi.errors import DeviceNodeMissingError
from cdi.names import KIND, device_name, qualified_device_id
from cdi.spec import ContainerEdits, Device, new_spec
from cdi.store import CdiStore
from driver.checkpoint import (
    PREPARE_COMPLETED,
    PREPARE_STARTED,
    CheckpointStore,
    PreparedClaim,
    PreparedDevice,
)
from driver.config import Config
from driver.errors import (
    CheckpointCorruptError,
    ClaimError,
    DriverError,
    LockBusyError,
    PermanentClaimError,
    TemporaryClaimError,
)
from driver.flock import FileLock, LockTimeoutError
from driver.inventory import AllocatableDevice, Inventory
from driver.kubeletplugin.claims import Claim, ClaimRef
from driver.kubeletplugin.draservice import PreparedDevice as ReplyDevice
from driver.metrics import stage
from driver.ownership import Ledger
from driver.shares import ShareLimits
from mig.spec import MigLive, MigSpec, parse_name
from sharing.config import ConfigGroup

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Planned:
    """One allocation result of ours, matched to the inventory device it names."""

    result: Mapping[str, Any]
    device: AllocatableDevice

    @property
    def request(self) -> str:
        return str(self.result.get("request", ""))

    @property
    def admin_access(self) -> bool:
        return bool(self.result.get("adminAccess"))

    @property
    def share_id(self) -> str | None:
        share = self.result.get("shareID")
        return str(share) if share else None

    @property
    def consumed(self) -> Mapping[str, Any]:
        """``consumedCapacity`` of a share (empty for a device given whole)."""
        return self.result.get("consumedCapacity") or {}


class DeviceState:
    """Prepares and unprepares claims; thread-safe; every public call is idempotent."""

    def __init__(
        self,
        *,
        driver_name: str,
        pool_name: str,
        inventory: Inventory,
        checkpoint: CheckpointStore,
        cdi: CdiStore,
        edits: EditsSource,
        locks: DeviceLocks,
        actions: Mapping[str, DeviceAction] | None = None,
        sharing: SharingAction | None = None,
        shares: ShareAction | None = None,
        single_instance: bool = False,
        ledger: Ledger | None = None,
    ) -> None:
        """Args:
        driver_name: results whose driver differs are left alone.
        pool_name: the node's pool; results naming another pool are refused.
        inventory: the devices this node publishes.
        checkpoint: the durable record of prepared claims.
        cdi: where claim CDI specs go.
        edits: CDI edits builder.
        locks: per-GPU locks.
        actions: device action per device kind (default: :func:`default_actions`).
        sharing: sharing seam (default: :class:`NoSharing`).
        shares: the seam that runs fractional shares of a GPU (default: :class:`NoShares`).
        single_instance: no second plugin instance can run on this node at the same time (no
            rolling-update sockets); enables the cheaper path of :meth:`_needs_write_ahead`.
        ledger: ownership records of changes that outlive the plugin (MIG instances, time
            slices), read only when the checkpoint is lost (``driver.ownership``).
        """
        self.driver_name = driver_name
        self.pool_name = pool_name
        self.inventory = inventory
        self.checkpoint = checkpoint
        self.cdi = cdi
        self.edits = edits
        self.locks = locks
        self.actions: Mapping[str, DeviceAction] = actions or default_actions()
        self.sharing: SharingAction = sharing or NoSharing(driver_name)
        self.shares: ShareAction = shares or NoShares()
        self.single_instance = single_instance
        self._cp_guard = threading.Lock()
        self._cache: dict[str, PreparedClaim] | None = None
        self.ledger = ledger
        #: Why claims cannot be served now (the checkpoint is unusable); None when they can.
        self.unavailable: str | None = None

    # ---- prepare ------------------------------------------------------------------------------

    def prepare(self, claim: Claim) -> list[ReplyDevice]:
        """Prepare an allocated claim (v1 JSON shape) and return its devices for the kubelet.

        Raises:
            PermanentClaimError: the claim names devices this node cannot give (unknown, held by
                another claim, bad config, missing device node).
            TemporaryClaimError: a lock, NVML or the file system failed in a way a retry may fix.
        """
        ref = claim_ref(claim)
        self._refuse_while_unavailable()
        planned = self._plan(claim)
        self._check(claim, planned)
        fractional = fractional_shares(planned)
        if fractional:
            self._refuse_sharing_configs_on_shares(claim, planned, fractional)
        with self.locks.hold(lock_keys(ref.uid, planned)):
            claims = self._all()
            recorded = claims.get(ref.uid)
            if recorded is not None and recorded.state == PREPARE_COMPLETED and is_rebuilt(recorded):
                recorded = self._adopt(ref, recorded, planned)
            if recorded is not None and recorded.state == PREPARE_COMPLETED:
                log.debug("claim already prepared")
                return reply_devices(recorded)
            self._refuse_held_devices(ref.uid, planned, claims.values())
            if recorded is not None:
                log.info("rolling back unfinished prepare", devices=[d.device for d in recorded.devices])
                self._rollback(recorded)
            started = PreparedClaim(
                uid=ref.uid,
                namespace=ref.namespace,
                name=ref.name,
                state=PREPARE_STARTED,
                devices=[self._planned_record(ref.uid, p, i in fractional) for i, p in enumerate(planned)],
                sharing=[],
                started_at=time.time(),
            )
            if fractional or self._needs_write_ahead(claim, planned, recorded):
                self._put(started)
            try:
                completed = self._act(claim, started, planned, fractional)
            except Exception as exc:
                self._rollback_after_failure(started)
                raise as_claim_error(exc, ref) from exc
            self._put(completed)
            return reply_devices(completed)

    def _refuse_while_unavailable(self) -> None:
        if self.unavailable is not None:
            raise TemporaryClaimError(
                f"the plugin cannot serve claims yet: {self.unavailable}; it retries on its own every few "
                "seconds, and the kubelet's retry succeeds once that is fixed"
            )

    def _adopt(
        self, ref: ClaimRef, rebuilt: PreparedClaim, planned: Sequence[Planned]
    ) -> PreparedClaim | None:
        """The kubelet prepares a claim rebuilt from the node after a lost checkpoint.

        When the node's record names the devices the claim was allocated, the record is completed
        with what only the claim says (name, request names, share ids, admin access) and kept.
        Otherwise it is undone and the claim is prepared afresh (returns None).
        """
        if sorted(d.device for d in rebuilt.devices) == sorted(p.device.name for p in planned):
            by_name = {p.device.name: p for p in planned}
            devices = [
                replace(
                    d,
                    request_names=[by_name[d.device].request],
                    share_id=d.share_id or by_name[d.device].share_id,
                    admin_access=by_name[d.device].admin_access,
                )
                for d in rebuilt.devices
            ]
            adopted = replace(rebuilt, namespace=ref.namespace, name=ref.name, devices=devices)
            self._put(adopted)
            log.info("claim rebuilt after a lost checkpoint adopted", devices=[d.device for d in devices])
            return adopted
        log.warning(
            "claim rebuilt after a lost checkpoint does not match its allocation; undoing it",
            rebuilt=[d.device for d in rebuilt.devices],
            allocated=[p.device.name for p in planned],
        )
        self._undo(rebuilt)
        self._forget(rebuilt.uid)
        self._remove(rebuilt.uid)
        return None

    def _needs_write_ahead(
        self, claim: Claim, planned: Sequence[Planned], recorded: PreparedClaim | None
    ) -> bool:
        """Whether ``PrepareStarted`` must be on disk before acting.

        Always, except on a single-instance node for a claim whose devices need no action (full
        GPUs, static MIG) and which carries no config of ours: its only side effect is the CDI
        spec, and a spec no checkpoint entry owns is removed by the start-up orphan sweep - the
        same rollback a ``PrepareStarted`` record would give, one fsync'd write cheaper. With two
        instances (rolling update) the other one's sweep could remove a spec mid-prepare, so
        there the record is always written first.
        """
        if not self.single_instance or recorded is not None:
            return True
        if any(not isinstance(self.actions.get(p.device.kind), NoAction) for p in planned):
            return True
        configs = ((claim.get("status") or {}).get("allocation") or {}).get("devices", {}).get("config") or []
        return any((c.get("opaque") or {}).get("driver") == self.driver_name for c in configs)

    def _plan(self, claim: Claim) -> list[Planned]:
        results = ((claim.get("status") or {}).get("allocation") or {}).get("devices", {}).get(
            "results"
        ) or []
        planned: list[Planned] = []
        for result in results:
            if result.get("driver") != self.driver_name:
                continue  # another driver's device in a shared claim
            pool, name = result.get("pool"), result.get("device")
            device = self.inventory.get(str(name))
            if pool != self.pool_name or device is None:
                raise PermanentClaimError(
                    f"allocated device {pool}/{name} (request {result.get('request')}) is not published "
                    f"by this node (pool {self.pool_name}); the claim was allocated for another node or "
                    "against an outdated ResourceSlice - delete and recreate the pod's claim"
                )
            planned.append(Planned(result, device))
        return planned

    def _check(self, claim: Claim, planned: Sequence[Planned]) -> None:
        """Everything that can be known wrong before the first change to any GPU: every config
        of the claim decoded and fitted to its devices, every device preparable here, the device
        nodes of full GPUs present. A MIG instance is never created for a claim that then fails
        on its config (1,072 of 2,341 rejected fuzz configs once did).
        """
        for p in planned:
            action = self.actions.get(p.device.kind)
            if action is None or isinstance(action, Unsupported):
                (action or Unsupported(f"unknown device kind {p.device.kind}")).prepare(p.device)
        try:
            self.sharing.check(claim, [p.device for p in planned])
            self.edits.common()
            for p in planned:
                if p.device.kind == "gpu" or p.device.mig_live is not None:
                    self.edits.for_device(p.device, None)
                elif p.device.mig_spec is not None:
                    # A MIG instance's capability nodes appear with it; its parent's node must
                    # be there before the instance is made.
                    self.edits.for_device(replace(p.device, kind="gpu"), None)
        except Exception as exc:
            raise as_claim_error(exc, claim_ref(claim)) from exc

    def _refuse_held_devices(
        self, uid: str, planned: Sequence[Planned], claims: Iterable[PreparedClaim]
    ) -> None:
        exclusive = {p.device.name: p for p in planned if not p.admin_access and p.share_id is None}
        if not exclusive:
            return
        for other in claims:
            if other.uid == uid or other.state != PREPARE_COMPLETED:
                continue
            for held in other.devices:
                if held.device in exclusive and not held.admin_access and held.share_id is None:
                    raise PermanentClaimError(
                        # The holder may live in another namespace, and this text reaches the
                        # pod's events: name it by UID only.
                        f"device {held.device} is already prepared for another claim (UID {other.uid}); "
                        "a device is given to one claim at a time - wait for that pod to end "
                        "(or use adminAccess for monitoring)"
                    )

    def _planned_record(self, uid: str, p: Planned, fractional: bool = False) -> PreparedDevice:
        return PreparedDevice(
            request_names=[p.request],
            pool=self.pool_name,
            device=p.device.name,
            cdi_device_ids=[qualified_device_id(uid, cdi_name(p, fractional))],
            kind=p.device.kind,
            gpu_uuid=p.device.gpu_uuid,
            share_id=p.share_id,
            admin_access=p.admin_access,
            mig=None,
        )

    def _act(
        self,
        claim: Claim,
        started: PreparedClaim,
        planned: Sequence[Planned],
        fractional: Mapping[int, ShareLimits],
    ) -> PreparedClaim:
        uid = started.uid
        devices: list[PreparedDevice] = []
        for record, p in zip(started.devices, planned, strict=True):
            if p.device.mig_spec is not None and p.device.kind == "mig-dynamic" and self.ledger is not None:
                # The mark says "this instance is the plugin's" when the checkpoint cannot.
                self.ledger.mark_mig(uid, p.device.mig_spec)
            with stage("mig_create" if p.device.kind == "mig-dynamic" else "device_action"):
                live = self.actions[p.device.kind].prepare(p.device)
            devices.append(replace(record, mig=mig_record(live)) if live is not None else record)
        if any(d.mig is not None for d in devices):
            # Record created MIG devices before the next step can fail, so a rollback finds them
            # by their live ids and not only by placement.
            self._put(replace(started, devices=devices))
        created = {d.device: live for d in devices if (live := mig_live(d.mig)) is not None}
        intended: list[dict[str, Any]] = []

        def intend(record: dict[str, Any]) -> None:
            # A sharing change the GPU keeps (a time slice) is recorded before it is made, so a
            # crash between the change and the next checkpoint write is still rolled back.
            intended.append(record)
            if self.ledger is not None:
                self.ledger.note_sharing(uid, record)
            self._put(replace(started, devices=devices, sharing=list(intended)))

        whole = [p.device for i, p in enumerate(planned) if i not in fractional]
        outcome = self.sharing.apply(uid, claim, whole, created, intend)
        records = list(outcome.records)
        if records:
            self._put(replace(started, devices=devices, sharing=list(records)))
        edits = dict(outcome.edits)
        for index, limits in fractional.items():
            p = planned[index]
            share = self.shares.record(uid, p.device, str(p.share_id), limits)
            records.append(share)  # durable before the share joins its GPU's daemon
            self._put(replace(started, devices=devices, sharing=list(records)))
            edits[cdi_name(p, True)] = self.shares.join(share)
        names = [cdi_name(p, i in fractional) for i, p in enumerate(planned)]
        self._write_cdi_spec(uid, devices, planned, edits, names)
        return replace(
            started,
            state=PREPARE_COMPLETED,
            devices=devices,
            sharing=records,
            completed_at=time.time(),
        )

    def _refuse_sharing_configs_on_shares(
        self, claim: Claim, planned: Sequence[Planned], fractional: Mapping[int, ShareLimits]
    ) -> None:
        names = {planned[i].device.name for i in fractional}
        for group in config_groups(claim, [p.device for p in planned], self.driver_name):
            on_share = [str(r.get("device")) for r in group.results if r.get("device") in names]
            if group.sharing is not None and on_share:
                raise PermanentClaimError(
                    f"sharing strategy {group.sharing.strategy} is set for {', '.join(on_share)}, which "
                    "this claim holds as a share (capacity requests); a share always runs through its "
                    "GPU's MPS daemon with the limits it was allocated - remove the sharing config, or "
                    "request the whole GPU"
                )

    def _write_cdi_spec(
        self,
        uid: str,
        devices: Sequence[PreparedDevice],
        planned: Sequence[Planned],
        sharing_edits: Mapping[str, ContainerEdits],
        names: Sequence[str],
    ) -> None:
        if not devices:
            return  # nothing of ours in this claim: no spec, and no CDI ids handed out
        cdi_devices = []
        for d, p, name in zip(devices, planned, names, strict=True):
            cdi_devices.append(
                Device(
                    name=device_name(uid, name),
                    container_edits=self.edits.for_device(p.device, mig_live(d.mig)).merged(
                        sharing_edits.get(name, ContainerEdits())
                    ),
                )
            )
        with stage("cdi_write"):
            self.cdi.write_claim_spec(uid, new_spec(KIND, cdi_devices, self.edits.common()))

    # ---- unprepare ----------------------------------------------------------------------------

    def unprepare(self, ref: ClaimRef) -> None:
        """Undo what the checkpoint recorded for ``ref.uid``; an unknown claim is a success.

        Raises:
            TemporaryClaimError: an undo step failed; the entry stays so the kubelet's retry can
                finish the job.
        """
        self._refuse_while_unavailable()
        recorded = self._get(ref.uid)
        if recorded is None:
            log.debug("claim not prepared here, nothing to undo")
            return
        with self.locks.hold(lock_keys(ref.uid, recorded.devices)):
            recorded = self._get(ref.uid)  # may have changed while we waited
            if recorded is None:
                return
            try:
                if recorded.state == PREPARE_COMPLETED:
                    self._undo(recorded)
                else:
                    self._rollback(recorded)
            except Exception as exc:
                raise as_claim_error(exc, ref, temporary=True) from exc
            self._forget(ref.uid)
            self._remove(ref.uid)
            log.info("claim unprepared", devices=[d.device for d in recorded.devices])

    def _undo(self, recorded: PreparedClaim) -> None:
        """Undo a completed prepare from recorded data only (the inventory may have changed)."""
        self._undo_sharing(recorded)
        if is_rebuilt(recorded):
            # Rebuilt from the node: its share records were in the lost checkpoint; the shares'
            # own member files still name the claim.
            self.shares.leave_claim(recorded.uid)
        for d in recorded.devices:
            with stage("mig_destroy" if d.mig is not None else "device_action"):
                self.actions.get(d.kind, NO_ACTION).unprepare(d)
        with stage("cdi_delete"):
            self.cdi.remove_claim_spec(recorded.uid)

    def _rollback(self, recorded: PreparedClaim) -> None:
        """Undo whatever an unfinished prepare may have done; every step tolerates "never happened"."""
        self._undo_sharing(recorded)
        self.shares.leave_claim(recorded.uid)
        for d in recorded.devices:
            action = self.actions.get(d.kind, NO_ACTION)
            if d.mig is not None:
                action.unprepare(d)
            else:
                action.rollback(self.inventory.get(d.device))
        self.cdi.remove_claim_spec(recorded.uid)

    def _undo_sharing(self, recorded: PreparedClaim) -> None:
        shares = [r for r in recorded.sharing if r.get("kind") == SHARE_RECORD_KIND]
        self.shares.undo(recorded.uid, shares)
        self.sharing.undo(recorded.uid, [r for r in recorded.sharing if r.get("kind") != SHARE_RECORD_KIND])

    def _rollback_after_failure(self, started: PreparedClaim) -> None:
        recorded = self._get(started.uid)
        try:
            self._rollback(recorded or started)
        except Exception:
            # Keep PrepareStarted: the kubelet's retry and start-up reconcile roll back again.
            log.exception("rollback after failed prepare failed; left for the next attempt")
            return
        if recorded is not None:
            self._forget(started.uid)
            self._remove(started.uid)

    # ---- start-up -----------------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Bring node state in line with the checkpoint once, before serving the kubelet.

        The checkpoint store itself drops claims of an earlier boot and moves a corrupt file
        aside. Here: roll back ``PrepareStarted`` claims and remove claim CDI specs (and stray
        temp files) that no checkpoint entry owns.
        """
        report = ReconcileReport()
        for claim in list(self._all().values()):
            if claim.state == PREPARE_COMPLETED:
                continue
            with self.locks.hold(lock_keys(claim.uid, claim.devices)):
                current = self._get(claim.uid)
                if current is None or current.state == PREPARE_COMPLETED:
                    continue  # another instance finished or undid it while we waited for the lock
                try:
                    self._rollback(current)
                except Exception as exc:  # one stuck claim must not stop the plugin
                    report.problems.append(f"rollback of claim {claim.uid} failed: {exc}")
                    log.exception("start-up rollback failed", claim_uid=claim.uid)
                    continue
                self._forget(claim.uid)
                self._remove(claim.uid)
                report.rolled_back.append(claim.uid)
        self._sweep_cdi_root(report)
        self._sweep_shares(report)
        log.info(
            "start-up reconcile done",
            rolled_back=report.rolled_back,
            removed_specs=[p.name for p in report.removed_specs],
            problems=report.problems,
        )
        return report

    def _sweep_cdi_root(self, report: ReconcileReport) -> None:
        """Remove claim specs no checkpoint entry owns, and temp files of interrupted writes.

        During a rolling update the other instance may be writing a spec right now (its temp file
        exists, or its spec is there a moment before its checkpoint entry is re-read here). It
        writes specs only while holding the locks of the claim's GPUs, so holding every GPU's
        lock makes the sweep see a quiet CDI root; the checkpoint is read inside that window.
        """
        gpus = {d.gpu_uuid for d in self.inventory.devices}
        gpus |= {d.gpu_uuid for c in self._all().values() for d in c.devices}
        try:
            with self.locks.hold(sorted(gpus)):
                known = set(self._all())
                for path in [*self.cdi.orphans(known), *self.cdi.stray_temp_files()]:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        report.removed_specs.append(path)
                # Records whose change was undone by a run that died before removing them.
                if self.ledger is not None:
                    report.removed_records.extend(self.ledger.sweep(known))
                report.removed_records.extend(self.sharing.sweep())
        except TemporaryClaimError as exc:  # a busy GPU must not stop the plugin; orphans are harmless
            report.problems.append(f"CDI root sweep skipped: {exc}")
            log.warning("start-up CDI sweep skipped, GPU locks busy", error=str(exc))

    def _sweep_shares(self, report: ReconcileReport) -> None:
        """Shares whose claim is not in the checkpoint are dropped; a GPU daemon nobody uses stops.

        Under every GPU's lock, like the CDI sweep: a prepare records its claim before its share
        joins, so inside the locks every member file of a live prepare has its checkpoint entry.
        """
        gpus = sorted({d.gpu_uuid for d in self.inventory.devices} | set(self.shares.gpus()))
        try:
            with self.locks.hold(gpus):
                known = set(self._all())
                report.shares.extend(self.shares.sweep(lambda uid: uid in known))
        except TemporaryClaimError as exc:
            report.problems.append(f"MPS share sweep skipped: {exc}")
            log.warning("start-up share sweep skipped, GPU locks busy", error=str(exc))
        except Exception as exc:  # a stuck daemon must not stop the plugin
            report.problems.append(f"MPS share sweep failed: {exc}")
            log.exception("start-up share sweep failed")

    def _forget(self, uid: str) -> None:
        """Drop the ownership records of a claim whose changes are undone (before its entry goes)."""
        if self.ledger is not None:
            with self._checkpoint_write(f"drop the ownership records of claim {uid} next to"):
                self.ledger.forget(uid)

    # ---- checkpoint helpers -------------------------------------------------------------------
    # The store's file lock keeps processes apart; this in-process lock keeps our own threads
    # from polling that flock against each other (cheaper, and fair). A single instance is the
    # only writer of its checkpoint, so it keeps what it last wrote in memory and skips reads;
    # any failed write drops that copy, and the next read goes to the file again.

    def prepared_claims(self) -> list[PreparedClaim]:
        """Every claim in the checkpoint, prepared or started (for metrics and watches; a copy)."""
        return list(self._all().values())

    def _all(self) -> dict[str, PreparedClaim]:
        with self._cp_guard:
            if self._cache is not None:
                return dict(self._cache)
            claims = self.checkpoint.load()
            if self.single_instance:
                self._cache = dict(claims)
            return claims

    def _get(self, uid: str) -> PreparedClaim | None:
        return self._all().get(uid)

    def _put(self, claim: PreparedClaim) -> None:
        with self._checkpoint_write(f"record claim {claim.uid} as {claim.state}"):
            self.checkpoint.put(claim)
            if self._cache is not None:
                self._cache[claim.uid] = claim

    def _remove(self, uid: str) -> None:
        with self._checkpoint_write(f"remove claim {uid} from"):
            self.checkpoint.remove(uid)
            if self._cache is not None:
                self._cache.pop(uid, None)

    @contextlib.contextmanager
    def _checkpoint_write(self, what: str) -> Iterator[None]:
        """Serialise a checkpoint write; a failure drops the cached copy and is a temporary error."""
        with self._cp_guard, stage("checkpoint_write"):
            try:
                yield
            except (DriverError, OSError) as exc:
                self._cache = None
                raise TemporaryClaimError(
                    f"could not {what} the checkpoint: {exc}; "
                    "check free space and permissions of the plugin's state directory"
                ) from exc


@dataclass(slots=True)
class ReconcileReport:
    """What start-up reconcile did (logged, and shown by the debug CLI)."""

    rolled_back: list[str] = field(default_factory=list)
    removed_specs: list[Path] = field(default_factory=list)
    shares: list[str] = field(default_factory=list)
    removed_records: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# ---- small pure helpers -----------------------------------------------------------------------


def claim_ref(claim: Claim) -> ClaimRef:
    """The claim's namespace/name/UID from its metadata."""
    meta = claim.get("metadata") or {}
    return ClaimRef(str(meta.get("namespace", "")), str(meta.get("name", "")), str(meta.get("uid", "")))


def is_rebuilt(claim: PreparedClaim) -> bool:
    """Whether ``claim`` was rebuilt from the node (``driver.ownership``), not recorded by a prepare."""
    return not claim.namespace and not claim.name


def lock_keys(uid: str, devices: Sequence[Planned] | Sequence[PreparedDevice]) -> list[str]:
    """The physical GPUs a claim touches, or the claim itself when it has no device of ours."""
    uuids = {d.device.gpu_uuid if isinstance(d, Planned) else d.gpu_uuid for d in devices}
    return sorted(uuids) or [f"claim-{uid}"]


def cdi_name(p: Planned, fractional: bool) -> str:
    """The CDI device name after ``<claim uid>-``: the device, or ``<device>-share-<share id>``.

    A fractional share's CDI device carries its share id: one claim may hold two shares of one
    GPU, and their containers must not see the same CDI id (kubernetes #134519). A device given
    whole keeps NVIDIA's name.
    """
    return f"{p.device.name}-share-{p.share_id}" if fractional and p.share_id else p.device.name


def fractional_shares(planned: Sequence[Planned]) -> dict[int, ShareLimits]:
    """Results that are fractional shares of a GPU, by index, with what each may use.

    A share that took a whole GPU (mode ``memory``, all memory) is prepared as the full GPU.

    Raises:
        PermanentClaimError: the consumed capacity does not fit the device.
    """
    from driver.shares import share_limits

    out: dict[int, ShareLimits] = {}
    for index, p in enumerate(planned):
        if p.share_id is None or not p.device.allow_multiple_allocations:
            continue
        try:
            limits = share_limits(p.device, p.consumed)
        except ValueError as exc:
            raise PermanentClaimError(
                f"allocation result for {p.device.name} (request {p.request}): {exc}; the claim was "
                "allocated against another ResourceSlice - delete and recreate it"
            ) from exc
        if not limits.whole:
            out[index] = limits
    return out


def reply_devices(claim: PreparedClaim) -> list[ReplyDevice]:
    """The kubelet's view of a prepared claim's devices."""
    return [
        ReplyDevice(
            request_names=tuple(d.request_names),
            pool=d.pool,
            device=d.device,
            cdi_device_ids=tuple(d.cdi_device_ids),
            share_id=d.share_id,
        )
        for d in claim.devices
    ]


def mig_record(live: MigLive) -> dict[str, int | str]:
    """A live MIG device as the checkpoint stores it."""
    return dict(dataclasses.asdict(live))


def mig_live(record: Mapping[str, int | str] | None) -> MigLive | None:
    """The live MIG device a checkpoint record describes (None for a full GPU)."""
    if record is None:
        return None
    try:
        return MigLive(**record)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CheckpointCorruptError(
            f"checkpoint MIG record {dict(record)} does not describe a MIG device ({exc}); "
            "the checkpoint was written by an incompatible version"
        ) from exc


def owned_mig_placements(claims: Iterable[PreparedClaim]) -> list[tuple[str, int, int]]:
    """``(parent UUID, GI profile id, placement start)`` of every MIG instance the checkpoint's
    claims own or may have half-made.

    Completed claims name theirs in their MIG record. An unfinished prepare (killed between its
    ``PrepareStarted`` record and the record of what it created) names only the planned device,
    whose canonical name carries profile and placement: whatever sits there is its leftover, to be
    published as ours so start-up reconcile can find and roll it back - not a foreign instance
    to keep forever.
    """
    owned: list[tuple[str, int, int]] = []
    for claim in claims:
        for d in claim.devices:
            live = mig_live(d.mig)
            if live is not None:
                owned.append((live.parent_uuid, live.gi_profile_id, live.placement_start))
            elif d.kind == "mig-dynamic" and (parsed := parse_name(d.device)) is not None:
                owned.append((d.gpu_uuid, parsed.gi_profile_id, parsed.placement_start))
    return owned


def mig_live_required(recorded: PreparedDevice) -> MigLive:
    """The live MIG device of ``recorded``, which must have one."""
    live = mig_live(recorded.mig)
    if live is None:
        raise CheckpointCorruptError(f"device {recorded.device} has no MIG record")
    return live


def as_claim_error(exc: Exception, ref: ClaimRef, *, temporary: bool = False) -> ClaimError:
    """Map any failure inside prepare/unprepare to the ClaimError the kubelet is shown."""
    if isinstance(exc, ClaimError):
        return exc
    if isinstance(exc, DeviceNodeMissingError):
        return PermanentClaimError(f"claim {ref}: {exc}")
    if isinstance(exc, CdiPackageError):
        return PermanentClaimError(f"claim {ref}: the CDI spec could not be built: {exc}")
    if isinstance(exc, ValueError) and not temporary:
        return PermanentClaimError(f"claim {ref}: {exc}")
    return TemporaryClaimError(f"claim {ref}: {type(exc).__name__}: {exc}; the kubelet will retry")


# ---- seams ------------------------------------------------------------------------------------


class EditsSource(Protocol):
    """Builds CDI container edits (``cdi.edits`` over the driver root in the daemon)."""

    def common(self) -> ContainerEdits:
        """Edits every device of every claim needs (control nodes, libraries, hooks)."""
        ...

    def for_device(self, device: AllocatableDevice, mig: MigLive | None) -> ContainerEdits:
        """Edits of one device.

        Raises:
            DeviceNodeMissingError: a device node it needs does not exist (message names it).
        """
        ...


class DeviceAction(Protocol):
    """What preparing one kind of device does to the hardware, and how to undo it."""

    def prepare(self, device: AllocatableDevice) -> MigLive | None:
        """Make ``device`` usable; return the live MIG device when one was created."""
        ...

    def rollback(self, device: AllocatableDevice | None) -> None:
        """Undo a prepare that may have half-happened (``device`` None: no longer in the inventory)."""
        ...

    def unprepare(self, recorded: PreparedDevice) -> None:
        """Undo a completed prepare from its record."""
        ...


class NoAction:
    """Full GPUs and static MIG devices: the device already exists, nothing to do."""

    def prepare(self, device: AllocatableDevice) -> MigLive | None:
        return None

    def rollback(self, device: AllocatableDevice | None) -> None:
        return None

    def unprepare(self, recorded: PreparedDevice) -> None:
        return None


NO_ACTION = NoAction()


class MigDevices(Protocol):
    """The subset of ``mig.manager.MigManager`` dynamic MIG needs."""

    def create(self, spec: MigSpec) -> MigLive: ...

    def destroy(self, live: MigLive) -> bool: ...

    def rollback(self, spec: MigSpec) -> bool: ...


class DynamicMigAction:
    """Dynamic MIG: create the GI/CI on prepare, destroy the recorded one on unprepare."""

    def __init__(self, mig: MigDevices) -> None:
        self._mig = mig

    def prepare(self, device: AllocatableDevice) -> MigLive | None:
        if device.mig_spec is None:
            raise PermanentClaimError(f"device {device.name} is a dynamic MIG device without a MIG spec")
        return self._mig.create(device.mig_spec)

    def rollback(self, device: AllocatableDevice | None) -> None:
        if device is not None and device.mig_spec is not None:
            self._mig.rollback(device.mig_spec)

    def unprepare(self, recorded: PreparedDevice) -> None:
        if recorded.mig is not None:
            self._mig.destroy(mig_live_required(recorded))


class Unsupported:
    """A device kind this build or configuration cannot prepare; says what to enable."""

    def __init__(self, why: str) -> None:
        self._why = why

    def prepare(self, device: AllocatableDevice) -> MigLive | None:
        raise PermanentClaimError(f"device {device.name} cannot be prepared: {self._why}")

    def rollback(self, device: AllocatableDevice | None) -> None:
        return None

    def unprepare(self, recorded: PreparedDevice) -> None:
        return None


def default_actions(mig: MigDevices | None = None) -> dict[str, DeviceAction]:
    """Device actions by :data:`driver.inventory.DeviceKind`."""
    return {
        "gpu": NO_ACTION,
        "mig-static": NO_ACTION,
        "mig-dynamic": DynamicMigAction(mig)
        if mig is not None
        else Unsupported("dynamic MIG is not enabled on this node (feature gate DynamicMIG)"),
    }


@dataclass(frozen=True, slots=True)
class SharingOutcome:
    """What applying sharing did: records for undo (checkpointed) and extra CDI edits per device."""

    records: tuple[dict[str, Any], ...] = ()
    edits: Mapping[str, ContainerEdits] = field(default_factory=dict)


class SharingAction(Protocol):
    """Applies a claim's sharing configs (time-slicing, MPS) per config group; undoes them from records."""

    def apply(
        self,
        claim_uid: str,
        claim: Claim,
        devices: Sequence[AllocatableDevice],
        live: Mapping[str, MigLive] | None = None,
        intend: Callable[[dict[str, Any]], None] | None = None,
    ) -> SharingOutcome:
        """Apply sharing for the claim's config groups (``live``: MIG devices created for it).

        ``intend(record)`` is called with the undo record of a change before the change is made;
        the caller makes it durable.

        Raises:
            ClaimError: a config is invalid or cannot be applied.
        """
        ...

    def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Undo what :meth:`apply` recorded; tolerate records of things that never happened."""
        ...

    def check(self, claim: Claim, devices: Sequence[AllocatableDevice]) -> None:
        """Decode and fit every config of ``claim`` to ``devices`` without changing anything
        (MIG devices not created yet are checked with stand-in UUIDs).

        Raises:
            ClaimError: a config is invalid or does not fit the devices.
        """
        ...

    def sweep(self) -> list[Path]:
        """Remove what interrupted starts left without a record (start-up, GPU locks held)."""
        ...


def config_groups(claim: Claim, devices: Sequence[AllocatableDevice], driver: str) -> list[ConfigGroup]:
    """The claim's devices grouped by the opaque config that applies to them (strictly decoded).

    Raises:
        PermanentClaimError: a config of ours is invalid; the message names the field to fix.
    """
    from sharing.config import resolve_groups
    from sharing.errors import ConfigError as SharingConfigError

    alloc = (claim.get("status") or {}).get("allocation") or {}
    results = (alloc.get("devices") or {}).get("results") or []
    configs = (alloc.get("devices") or {}).get("config") or []
    kinds = {d.name: ("gpu" if d.kind == "gpu" else "mig") for d in devices}
    try:
        return resolve_groups(results, configs, driver, lambda name: kinds.get(name, "unknown"))
    except SharingConfigError as exc:
        raise PermanentClaimError(
            f"invalid opaque device config: {exc}; fix the claim's (or DeviceClass's) config"
        ) from exc


class NoSharing:
    """Decodes opaque configs strictly, applies none: sharing is refused with what to enable.

    The seam where ``sharing.timeslicing`` / ``sharing.mps`` plug in.
    """

    def __init__(self, driver_name: str = "gpu.nvidia.com") -> None:
        self._driver = driver_name

    def apply(
        self,
        claim_uid: str,
        claim: Claim,
        devices: Sequence[AllocatableDevice],
        live: Mapping[str, MigLive] | None = None,
        intend: Callable[[dict[str, Any]], None] | None = None,
    ) -> SharingOutcome:
        groups = config_groups(claim, devices, self._driver)
        for group in groups:
            if group.sharing is not None:
                raise PermanentClaimError(
                    f"sharing strategy {group.sharing.strategy} is not enabled on this node; enable the "
                    "TimeSlicingSettings / MPSSupport feature gate or remove the sharing config"
                )
        return SharingOutcome()

    def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
        return None

    def check(self, claim: Claim, devices: Sequence[AllocatableDevice]) -> None:
        self.apply("", claim, devices)  # decodes and refuses only: it changes nothing

    def sweep(self) -> list[Path]:
        return []


SHARE_RECORD_KIND = "mps-share"


class ShareAction(Protocol):
    """Runs fractional shares of GPUs (``driver.gpushares`` over ``sharing.sharedmps``)."""

    def record(
        self, claim_uid: str, device: AllocatableDevice, share_id: str, limits: ShareLimits
    ) -> dict[str, Any]:
        """The checkpoint record of one share (kind :data:`SHARE_RECORD_KIND`), before it joins."""
        ...

    def join(self, record: Mapping[str, Any]) -> ContainerEdits:
        """Start or join the GPU's daemon for the share; its containers' edits.

        Raises:
            ClaimError: the share cannot run (the share is left again before raising).
        """
        ...

    def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Leave the recorded shares; the last share of a GPU stops its daemon."""
        ...

    def leave_claim(self, claim_uid: str) -> None:
        """Leave every share of the claim, recorded or not (rollback)."""
        ...

    def gpus(self) -> list[str]:
        """GPUs that have share state on disk."""
        ...

    def sweep(self, is_prepared: Callable[[str], bool]) -> list[str]:
        """Start-up: drop shares of unknown claims, stop unused daemons, restart lost ones."""
        ...


class NoShares:
    """Fractional shares refused, with what to enable; nothing on disk to undo or sweep."""

    def record(
        self, claim_uid: str, device: AllocatableDevice, share_id: str, limits: ShareLimits
    ) -> dict[str, Any]:
        raise PermanentClaimError(
            f"device {device.name} was allocated as a share (capacity requests), but this node does "
            "not run shares; enable the MPSSupport and ConsumableShares feature gates on the plugin"
        )

    def join(self, record: Mapping[str, Any]) -> ContainerEdits:
        raise PermanentClaimError("this node does not run shares")

    def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
        return None

    def leave_claim(self, claim_uid: str) -> None:
        return None

    def gpus(self) -> list[str]:
        return []

    def sweep(self, is_prepared: Callable[[str], bool]) -> list[str]:
        return []


class DriverRootEdits:
    """CDI edits from the driver root the plugin sees, with host paths for the runtime.

    The common edits scan the driver root, so they are computed once and cached; a failure is
    not cached (the next claim tries again and reports what is missing).
    """

    def __init__(
        self,
        *,
        driver_root: Path,
        host_driver_root: Path,
        dev_root: Path,
        proc_root: Path,
        hook_path: str,
    ) -> None:
        self._driver_root = driver_root
        self._host_driver_root = host_driver_root
        self._dev_root = dev_root
        self._proc_root = proc_root
        self._hook_path = hook_path
        self._common: ContainerEdits | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config) -> DriverRootEdits:
        """Edits for the daemon's configured roots."""
        hook = cfg.nvidia_cdi_hook_path or (cfg.driver_root / "usr/bin/nvidia-cdi-hook")
        return cls(
            driver_root=cfg.container_driver_root,
            host_driver_root=cfg.driver_root,
            dev_root=cfg.dev_root,
            proc_root=cfg.proc_root,
            hook_path=str(hook),
        )

    def _host(self, root: Path, seen_as: Path) -> str | None:
        return None if root == seen_as else str(root)

    def common(self) -> ContainerEdits:
        with self._lock:
            if self._common is None:
                self._common = common_edits(
                    self._driver_root,
                    self._dev_root,
                    self._hook_path,
                    host_driver_root=self._host(self._host_driver_root, self._driver_root),
                )
            return self._common

    def for_device(self, device: AllocatableDevice, mig: MigLive | None) -> ContainerEdits:
        live = mig or device.mig_live
        if device.kind == "gpu":
            return gpu_edits(self._dev_root, device.gpu_minor)
        if live is None:
            raise PermanentClaimError(
                f"MIG device {device.name} has no live instance to hand out; the plugin's inventory is out "
                "of date - restart the plugin"
            )
        return mig_edits(self._dev_root, self._proc_root, live.parent_minor, live.gi_id, live.ci_id)


# ---- locks ------------------------------------------------------------------------------------


class DeviceLocks:
    """Locks keyed by physical GPU UUID: one thread per GPU in this process, and with ``lock_dir``
    one process per GPU on the node (two plugin instances overlap during a rolling update).

    Keys are always taken in sorted order, so two multi-GPU claims cannot deadlock.
    """

    def __init__(self, lock_dir: Path | None = None, timeout_s: float = 10.0) -> None:
        self._lock_dir = lock_dir
        self._timeout_s = timeout_s
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        if lock_dir is not None:
            lock_dir.mkdir(parents=True, exist_ok=True)

    def _thread_lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    @contextlib.contextmanager
    def hold(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold every lock in ``keys`` for the block.

        Raises:
            TemporaryClaimError: a lock was not free within the timeout.
        """
        with contextlib.ExitStack() as stack, stage("lock_wait"):
            deadline = time.monotonic() + self._timeout_s
            for key in sorted(set(keys)):
                lock = self._thread_lock(key)
                if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise LockBusyError(
                        f"timed out after {self._timeout_s:.0f}s waiting for the lock of {key}: another "
                        "prepare or unprepare on that GPU is still running; the kubelet will retry"
                    )
                stack.callback(lock.release)
                if self._lock_dir is not None:
                    remaining = max(0.1, deadline - time.monotonic())
                    try:
                        stack.enter_context(FileLock(self._lock_dir / f"{key}.lock", remaining))
                    except LockTimeoutError as exc:
                        raise LockBusyError(str(exc)) from exc
            yield


__all__ = [
    "PREPARE_COMPLETED",
    "PREPARE_STARTED",
    "CheckpointCorruptError",
    "DeviceAction",
    "DeviceLocks",
    "DeviceState",
    "DynamicMigAction",
    "EditsSource",
    "NoAction",
    "NoShares",
    "NoSharing",
    "ReconcileReport",
    "ShareAction",
    "SharingAction",
    "SharingOutcome",
    "Unsupported",
    "default_actions",
    "owned_mig_placements",
]
