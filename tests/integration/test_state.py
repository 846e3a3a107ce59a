"""driver.state.DeviceState over real files: checkpoint, CDI specs, locks, fake driver root.

The inventory is built by hand (eight A100-like GPUs) so these tests exercise the orchestration
only; discovery has its own tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cdi.names import claim_spec_filename
from cdi.spec import ContainerEdits
from cdi.store import CdiStore
from driver.checkpoint import (
    PREPARE_COMPLETED,
    PREPARE_STARTED,
    CheckpointStore,
    PreparedClaim,
    PreparedDevice,
)
from driver.errors import PermanentClaimError, TemporaryClaimError
from driver.inventory import AllocatableDevice, Inventory
from driver.kubeletplugin.claims import ClaimRef
from driver.state import (
    DeviceLocks,
    DeviceState,
    DriverRootEdits,
    NoSharing,
    SharingOutcome,
    default_actions,
    mig_record,
)
from mig.spec import MigLive, MigSpec
from tests.ground.driverroot import FakeDriverRoot, make_fake_driver_root

NODE = "node-a"
DRIVER = "gpu.nvidia.com"
BOOT_ID = "6f1d3c1e-0000-4000-8000-000000000001"


def gpu_uuid(minor: int) -> str:
    return f"GPU-00000000-0000-4000-8000-{minor:012d}"


def gpu_inventory(count: int = 8, extra: Iterable[AllocatableDevice] = ()) -> Inventory:
    """``count`` full GPUs gpu-0..gpu-<count-1>, plus ``extra`` devices."""
    gpus = tuple(
        AllocatableDevice(
            name=f"gpu-{i}",
            kind="gpu",
            gpu_uuid=gpu_uuid(i),
            gpu_minor=i,
            attributes={"type": "gpu", "uuid": gpu_uuid(i)},
            capacity={"memory": 40 << 30},
        )
        for i in range(count)
    )
    return Inventory(devices=gpus + tuple(extra))


def make_claim(
    uid: str,
    devices: Sequence[tuple[str, str]],
    *,
    name: str | None = None,
    namespace: str = "default",
    driver: str = DRIVER,
    pool: str = NODE,
    admin: bool = False,
    share_ids: Mapping[str, str] | None = None,
    config: Sequence[Mapping[str, Any]] = (),
    allocated: bool = True,
) -> dict[str, Any]:
    """A ResourceClaim in v1 JSON shape allocated to ``devices`` = [(request, device), ...]."""
    results: list[dict[str, Any]] = []
    for request, device in devices:
        result: dict[str, Any] = {"request": request, "driver": driver, "pool": pool, "device": device}
        if admin:
            result["adminAccess"] = True
        if share_ids and device in share_ids:
            result["shareID"] = share_ids[device]
        results.append(result)
    claim: dict[str, Any] = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": namespace, "name": name or f"claim-{uid}", "uid": uid},
        "spec": {"devices": {"requests": [{"name": r.split("/")[0]} for r, _ in devices]}},
        "status": {},
    }
    if allocated:
        claim["status"]["allocation"] = {"devices": {"results": results, "config": list(config)}}
    return claim


def ref_of(claim: Mapping[str, Any]) -> ClaimRef:
    meta = claim["metadata"]
    return ClaimRef(meta["namespace"], meta["name"], meta["uid"])


@dataclass
class Node:
    """Everything one simulated node's DeviceState works on."""

    root: Path
    driver_root: FakeDriverRoot
    cdi: CdiStore
    checkpoint: CheckpointStore
    state: DeviceState
    boot_id_path: Path
    spec_writes: list[str] = field(default_factory=list)

    def spec_path(self, uid: str) -> Path:
        return self.cdi.root / claim_spec_filename(uid)

    def recorded(self, uid: str) -> PreparedClaim | None:
        return self.checkpoint.get(uid)

    def restart(self, **kwargs: Any) -> DeviceState:
        """A new DeviceState over the same files, as after a plugin restart."""
        self.checkpoint = CheckpointStore(self.root / "state" / "checkpoint.json", self.boot_id_path)
        self.checkpoint.startup()
        self.state = build_state(self, **kwargs)
        return self.state


class CountingCdiStore(CdiStore):
    """A CdiStore that remembers which claims' specs it wrote (to prove "prepared once")."""

    def __init__(self, root: Path, writes: list[str]) -> None:
        super().__init__(root)
        self._writes = writes
        self._lock = threading.Lock()

    def write_claim_spec(self, claim_uid: str, spec: Any) -> Path:
        with self._lock:
            self._writes.append(claim_uid)
        return super().write_claim_spec(claim_uid, spec)


def build_state(node: Node, inventory: Inventory | None = None, **kwargs: Any) -> DeviceState:
    fake = node.driver_root
    return DeviceState(
        driver_name=DRIVER,
        pool_name=NODE,
        inventory=inventory or gpu_inventory(),
        checkpoint=node.checkpoint,
        cdi=node.cdi,
        edits=DriverRootEdits(
            driver_root=fake.root,
            host_driver_root=fake.root,
            dev_root=fake.root,
            proc_root=fake.proc_dir,
            hook_path=str(fake.hook_path),
        ),
        locks=kwargs.pop("locks", None) or DeviceLocks(node.root / "state" / "locks", timeout_s=30.0),
        **kwargs,
    )


def make_node(root: Path, gpus: int = 8, **kwargs: Any) -> Node:
    root.mkdir(parents=True, exist_ok=True)
    fake = make_fake_driver_root(root / "driver", range(gpus))
    boot_id_path = root / "boot_id"
    boot_id_path.write_text(BOOT_ID + "\n")
    checkpoint = CheckpointStore(root / "state" / "checkpoint.json", boot_id_path)
    checkpoint.startup()
    writes: list[str] = []
    node = Node(
        root=root,
        driver_root=fake,
        cdi=CountingCdiStore(root / "cdi", writes),
        checkpoint=checkpoint,
        state=None,  # type: ignore[arg-type]
        boot_id_path=boot_id_path,
        spec_writes=writes,
    )
    node.state = build_state(node, **kwargs)
    return node


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(tmp_path)


# ---- prepare / unprepare ------------------------------------------------------------------------


def test_prepare_full_gpu_writes_spec_and_checkpoint(node: Node) -> None:
    """A one-GPU claim yields its CDI id, a valid spec with /dev/nvidia3, and PrepareCompleted."""
    devices = node.state.prepare(make_claim("uid-1", [("gpu", "gpu-3")]))
    assert [(d.pool, d.device, d.request_names) for d in devices] == [(NODE, "gpu-3", ("gpu",))]
    assert devices[0].cdi_device_ids == ("k8s.gpu.nvidia.com/claim=uid-1-gpu-3",)
    spec = json.loads(node.spec_path("uid-1").read_text())
    assert spec["kind"] == "k8s.gpu.nvidia.com/claim"
    assert [d["name"] for d in spec["devices"]] == ["uid-1-gpu-3"]
    nodes = [n["path"] for n in spec["devices"][0]["containerEdits"]["deviceNodes"]]
    assert nodes == ["/dev/nvidia3"]
    common_nodes = {n["path"] for n in spec["containerEdits"]["deviceNodes"]}
    assert {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"} <= common_nodes
    recorded = node.recorded("uid-1")
    assert recorded is not None
    assert recorded.state == PREPARE_COMPLETED
    assert recorded.devices[0].gpu_uuid == gpu_uuid(3)


def test_prepare_is_idempotent_without_side_effects(node: Node) -> None:
    """A second prepare of a completed claim returns the same devices and writes nothing."""
    claim = make_claim("uid-1", [("gpu", "gpu-0")])
    first = node.state.prepare(claim)
    inode = node.spec_path("uid-1").stat().st_ino
    second = node.state.prepare(claim)
    assert first == second
    assert node.spec_writes == ["uid-1"]
    assert node.spec_path("uid-1").stat().st_ino == inode


def test_results_of_other_drivers_are_ignored(node: Node) -> None:
    """Only results whose driver is ours are prepared; a claim with none of ours gets no spec."""
    claim = make_claim("uid-1", [("gpu", "gpu-1")])
    claim["status"]["allocation"]["devices"]["results"].append(
        {"request": "nic", "driver": "net.example.com", "pool": NODE, "device": "eth0"}
    )
    assert [d.device for d in node.state.prepare(claim)] == ["gpu-1"]
    other = make_claim("uid-2", [("nic", "eth0")], driver="net.example.com")
    assert node.state.prepare(other) == []
    assert not node.spec_path("uid-2").exists()
    node.state.unprepare(ref_of(other))
    assert node.recorded("uid-2") is None


def test_unknown_device_is_a_permanent_error(node: Node) -> None:
    """A device this node does not publish fails the claim and leaves nothing behind."""
    with pytest.raises(PermanentClaimError, match="gpu-42"):
        node.state.prepare(make_claim("uid-1", [("gpu", "gpu-42")]))
    with pytest.raises(PermanentClaimError, match="pool"):
        node.state.prepare(make_claim("uid-2", [("gpu", "gpu-1")], pool="node-b"))
    assert node.checkpoint.load() == {}


def test_device_held_by_another_claim_is_refused(node: Node) -> None:
    """A device prepared for one claim is refused to another, naming the holder."""
    node.state.prepare(make_claim("uid-1", [("gpu", "gpu-2")], name="first"))
    with pytest.raises(
        PermanentClaimError, match=r"gpu-2 is already prepared for another claim \(UID uid-1\)"
    ):
        node.state.prepare(make_claim("uid-2", [("gpu", "gpu-2")]))
    assert node.recorded("uid-2") is None
    assert not node.spec_path("uid-2").exists()


def test_admin_access_may_share_a_held_device(node: Node) -> None:
    """adminAccess results are not refused, and do not block others either."""
    node.state.prepare(make_claim("uid-1", [("gpu", "gpu-2")]))
    assert [d.device for d in node.state.prepare(make_claim("uid-2", [("gpu", "gpu-2")], admin=True))] == [
        "gpu-2"
    ]
    node.state.unprepare(ClaimRef("default", "claim-uid-1", "uid-1"))
    node.state.prepare(make_claim("uid-3", [("gpu", "gpu-2")]))
    assert node.recorded("uid-3") is not None


def test_unprepare_undoes_exactly_what_was_recorded(node: Node) -> None:
    """Unprepare removes the claim's spec and checkpoint entry, and nothing of other claims."""
    node.state.prepare(make_claim("uid-1", [("a", "gpu-0"), ("b", "gpu-1")]))
    node.state.prepare(make_claim("uid-2", [("gpu", "gpu-2")]))
    node.state.unprepare(ClaimRef("default", "claim-uid-1", "uid-1"))
    assert not node.spec_path("uid-1").exists()
    assert node.recorded("uid-1") is None
    assert node.spec_path("uid-2").exists()
    assert node.recorded("uid-2") is not None


def test_unprepare_of_unknown_claim_succeeds(node: Node) -> None:
    """Unpreparing a claim never prepared here is a success (kubelet retries, restarts)."""
    node.state.unprepare(ClaimRef("default", "ghost", "uid-ghost"))
    assert node.checkpoint.load() == {}


def test_missing_device_node_fails_the_claim_naming_it(node: Node) -> None:
    """No /dev/nvidia5: the claim fails naming the node; no spec, no checkpoint entry."""
    node.driver_root.remove_node("nvidia5")
    with pytest.raises(PermanentClaimError, match="/dev/nvidia5") as info:
        node.state.prepare(make_claim("uid-1", [("gpu", "gpu-5")]))
    assert "nvidia-modprobe" in str(info.value)
    assert not node.spec_path("uid-1").exists()
    assert node.recorded("uid-1") is None
    assert node.spec_writes == []


def test_share_id_is_recorded_and_returned(node: Node) -> None:
    """results[].shareID comes back on the device (consumable capacity)."""
    share = "5a0b6c1e-1111-4222-8333-444455556666"
    devices = node.state.prepare(make_claim("uid-1", [("gpu", "gpu-0")], share_ids={"gpu-0": share}))
    assert devices[0].share_id == share
    assert node.state.prepare(make_claim("uid-1", [("gpu", "gpu-0")]))[0].share_id == share


# ---- crash recovery -----------------------------------------------------------------------------


def _started(uid: str, device: str = "gpu-4", sharing: list[dict[str, Any]] | None = None) -> PreparedClaim:
    minor = int(device.split("-")[1])
    return PreparedClaim(
        uid=uid,
        namespace="default",
        name=f"claim-{uid}",
        state=PREPARE_STARTED,
        devices=[
            PreparedDevice(
                request_names=["gpu"],
                pool=NODE,
                device=device,
                cdi_device_ids=[f"k8s.gpu.nvidia.com/claim={uid}-{device}"],
                kind="gpu",
                gpu_uuid=gpu_uuid(minor),
            )
        ],
        sharing=sharing or [],
        started_at=1.0,
    )


def test_reconcile_rolls_back_started_claims_and_removes_orphan_specs(node: Node) -> None:
    """After a crash: PrepareStarted rolled back (its spec gone), orphan and temp specs removed."""
    node.state.prepare(make_claim("uid-done", [("gpu", "gpu-0")]))
    node.checkpoint.put(_started("uid-half"))
    node.spec_path("uid-half").write_text("{}")  # a spec whose claim never completed
    node.spec_path("uid-orphan").write_text("{}")  # no checkpoint entry owns it
    stray = node.cdi.root / f".tmp-{claim_spec_filename('uid-x')}-abc"
    stray.write_text("{")
    foreign = node.cdi.root / "nvidia.yaml"  # not ours: left alone
    foreign.write_text("cdiVersion: 0.5.0\n")

    report = node.restart().reconcile()

    assert report.rolled_back == ["uid-half"]
    assert sorted(p.name for p in report.removed_specs) == sorted(
        [claim_spec_filename("uid-orphan"), stray.name]
    )
    assert node.recorded("uid-half") is None
    assert not node.spec_path("uid-half").exists()
    assert not node.spec_path("uid-orphan").exists()
    assert node.spec_path("uid-done").exists()
    assert foreign.exists()
    done = node.recorded("uid-done")
    assert done is not None
    assert done.state == PREPARE_COMPLETED


def test_kubelet_retry_rolls_back_an_unfinished_attempt(node: Node) -> None:
    """A PrepareStarted entry for the same claim is rolled back, then the claim is prepared."""
    rollbacks: list[str] = []

    class RecordingSharing(NoSharing):
        def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
            rollbacks.extend(str(r["id"]) for r in records)

    state = node.restart(sharing=RecordingSharing(DRIVER))
    node.checkpoint.put(_started("uid-1", sharing=[{"id": "ts-gpu-4"}]))
    devices = state.prepare(make_claim("uid-1", [("gpu", "gpu-4")]))
    assert [d.device for d in devices] == ["gpu-4"]
    assert rollbacks == ["ts-gpu-4"]
    recorded = node.recorded("uid-1")
    assert recorded is not None
    assert recorded.state == PREPARE_COMPLETED


def test_corrupt_checkpoint_is_moved_aside_not_a_crash(node: Node) -> None:
    """A damaged checkpoint is moved aside at start-up; the plugin starts empty and works."""
    node.state.prepare(make_claim("uid-1", [("gpu", "gpu-0")]))
    path = node.checkpoint.path
    path.write_text(path.read_text().replace("gpu-0", "gpu-9"))  # checksum no longer matches
    state = node.restart()
    assert list(path.parent.glob("checkpoint.json.corrupt-*"))
    report = state.reconcile()
    assert report.removed_specs == [node.spec_path("uid-1")]  # now owned by nobody
    assert state.prepare(make_claim("uid-2", [("gpu", "gpu-0")]))


# ---- seams: sharing and MIG ---------------------------------------------------------------------


def test_sharing_configs_are_decoded_and_refused_until_wired(node: Node) -> None:
    """Without a sharing implementation a TimeSlicing config is refused, naming the feature gate."""
    config = [
        {
            "source": "FromClaim",
            "requests": ["gpu"],
            "opaque": {
                "driver": DRIVER,
                "parameters": {
                    "apiVersion": "resource.nvidia.com/v1beta1",
                    "kind": "GpuConfig",
                    "sharing": {"strategy": "TimeSlicing"},
                },
            },
        }
    ]
    with pytest.raises(PermanentClaimError, match="TimeSlicingSettings"):
        node.state.prepare(make_claim("uid-1", [("gpu", "gpu-0")], config=config))
    bad = [{**config[0], "opaque": {"driver": DRIVER, "parameters": {"kind": "GpuConfig", "bogus": 1}}}]
    with pytest.raises(PermanentClaimError, match="invalid opaque device config"):
        node.state.prepare(make_claim("uid-2", [("gpu", "gpu-0")], config=bad))
    assert node.checkpoint.load() == {}


class FakeSharing:
    """Records per claim; adds an env edit to each device; undo remembers what it undid."""

    def __init__(self) -> None:
        self.undone: list[str] = []

    def apply(
        self,
        claim_uid: str,
        claim: Mapping[str, Any],
        devices: Sequence[AllocatableDevice],
        live=None,
        intend=None,
    ) -> SharingOutcome:
        return SharingOutcome(
            records=({"claim": claim_uid, "gpus": [d.gpu_uuid for d in devices]},),
            edits={d.name: ContainerEdits(env=(f"SHARED_{d.gpu_minor}=1",)) for d in devices},
        )

    def undo(self, claim_uid: str, records: Sequence[Mapping[str, Any]]) -> None:
        self.undone.extend(str(r["claim"]) for r in records)

    def check(self, claim: Mapping[str, Any], devices: Sequence[AllocatableDevice]) -> None:
        return None

    def sweep(self) -> list[Path]:
        return []


def test_sharing_seam_records_edits_and_undo(node: Node) -> None:
    """A sharing action's records are checkpointed, its edits land in the spec, unprepare undoes it."""
    sharing = FakeSharing()
    state = node.restart(sharing=sharing)
    state.prepare(make_claim("uid-1", [("gpu", "gpu-6")]))
    recorded = node.recorded("uid-1")
    assert recorded is not None
    assert recorded.sharing == [{"claim": "uid-1", "gpus": [gpu_uuid(6)]}]
    spec = json.loads(node.spec_path("uid-1").read_text())
    assert spec["devices"][0]["containerEdits"]["env"] == ["SHARED_6=1"]
    state.unprepare(ClaimRef("default", "claim-uid-1", "uid-1"))
    assert sharing.undone == ["uid-1"]


class FakeMig:
    """MigDevices over a dict; creates GI 1/CI 0 for any spec."""

    def __init__(self, fake_root: FakeDriverRoot) -> None:
        self.fake_root = fake_root
        self.live: dict[str, MigLive] = {}
        self.rolled_back: list[str] = []

    def create(self, spec: MigSpec) -> MigLive:
        live = MigLive(
            spec.parent_minor, spec.parent_uuid, 1, 0, "MIG-fake-1", spec.gi_profile_id, spec.placement_start
        )
        self.fake_root.add_mig_caps(spec.parent_minor, 1, 0)
        self.live[spec.name] = live
        return live

    def destroy(self, live: MigLive) -> bool:
        return any(self.live.pop(k) for k, v in list(self.live.items()) if v == live)

    def rollback(self, spec: MigSpec) -> bool:
        self.rolled_back.append(spec.name)
        return self.live.pop(spec.name, None) is not None


def _mig_device(minor: int = 0) -> AllocatableDevice:
    spec = MigSpec(minor, gpu_uuid(minor), "1g.5gb", 19, 0, 1)
    return AllocatableDevice(
        name=spec.name,
        kind="mig-dynamic",
        gpu_uuid=gpu_uuid(minor),
        gpu_minor=minor,
        attributes={"type": "mig"},
        capacity={},
        mig_spec=spec,
    )


def test_dynamic_mig_seam_creates_records_and_destroys(node: Node) -> None:
    """Dynamic MIG: created on prepare, live ids checkpointed, CDI has cap nodes, destroyed on unprepare."""
    mig = FakeMig(node.driver_root)
    device = _mig_device()
    state = node.restart(inventory=gpu_inventory(extra=[device]), actions=default_actions(mig))
    state.prepare(make_claim("uid-1", [("mig", device.name)]))
    recorded = node.recorded("uid-1")
    assert recorded is not None
    assert recorded.devices[0].mig == mig_record(mig.live[device.name])
    spec = json.loads(node.spec_path("uid-1").read_text())
    paths = [n["path"] for n in spec["devices"][0]["containerEdits"]["deviceNodes"]]
    assert paths[0] == "/dev/nvidia0"
    assert any("nvidia-caps" in p for p in paths[1:])
    state.unprepare(ClaimRef("default", "claim-uid-1", "uid-1"))
    assert mig.live == {}


def test_dynamic_mig_is_refused_until_enabled(node: Node) -> None:
    """Without a MIG manager a dynamic MIG device fails with what to enable."""
    device = _mig_device()
    state = node.restart(inventory=gpu_inventory(extra=[device]))
    with pytest.raises(PermanentClaimError, match="DynamicMIG"):
        state.prepare(make_claim("uid-1", [("mig", device.name)]))


def test_failed_prepare_rolls_back_the_created_mig_device(node: Node) -> None:
    """A failure after the MIG device was created destroys it again; nothing is recorded."""
    mig = FakeMig(node.driver_root)
    device = _mig_device(minor=1)
    node.driver_root.remove_node("nvidia1")
    state = node.restart(inventory=gpu_inventory(extra=[device]), actions=default_actions(mig))
    with pytest.raises(PermanentClaimError, match="/dev/nvidia1"):
        state.prepare(make_claim("uid-1", [("mig", device.name)]))
    assert mig.live == {}
    assert node.recorded("uid-1") is None


# ---- locking ------------------------------------------------------------------------------------


class BlockingSharing(FakeSharing):
    """Blocks the prepare of claims on gpu-0 until released, to observe lock granularity."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def apply(
        self,
        claim_uid: str,
        claim: Mapping[str, Any],
        devices: Sequence[AllocatableDevice],
        live=None,
        intend=None,
    ) -> SharingOutcome:
        if any(d.name == "gpu-0" for d in devices):
            self.entered.set()
            assert self.release.wait(30), "test never released the blocked prepare"
        return SharingOutcome()


def test_claims_on_different_gpus_do_not_wait_for_each_other(node: Node) -> None:
    """While a prepare on gpu-0 is stuck, a claim on gpu-1 completes (per-GPU locks, not node-wide)."""
    sharing = BlockingSharing()
    state = node.restart(sharing=sharing)
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            state.prepare(make_claim("uid-slow", [("gpu", "gpu-0")]))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        assert sharing.entered.wait(30)
        state.prepare(make_claim("uid-fast", [("gpu", "gpu-1")]))
        fast = node.recorded("uid-fast")
        assert fast is not None
        assert fast.state == PREPARE_COMPLETED
        slow_now = node.recorded("uid-slow")
        assert slow_now is not None
        assert slow_now.state == PREPARE_STARTED  # still blocked: it really ran in parallel
    finally:
        sharing.release.set()
        thread.join(30)
    assert errors == []


def test_same_gpu_lock_times_out_as_a_temporary_error(node: Node) -> None:
    """A GPU lock held too long gives a TemporaryClaimError the kubelet retries."""
    sharing = BlockingSharing()
    state = node.restart(sharing=sharing, locks=DeviceLocks(node.root / "state" / "locks", timeout_s=0.2))
    thread = threading.Thread(target=lambda: state.prepare(make_claim("uid-a", [("gpu", "gpu-0")])))
    thread.start()
    try:
        assert sharing.entered.wait(30)
        with pytest.raises(TemporaryClaimError, match="lock"):
            state.prepare(make_claim("uid-b", [("gpu", "gpu-0")]))
    finally:
        sharing.release.set()
        thread.join(30)


# ---- write-ahead ------------------------------------------------------------------------------


class RecordingCheckpoint(CheckpointStore):
    """A CheckpointStore that remembers the (uid, state) of every put."""

    puts: list[tuple[str, str]]

    def put(self, claim: PreparedClaim) -> None:
        self.puts.append((claim.uid, claim.state))
        super().put(claim)


def _recording(node: Node) -> RecordingCheckpoint:
    store = RecordingCheckpoint(node.checkpoint.path, node.boot_id_path)
    store.puts = []
    node.checkpoint = store
    return store


def test_write_ahead_is_always_used_with_two_instances(node: Node) -> None:
    """Default (rolling updates possible): PrepareStarted is on disk before the spec is written."""
    store = _recording(node)
    state = build_state(node)
    state.prepare(make_claim("uid-1", [("gpu", "gpu-0")]))
    assert store.puts == [("uid-1", PREPARE_STARTED), ("uid-1", PREPARE_COMPLETED)]


def test_single_instance_skips_write_ahead_only_without_side_effects(node: Node) -> None:
    """Single instance: a plain GPU claim writes only PrepareCompleted; a claim with config of
    ours (possible sharing) or with a device action still writes PrepareStarted first."""
    store = _recording(node)
    mig = FakeMig(node.driver_root)
    device = _mig_device(minor=7)
    state = build_state(
        node, inventory=gpu_inventory(extra=[device]), actions=default_actions(mig), single_instance=True
    )
    state.prepare(make_claim("uid-plain", [("gpu", "gpu-0")]))
    assert store.puts == [("uid-plain", PREPARE_COMPLETED)]
    store.puts.clear()
    config = [
        {
            "source": "FromClaim",
            "requests": [],
            "opaque": {
                "driver": DRIVER,
                "parameters": {"kind": "GpuConfig", "apiVersion": "resource.nvidia.com/v1beta1"},
            },
        }
    ]
    state.prepare(make_claim("uid-config", [("gpu", "gpu-1")], config=config))
    assert store.puts == [("uid-config", PREPARE_STARTED), ("uid-config", PREPARE_COMPLETED)]
    store.puts.clear()
    state.prepare(make_claim("uid-mig", [("mig", device.name)]))
    assert store.puts[0] == ("uid-mig", PREPARE_STARTED)


def test_single_instance_crash_before_completed_leaves_only_an_orphan_spec(node: Node) -> None:
    """The skipped record is safe: a spec written just before a crash has no owner and is swept."""
    state = build_state(node, single_instance=True)
    state.prepare(make_claim("uid-1", [("gpu", "gpu-0")]))
    node.checkpoint.remove("uid-1")  # as if the process died between spec write and PrepareCompleted
    report = node.restart(single_instance=True).reconcile()
    assert report.removed_specs == [node.spec_path("uid-1")]


def test_single_instance_failed_prepare_leaves_nothing(node: Node) -> None:
    """Without write-ahead a failure still removes the half-written state (no entry, no spec)."""
    node.driver_root.remove_node("nvidia2")
    state = build_state(node, single_instance=True)
    with pytest.raises(PermanentClaimError, match="/dev/nvidia2"):
        state.prepare(make_claim("uid-1", [("a", "gpu-1"), ("b", "gpu-2")]))
    assert node.checkpoint.load() == {}
    assert not node.spec_path("uid-1").exists()
