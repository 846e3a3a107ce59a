"""The cdi package's own small error tree (cdi never imports ``driver``).

::

    CdiError
    ├── SpecInvalidError (ValueError)   a spec breaks a CDI rule; nothing was written
    ├── CdiNameError (ValueError)       a claim UID, device name or CDI id cannot be formed or parsed
    ├── DeviceNodeMissingError          a device node the container needs is not on the host
    └── DriverRootError                 the driver root lacks what a container needs (libraries, caps files)

``driver.state`` maps these to claim errors at the claim boundary. Every message names what is
wrong and what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class CdiError(Exception):
    """Base of every error the cdi package raises on purpose."""


class SpecInvalidError(CdiError, ValueError):
    """A CDI spec breaks a rule of the CDI specification or of this driver; it was not written."""


class CdiNameError(CdiError, ValueError):
    """A claim UID, CDI device name or qualified device id is malformed."""


class DeviceNodeMissingError(CdiError):
    """A device node a container needs does not exist where the plugin looks for it.

    Attributes:
        node: the node's path as a container sees it, e.g. ``/dev/nvidia-uvm``.
        looked_at: where the plugin looked (the node under the dev root).
    """

    def __init__(self, node: str, looked_at: Path, fix: str) -> None:
        super().__init__(
            f"device node {node} is missing (looked for {looked_at}); {fix}. If the node exists on the "
            "host, check that the plugin's dev root / driver root flags point at the host's root and that "
            "the host /dev is mounted into the plugin container"
        )
        self.node = node
        self.looked_at = looked_at


class DriverRootError(CdiError):
    """The driver root does not hold what NVIDIA's container toolkit would give a container."""
