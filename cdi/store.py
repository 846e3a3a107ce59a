"""The CDI spec directory as the driver uses it: one transient spec file per prepared claim.

A spec is validated before it is written and written atomically (temp file, rename; with
``durable`` also fsync of file and directory), so a runtime scanning the directory - or a plugin
restarted after kill -9 - sees the whole old file or the whole new one, never an incomplete spec.
Start-up uses :meth:`CdiStore.orphans` to find specs no checkpoint entry owns.

What it does not do: decide what goes into a spec (:mod:`cdi.edits`), or touch files of other
kinds in the same directory (the NVIDIA toolkit's, other drivers').
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import structlog

from cdi.atomicfile import remove_durable, write_atomic
from cdi.errors import SpecInvalidError
from cdi.names import KIND, SPEC_FILE_PREFIX, check_claim_uid, claim_spec_filename, parse_claim_spec_filename
from cdi.spec import Spec, validate

log = structlog.get_logger(__name__)

SPEC_FILE_MODE = 0o644


class CdiStore:
    """Per-claim CDI spec files under ``root`` (the CDI root, e.g. ``/var/run/cdi``).

    ``durable=False`` skips the fsyncs (see :mod:`cdi.atomicfile`): right for specs that are void
    after a reboot anyway, such as claim specs whose owner forgets every claim on reboot.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable

    def path_for(self, claim_uid: str) -> Path:
        """Where the spec of ``claim_uid`` lives."""
        return self.root / claim_spec_filename(claim_uid)

    def write_claim_spec(self, claim_uid: str, spec: Spec) -> Path:
        """Validate ``spec`` as the spec of ``claim_uid`` and write it atomically; return its path."""
        check_claim_spec(claim_uid, spec)
        path = self.path_for(claim_uid)
        write_atomic(path, spec.to_json(), mode=SPEC_FILE_MODE, durable=self.durable)
        log.debug("cdi spec written", path=str(path), devices=[d.name for d in spec.devices])
        return path

    def remove_claim_spec(self, claim_uid: str) -> bool:
        """Delete the spec of ``claim_uid`` durably; return whether it existed."""
        path = self.path_for(claim_uid)
        removed = remove_durable(path, durable=self.durable)
        if removed:
            log.debug("cdi spec removed", path=str(path))
        return removed

    def read_claim_spec(self, claim_uid: str) -> Spec | None:
        """The spec of ``claim_uid``, or None when there is none; a damaged file raises SpecInvalidError."""
        path = self.path_for(claim_uid)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Spec.from_json(text)
        except SpecInvalidError as exc:
            raise SpecInvalidError(f"CDI spec {path} cannot be read back: {exc}") from exc

    def list_claim_specs(self) -> dict[str, Path]:
        """Every claim spec file in the root, by claim UID (other files are ignored)."""
        if not self.root.is_dir():
            return {}
        out: dict[str, Path] = {}
        for path in sorted(self.root.glob(f"{SPEC_FILE_PREFIX}*")):
            uid = parse_claim_spec_filename(path.name)
            if uid is not None and path.is_file():
                out[uid] = path
        return out

    def orphans(self, known_uids: Iterable[str]) -> list[Path]:
        """Claim spec files whose claim is not in ``known_uids`` (e.g. the checkpoint's claims)."""
        known = set(known_uids)
        return [path for uid, path in self.list_claim_specs().items() if uid not in known]

    def stray_temp_files(self) -> list[Path]:
        """Temp files of our specs left by a write killed before its rename; safe to delete at start-up."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f".tmp-{SPEC_FILE_PREFIX}*") if p.is_file())


def check_claim_spec(claim_uid: str, spec: Spec) -> None:
    """Refuse a spec that is invalid CDI or is not shaped as ``claim_uid``'s spec.

    The driver's own rules on top of CDI's: the kind is ours, and every device name carries the
    claim's UID, so ids handed to the kubelet resolve to this file and no other.
    """
    if spec.kind != KIND:
        raise SpecInvalidError(
            f"claim spec for {claim_uid} has kind {spec.kind!r}; claim specs use kind {KIND}"
        )
    prefix = check_claim_uid(claim_uid) + "-"
    for dev in spec.devices:
        if not dev.name.startswith(prefix) or len(dev.name) == len(prefix):
            raise SpecInvalidError(
                f"device {dev.name!r} in the spec of claim {claim_uid} is not named '<claim uid>-<device>'; "
                "build names with cdi.names.device_name()"
            )
    validate(spec)
