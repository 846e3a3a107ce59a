"""CDI names: kind, spec file names, device names, qualified ids, and their parsers."""

from __future__ import annotations

import pytest

from cdi.errors import CdiNameError
from cdi.names import (
    KIND,
    ClaimDeviceRef,
    claim_spec_filename,
    device_name,
    parse_claim_spec_filename,
    parse_device_name,
    parse_qualified_device_id,
    qualified_device_id,
)

UID = "dab5e2a1-6f3c-4b8e-9d0a-1c2b3a4d0f7a"


def test_constants_match_nvidia() -> None:
    assert KIND == "k8s.gpu.nvidia.com/claim"


def test_spec_filename_and_back() -> None:
    name = claim_spec_filename(UID)
    assert name == f"k8s.gpu.nvidia.com-claim_{UID}.json"
    assert parse_claim_spec_filename(name) == UID


@pytest.mark.parametrize(
    "name",
    [
        "nvidia.yaml",
        f"k8s.gpu.nvidia.com-claim_{UID}.yaml",
        f"k8s.gpu.nvidia.com-device_{UID}.json",
        "k8s.gpu.nvidia.com-claim_.json",
        f".tmp-k8s.gpu.nvidia.com-claim_{UID}.json-abc123",
    ],
)
def test_parse_spec_filename_ignores_other_files(name: str) -> None:
    assert parse_claim_spec_filename(name) is None


def test_device_name_and_qualified_id() -> None:
    assert device_name(UID, "gpu-0") == f"{UID}-gpu-0"
    assert qualified_device_id(UID, "gpu-0") == f"k8s.gpu.nvidia.com/claim={UID}-gpu-0"


@pytest.mark.parametrize("device", ["gpu-0", "gpu-3-mig-1g10gb-me-20-0", "gpu-vfio-1"])
def test_parse_round_trip(device: str) -> None:
    assert parse_device_name(device_name(UID, device)) == ClaimDeviceRef(UID, device)
    assert parse_qualified_device_id(qualified_device_id(UID, device)) == ClaimDeviceRef(UID, device)


def test_parse_non_uuid_uid_splits_at_gpu() -> None:
    assert parse_device_name("claim-1-gpu-2") == ClaimDeviceRef("claim-1", "gpu-2")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "-x", "x-", "a b"])
def test_bad_claim_uids_refused(bad: str) -> None:
    with pytest.raises(CdiNameError, match="claim UID"):
        claim_spec_filename(bad)


def test_bad_device_refused() -> None:
    with pytest.raises(CdiNameError, match="CDI refuses"):
        device_name(UID, "gpu-0/")
    with pytest.raises(CdiNameError):
        device_name(UID, "")


@pytest.mark.parametrize(
    "bad",
    ["nvidia.com/gpu=0", f"k8s.gpu.nvidia.com/claim{UID}-gpu-0", "k8s.gpu.nvidia.com/claim=somethingelse"],
)
def test_parse_qualified_refuses_foreign_ids(bad: str) -> None:
    with pytest.raises(CdiNameError):
        parse_qualified_device_id(bad)
