"""The plugin's checkpoint: which claims are prepared (or half-prepared), surviving restarts.

The file is versioned JSON with a checksum and the node's boot id, on one line (read it with
``python -m json.tool`` or ``gpu-dra`` debug commands)::

    {"checksum":"<sha256 of canonical JSON of data>","data":{"claims":{"<uid>":{...}},
     "nodeBootID":"..."},"version":1}

The canonical JSON of ``data`` (sorted keys, no whitespace) is produced once per write, hashed and
embedded as it is; a reader accepts any whitespace, since it re-serialises ``data`` to verify.

Why each part exists:

* ``PrepareStarted`` is written before any side effect and ``PrepareCompleted`` after, so after a
  crash start-up knows which claims need rolling back;
* writes are atomic (temp file, rename) and every read-modify-write runs under a file lock on
  ``<path>.lock``, so kill -9 at any point leaves the old or the new file and two plugin
  processes (rolling update) never lose each other's updates. No fsync: what the file says
  matters only until the next reboot (see the boot id below), and a killed process's writes are
  in the page cache, which outlives it; only a power loss or kernel crash can lose the last
  writes or leave a short file, and after either the boot id has changed, so every claim is
  dropped anyway (a file damaged that way is moved aside as corrupt). The two fsyncs per write
  were most of a prepare's own time. A read-modify-write still
  reads the file, but when its bytes are the ones this store last wrote or read it reuses the
  claims decoded then instead of parsing and verifying them again;
* the checksum catches a torn or hand-edited file; :meth:`CheckpointStore.startup` moves such a
  file (or a directory in its place) aside to ``<path>.corrupt-<timestamp>`` and starts empty -
  reported loudly, never a crash loop; what the lost file recorded is then rebuilt from the node
  (``driver.ownership``), and a state directory that cannot be written is reported as the
  report's ``problem`` instead of an exception;
* the boot id: after a reboot no claim is prepared any more (MIG devices, MPS daemons, CDI specs
  in /var/run are gone), so claims from an earlier boot are dropped.

What it does not do: roll claims back or delete CDI specs - ``driver.state`` does that with the
report :meth:`CheckpointStore.startup` returns.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import structlog

from cdi.atomicfile import explained, fsync_dir, write_atomic
from driver.errors import CheckpointCorruptError, CheckpointError
from driver.flock import FileLock

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
DEFAULT_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
FILE_MODE = 0o600

ClaimState = Literal["PrepareStarted", "PrepareCompleted"]
PREPARE_STARTED: ClaimState = "PrepareStarted"
PREPARE_COMPLETED: ClaimState = "PrepareCompleted"
_STATES = frozenset(get_args(ClaimState))

R = TypeVar("R")


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise CheckpointCorruptError(f"checkpoint {where} lacks field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise CheckpointCorruptError(f"checkpoint {where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointCorruptError(f"checkpoint {where} must be a list of strings")
    return list(value)


@dataclass(frozen=True)
class PreparedDevice:
    """One device of a prepared claim, as handed to the kubelet plus what unprepare needs.

    ``kind`` is the device type (``gpu``, ``mig``, ...); ``mig`` holds a MIG device's live ids
    (``mig.spec.MigLive`` as a dict) so unprepare can destroy exactly that instance.
    """

    request_names: list[str]
    pool: str
    device: str
    cdi_device_ids: list[str]
    kind: str
    gpu_uuid: str
    share_id: str | None = None
    admin_access: bool = False
    mig: dict[str, int | str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "requestNames": list(self.request_names),
            "pool": self.pool,
            "device": self.device,
            "cdiDeviceIDs": list(self.cdi_device_ids),
            "kind": self.kind,
            "gpuUUID": self.gpu_uuid,
            "shareID": self.share_id,
            "adminAccess": self.admin_access,
            "mig": dict(self.mig) if self.mig is not None else None,
        }

    @classmethod
    def from_dict(cls, obj: Any, where: str = "device") -> PreparedDevice:
        if not isinstance(obj, dict):
            raise CheckpointCorruptError(f"checkpoint {where} must be an object")
        mig = obj.get("mig")
        if mig is not None and (
            not isinstance(mig, dict)
            or not all(isinstance(v, int | str) and not isinstance(v, bool) for v in mig.values())
        ):
            raise CheckpointCorruptError(f"checkpoint {where}.mig must be an object of ints and strings")
        share_id = obj.get("shareID")
        if share_id is not None and not isinstance(share_id, str):
            raise CheckpointCorruptError(f"checkpoint {where}.shareID must be a string")
        return cls(
            request_names=_str_list(_require(obj, "requestNames", list, where), f"{where}.requestNames"),
            pool=_require(obj, "pool", str, where),
            device=_require(obj, "device", str, where),
            cdi_device_ids=_str_list(_require(obj, "cdiDeviceIDs", list, where), f"{where}.cdiDeviceIDs"),
            kind=_require(obj, "kind", str, where),
            gpu_uuid=_require(obj, "gpuUUID", str, where),
            share_id=share_id,
            admin_access=bool(obj.get("adminAccess", False)),
            mig=dict(mig) if mig is not None else None,
        )


@dataclass(frozen=True)
class PreparedClaim:
    """A claim the plugin has started (or finished) preparing.

    ``sharing`` holds opaque records of applied sharing actions (time-slice settings, MPS
    daemons) so unprepare can undo exactly those.
    """

    uid: str
    namespace: str
    name: str
    state: ClaimState
    devices: list[PreparedDevice]
    sharing: list[dict[str, Any]]
    started_at: float
    completed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "state": self.state,
            "devices": [d.to_dict() for d in self.devices],
            "sharing": [dict(s) for s in self.sharing],
            "startedAt": self.started_at,
            "completedAt": self.completed_at,
        }

    @classmethod
    def from_dict(cls, obj: Any, where: str = "claim") -> PreparedClaim:
        if not isinstance(obj, dict):
            raise CheckpointCorruptError(f"checkpoint {where} must be an object")
        state = _require(obj, "state", str, where)
        if state not in _STATES:
            raise CheckpointCorruptError(
                f"checkpoint {where}.state is {state!r}; expected one of {', '.join(sorted(_STATES))}"
            )
        devices = _require(obj, "devices", list, where)
        sharing = _require(obj, "sharing", list, where)
        if not all(isinstance(s, dict) for s in sharing):
            raise CheckpointCorruptError(f"checkpoint {where}.sharing must be a list of objects")
        completed = obj.get("completedAt")
        if completed is not None and (not isinstance(completed, int | float) or isinstance(completed, bool)):
            raise CheckpointCorruptError(f"checkpoint {where}.completedAt must be a number or null")
        return cls(
            uid=_require(obj, "uid", str, where),
            namespace=_require(obj, "namespace", str, where),
            name=_require(obj, "name", str, where),
            state=cast(ClaimState, state),
            devices=[PreparedDevice.from_dict(d, f"{where}.devices[{i}]") for i, d in enumerate(devices)],
            sharing=[dict(s) for s in sharing],
            started_at=float(_require(obj, "startedAt", (int, float), where)),
            completed_at=float(completed) if completed is not None else None,
        )


def canonical_json(data: Any) -> bytes:
    """The bytes the checksum covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def checksum(data: Any) -> str:
    return hashlib.sha256(canonical_json(data)).hexdigest()


def encode(boot_id: str, claims: Mapping[str, PreparedClaim]) -> str:
    """The checkpoint file's text for ``claims`` recorded under ``boot_id``."""
    return _encode_bytes(boot_id, claims).decode()


def _encode_bytes(boot_id: str, claims: Mapping[str, PreparedClaim]) -> bytes:
    # The data is serialised once, canonically, and those very bytes are both hashed and embedded:
    # the file is the document {"checksum", "data", "version"} with sorted keys, on one line.
    data = {"nodeBootID": boot_id, "claims": {uid: c.to_dict() for uid, c in sorted(claims.items())}}
    body = canonical_json(data)
    digest = hashlib.sha256(body).hexdigest()
    return b'{"checksum":"%s","data":%s,"version":%d}\n' % (digest.encode(), body, FORMAT_VERSION)


def decode(text: str | bytes) -> tuple[str, dict[str, PreparedClaim]]:
    """Parse and verify a checkpoint file; return (boot id, claims) or raise CheckpointCorruptError."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CheckpointCorruptError(f"checkpoint is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointCorruptError("checkpoint is not a JSON object")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"checkpoint format version {version!r} is not {FORMAT_VERSION}, the one this plugin reads "
            "(written by a newer or foreign plugin?)"
        )
    data = doc.get("data")
    stored = doc.get("checksum")
    if not isinstance(data, dict) or not isinstance(stored, str):
        raise CheckpointCorruptError("checkpoint lacks its 'data' object or 'checksum' string")
    actual = checksum(data)
    if actual != stored:
        raise CheckpointCorruptError(
            f"checkpoint checksum mismatch (stored {stored[:12]}..., computed {actual[:12]}...): "
            "the file was damaged or edited by hand"
        )
    boot_id = _require(data, "nodeBootID", str, "data")
    raw_claims = _require(data, "claims", dict, "data")
    claims: dict[str, PreparedClaim] = {}
    for uid, raw in raw_claims.items():
        claim = PreparedClaim.from_dict(raw, f"claims[{uid}]")
        if claim.uid != uid:
            raise CheckpointCorruptError(f"checkpoint claim stored under {uid} carries uid {claim.uid}")
        claims[uid] = claim
    return boot_id, claims


@dataclass(frozen=True)
class StartupReport:
    """What :meth:`CheckpointStore.startup` found and did; every field empty on a clean start."""

    claims: dict[str, PreparedClaim]
    moved_aside: Path | None = None
    corrupt_reason: str | None = None
    previous_boot_id: str | None = None
    dropped_for_reboot: list[PreparedClaim] = field(default_factory=list)
    #: No trustworthy record of this boot's claims: the file was missing or was moved aside. What
    #: the node holds is then rebuilt from the node itself (``driver.ownership``).
    lost: bool = False
    #: The checkpoint cannot be used now (unreadable, or its directory is full or read-only);
    #: the plugin refuses claims with this text and calls :meth:`CheckpointStore.startup` again.
    problem: str | None = None
    #: Temp files of writes a kill -9 interrupted, removed.
    swept: list[Path] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """Human-readable lines for the start-up log / events."""
        out: list[str] = []
        if self.moved_aside is not None:
            out.append(
                f"checkpoint was corrupt ({self.corrupt_reason}); moved aside to {self.moved_aside} and "
                "started empty - claims prepared before are unknown to the plugin until the kubelet "
                "prepares them again"
            )
        if self.problem is not None:
            out.append(f"checkpoint unusable: {self.problem}")
        if self.dropped_for_reboot:
            out.append(
                f"node rebooted (boot id {self.previous_boot_id} -> now): dropped "
                f"{len(self.dropped_for_reboot)} claim(s) prepared before the reboot"
            )
        return out


class CheckpointStore:
    """Read and update the checkpoint file at ``path`` under a cross-process file lock."""

    def __init__(
        self, path: Path, boot_id_path: Path = DEFAULT_BOOT_ID_PATH, lock_timeout_s: float = 10.0
    ) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.lock_timeout_s = lock_timeout_s
        self.boot_id = self._read_boot_id(boot_id_path)
        # What this store last wrote or read, and its claims: an update that finds the file
        # unchanged (byte for byte) skips decoding it again.
        self._known: tuple[bytes, dict[str, PreparedClaim]] | None = None

    @staticmethod
    def _read_boot_id(path: Path) -> str:
        try:
            boot_id = path.read_text().strip()
        except OSError as exc:
            raise CheckpointError(
                f"cannot read the boot id from {path} ({exc}); the plugin needs /proc to tell a reboot "
                "from a restart - mount the host's /proc"
            ) from exc
        if not boot_id:
            raise CheckpointError(f"{path} is empty; expected the kernel's boot id")
        return boot_id

    def _lock(self) -> FileLock:
        return FileLock(self.lock_path, self.lock_timeout_s)

    def _read_unlocked(self) -> dict[str, PreparedClaim]:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        known = self._known
        if known is not None and known[0] == text:
            return dict(known[1])
        _, claims = decode(text)
        self._known = (text, dict(claims))
        return claims

    def _write_unlocked(self, claims: Mapping[str, PreparedClaim]) -> None:
        payload = _encode_bytes(self.boot_id, claims)
        self._known = None  # a failed write leaves the file in a state we did not see
        write_atomic(self.path, payload, mode=FILE_MODE, durable=False)
        self._known = (payload, dict(claims))

    def load(self) -> dict[str, PreparedClaim]:
        """All claims; raises CheckpointCorruptError if the file went bad since :meth:`startup`."""
        with self._lock():
            return self._read_unlocked()

    def get(self, uid: str) -> PreparedClaim | None:
        return self.load().get(uid)

    def update(self, fn: Callable[[dict[str, PreparedClaim]], R]) -> R:
        """Read the claims, let ``fn`` change the dict in place, write it back; return fn's result.

        All under the lock, so concurrent updaters (threads or processes) serialise. If ``fn``
        raises, nothing is written.
        """
        with self._lock():
            claims = self._read_unlocked()
            result = fn(claims)
            self._write_unlocked(claims)
            return result

    def put(self, claim: PreparedClaim) -> None:
        """Record ``claim`` (replacing an entry with the same UID)."""

        def put_one(claims: dict[str, PreparedClaim]) -> None:
            claims[claim.uid] = claim

        self.update(put_one)

    def remove(self, uid: str) -> bool:
        """Forget claim ``uid``; return whether it was recorded."""
        return self.update(lambda claims: claims.pop(uid, None) is not None)

    def startup(self) -> StartupReport:
        """Verify the checkpoint at plugin start; repair what would otherwise stop the plugin.

        A missing file starts empty; a corrupt one (bad JSON, checksum, unknown version, or a
        directory in its place) is moved aside and replaced by an empty one; claims recorded
        under another boot id are dropped; temp files of interrupted writes are removed. It never
        raises for the state of the file system: what keeps the checkpoint from being used (a
        full or read-only directory, an unreadable file) is returned as ``problem``, and calling
        this again once it is fixed completes the start-up.
        """
        try:
            with self._lock():
                return self._startup_locked()
        except OSError as exc:
            problem = str(explained(exc, self.lock_path))
            log.error("checkpoint unusable", path=str(self.path), problem=problem)  # noqa: TRY400
            return StartupReport(claims={}, problem=problem)

    def _startup_locked(self) -> StartupReport:
        swept = self._sweep_temp_files()
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            log.info("checkpoint created", path=str(self.path))
            return StartupReport(claims={}, lost=True, swept=swept, problem=self._write_empty())
        except IsADirectoryError:
            return self._aside("a directory is where the checkpoint file belongs", swept)
        except OSError as exc:
            problem = f"cannot read {self.path}: {exc}; check the state directory's permissions and disk"
            log.error("checkpoint unreadable", path=str(self.path), problem=problem)  # noqa: TRY400
            return StartupReport(claims={}, problem=problem, swept=swept)
        try:
            boot_id, claims = decode(text)
        except CheckpointCorruptError as exc:
            return self._aside(str(exc), swept)
        if boot_id != self.boot_id:
            dropped = list(claims.values())
            log.warning(
                "checkpoint from an earlier boot, claims dropped",
                path=str(self.path),
                previous_boot_id=boot_id,
                boot_id=self.boot_id,
                dropped=sorted(claims),
            )
            return StartupReport(
                claims={},
                previous_boot_id=boot_id,
                dropped_for_reboot=dropped,
                swept=swept,
                problem=self._write_empty(),
            )
        log.info("checkpoint loaded", path=str(self.path), claims=len(claims))
        return StartupReport(claims=claims, swept=swept)

    def _aside(self, reason: str, swept: list[Path]) -> StartupReport:
        try:
            aside = self._move_aside()
        except OSError as exc:
            problem = f"checkpoint {self.path} is corrupt ({reason}) and cannot be moved aside: {exc}"
            log.error("checkpoint corrupt and stuck", path=str(self.path), problem=problem)  # noqa: TRY400
            return StartupReport(claims={}, corrupt_reason=reason, problem=problem, swept=swept)
        log.error(
            "checkpoint corrupt, moved aside",
            path=str(self.path),
            moved_to=str(aside),
            reason=reason,
        )
        return StartupReport(
            claims={},
            moved_aside=aside,
            corrupt_reason=reason,
            lost=True,
            swept=swept,
            problem=self._write_empty(),
        )

    def _write_empty(self) -> str | None:
        """Write an empty checkpoint; a failure is returned (a missing file reads as empty too)."""
        try:
            self._write_unlocked({})
        except OSError as exc:
            problem = str(explained(exc, self.path))
            log.error("checkpoint cannot be written", path=str(self.path), problem=problem)  # noqa: TRY400
            return problem
        return None

    def _sweep_temp_files(self) -> list[Path]:
        """Remove ``.tmp-<name>-*`` files a kill -9 mid-write left (under the lock: no writer runs)."""
        removed: list[Path] = []
        for tmp in self.path.parent.glob(f".tmp-{self.path.name}-*"):
            try:
                tmp.unlink()
            except OSError:
                continue
            removed.append(tmp)
        if removed:
            log.info("removed temp files of interrupted checkpoint writes", files=[p.name for p in removed])
        return removed

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        self.path.replace(aside)
        fsync_dir(self.path.parent)
        return aside
