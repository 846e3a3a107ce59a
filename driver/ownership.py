"""Ownership: what the node itself says the plugin owns, so a lost checkpoint loses nothing.

Why it exists: the checkpoint is the record unprepare works from. When it is lost (deleted,
truncated, damaged in any way and moved aside), the plugin's own GPU changes must not become
permanent - a MIG instance published as a foreign device and never destroyed, an MPS daemon and
EXCLUSIVE_PROCESS compute mode left behind, a time slice left set. So every change that outlives
the plugin also leaves a record of its own, outside the checkpoint, that names its claim:

* MPS: the group's ``group.json`` (``sharing.mps``) under the MPS root; its group id is
  ``<claim UID>-<5 hex>``, and it names the GPUs whose compute mode the daemon set;
* a time slice: a ledger record ``ts-<claim UID>.json`` written before the slice is set;
* a dynamic MIG instance: a ledger mark ``mig-<GPU UUID>-<GI profile>-<placement>.json`` written
  before the instance is created. NVML has no place for a mark on a GPU or compute instance, so
  the mark sits beside it; an instance at a canonical dynamic placement *with* a mark is the
  plugin's, one without is foreign and is never destroyed (an admin's ``nvidia-smi mig -cgi``
  lands on the same placements);
* the claim's CDI spec names its devices (``<claim UID>-<device>``), and exists only once a
  prepare got that far.

:func:`rebuild` turns these into checkpoint entries: a claim with a CDI spec is
``PrepareCompleted`` (the kubelet's re-prepare refreshes its request names, its unprepare undoes
it), one without is ``PrepareStarted`` (start-up reconcile rolls it back). Records are removed
only after their change is undone, and before the claim leaves the checkpoint, so a record
never outlives its change.

What it does not do: decide when to rebuild (``driver.daemon``: only when the checkpoint was
missing or moved aside) or undo anything (``driver.state``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from cdi.atomicfile import remove_durable, write_atomic
from cdi.names import parse_device_name, qualified_device_id
from cdi.store import CdiStore
from driver.checkpoint import PREPARE_COMPLETED, PREPARE_STARTED, PreparedClaim, PreparedDevice
from mig.spec import MigInstance, MigLive, MigSpec, parse_name

log = structlog.get_logger(__name__)

LEDGER_DIR = "owned"
RECORD_VERSION = 1
_GPU_NAME = re.compile(r"^gpu-(\d+)$")
# A fractional share's CDI device: ``<device>-share-<share id>`` (``driver.state.cdi_name``).
_SHARE_NAME = re.compile(r"^(gpu-\d+)-share-(.+)$")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class MigView(Protocol):
    """What the rebuild reads from the GPUs (``driver.nvml.mig.NvmlMigBackend`` in the daemon)."""

    def list_instances(self, parent_uuid: str) -> Sequence[MigInstance]: ...


@runtime_checkable
class SharingRecords(Protocol):
    """MPS group records under the MPS root (``sharing.mps.MpsManager.leftovers``)."""

    def leftovers(self, prefix: str) -> list[dict[str, Any]]: ...


class Ledger:
    """Small per-change records under ``<state dir>/owned/``, written atomically and durably."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- writing ----------------------------------------------------------------------------------

    def mark_mig(self, claim_uid: str, spec: MigSpec) -> None:
        """Record, before it is created, that the instance at ``spec``'s placement is ``claim_uid``'s."""
        self._write(
            _mig_file(spec.parent_uuid, spec.gi_profile_id, spec.placement_start),
            {
                "kind": "mig",
                "claimUID": claim_uid,
                "gpuUUID": spec.parent_uuid,
                "parentMinor": spec.parent_minor,
                "giProfileId": spec.gi_profile_id,
                "placementStart": spec.placement_start,
                "device": spec.name,
            },
        )

    def note_sharing(self, claim_uid: str, record: Mapping[str, Any]) -> None:
        """Record a sharing change other than MPS (a time slice) before it is made."""
        self._write(
            f"ts-{_safe(claim_uid)}.json", {"kind": "sharing", "claimUID": claim_uid, "record": dict(record)}
        )

    def forget(self, claim_uid: str) -> None:
        """Drop every record of ``claim_uid`` (its changes are undone)."""
        for path, record in self._records():
            if record.get("claimUID") == claim_uid:
                with contextlib.suppress(FileNotFoundError):
                    remove_durable(path)

    def _write(self, name: str, body: dict[str, Any]) -> None:
        write_atomic(self.root / name, json.dumps({"version": RECORD_VERSION, **body}), mode=0o600)

    # -- reading ----------------------------------------------------------------------------------

    def _records(self) -> list[tuple[Path, dict[str, Any]]]:
        if not self.root.is_dir():
            return []
        out: list[tuple[Path, dict[str, Any]]] = []
        for path in sorted(self.root.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("ownership record unreadable, ignored", path=str(path), error=str(exc))
                continue
            if isinstance(record, dict) and isinstance(record.get("claimUID"), str):
                out.append((path, record))
        return out

    def mig_marks(self) -> dict[tuple[str, int, int], str]:
        """``(GPU UUID, GI profile id, placement start)`` -> claim UID of every marked instance."""
        out: dict[tuple[str, int, int], str] = {}
        for _path, r in self._records():
            if r.get("kind") == "mig":
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    key = (str(r["gpuUUID"]), int(r["giProfileId"]), int(r["placementStart"]))
                    out[key] = str(r["claimUID"])
        return out

    def sharing_records(self) -> dict[str, list[dict[str, Any]]]:
        """Claim UID -> the sharing records noted for it."""
        out: dict[str, list[dict[str, Any]]] = {}
        for _path, r in self._records():
            if r.get("kind") == "sharing" and isinstance(r.get("record"), dict):
                out.setdefault(str(r["claimUID"]), []).append(dict(r["record"]))
        return out

    def sweep(self, known: Iterable[str]) -> list[Path]:
        """Remove the records of claims not in ``known`` (a crash after the undo left them)."""
        keep = set(known)
        removed: list[Path] = []
        for path, record in self._records():
            if record.get("claimUID") not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        return removed


def _safe(text: str) -> str:
    return _SAFE.sub("_", text)


def _mig_file(gpu_uuid: str, profile: int, start: int) -> str:
    return f"mig-{_safe(gpu_uuid)}-{profile}-{start}.json"


@dataclass(frozen=True, slots=True)
class Gpu:
    """A physical GPU as the rebuild needs it."""

    minor: int
    uuid: str


@dataclass(slots=True)
class Rebuilt:
    """What :func:`rebuild` found, per claim, and what it could not place."""

    claims: dict[str, PreparedClaim] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def mps_claim_uid(record: Mapping[str, Any]) -> str | None:
    """The claim UID of a per-claim MPS group record, or None for any other record.

    A per-claim group id is ``<claim UID>-<first 5 hex of sha256 of its sorted UUIDs>``
    (``sharing.mps.mps_group_id``); the digest is checked, so a daemon shared by several claims
    (or anything else under the MPS root) is never taken for one claim's and stopped with it.
    """
    group_id = str(record.get("groupId", ""))
    uid, _, digest = group_id.rpartition("-")
    uuids = record.get("uuids")
    if not uid or not isinstance(uuids, list):
        return None
    expected = hashlib.sha256(",".join(sorted(str(u) for u in uuids)).encode()).hexdigest()[:5]
    return uid if digest == expected else None


def rebuild(
    *,
    pool: str,
    cdi: CdiStore,
    ledger: Ledger,
    gpus: Sequence[Gpu],
    mig: MigView | None,
    mps: SharingRecords | None,
    dynamic_mig: bool,
) -> Rebuilt:
    """Checkpoint entries for every claim the node still shows signs of.

    Args:
        pool: the node's pool name (every device of ours is in it).
        cdi: the CDI root (claim specs name the devices).
        ledger: MIG marks and time-slice records.
        gpus: the node's GPUs (device names carry the minor; records the UUID).
        mig: the GPUs' MIG instances (None: no MIG on this node).
        mps: MPS group records (None: MPS not enabled).
        dynamic_mig: whether marked instances are the plugin's dynamic MIG devices.
    """
    out = Rebuilt()
    by_minor = {g.minor: g for g in gpus}
    marks = ledger.mig_marks() if dynamic_mig else {}
    instances = _instances(mig, gpus)
    devices, completed = _spec_devices(
        pool, cdi, by_minor=by_minor, marks=marks, instances=instances, notes=out.notes
    )
    _add_marked(pool, ledger, gpus=gpus, marks=marks, instances=instances, devices=devices)
    sharing = _sharing(ledger, mps)
    now = time.time()
    for uid in sorted(set(devices) | set(sharing) | completed):
        state = PREPARE_COMPLETED if uid in completed else PREPARE_STARTED
        out.claims[uid] = PreparedClaim(
            uid=uid,
            namespace="",
            name="",
            state=state,
            devices=list((devices.get(uid) or {}).values()),
            sharing=sharing.get(uid, []),
            started_at=now,
            completed_at=now if state == PREPARE_COMPLETED else None,
        )
    return out


_Instances = dict[tuple[str, int, int], MigInstance]


def _instances(mig: MigView | None, gpus: Sequence[Gpu]) -> _Instances:
    instances: _Instances = {}
    if mig is None:
        return instances
    for gpu in gpus:
        try:
            found = mig.list_instances(gpu.uuid)
        except Exception as exc:  # noqa: BLE001 - a GPU without MIG support lists nothing
            log.debug("no MIG instances read", gpu=gpu.uuid, error=str(exc))
            continue
        for inst in found:
            instances[(gpu.uuid, inst.gi_profile_id, inst.placement_start)] = inst
    return instances


def _spec_devices(
    pool: str,
    cdi: CdiStore,
    *,
    by_minor: Mapping[int, Gpu],
    marks: Mapping[tuple[str, int, int], str],
    instances: _Instances,
    notes: list[str],
) -> tuple[dict[str, dict[str, PreparedDevice]], set[str]]:
    """Devices named by each claim's CDI spec, and the claims that have one."""
    devices: dict[str, dict[str, PreparedDevice]] = {}
    completed: set[str] = set()
    for uid in cdi.list_claim_specs():
        try:
            spec = cdi.read_claim_spec(uid)
        except Exception as exc:  # noqa: BLE001 - a damaged spec is reported, the rest rebuilt
            notes.append(f"CDI spec of claim {uid} unreadable ({exc}); not rebuilt from it")
            continue
        if spec is None:
            continue
        completed.add(uid)
        for cdi_device in spec.devices:
            try:
                ref = parse_device_name(cdi_device.name)
            except ValueError:
                continue
            device = (
                _device(pool, uid, ref.device, by_minor=by_minor, marks=marks, instances=instances)
                if ref.claim_uid == uid
                else None
            )
            if device is None:
                notes.append(f"device {ref.device} of claim {uid} is not on this node any more")
                continue
            devices.setdefault(uid, {})[ref.device] = device
    return devices, completed


def _add_marked(
    pool: str,
    ledger: Ledger,
    *,
    gpus: Sequence[Gpu],
    marks: Mapping[tuple[str, int, int], str],
    instances: _Instances,
    devices: dict[str, dict[str, PreparedDevice]],
) -> None:
    """Marked instances no spec names: a prepare that never got to its spec."""
    by_uuid = {g.uuid: g for g in gpus}
    for (gpu_uuid, profile, start), uid in marks.items():
        gpu = by_uuid.get(gpu_uuid)
        if gpu is None:
            continue
        named = {
            (p.gi_profile_id, p.placement_start)
            for n in (devices.get(uid) or {})
            if (p := parse_name(n)) is not None and p.parent_minor == gpu.minor
        }
        if (profile, start) in named:
            continue
        device_name = _slug_from_ledger(ledger, gpu_uuid, profile, start) or (
            f"gpu-{gpu.minor}-mig-unknown-{profile}-{start}"
        )
        inst = instances.get((gpu_uuid, profile, start))
        devices.setdefault(uid, {})[device_name] = PreparedDevice(
            request_names=[],
            pool=pool,
            device=device_name,
            cdi_device_ids=[qualified_device_id(uid, device_name)],
            kind="mig-dynamic",
            gpu_uuid=gpu_uuid,
            mig=_live_record(inst.to_live(gpu.minor) if inst is not None else None),
        )


def _sharing(ledger: Ledger, mps: SharingRecords | None) -> dict[str, list[dict[str, Any]]]:
    sharing: dict[str, list[dict[str, Any]]] = {}
    for uid, records in ledger.sharing_records().items():
        sharing.setdefault(uid, []).extend(records)
    if mps is not None:
        for record in mps.leftovers(""):
            owner = mps_claim_uid(record)
            if owner:
                sharing.setdefault(owner, []).append({"kind": "mps", **record})
    return sharing


def _slug_from_ledger(ledger: Ledger, gpu_uuid: str, profile: int, start: int) -> str | None:
    path = ledger.root / _mig_file(gpu_uuid, profile, start)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = record.get("device") if isinstance(record, dict) else None
    return str(name) if isinstance(name, str) and parse_name(name) is not None else None


def _device(
    pool: str,
    uid: str,
    name: str,
    *,
    by_minor: Mapping[int, Gpu],
    marks: Mapping[tuple[str, int, int], str],
    instances: Mapping[tuple[str, int, int], MigInstance],
) -> PreparedDevice | None:
    share = _SHARE_NAME.match(name)
    full = _GPU_NAME.match(share.group(1) if share is not None else name)
    if full is not None:
        gpu = by_minor.get(int(full.group(1)))
        if gpu is None:
            return None
        return PreparedDevice(
            request_names=[],
            pool=pool,
            device=full.group(0),
            cdi_device_ids=[qualified_device_id(uid, name)],
            kind="gpu",
            gpu_uuid=gpu.uuid,
            share_id=share.group(2) if share is not None else None,
        )
    parsed = parse_name(name)
    if parsed is None:
        return None
    gpu = by_minor.get(parsed.parent_minor)
    if gpu is None:
        return None
    key = (gpu.uuid, parsed.gi_profile_id, parsed.placement_start)
    inst = instances.get(key)
    if key in marks:  # made by the plugin for a claim: destroyed on unprepare
        return PreparedDevice(
            request_names=[],
            pool=pool,
            device=name,
            cdi_device_ids=[qualified_device_id(uid, name)],
            kind="mig-dynamic",
            gpu_uuid=gpu.uuid,
            mig=_live_record(inst.to_live(gpu.minor) if inst is not None else None),
        )
    # No mark: an existing instance handed out as it is (static MIG); never destroyed.
    return PreparedDevice(
        request_names=[],
        pool=pool,
        device=name,
        cdi_device_ids=[qualified_device_id(uid, name)],
        kind="mig-static",
        gpu_uuid=gpu.uuid,
    )


def _live_record(live: MigLive | None) -> dict[str, int | str] | None:
    return None if live is None else dict(dataclasses.asdict(live))
