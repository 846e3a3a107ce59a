"""The sharing package's own small error tree (sharing never imports ``driver``).

::

    SharingError
    ├── ConfigError (ValueError)   the opaque config is invalid; the message names the field path and
    │                              the allowed values. Permanent: fix the claim or the DeviceClass.
    ├── CommandError               nvidia-smi / nvidia-cuda-mps-control failed; command, exit status and
    │                              stderr are kept. Usually temporary (GPU busy), may be retried.
    └── MpsError                   an MPS control daemon could not be started, found or stopped
        └── MpsStartTimeoutError        the daemon did not answer within the bounded wait

``driver.state`` maps ConfigError to a permanent claim error and the others to temporary ones.
"""

from __future__ import annotations

from collections.abc import Sequence


class SharingError(Exception):
    """Base of every error the sharing package raises on purpose."""


class ConfigError(SharingError, ValueError):
    """An opaque ``resource.nvidia.com/v1beta1`` config is invalid.

    Attributes:
        path: the field path that is wrong, e.g. ``sharing.timeSlicingConfig.interval`` ("" for the
            whole object).
        reason: the message without path and context.
    """

    def __init__(self, path: str, message: str, context: str = "") -> None:
        text = f"{path}: {message}" if path else message
        super().__init__(f"{context}: {text}" if context else text)
        self.path = path
        self.reason = message


class CommandError(SharingError):
    """An external NVIDIA tool exited non-zero or could not be run.

    Attributes:
        argv: the command line that was run.
        returncode: its exit status (None when it could not be started or timed out).
        stderr: what it wrote to stderr (trimmed).
    """

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, hint: str = "") -> None:
        cmd = " ".join(argv)
        status = "could not be run" if returncode is None else f"exited with status {returncode}"
        detail = stderr.strip() or "(no stderr)"
        text = f"command `{cmd}` {status}: {detail}"
        if hint:
            text += f"; {hint}"
        super().__init__(text)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class MpsError(SharingError):
    """An MPS control daemon could not be started, found or stopped."""


class MpsStartTimeoutError(MpsError):
    """The MPS control daemon did not answer within the bounded readiness wait."""
