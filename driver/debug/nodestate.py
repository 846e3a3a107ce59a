"""What the debug commands read from this node: the checkpoint (verified), its claims' holdings,
the devices NVML reports, and the CDI specs on disk.

Why a module of its own: ``devices``, ``mig``, ``claims``, ``cdi`` and ``doctor`` all answer from
the same three sources and must agree on them - a MIG instance the plugin created for a claim is
the plugin's (not a foreign instance), a device named in the checkpoint is held by that claim.

Everything here only reads. The checkpoint is read without its lock: the plugin replaces the file
atomically, so a reader sees one whole version. It does not format output (``render``) nor talk to
the API server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driver.checkpoint import PreparedClaim, decode
from driver.config import Config
from driver.errors import DriverError
from driver.inventory import AllocatableDevice, Inventory

JsonDict = dict[str, Any]
CHECKPOINT_FILE = "checkpoint.json"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: Environment twin of the boot id path, so a test can stand in for /proc.
BOOT_ID_ENV = "GPU_DRA_BOOT_ID_PATH"


# -- the checkpoint ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckpointView:
    """The checkpoint as read now: its claims and how far it could be verified.

    ``problem`` is None when the file is absent (nothing prepared yet) or verified: checksum
    matches and it was written in this boot.
    """

    path: Path
    exists: bool
    claims: Mapping[str, PreparedClaim]
    checksum: str | None = None
    checksum_verified: bool = False
    boot_id: str | None = None
    current_boot_id: str | None = None
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None

    def to_dict(self) -> JsonDict:
        return {
            "path": str(self.path),
            "exists": self.exists,
            "valid": self.valid,
            "checksum": self.checksum,
            "checksumVerified": self.checksum_verified,
            "bootId": self.boot_id,
            "currentBootId": self.current_boot_id,
            "bootIdMatches": self.boot_id is not None and self.boot_id == self.current_boot_id,
            "problem": self.problem,
        }


def current_boot_id() -> str | None:
    path = Path(os.environ.get(BOOT_ID_ENV, str(BOOT_ID_PATH)))
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def read_checkpoint(state_dir: Path) -> CheckpointView:
    """Read and verify ``<state_dir>/checkpoint.json`` (checksum, format, boot id)."""
    path = state_dir / CHECKPOINT_FILE
    boot_now = current_boot_id()
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return CheckpointView(path, False, {}, current_boot_id=boot_now)
    except IsADirectoryError:
        return CheckpointView(
            path,
            True,
            {},
            current_boot_id=boot_now,
            problem=f"{path} is a directory, not the checkpoint file; the plugin moves it aside on start",
        )
    except OSError as exc:
        return CheckpointView(
            path, True, {}, current_boot_id=boot_now, problem=f"cannot read {path}: {exc}; run as root"
        )
    stored: str | None = None
    try:
        doc = json.loads(text)
        stored = str(doc.get("checksum")) if isinstance(doc, dict) and doc.get("checksum") else None
    except ValueError:
        pass
    try:
        boot_id, claims = decode(text)
    except DriverError as exc:
        return CheckpointView(
            path,
            True,
            {},
            stored,
            current_boot_id=boot_now,
            problem=f"{path}: {exc}; the plugin moves such a file aside on its next start",
        )
    problem = None
    if boot_now is None:
        problem = f"cannot read the boot id ({os.environ.get(BOOT_ID_ENV, str(BOOT_ID_PATH))}); mount /proc"
    elif boot_id != boot_now:
        problem = (
            f"{path} was written in boot {boot_id}, this is boot {boot_now}: its claims are stale and "
            "the plugin drops them on its next start"
        )
    return CheckpointView(path, True, claims, stored, True, boot_id, boot_now, problem)


def claim_ref(claim: PreparedClaim) -> str:
    if not claim.namespace and not claim.name:
        # Rebuilt from the node after a lost checkpoint; the kubelet's next prepare names it.
        return f"(rebuilt) {claim.uid}"
    return f"{claim.namespace}/{claim.name}"


def holders(claims: Mapping[str, PreparedClaim]) -> dict[str, PreparedClaim]:
    """device name -> the prepared claim that holds it."""
    return {device.device: claim for claim in claims.values() for device in claim.devices}


def age_seconds(claim: PreparedClaim, now: float | None = None) -> int:
    return max(0, int((time.time() if now is None else now) - claim.started_at))


def find_claim(claims: Mapping[str, PreparedClaim], ref: str) -> PreparedClaim | None:
    """The claim whose uid, ``ns/name`` or (unique) name is ``ref``."""
    for uid, claim in claims.items():
        if ref in (uid, claim_ref(claim)):
            return claim
    by_name = [c for c in claims.values() if c.name == ref]
    return by_name[0] if len(by_name) == 1 else None


def sharing_summary(claim: PreparedClaim) -> list[str]:
    """One line per applied sharing record; the empty case says so explicitly."""
    if not claim.sharing:
        return ["none applied: the devices are used as they are (no time-slicing, no MPS)"]
    lines = []
    for record in claim.sharing:
        kind = record.get("kind")
        if kind == "mps":
            lines.append(
                f"MPS control daemon {record.get('groupId')} (pid {record.get('pid')}, "
                f"pipe dir {record.get('groupDir')}/pipe) on {', '.join(record.get('uuids') or [])}"
            )
        elif kind == "timeslice":
            lines.append(f"time-slicing level {record.get('level')} on {', '.join(record.get('gpus') or [])}")
        else:
            lines.append(f"{kind}: {json.dumps(record, sort_keys=True)}")
    return lines


def mps_records(claims: Mapping[str, PreparedClaim]) -> list[tuple[PreparedClaim, Mapping[str, Any]]]:
    return [(c, r) for c in claims.values() for r in c.sharing if r.get("kind") == "mps"]


# -- devices -------------------------------------------------------------------------------------


def local_inventory(cfg: Config, claims: Iterable[PreparedClaim] = ()) -> Inventory:
    """What this node's NVML reports, discovered as the daemon does.

    MIG instances the checkpoint's claims own are the plugin's, as in the daemon; without them
    they would show as foreign static devices and hide their placements.
    """
    from driver.discovery import discover
    from driver.migdiscovery import make_mig_hook
    from driver.nvml.backend import Nvml
    from driver.nvml.mig import NvmlMigBackend
    from driver.state import owned_mig_placements

    node = cfg.node_name or "this-node"
    if cfg.nvml_backend == "fake":
        state = cfg.fake_state or (cfg.state_dir / "fake-nvml.json")
        nvml = Nvml.open("fake", fake_topology=cfg.fake_topology, fake_state=state, node_name=node)
    else:
        nvml = Nvml.open("real", cfg.container_driver_root)
    try:
        mode = cfg.mig_mode if cfg.gate("DynamicMIG") else "static"
        hook = make_mig_hook(
            NvmlMigBackend(nvml),
            mode,
            allow_mig_mode_change=cfg.allow_mig_mode_change,
            owned=owned_mig_placements(claims),
        )
        sysfs = None if cfg.nvml_backend == "fake" else Path("/sys")
        inventory = discover(nvml, node, sysfs_root=sysfs, mig_hook=hook)
    finally:
        nvml.shutdown()
    if not cfg.gate("ConsumableShares"):
        return inventory
    from driver.shares import offer_shares, parse_share_mode

    # As the daemon offers full GPUs (a server that drops the fields makes it fall back).
    return offer_shares(inventory, parse_share_mode(cfg.consumable_shares))


@dataclass(frozen=True, slots=True)
class DeviceHolding:
    """Who has a device: the claim holding it, or the claims holding devices it shares memory with."""

    held_by: PreparedClaim | None = None
    blocked_by: tuple[PreparedClaim, ...] = field(default=())

    @property
    def status(self) -> str:
        if self.held_by is not None:
            return "held"
        return "blocked" if self.blocked_by else "free"


def _memory(device: AllocatableDevice) -> set[tuple[str, str]]:
    return {
        (c.counter_set, name)
        for c in device.consumes_counters
        for name in c.counters
        if name.startswith("memory-slice")
    }


def device_holdings(inventory: Inventory, claims: Mapping[str, PreparedClaim]) -> dict[str, DeviceHolding]:
    """Per device: held (named in a prepared claim), blocked (shares a memory slice with a held
    device: a full GPU while one of its MIG slices is in use, an overlapping placement) or free."""
    held = holders(claims)
    used: dict[tuple[str, str], list[PreparedClaim]] = {}
    for d in inventory.devices:
        if d.name in held:
            for key in _memory(d):
                used.setdefault(key, []).append(held[d.name])
    out: dict[str, DeviceHolding] = {}
    for d in inventory.devices:
        if d.name in held:
            out[d.name] = DeviceHolding(held[d.name])
            continue
        blockers: dict[str, PreparedClaim] = {}
        for key in _memory(d):
            for claim in used.get(key, []):
                blockers[claim.uid] = claim
        out[d.name] = DeviceHolding(None, tuple(blockers[u] for u in sorted(blockers)))
    return out


# -- CDI specs -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpecStatus:
    """One claim spec file (or a checkpoint claim missing one) and what is wrong with it."""

    claim_uid: str
    path: Path
    status: str  # ok | orphan | invalid | missing
    problem: str | None = None
    devices: tuple[str, ...] = ()

    def to_dict(self) -> JsonDict:
        return {
            "claim": self.claim_uid,
            "path": str(self.path),
            "status": self.status,
            "orphan": self.status == "orphan",
            "problem": self.problem,
            "devices": list(self.devices),
        }


def cdi_specs(cdi_root: Path, claims: Mapping[str, PreparedClaim]) -> list[SpecStatus]:
    """Every claim spec under ``cdi_root`` checked, plus completed claims that have none."""
    from cdi.errors import CdiError
    from cdi.names import KIND
    from cdi.store import CdiStore, check_claim_spec

    store = CdiStore(cdi_root)
    out: list[SpecStatus] = []
    files = store.list_claim_specs()
    for uid, path in sorted(files.items()):
        try:
            spec = store.read_claim_spec(uid)
            if spec is None:  # removed between list and read
                continue
            check_claim_spec(uid, spec)
        except (CdiError, ValueError, OSError) as exc:
            out.append(SpecStatus(uid, path, "invalid", f"{exc}; the runtime cannot use it"))
            continue
        ids = tuple(f"{KIND}={d.name}" for d in spec.devices)
        claim = claims.get(uid)
        if claim is None:
            out.append(
                SpecStatus(
                    uid, path, "orphan", "no checkpoint entry owns it; the plugin removes it on start", ids
                )
            )
            continue
        want = {i for d in claim.devices for i in d.cdi_device_ids}
        if claim.state == "PrepareCompleted" and not want <= set(ids):
            missing = sorted(want - set(ids))
            out.append(
                SpecStatus(uid, path, "invalid", f"lacks devices {missing} handed to the kubelet", ids)
            )
            continue
        out.append(SpecStatus(uid, path, "ok", None, ids))
    for uid, claim in sorted(claims.items()):
        if (
            uid not in files
            and claim.state == "PrepareCompleted"
            and any(d.cdi_device_ids for d in claim.devices)
        ):
            out.append(
                SpecStatus(
                    uid,
                    store.path_for(uid),
                    "missing",
                    f"claim {claim_ref(claim)} is prepared but its CDI spec is gone; containers cannot start",
                )
            )
    return out


def spec_problems(statuses: Sequence[SpecStatus]) -> list[str]:
    return [f"{s.path}: {s.status}: {s.problem}" for s in statuses if s.status != "ok"]
