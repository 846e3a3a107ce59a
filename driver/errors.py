"""The driver's exception tree.

Every error says what is wrong and what a person can do about it::

    DriverError
    ├── ConfigError (ValueError)        bad flag, env or file; fix the setting named in the message
    ├── ClaimError                      reported per claim in the NodePrepare/Unprepare response
    │   ├── PermanentClaimError         retrying cannot help: bad opaque config, unknown device
    │   └── TemporaryClaimError         retry may help: lock timeout, NVML busy, API hiccup
    ├── NvmlError                       an NVML call failed (op + NVML return code kept)
    ├── MigError                        creating / destroying a MIG instance failed
    ├── CdiError                        a CDI spec could not be built or written
    ├── CheckpointError                 the checkpoint could not be read or written
    │   └── CheckpointCorruptError      checksum/format wrong: moved aside, reported
    ├── SliceValidationError            a ResourceSlice we built breaks an API limit
    └── ApiError                        the API server said no (status and reason kept)
        ├── ApiNotFoundError
        ├── ApiConflictError
        └── ApiBodyError                the answer cannot be decoded safely (retrying cannot help)

Modules outside ``driver/`` (cdi, mig, sharing) keep their own small trees; ``driver.state``
maps them to ClaimError at the claim boundary.
"""

from __future__ import annotations


class DriverError(Exception):
    """Base of every error the driver raises on purpose."""


class ConfigError(DriverError, ValueError):
    """A flag, environment variable or file holds a value the driver cannot use."""


class ClaimError(DriverError):
    """Preparing or unpreparing one claim failed; reported in that claim's response entry."""


class PermanentClaimError(ClaimError):
    """The claim cannot be prepared as written (bad config, unknown device); retrying will not help."""


class TemporaryClaimError(ClaimError):
    """A transient condition (lock timeout, busy GPU, API hiccup); the kubelet's retry may succeed."""


class LockBusyError(TemporaryClaimError):
    """A GPU's lock was not free in time (NVIDIA's ``lock_acquire`` error type)."""


class NvmlError(DriverError):
    """An NVML call failed.

    Attributes:
        op: the NVML function that failed.
        code: the NVML return code (``NVML_ERROR_*`` value), or None when unknown.
    """

    def __init__(self, op: str, code: int | None, message: str) -> None:
        super().__init__(f"NVML {op} failed: {message}" + (f" (code {code})" if code is not None else ""))
        self.op = op
        self.code = code


class MigError(DriverError):
    """A MIG instance could not be created, found or destroyed."""


class CdiError(DriverError):
    """A CDI spec could not be built or written."""


class CheckpointError(DriverError):
    """The checkpoint could not be read or written."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint file failed its checksum or format check."""


class SliceValidationError(DriverError):
    """A ResourceSlice built by the driver would be rejected by the API server."""


class ApiError(DriverError):
    """The Kubernetes API server refused a request.

    Attributes:
        status: HTTP status code.
        reason: the API's reason string (NotFound, Conflict, Forbidden, ...).
    """

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ApiNotFoundError(ApiError):
    """The object (or the API version) does not exist on the server."""


class ApiConflictError(ApiError):
    """The object changed or already exists; re-read and retry."""


class ApiBodyError(ApiError):
    """The server's answer is JSON the driver refuses to decode (nested too deep); the object
    itself must be fixed, so retrying will not help."""
