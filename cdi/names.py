"""The driver's CDI names: kind, per-claim spec file names, device names and qualified ids.

They match NVIDIA's GPU DRA driver exactly, so tooling and runtimes see the same ids:
kind ``k8s.gpu.nvidia.com/claim``, one transient spec per claim named
``k8s.gpu.nvidia.com-claim_<uid>.json``, device names ``<uid>-<device>`` and qualified ids
``k8s.gpu.nvidia.com/claim=<uid>-<device>``. The parsers serve orphan detection at start-up and
the debug CLI; they do not look at the file system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cdi.errors import CdiNameError
from cdi.spec import valid_device_name

VENDOR = "k8s.gpu.nvidia.com"
CLASS = "claim"
KIND = f"{VENDOR}/{CLASS}"
SPEC_FILE_PREFIX = f"{VENDOR}-{CLASS}_"
SPEC_FILE_SUFFIX = ".json"

# Claim UIDs come from the API server (RFC 4122 UUIDs); the looser rule keeps test UIDs working
# while refusing anything that could escape the CDI directory or break a CDI device name.
_UID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_UUID_PREFIX_RE = re.compile(
    r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})-(.+)$"
)
# Every device the driver publishes starts with "gpu-" (gpu-0, gpu-0-mig-..., gpu-vfio-0).
_DEVICE_MARK = "-gpu-"


@dataclass(frozen=True, slots=True)
class ClaimDeviceRef:
    """A claim UID and one of its device names, recovered from a CDI name."""

    claim_uid: str
    device: str


def check_claim_uid(claim_uid: str) -> str:
    """Return ``claim_uid`` if it can name a spec file and prefix CDI device names, else raise."""
    if not _UID_RE.match(claim_uid):
        raise CdiNameError(
            f"claim UID {claim_uid!r} cannot be used in a CDI name: it must start and end with a letter "
            "or digit and use only letters, digits, '_', '.', '-' (API server UIDs always do)"
        )
    return claim_uid


def claim_spec_filename(claim_uid: str) -> str:
    """``k8s.gpu.nvidia.com-claim_<uid>.json``: the transient spec file of one claim."""
    return f"{SPEC_FILE_PREFIX}{check_claim_uid(claim_uid)}{SPEC_FILE_SUFFIX}"


def parse_claim_spec_filename(filename: str) -> str | None:
    """The claim UID of a file named by :func:`claim_spec_filename`, or None for any other file."""
    if not (filename.startswith(SPEC_FILE_PREFIX) and filename.endswith(SPEC_FILE_SUFFIX)):
        return None
    uid = filename[len(SPEC_FILE_PREFIX) : -len(SPEC_FILE_SUFFIX)]
    return uid if _UID_RE.match(uid) else None


def device_name(claim_uid: str, device: str) -> str:
    """``<uid>-<device>``: the CDI device name of one allocated device within the claim's spec."""
    name = f"{check_claim_uid(claim_uid)}-{device}"
    if not device or not valid_device_name(name):
        raise CdiNameError(
            f"device {device!r} of claim {claim_uid} gives the CDI device name {name!r}, which CDI refuses; "
            "device names must end with a letter or digit and use only letters, digits, '_', '.', ':', '-'"
        )
    return name


def qualified_device_id(claim_uid: str, device: str) -> str:
    """``k8s.gpu.nvidia.com/claim=<uid>-<device>``: the id returned to the kubelet."""
    return f"{KIND}={device_name(claim_uid, device)}"


def parse_device_name(name: str) -> ClaimDeviceRef:
    """Split ``<uid>-<device>`` back into its parts.

    A UUID-shaped prefix is taken as the UID; otherwise the split is at the first ``-gpu-``, as
    every device this driver publishes starts with ``gpu-``.
    """
    match = _UUID_PREFIX_RE.match(name)
    if match:
        return ClaimDeviceRef(match.group(1), match.group(2))
    uid, mark, rest = name.partition(_DEVICE_MARK)
    if mark and uid and rest:
        return ClaimDeviceRef(uid, "gpu-" + rest)
    raise CdiNameError(
        f"CDI device name {name!r} is not '<claim uid>-<device>' (e.g. "
        "'0b7f0a4c-5c1e-4d59-9b7a-8a1d2f3e4c5d-gpu-0'); it was not written by this driver"
    )


def parse_qualified_device_id(device_id: str) -> ClaimDeviceRef:
    """Split ``k8s.gpu.nvidia.com/claim=<uid>-<device>``; other kinds raise :class:`CdiNameError`."""
    kind, sep, name = device_id.partition("=")
    if not sep or kind != KIND:
        raise CdiNameError(
            f"CDI id {device_id!r} is not of kind {KIND} ('{KIND}=<claim uid>-<device>'); "
            "it belongs to another driver or is malformed"
        )
    return parse_device_name(name)
