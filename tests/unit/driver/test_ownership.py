"""driver.ownership: what is rebuilt from the node after a lost checkpoint, and what never is."""

from __future__ import annotations

from pathlib import Path

from cdi.spec import ContainerEdits, Device, new_spec
from cdi.store import CdiStore
from driver.checkpoint import PREPARE_COMPLETED, PREPARE_STARTED
from driver.ownership import Gpu, Ledger, mps_claim_uid, rebuild
from mig.spec import MigInstance, MigSpec
from sharing.mps import mps_group_id

GPU0 = "GPU-00000000-0000-4000-8000-000000000000"
GPU1 = "GPU-00000000-0000-4000-8000-000000000001"


class Instances:
    def __init__(self, found: dict[str, list[MigInstance]]) -> None:
        self.found = found

    def list_instances(self, parent_uuid: str) -> list[MigInstance]:
        return self.found.get(parent_uuid, [])


class Records:
    def __init__(self, records: list[dict[str, object]]) -> None:
        self.records = records

    def leftovers(self, prefix: str) -> list[dict[str, object]]:
        return list(self.records)


def _spec(cdi: CdiStore, uid: str, *devices: str) -> None:
    cdi.write_claim_spec(
        uid,
        new_spec(
            "k8s.gpu.nvidia.com/claim",
            [Device(name=f"{uid}-{d}", container_edits=ContainerEdits(env=("X=1",))) for d in devices],
            ContainerEdits(),
        ),
    )


def test_rebuild_from_specs_marks_and_records(tmp_path: Path) -> None:
    cdi = CdiStore(tmp_path / "cdi")
    ledger = Ledger(tmp_path / "owned")
    marked = MigSpec(0, GPU0, "2g.10gb", 14, 4, 2)
    foreign = MigSpec(0, GPU0, "1g.5gb", 19, 0, 1)
    half = MigSpec(0, GPU0, "1g.5gb", 19, 1, 1)
    ledger.mark_mig("uid-mig", marked)
    ledger.mark_mig("uid-half", half)
    ledger.note_sharing("uid-ts", {"kind": "timeslice", "gpus": [GPU1], "level": 3})
    _spec(cdi, "uid-mig", marked.name)
    _spec(cdi, "uid-foreign", foreign.name)
    _spec(cdi, "uid-ts", "gpu-1")
    instances = Instances(
        {
            GPU0: [
                MigInstance(GPU0, 2, 14, 4, 2, 0, "MIG-a"),
                MigInstance(GPU0, 7, 19, 0, 1, 0, "MIG-b"),
                MigInstance(GPU0, 8, 19, 1, 1, None, None),  # a GI whose CI was never made
            ]
        }
    )
    per_claim: dict[str, object] = {
        "groupId": mps_group_id("uid-mps", [GPU1]),
        "uuids": [GPU1],
        "groupDir": "/x",
    }
    shared: dict[str, object] = {"groupId": f"shared-{GPU1}", "uuids": [GPU1], "groupDir": "/y"}
    out = rebuild(
        pool="node-a",
        cdi=cdi,
        ledger=ledger,
        gpus=[Gpu(0, GPU0), Gpu(1, GPU1)],
        mig=instances,
        mps=Records([per_claim, shared]),
        dynamic_mig=True,
    )
    claims = out.claims
    assert set(claims) == {"uid-mig", "uid-foreign", "uid-ts", "uid-half", "uid-mps"}
    (mig,) = claims["uid-mig"].devices
    assert (mig.kind, claims["uid-mig"].state) == ("mig-dynamic", PREPARE_COMPLETED)
    assert mig.mig is not None and mig.mig["mig_uuid"] == "MIG-a"
    (static,) = claims["uid-foreign"].devices
    assert (static.kind, static.mig) == ("mig-static", None)  # no mark: never destroyed
    (gi_only,) = claims["uid-half"].devices
    assert (gi_only.device, gi_only.kind, claims["uid-half"].state) == (
        half.name,
        "mig-dynamic",
        PREPARE_STARTED,
    )
    assert claims["uid-ts"].sharing == [{"kind": "timeslice", "gpus": [GPU1], "level": 3}]
    assert claims["uid-ts"].devices[0].gpu_uuid == GPU1
    assert claims["uid-mps"].state == PREPARE_STARTED
    assert [r["groupId"] for r in claims["uid-mps"].sharing] == [per_claim["groupId"]]
    assert all(not c.namespace and not c.name for c in claims.values())


def test_shared_daemons_are_never_a_claims_group() -> None:
    assert (
        mps_claim_uid({"groupId": mps_group_id("uid-1", ["GPU-a", "GPU-b"]), "uuids": ["GPU-b", "GPU-a"]})
        == "uid-1"
    )
    assert (
        mps_claim_uid({"groupId": "shared-GPU-4f3a1c2e-0000-0000-0000-000000000000", "uuids": ["GPU-x"]})
        is None
    )
    assert mps_claim_uid({"groupId": "uid-1-abcde", "uuids": ["GPU-a"]}) is None  # digest does not match


def test_forget_and_sweep_remove_only_their_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "owned")
    ledger.mark_mig("uid-a", MigSpec(0, GPU0, "1g.5gb", 19, 0, 1))
    ledger.note_sharing("uid-b", {"kind": "timeslice", "gpus": [GPU0], "level": 1})
    ledger.note_sharing("uid-c", {"kind": "timeslice", "gpus": [GPU1], "level": 1})
    ledger.forget("uid-a")
    assert ledger.mig_marks() == {}
    removed = ledger.sweep(known={"uid-b"})
    assert [p.name for p in removed] == ["ts-uid-c.json"]
    assert set(ledger.sharing_records()) == {"uid-b"}


def test_fractional_shares_come_back_as_their_gpu_with_the_share_id(tmp_path: Path) -> None:
    cdi = CdiStore(tmp_path / "cdi")
    _spec(cdi, "uid-sh", "gpu-1-share-a1", "gpu-1-share-b2")
    out = rebuild(
        pool="node-a",
        cdi=cdi,
        ledger=Ledger(tmp_path / "owned"),
        gpus=[Gpu(0, GPU0), Gpu(1, GPU1)],
        mig=None,
        mps=None,
        dynamic_mig=False,
    )
    devices = sorted(out.claims["uid-sh"].devices, key=lambda d: str(d.share_id))
    assert [(d.device, d.share_id, d.gpu_uuid) for d in devices] == [
        ("gpu-1", "a1", GPU1),
        ("gpu-1", "b2", GPU1),
    ]
    assert [d.cdi_device_ids for d in devices] == [
        ["k8s.gpu.nvidia.com/claim=uid-sh-gpu-1-share-a1"],
        ["k8s.gpu.nvidia.com/claim=uid-sh-gpu-1-share-b2"],
    ]


def test_start_up_conditions_reach_the_node_events_once_the_recorder_runs() -> None:
    """Issue 17: an unusable checkpoint, a rebuild and the recovery are Node Events; those raised
    before the Event recorder started are held and sent when it does."""
    from driver import config
    from driver.daemon import Daemon

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[tuple[str, str, str, str]] = []

        def node_event(self, event_type: str, reason: str, action: str, note: str) -> None:
            self.sent.append((event_type, reason, action, note))

    daemon = Daemon(
        config.parse(
            [
                "--node-name",
                "n",
                "--nvml-backend",
                "fake",
                "--fake-topology",
                "a100-40gb-x8",
                "--no-publish",
                "--fake-claims-dir",
                "/x",
            ]
        )
    )
    daemon._announce("Warning", "CheckpointUnusable", "directory /s is full")
    assert daemon._pending_events == [("Warning", "CheckpointUnusable", "directory /s is full")]
    recorder = Recorder()
    daemon._events = recorder  # type: ignore[assignment]
    daemon._announce("Normal", "CheckpointUsable", "usable again")
    assert recorder.sent == [("Normal", "CheckpointUsable", "StartPlugin", "usable again")]
