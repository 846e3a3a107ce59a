"""GpuShares: the state's share seam, filled with ``sharing.sharedmps``.

Maps the state's terms (a device, its share id, :class:`~driver.shares.ShareLimits`) onto a
:class:`~sharing.sharedmps.Share`, and the sharing package's errors onto claim errors. Every call
runs under the GPU's lock held by ``driver.state``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cdi.spec import ContainerEdits
from driver.errors import TemporaryClaimError
from driver.inventory import AllocatableDevice
from driver.shares import ShareLimits
from sharing.errors import SharingError
from sharing.sharedmps import Share, SharedMps


class GpuShares:
    """Fractional GPU shares through one MPS control daemon per GPU."""

    def __init__(self, shared: SharedMps) -> None:
        self._shared = shared

    def record(
        self, claim_uid: str, device: AllocatableDevice, share_id: str, limits: ShareLimits
    ) -> dict[str, Any]:
        return Share(
            claim_uid=claim_uid,
            share_id=share_id,
            device=device.name,
            gpu_uuid=device.gpu_uuid,
            memory_mib=limits.memory_mib,
            thread_percentage=limits.thread_percentage,
        ).to_record()

    def join(self, record: Mapping[str, Any]) -> ContainerEdits:
        try:
            return self._shared.join(Share.from_record(record))
        except SharingError as exc:
            raise TemporaryClaimError(
                f"the MPS daemon of GPU {record.get('gpuUuid')} for share {record.get('shareId')} could "
                f"not be started or joined: {exc}; the kubelet will retry"
            ) from exc

    def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
        for record in reversed(list(records)):
            self._shared.leave(Share.from_record(record))

    def leave_claim(self, claim_uid: str) -> None:
        self._shared.leave_claim(claim_uid)

    def gpus(self) -> list[str]:
        return self._shared.gpus()

    def sweep(self, is_prepared: Callable[[str], bool]) -> list[str]:
        return self._shared.sweep(is_prepared)
