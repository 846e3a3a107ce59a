"""The MIG package's own small error tree (``mig`` never imports ``driver``).

    MigError
    ├── MigUnsupportedError   the GPU cannot do what was asked (MIG off, mode change forbidden)
    ├── MigPlacementError     the placement is occupied or the profile is exhausted
    ├── MigMismatchError      the instance on the GPU is not the one we recorded
    └── MigBackendError       the backend (NVML) failed; ``code`` keeps its return code

``driver.state`` maps these to claim errors at the claim boundary; this module does not decide
what is temporary and what is permanent.
"""

from __future__ import annotations


class MigError(Exception):
    """Creating, finding or destroying a MIG instance failed."""


class MigUnsupportedError(MigError):
    """The GPU's MIG mode (or the node's settings) does not allow the requested operation."""


class MigPlacementError(MigError):
    """The requested placement overlaps an existing instance or the profile has no room left."""


class MigMismatchError(MigError):
    """An instance on the GPU differs from what was recorded; it is left alone."""


class MigBackendError(MigError):
    """The MIG backend failed.

    Attributes:
        op: the backend operation (an NVML function name for the NVML backend).
        code: the backend's numeric error code (``NVML_ERROR_*``), or None.
    """

    def __init__(self, message: str, op: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.code = code


# NVML return codes the MIG logic tells apart; the backend reports them in MigBackendError.code.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_IN_USE = 19
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
