"""Seamless upgrade: two plugin processes for one node, as a rolling update with maxSurge 1 runs them.

Why: the chart upgrades with ``maxSurge: 1, maxUnavailable: 0``, so for a while the old and the
new plugin pod run side by side on every GPU node. Each registers under its own socket names
(``--pod-uid``), the kubelet calls the newest connected one, and both share the node's state dir,
CDI root and GPUs. Nothing a pod needs may break while that happens: no call fails, no claim is
prepared twice, the checkpoint stays consistent and intact, and a claim prepared by the old
instance is unprepared by the new one.

The plugins here are the real ``gpu-dra plugin`` processes (fake NVML, claims from files, no API
server) and the kubelet is :class:`tests.ground.kubelet.KubeletEmulator`. What this does not cover:
the API server side of an upgrade (slice ownership), which the e2e tests exercise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cdi.names import claim_spec_filename
from driver.checkpoint import PREPARE_COMPLETED, CheckpointStore, PreparedClaim, PreparedDevice
from driver.state import DeviceLocks
from tests.ground.kubelet import KubeletEmulator, KubeletError
from tests.integration.test_daemon import NODE, REPO, Layout, temp_layout
from tests.integration.test_state import DRIVER, build_state, gpu_uuid, make_claim, make_node

pytestmark = pytest.mark.timeout(240)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# Pod UIDs of three successive plugin pods on the node (two rolling updates).
POD_UIDS = (
    "0f0e0d0c-1111-4000-8000-00000000a001",
    "0f0e0d0c-2222-4000-8000-00000000a002",
    "0f0e0d0c-3333-4000-8000-00000000a003",
)
HELD_UID = "held-0001"
NAMESPACE = "team-a"
HELD_GPU = 7  # prepared by the old instance, unprepared by the new one
TRAFFIC_GPUS = range(7)
WAIT_S = 90.0


@dataclass
class Instance:
    """One ``gpu-dra plugin`` process with its per-pod socket names."""

    pod_uid: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    reg_socket: Path
    dra_socket: Path

    def events(self) -> list[dict[str, object]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def terminate(self, timeout_s: float = WAIT_S) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"plugin {self.pod_uid} did not exit after SIGTERM; log: {self.log_path}")


def launch(layout: Layout, pod_uid: str) -> Instance:
    """Start a plugin instance for pod ``pod_uid``; its log (JSON, debug) goes to a file."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["PYTHONPATH"] = str(REPO)
    log_path = layout.base / f"plugin-{pod_uid[-4:]}.log"
    # A file, not a pipe: nobody reads while traffic runs, and a full pipe would stall the plugin.
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            layout.argv("--pod-uid", pod_uid, "--log-level", "debug"),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Instance(
        pod_uid=pod_uid,
        proc=proc,
        log_path=log_path,
        reg_socket=layout.registry / f"{DRIVER}-{pod_uid}-reg.sock",
        dra_socket=layout.state / f"dra-{pod_uid}.sock",
    )


def claim_ref(uid: str) -> tuple[str, str, str]:
    return (NAMESPACE, uid, f"claim-{uid}")


def put_claim(layout: Layout, uid: str, gpu: int) -> tuple[str, str, str]:
    claim = make_claim(uid, [("gpu", f"gpu-{gpu}")], namespace=NAMESPACE, name=f"claim-{uid}", pool=NODE)
    layout.put_claim(claim)
    return claim_ref(uid)


def checkpoint_claims(layout: Layout) -> dict[str, PreparedClaim]:
    """The shared checkpoint, read under its lock; a bad checksum raises here."""
    return CheckpointStore(layout.state / "checkpoint.json", BOOT_ID_PATH).load()


@dataclass
class Traffic:
    """Kubelet-like prepare/unprepare cycles, one thread per GPU, checking each step as it goes.

    A cycle prepares a fresh claim, repeats the prepare (the kubelet does after a restart; it
    must not act again), then unprepares it. After each step the shared checkpoint and the CDI
    root must agree with what the kubelet was told.
    """

    emulator: KubeletEmulator
    layout: Layout
    gpus: Sequence[int]
    failures: list[str] = field(default_factory=list)
    prepared_uids: list[str] = field(default_factory=list)
    believed: set[str] = field(default_factory=set)
    cycles: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for gpu in self.gpus:
            t = threading.Thread(target=self._worker, args=(gpu,), name=f"traffic-gpu-{gpu}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=WAIT_S)
        assert not any(t.is_alive() for t in self._threads), "a traffic thread hangs in a DRA call"

    def wait_cycles(self, more: int, what: str) -> None:
        """Wait until ``more`` further cycles completed (or a worker failed)."""
        with self._cond:
            target = self.cycles + more
            ok = self._cond.wait_for(lambda: self.cycles >= target or bool(self.failures), timeout=WAIT_S)
        assert not self.failures, f"traffic failed {what}: {self.failures}"
        assert ok, f"traffic made no progress {what} (cycles {self.cycles}, wanted {target})"

    def _worker(self, gpu: int) -> None:
        n = 0
        while not self._stop.is_set():
            uid = f"c{gpu}-{n:05d}"
            ref = put_claim(self.layout, uid, gpu)
            try:
                first = self.emulator.prepare(DRIVER, [ref])
                with self._cond:
                    self.believed.add(uid)
                    self.prepared_uids.append(uid)
                self._check(uid, prepared=True)
                again = self.emulator.prepare(DRIVER, [ref])
                assert again == first, f"repeated prepare of {uid} answered {again}, first {first}"
                self.emulator.unprepare(DRIVER, [ref])
                with self._cond:
                    self.believed.discard(uid)
                self._check(uid, prepared=False)
            except (KubeletError, AssertionError, OSError, ValueError) as exc:
                with self._cond:
                    self.failures.append(f"claim {uid} on gpu-{gpu}: {type(exc).__name__}: {exc}")
                    self._cond.notify_all()
                return
            n += 1
            with self._cond:
                self.cycles += 1
                self._cond.notify_all()

    def _check(self, uid: str, *, prepared: bool) -> None:
        recorded = checkpoint_claims(self.layout).get(uid)
        spec = self.layout.cdi / claim_spec_filename(uid)
        if prepared:
            assert recorded is not None, f"{uid} prepared OK but missing from the checkpoint"
            assert recorded.state == PREPARE_COMPLETED, f"{uid} prepared OK but recorded as {recorded.state}"
            assert spec.exists(), f"{uid} prepared OK but its CDI spec {spec} is missing"
        else:
            assert recorded is None, f"{uid} unprepared OK but still in the checkpoint ({recorded.state})"
            assert not spec.exists(), f"{uid} unprepared OK but its CDI spec {spec} remains"


@pytest.fixture
def layout() -> Iterator[Layout]:
    with temp_layout("gdr-") as lay:
        yield lay


@pytest.fixture
def emulator(layout: Layout) -> Iterator[KubeletEmulator]:
    with KubeletEmulator(NODE, None, layout.registry) as emu:
        yield emu


def wait_serving(emulator: KubeletEmulator, instance: Instance) -> None:
    """Wait until the kubelet would send calls to ``instance`` (registered and connected)."""

    def chosen() -> bool:
        rec = emulator.plugin_for(DRIVER)
        return rec is not None and rec.endpoint == str(instance.dra_socket) and emulator.is_connected(DRIVER)

    if instance.proc.poll() is not None:
        pytest.fail(
            f"plugin {instance.pod_uid} exited with {instance.proc.returncode}; log: {instance.log_path}"
        )
    emulator.wait_for(chosen, WAIT_S, f"plugin {instance.pod_uid} to be the instance the kubelet calls")


def only_instance(emulator: KubeletEmulator, instance: Instance) -> bool:
    return [r.endpoint for r in emulator.instances(DRIVER)] == [str(instance.dra_socket)]


def spec_writes(*instances: Instance) -> Counter[str]:
    """How often each claim's CDI spec was written, over the logs of all ``instances``."""
    writes: Counter[str] = Counter()
    for inst in instances:
        for event in inst.events():
            if event.get("event") == "cdi spec written":
                writes[Path(str(event["path"])).name] += 1
    return writes


def test_rolling_updates_under_traffic_lose_no_call_and_prepare_nothing_twice(
    layout: Layout, emulator: KubeletEmulator
) -> None:
    """Two rolling updates in a row (each: new instance starts and takes over, old one gets
    SIGTERM) while the kubelet prepares and unprepares claims on seven GPUs; a claim the first
    instance prepared is unprepared by the last one."""
    instances = [launch(layout, POD_UIDS[0])]
    traffic = Traffic(emulator, layout, list(TRAFFIC_GPUS))
    try:
        wait_serving(emulator, instances[0])
        held = put_claim(layout, HELD_UID, HELD_GPU)
        held_devices = emulator.prepare(DRIVER, [held])

        traffic.start()
        traffic.wait_cycles(len(TRAFFIC_GPUS), "while only the first instance ran")
        for pod_uid in POD_UIDS[1:]:
            old, new = instances[-1], launch(layout, pod_uid)
            instances.append(new)
            wait_serving(emulator, new)
            assert len(emulator.instances(DRIVER)) == 2, "both instances must be registered side by side"
            traffic.wait_cycles(len(TRAFFIC_GPUS), f"while {old.pod_uid} and {new.pod_uid} both ran")

            assert old.terminate() == 0, f"instance {old.pod_uid} exited non-zero; log: {old.log_path}"
            emulator.wait_for(
                functools.partial(only_instance, emulator, new),
                WAIT_S,
                f"instance {old.pod_uid} to be deregistered",
            )
            # The old instance removed its own sockets and nothing else.
            assert not old.reg_socket.exists()
            assert not old.dra_socket.exists()
            assert new.reg_socket.exists()
            assert new.dra_socket.exists()
            traffic.wait_cycles(len(TRAFFIC_GPUS), f"after {old.pod_uid} exited")
        traffic.stop()
        last = instances[-1]

        # Instances are interchangeable: the last one knows the first one's claim and undoes it.
        assert emulator.prepare(DRIVER, [held]) == held_devices
        emulator.unprepare(DRIVER, [held])
        assert emulator.calls[-1].endpoint == str(last.dra_socket)
        assert not (layout.cdi / claim_spec_filename(HELD_UID)).exists()

        assert not traffic.failures
        failed = [c for c in emulator.calls if c.error]
        assert not failed, f"kubelet calls failed during the rolling updates: {failed}"
        assert {c.endpoint for c in emulator.calls} == {str(i.dra_socket) for i in instances}

        # The checkpoint is intact (checksum) and holds exactly what the kubelet believes prepared.
        assert traffic.believed == set()
        assert checkpoint_claims(layout) == {}
        assert sorted(p.name for p in layout.cdi.glob("*.json")) == []

        # Every claim was prepared once: one spec write per claim, whichever instance answered.
        writes = spec_writes(*instances)
        expected = Counter(claim_spec_filename(uid) for uid in [*traffic.prepared_uids, HELD_UID])
        assert writes == expected, f"spec writes differ: {(writes - expected) + (expected - writes)}"

        assert last.terminate() == 0, f"instance {last.pod_uid} exited non-zero; log: {last.log_path}"
    finally:
        with contextlib.suppress(Exception):
            traffic.stop()
        for inst in instances:
            if inst.proc.poll() is None:
                inst.proc.kill()
                inst.proc.wait()


def test_start_up_sweep_leaves_a_spec_the_other_instance_is_writing(tmp_path: Path) -> None:
    """The new instance's start-up sweep of the CDI root waits for the GPU locks: a temp file the
    old instance is writing (under the claim's GPU lock) is neither removed nor later taken for
    an orphan once its checkpoint entry exists.

    Regression: the sweep once ran without locks and deleted the old instance's in-flight temp
    file, failing that prepare with FileNotFoundError on the rename.
    """
    node = make_node(tmp_path)
    uid = "uid-inflight"
    spec = node.spec_path(uid)
    temp = spec.with_name(f".tmp-{spec.name}-inflight")
    # The old instance: holding gpu-3's lock, half-way through writing the claim's spec.
    old_locks = DeviceLocks(tmp_path / "state" / "locks", timeout_s=5.0)
    with old_locks.hold([gpu_uuid(3)]):
        node.cdi.root.mkdir(parents=True, exist_ok=True)
        temp.write_text("{}")
        new_state = build_state(node)
        sweep = threading.Thread(target=new_state.reconcile, name="new-instance-reconcile")
        sweep.start()
        sweep.join(timeout=1.0)  # gives an unlocked sweep the time to do its damage
        assert temp.exists(), "the start-up sweep removed a spec temp file while its GPU was locked"
        # The old instance finishes: rename, then PrepareCompleted.
        temp.replace(spec)
        node.checkpoint.put(
            PreparedClaim(
                uid=uid,
                namespace="default",
                name="claim-x",
                state=PREPARE_COMPLETED,
                devices=[
                    PreparedDevice(
                        request_names=["gpu"],
                        pool=NODE,
                        device="gpu-3",
                        cdi_device_ids=[f"k8s.{DRIVER}/claim={uid}-gpu-3"],
                        kind="gpu",
                        gpu_uuid=gpu_uuid(3),
                    )
                ],
                sharing=[],
                started_at=1.0,
                completed_at=2.0,
            )
        )
    sweep.join(timeout=WAIT_S)
    assert not sweep.is_alive()
    assert spec.exists(), "the start-up sweep took the old instance's new spec for an orphan"
