"""The seam between MIG logic and the hardware: what ``mig.manager`` needs from a GPU.

``driver.nvml.mig.NvmlMigBackend`` implements it over NVML (real or fake); tests may supply
their own. Implementations report failures as :class:`mig.errors.MigBackendError` carrying the
NVML return code, so the manager can tell an occupied placement from a vanished instance.
This module holds no logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mig.profiles import GiProfile, Placement
from mig.spec import MigInstance

# NVML_DEVICE_ARCH_* values the safety rules compare against.
ARCH_AMPERE = 7
ARCH_HOPPER = 9
ARCH_UNKNOWN = 0xFFFFFFFF


class MigBackend(Protocol):
    """GPU-instance and compute-instance operations on one node's GPUs, keyed by parent GPU UUID."""

    def profiles(self, parent_uuid: str) -> Sequence[GiProfile]:
        """Every GPU-instance profile the GPU supports, with its possible placements."""
        ...

    def placements(self, parent_uuid: str, profile_id: int) -> Sequence[Placement]:
        """All placements of ``profile_id`` on the GPU, free or not."""
        ...

    def create_gi(self, parent_uuid: str, profile_id: int, start: int) -> int:
        """Create a GPU instance of ``profile_id`` at exactly ``start``; return its GI id."""
        ...

    def create_ci(self, parent_uuid: str, gi_id: int) -> tuple[int, str]:
        """Create the default compute instance (C == G) in GI ``gi_id``; return (CI id, MIG UUID)."""
        ...

    def destroy_ci(self, parent_uuid: str, gi_id: int, ci_id: int) -> None:
        """Destroy one compute instance."""
        ...

    def destroy_gi(self, parent_uuid: str, gi_id: int) -> None:
        """Destroy one GPU instance (it must have no compute instances left)."""
        ...

    def list_instances(self, parent_uuid: str) -> Sequence[MigInstance]:
        """Every GPU instance on the GPU with its compute instances (one entry per CI; one per empty GI)."""
        ...

    def mig_mode(self, parent_uuid: str) -> tuple[bool, bool]:
        """(current, pending) MIG mode."""
        ...

    def set_mig_mode(self, parent_uuid: str, enabled: bool) -> None:
        """Request a MIG mode; raises when the GPU would need a reset to apply it."""
        ...

    def architecture(self, parent_uuid: str) -> int:
        """NVML_DEVICE_ARCH_* of the GPU."""
        ...

    def is_vgpu_guest(self, parent_uuid: str) -> bool:
        """True when the GPU is a vGPU inside a virtual machine (MIG is the host's business there)."""
        ...
