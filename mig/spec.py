"""What a MIG device is, abstractly (MigSpec) and once it exists on a GPU (MigLive).

Canonical device names follow NVIDIA's driver so manifests and tooling carry over:
``gpu-<parent minor>-mig-<profile without dots, RFC 1123 clean>-<GI profile id>-<placement start>``,
e.g. ``gpu-0-mig-1g5gb-19-0``; ``1g.10gb+me`` becomes ``1g10gb-me``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME_RE = re.compile(r"^gpu-(\d+)-mig-(.+)-(\d+)-(\d+)$")


def profile_slug(profile: str) -> str:
    """``1g.10gb+me`` -> ``1g10gb-me``: dots dropped, anything outside [a-z0-9-] becomes ``-``."""
    return re.sub(r"[^a-z0-9-]", "-", profile.lower().replace(".", ""))


@dataclass(frozen=True, slots=True)
class MigSpec:
    """A GPU-instance profile at one placement on one parent GPU: a device that may be created."""

    parent_minor: int
    parent_uuid: str
    profile: str  # e.g. "1g.5gb"
    gi_profile_id: int  # GpuInstanceProfileInfo.id (the value NVML create calls take)
    placement_start: int  # in memory slices
    placement_size: int  # in memory slices

    @property
    def name(self) -> str:
        """The canonical DRA device name."""
        return canonical_name(self.parent_minor, self.profile, self.gi_profile_id, self.placement_start)

    @property
    def memory_slices(self) -> range:
        """The memory slices this placement occupies."""
        return range(self.placement_start, self.placement_start + self.placement_size)


@dataclass(frozen=True, slots=True)
class MigLive:
    """A MIG device that exists on the GPU: what unprepare needs to find and destroy it again."""

    parent_minor: int
    parent_uuid: str
    gi_id: int
    ci_id: int
    mig_uuid: str
    gi_profile_id: int
    placement_start: int


def canonical_name(parent_minor: int, profile: str, gi_profile_id: int, placement_start: int) -> str:
    """Format a MIG device name, e.g. ``gpu-0-mig-1g5gb-19-0``."""
    return f"gpu-{parent_minor}-mig-{profile_slug(profile)}-{gi_profile_id}-{placement_start}"


@dataclass(frozen=True, slots=True)
class ParsedMigName:
    """The parts of a canonical MIG device name."""

    parent_minor: int
    profile_slug: str
    gi_profile_id: int
    placement_start: int


def parse_name(name: str) -> ParsedMigName | None:
    """Parse a canonical MIG device name; None when ``name`` is not one."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return ParsedMigName(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)))


@dataclass(frozen=True, slots=True)
class MigInstance:
    """A GPU instance found on a GPU, with its compute instance when it has one.

    A GI without a CI is what a crash between the two creates leaves behind; ``ci_id`` and
    ``mig_uuid`` are None then.
    """

    parent_uuid: str
    gi_id: int
    gi_profile_id: int
    placement_start: int
    placement_size: int
    ci_id: int | None = None
    mig_uuid: str | None = None

    def to_live(self, parent_minor: int) -> MigLive | None:
        """The MigLive for this instance, or None while it has no compute instance."""
        if self.ci_id is None or self.mig_uuid is None:
            return None
        return MigLive(
            parent_minor=parent_minor,
            parent_uuid=self.parent_uuid,
            gi_id=self.gi_id,
            ci_id=self.ci_id,
            mig_uuid=self.mig_uuid,
            gi_profile_id=self.gi_profile_id,
            placement_start=self.placement_start,
        )

    def matches(self, spec: MigSpec) -> bool:
        """True when this instance sits at ``spec``'s profile and placement on ``spec``'s GPU."""
        return (
            self.parent_uuid == spec.parent_uuid
            and self.gi_profile_id == spec.gi_profile_id
            and self.placement_start == spec.placement_start
        )
