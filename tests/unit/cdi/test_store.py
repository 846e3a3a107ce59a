"""The per-claim CDI spec store: atomic validated writes, reads, listing and orphans."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cdi.errors import SpecInvalidError
from cdi.names import KIND, device_name
from cdi.spec import ContainerEdits, Device, DeviceNode, Spec, new_spec
from cdi.store import CdiStore

UID = "0b7f0a4c-5c1e-4d59-9b7a-8a1d2f3e4c5d"
OTHER = "1c8e1b5d-6d2f-4e6a-8c8b-9b2e3f4d5e6f"


def claim_spec(uid: str = UID, device: str = "gpu-0") -> Spec:
    edits = ContainerEdits(device_nodes=(DeviceNode("/dev/nvidia0", host_path="/dev/nvidia0"),))
    return new_spec(KIND, [Device(device_name(uid, device), edits)])


def test_write_read_remove(tmp_path: Path) -> None:
    store = CdiStore(tmp_path / "cdi")
    path = store.write_claim_spec(UID, claim_spec())
    assert path == tmp_path / "cdi" / f"k8s.gpu.nvidia.com-claim_{UID}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert store.read_claim_spec(UID) == claim_spec()
    assert store.remove_claim_spec(UID) is True
    assert not path.exists()
    assert store.remove_claim_spec(UID) is False
    assert store.read_claim_spec(UID) is None


def test_invalid_spec_is_never_written_and_old_file_survives(tmp_path: Path) -> None:
    store = CdiStore(tmp_path)
    store.write_claim_spec(UID, claim_spec())
    before = store.path_for(UID).read_bytes()
    bad = Spec("0.5.0", KIND, (Device(device_name(UID, "gpu-1"), ContainerEdits()),))
    with pytest.raises(SpecInvalidError, match="no container edits"):
        store.write_claim_spec(UID, bad)
    assert store.path_for(UID).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.path_for(UID).name]


def test_spec_must_belong_to_the_claim(tmp_path: Path) -> None:
    store = CdiStore(tmp_path)
    with pytest.raises(SpecInvalidError, match="not named '<claim uid>-<device>'"):
        store.write_claim_spec(UID, claim_spec(uid=OTHER))
    wrong_kind = Spec("0.5.0", "nvidia.com/gpu", claim_spec().devices)
    with pytest.raises(SpecInvalidError, match="kind"):
        store.write_claim_spec(UID, wrong_kind)
    assert not store.path_for(UID).exists()


def test_list_and_orphans_ignore_foreign_files(tmp_path: Path) -> None:
    store = CdiStore(tmp_path)
    assert store.list_claim_specs() == {}
    store.write_claim_spec(UID, claim_spec())
    store.write_claim_spec(OTHER, claim_spec(uid=OTHER))
    (tmp_path / "nvidia.yaml").write_text("x")
    (tmp_path / "k8s.gpu.nvidia.com-claim_notes.txt").write_text("x")
    assert store.list_claim_specs() == {UID: store.path_for(UID), OTHER: store.path_for(OTHER)}
    assert store.orphans([UID]) == [store.path_for(OTHER)]
    assert store.orphans([UID, OTHER]) == []


def test_missing_root_lists_nothing(tmp_path: Path) -> None:
    store = CdiStore(tmp_path / "absent")
    assert store.list_claim_specs() == {}
    assert store.stray_temp_files() == []


def test_stray_temp_files_are_found(tmp_path: Path) -> None:
    store = CdiStore(tmp_path)
    stray = tmp_path / f".tmp-k8s.gpu.nvidia.com-claim_{UID}.json-x1y2"
    stray.write_text("{")
    assert store.stray_temp_files() == [stray]
    assert store.list_claim_specs() == {}


def test_damaged_file_reports_path(tmp_path: Path) -> None:
    store = CdiStore(tmp_path)
    store.path_for(UID).write_text("{")
    with pytest.raises(SpecInvalidError, match=str(store.path_for(UID))):
        store.read_claim_spec(UID)


class _Fsyncs:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = os.fsync

        def counted(fd: int) -> None:
            self.count += 1
            real(fd)

        monkeypatch.setattr(os, "fsync", counted)


@pytest.mark.parametrize("durable", [True, False])
def test_durable_decides_the_fsyncs_and_writes_stay_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """A durable store fsyncs file and directory on write and the directory on removal; a
    non-durable one none, and still replaces the whole file by rename (no temp file left)."""
    counter = _Fsyncs(monkeypatch)
    store = CdiStore(tmp_path / "cdi", durable=durable)
    path = store.write_claim_spec(UID, claim_spec(device="gpu-0"))
    replaced = path.stat().st_ino
    store.write_claim_spec(UID, claim_spec(device="gpu-1"))
    assert path.stat().st_ino != replaced  # a new file renamed into place
    assert store.read_claim_spec(UID) == claim_spec(device="gpu-1")
    assert store.stray_temp_files() == []
    assert counter.count == (4 if durable else 0)
    store.remove_claim_spec(UID)
    assert counter.count == (5 if durable else 0)
