"""The checkpoint: round trip, checksum, corrupt files moved aside, reboots, concurrency, kill -9."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from driver.checkpoint import (
    PREPARE_COMPLETED,
    PREPARE_STARTED,
    CheckpointStore,
    PreparedClaim,
    PreparedDevice,
    decode,
    encode,
)
from driver.errors import CheckpointCorruptError, CheckpointError

CTX = mp.get_context("fork")
BOOT = "1fbb26cb-585f-4217-ab28-62445d4e8f74"


def make_claim(uid: str = "u1", state: str = PREPARE_COMPLETED, n: int = 0) -> PreparedClaim:
    gpu = PreparedDevice(
        request_names=["gpu"],
        pool="node-a",
        device="gpu-0",
        cdi_device_ids=[f"k8s.gpu.nvidia.com/claim={uid}-gpu-0"],
        kind="gpu",
        gpu_uuid="GPU-11111111-2222-3333-4444-555555555555",
    )
    mig = PreparedDevice(
        request_names=["mig", "other"],
        pool="node-a",
        device="gpu-1-mig-1g5gb-19-0",
        cdi_device_ids=[f"k8s.gpu.nvidia.com/claim={uid}-gpu-1-mig-1g5gb-19-0"],
        kind="mig",
        gpu_uuid="GPU-aaaaaaaa-2222-3333-4444-555555555555",
        share_id="s-1",
        admin_access=True,
        mig={"parent_minor": 1, "gi_id": 11, "ci_id": 0, "mig_uuid": "MIG-x"},
    )
    return PreparedClaim(
        uid=uid,
        namespace="ns",
        name=f"claim-{n}",
        state=state,  # type: ignore[arg-type]
        devices=[gpu, mig],
        sharing=[{"kind": "timeSlicing", "interval": "Short", "gpus": ["GPU-1"]}],
        started_at=1700000000.5,
        completed_at=1700000001.0 if state == PREPARE_COMPLETED else None,
    )


@pytest.fixture
def boot_file(tmp_path: Path) -> Path:
    path = tmp_path / "boot_id"
    path.write_text(BOOT + "\n")
    return path


@pytest.fixture
def store(tmp_path: Path, boot_file: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "state" / "checkpoint.json", boot_id_path=boot_file, lock_timeout_s=10)


def test_round_trip(store: CheckpointStore) -> None:
    report = store.startup()
    assert report.claims == {}
    assert report.warnings == []
    claim = make_claim()
    started = make_claim("u2", PREPARE_STARTED)
    store.put(claim)
    store.put(started)
    assert store.load() == {"u1": claim, "u2": started}
    assert store.get("u2") == started
    assert store.get("nope") is None
    doc = json.loads(store.path.read_text())
    assert doc["version"] == 1
    assert doc["data"]["nodeBootID"] == BOOT
    assert set(doc["data"]["claims"]) == {"u1", "u2"}
    assert doc["data"]["claims"]["u1"]["devices"][1]["mig"]["gi_id"] == 11
    assert store.remove("u1") is True
    assert store.remove("u1") is False
    assert set(store.load()) == {"u2"}


def test_update_returns_result_and_writes_nothing_when_fn_raises(store: CheckpointStore) -> None:
    store.put(make_claim())
    before = store.path.read_bytes()

    def boom(claims: dict[str, PreparedClaim]) -> None:
        claims.clear()
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        store.update(boom)
    assert store.path.read_bytes() == before
    assert store.update(sorted) == ["u1"]


def test_load_missing_file_is_empty(store: CheckpointStore) -> None:
    assert store.load() == {}


def test_checksum_tamper_is_moved_aside(store: CheckpointStore) -> None:
    store.startup()
    store.put(make_claim())
    doc = json.loads(store.path.read_text())
    doc["data"]["claims"]["u1"]["name"] = "edited"
    store.path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        store.load()
    report = store.startup()
    assert report.claims == {}
    assert report.moved_aside is not None
    assert report.moved_aside.name.startswith("checkpoint.json.corrupt-")
    assert json.loads(report.moved_aside.read_text())["data"]["claims"]["u1"]["name"] == "edited"
    assert "checksum mismatch" in (report.corrupt_reason or "")
    assert any("moved aside" in w for w in report.warnings)
    assert store.load() == {}
    # A second corrupt file on the same second gets its own name.
    store.path.write_text("{")
    second = store.startup()
    assert second.moved_aside is not None
    assert second.moved_aside != report.moved_aside
    assert second.moved_aside.exists()
    assert report.moved_aside.exists()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"version": 2, "checksum": "x", "data": {}}', "format version 2"),
        ('{"version": 1, "data": {}}', "lacks"),
    ],
)
def test_other_corruption_is_moved_aside(store: CheckpointStore, text: str, reason: str) -> None:
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text(text)
    report = store.startup()
    assert reason in (report.corrupt_reason or "")
    assert report.moved_aside is not None
    assert report.moved_aside.read_text() == text


def test_bad_field_with_valid_checksum_is_corrupt() -> None:
    text = encode(BOOT, {"u1": make_claim()})
    doc = json.loads(text)
    doc["data"]["claims"]["u1"]["state"] = "Prepared"
    from driver.checkpoint import checksum

    doc["checksum"] = checksum(doc["data"])
    with pytest.raises(CheckpointCorruptError, match="state"):
        decode(json.dumps(doc))
    doc["data"]["claims"]["u1"]["state"] = PREPARE_STARTED
    doc["data"]["claims"]["u1"]["uid"] = "other"
    doc["checksum"] = checksum(doc["data"])
    with pytest.raises(CheckpointCorruptError, match="carries uid"):
        decode(json.dumps(doc))


def test_boot_id_change_drops_claims(tmp_path: Path, store: CheckpointStore, boot_file: Path) -> None:
    store.startup()
    store.put(make_claim())
    store.put(make_claim("u2", PREPARE_STARTED))
    boot_file.write_text("22222222-0000-0000-0000-000000000000\n")
    after_reboot = CheckpointStore(store.path, boot_id_path=boot_file)
    report = after_reboot.startup()
    assert report.claims == {}
    assert report.previous_boot_id == BOOT
    assert sorted(c.uid for c in report.dropped_for_reboot) == ["u1", "u2"]
    assert any("rebooted" in w for w in report.warnings)
    assert after_reboot.load() == {}
    assert json.loads(store.path.read_text())["data"]["nodeBootID"].startswith("2222")


def test_same_boot_restart_keeps_claims(store: CheckpointStore, boot_file: Path) -> None:
    store.startup()
    store.put(make_claim())
    again = CheckpointStore(store.path, boot_id_path=boot_file).startup()
    assert again.claims == {"u1": make_claim()}
    assert again.warnings == []


def test_unreadable_boot_id(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="boot id"):
        CheckpointStore(tmp_path / "c.json", boot_id_path=tmp_path / "absent")


def _hammer(path: str, boot: str, prefix: str, n: int) -> None:
    s = CheckpointStore(Path(path), boot_id_path=Path(boot))
    for i in range(n):
        s.put(make_claim(f"{prefix}-{i}", n=i))


def test_concurrent_updates_from_two_processes_keep_every_update(
    store: CheckpointStore, boot_file: Path
) -> None:
    store.startup()
    n = 25
    procs = [CTX.Process(target=_hammer, args=(str(store.path), str(boot_file), p, n)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    claims = store.load()
    assert len(claims) == 2 * n
    assert {f"a-{i}" for i in range(n)} | {f"b-{i}" for i in range(n)} == set(claims)


def _write_forever(path: str, boot: str) -> None:
    s = CheckpointStore(Path(path), boot_id_path=Path(boot))
    i = 0
    while True:
        s.put(make_claim(f"k-{i}", n=i))
        i += 1


def test_kill_9_during_writes_leaves_a_valid_file(store: CheckpointStore, boot_file: Path) -> None:
    store.startup()
    # Big enough that a write is not a single page, so a torn write would show.
    for i in range(40):
        store.put(make_claim(f"base-{i}"))
    child = CTX.Process(target=_write_forever, args=(str(store.path), str(boot_file)))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if "k-5" in decode(store.path.read_bytes())[1]:
                break
            time.sleep(0.005)
        else:
            pytest.fail("the writer child made no progress")
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    # Readers under the lock see a whole, verified file; the lock died with the child.
    claims = CheckpointStore(store.path, boot_id_path=boot_file, lock_timeout_s=5).load()
    assert {f"base-{i}" for i in range(40)} <= set(claims)
    assert "k-5" in claims
    report = CheckpointStore(store.path, boot_id_path=boot_file).startup()
    assert report.moved_aside is None


def test_writes_are_atomic_renames_without_fsync(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 safety needs the rename only; the boot id voids the file after a power loss, so a
    write costs no fsync (they were most of a prepare's own time)."""
    store.startup()
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", fsyncs.append)
    before = store.path.stat().st_ino
    store.put(make_claim("u1"))
    assert store.path.stat().st_ino != before
    store.remove("u1")
    assert fsyncs == []
    assert store.load() == {}
    assert [p.name for p in store.path.parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_startup_sweeps_temp_files_and_moves_a_directory_aside(tmp_path):
    """Issue 17: kill -9 mid-write leaves .tmp-checkpoint.json-* files; a directory where the file
    belongs once made every start exit 1."""
    from driver.checkpoint import CheckpointStore

    boot = tmp_path / "boot_id"
    boot.write_text("b1\n")
    path = tmp_path / "state" / "checkpoint.json"
    (path / "inner").mkdir(parents=True)
    for i in range(3):
        (path.parent / f".tmp-checkpoint.json-{i}abc").write_bytes(b"half")
    (path.parent / ".tmp-other-1").write_bytes(b"not ours")
    report = CheckpointStore(path, boot).startup()
    assert report.problem is None
    assert report.lost
    assert report.moved_aside is not None and report.moved_aside.is_dir()
    assert "a directory is where the checkpoint file belongs" in str(report.corrupt_reason)
    assert sorted(p.name for p in report.swept) == [f".tmp-checkpoint.json-{i}abc" for i in range(3)]
    assert (path.parent / ".tmp-other-1").exists()
    assert path.is_file()
    # A healthy file is not lost; a deleted one is.
    assert not CheckpointStore(path, boot).startup().lost
    path.unlink()
    assert CheckpointStore(path, boot).startup().lost
