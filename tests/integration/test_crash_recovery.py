"""Crash safety of the real plugin process: kill -9 at every step, restart, the node is consistent.

The plugin runs as a subprocess over the fake NVML backend (whose state file outlives the process
as a GPU would), with claims read from files and no API server; calls go through its real DRA
socket. Exact steps are hit with :mod:`tests.ground.crashpoints` (SIGKILL from inside, at a named
step); random moments with SIGKILL from outside. After each restart the node must hold exactly
what completed claims own: MIG instances on the fake GPU, MPS daemons, compute modes, CDI specs,
checkpoint entries - and the interrupted claim must prepare again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from cdi.store import CdiStore
from driver.checkpoint import PREPARE_COMPLETED, PREPARE_STARTED, PreparedClaim, decode
from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc
from driver.nvml.fakestate import FakeState
from driver.nvml.topology import load_topology
from tests.ground.crashpoints import CLAIM_ENV, CRASH_ENV, REACHED
from tests.ground.driverroot import make_fake_driver_root
from tests.ground.longrun import scaled
from tests.ground.standins import install_standins, read_journal

DRIVER = "gpu.nvidia.com"
NODE = "node-crash"
REPO = Path(__file__).resolve().parents[2]
#: Logged once reconcile is done and calls are served (the sockets come earlier).
READY_EVENT = "plugin ready"
TIMEOUT_S = 60.0

MIG_TOPOLOGY = "a100-40gb-x1-mig"
KEEP_MIG = "gpu-0-mig-1g5gb-19-0"  # a completed claim that every crash must leave alone
TARGET_MIG = "gpu-0-mig-2g10gb-14-4"

TIMESLICE_CONFIG = {
    "source": "FromClaim",
    "requests": [],
    "opaque": {
        "driver": DRIVER,
        "parameters": {
            "apiVersion": "resource.nvidia.com/v1beta1",
            "kind": "GpuConfig",
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}},
        },
    },
}

MPS_CONFIG = {
    "source": "FromClaim",
    "requests": [],
    "opaque": {
        "driver": DRIVER,
        "parameters": {
            "apiVersion": "resource.nvidia.com/v1beta1",
            "kind": "GpuConfig",
            "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}},
        },
    },
}


def claim_for(uid: str, device: str, config: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A v1 ResourceClaim allocated to ``device`` of this node."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": "crash", "name": f"claim-{uid}", "uid": uid},
        "spec": {"devices": {"requests": [{"name": "gpu"}]}},
        "status": {
            "allocation": {
                "devices": {
                    "results": [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}],
                    "config": config or [],
                }
            }
        },
    }


def wire_claim(claim: dict[str, Any]) -> dra_v1_pb2.Claim:
    meta = claim["metadata"]
    return dra_v1_pb2.Claim(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


def poll(predicate: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@dataclass
class Plugin:
    """One run of the plugin process; its stdout+stderr go to a file (a full pipe would block it)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    dra_socket: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def is_ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"plugin exited with {self.proc.returncode} before it was ready:\n{self.output()}")
        return any(e.get("event") == READY_EVENT for e in self.events())

    def wait_ready(self) -> Plugin:
        poll(self.is_ready, "plugin start-up")
        return self

    def _call(self, method: str, claims: list[dict[str, Any]]) -> Any:
        with grpc.insecure_channel(f"unix://{self.dra_socket}") as channel:
            stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
            if method == "prepare":
                return stub.NodePrepareResources(
                    dra_v1_pb2.NodePrepareResourcesRequest(claims=[wire_claim(c) for c in claims]),
                    timeout=TIMEOUT_S,
                )
            return stub.NodeUnprepareResources(
                dra_v1_pb2.NodeUnprepareResourcesRequest(claims=[wire_claim(c) for c in claims]),
                timeout=TIMEOUT_S,
            )

    def prepare(self, claim: dict[str, Any]) -> list[str]:
        """Prepare one claim, which must succeed; return its CDI device ids."""
        uid = claim["metadata"]["uid"]
        result = self._call("prepare", [claim]).claims[uid]
        assert result.error == "", f"prepare of {uid} failed: {result.error}\n{self.output()}"
        return [i for d in result.devices for i in d.cdi_device_ids]

    def unprepare(self, claim: dict[str, Any]) -> None:
        uid = claim["metadata"]["uid"]
        result = self._call("unprepare", [claim]).claims[uid]
        assert result.error == "", f"unprepare of {uid} failed: {result.error}\n{self.output()}"

    def call_into_crash(self, method: str, claim: dict[str, Any], point: str) -> None:
        """Send a call that must kill the plugin at ``point``."""
        with pytest.raises(grpc.RpcError):
            self._call(method, [claim])
        self.wait_killed()
        assert REACHED + point in self.output(), f"crash point {point} was not reached:\n{self.output()}"

    def wait_killed(self) -> None:
        try:
            self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("plugin did not die at its crash point")
        assert self.proc.returncode == -signal.SIGKILL, self.output()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM; the plugin must exit 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"plugin did not exit on SIGTERM:\n{self.output()}")
        assert self.proc.returncode == 0, self.output()


@dataclass
class Node:
    """A simulated node: directories, fake driver root, fake GPU state, claim files."""

    base: Path
    topology: str
    runs: list[Plugin] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.base / "plug" / DRIVER

    @property
    def checkpoint(self) -> Path:
        return self.state_dir / "checkpoint.json"

    @property
    def cdi(self) -> Path:
        return self.base / "cdi"

    @property
    def driver_root(self) -> Path:
        return self.base / "drv"

    @property
    def fake_state(self) -> Path:
        return self.base / "fake-nvml.json"

    @property
    def mps_root(self) -> Path:
        return self.base / "mps"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.ground.crashpoints",
            "plugin",
            "--node-name",
            NODE,
            "--nvml-backend",
            "fake",
            "--fake-topology",
            self.topology,
            "--fake-state",
            str(self.fake_state),
            "--no-publish",
            "--fake-claims-dir",
            str(self.base / "claims"),
            "--kubelet-registrar-directory-path",
            str(self.base / "reg"),
            "--kubelet-plugins-directory-path",
            str(self.base / "plug"),
            "--cdi-root",
            str(self.cdi),
            "--driver-root",
            str(self.driver_root),
            "--dev-root",
            str(self.driver_root),
            "--proc-root",
            str(self.driver_root / "proc"),
            "--mps-root",
            str(self.mps_root),
            "--log-format",
            "json",
        ]

    def put(self, claim: dict[str, Any]) -> dict[str, Any]:
        meta = claim["metadata"]
        path = self.base / "claims" / meta["namespace"] / f"{meta['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(claim))
        return claim

    def start(
        self,
        crash_at: str | None = None,
        crash_claim: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Plugin:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        env["PYTHONPATH"] = str(REPO)
        env.update(extra_env or {})
        env.pop(CRASH_ENV, None)
        env.pop(CLAIM_ENV, None)
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
        if crash_claim is not None:
            env[CLAIM_ENV] = crash_claim
        log_path = self.base / f"plugin-{len(self.runs)}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(self.argv(), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        plugin = Plugin(proc, log_path, self.state_dir / "dra.sock")
        self.runs.append(plugin)
        return plugin

    # --- what is on the node ------------------------------------------------------------------

    def claims(self) -> dict[str, PreparedClaim]:
        """The checkpoint's claims; decoding verifies the checksum."""
        _boot, claims = decode(self.checkpoint.read_bytes())
        return claims

    def specs(self) -> set[str]:
        return set(CdiStore(self.cdi).list_claim_specs())

    def gpus(self) -> dict[str, Any]:
        gpus: dict[str, Any] = json.loads(self.fake_state.read_text())["gpus"]
        return gpus

    def mig_instances(self) -> dict[int, tuple[int | None, str | None]]:
        """GI id -> (CI id, MIG UUID) on the node's only GPU (CI None: a GI without CI)."""
        (gpu,) = self.gpus().values()
        out: dict[int, tuple[int | None, str | None]] = {}
        for gi_id, gi in gpu["mig"].get("gis", {}).items():
            cis = gi.get("cis", {})
            ci_id = next(iter(cis), None)
            out[int(gi_id)] = (None, None) if ci_id is None else (int(ci_id), cis[ci_id]["uuid"])
        return out

    def owned_instances(self) -> dict[int, tuple[int | None, str | None]]:
        """GI id -> (CI id, MIG UUID) that completed claims recorded."""
        out: dict[int, tuple[int | None, str | None]] = {}
        for claim in self.claims().values():
            if claim.state != PREPARE_COMPLETED:
                continue
            for d in claim.devices:
                if d.mig is not None:
                    out[int(d.mig["gi_id"])] = (int(d.mig["ci_id"]), str(d.mig["mig_uuid"]))
        return out

    def compute_modes(self) -> set[str]:
        return {g["computeMode"] for g in self.gpus().values()}

    def mps_daemon_pids(self) -> list[int]:
        return [e["pid"] for e in read_journal(self.fake_state) if e.get("mode") == "daemon-start"]

    def assert_consistent(self, *, unpreparing: str | None = None) -> dict[str, PreparedClaim]:
        """After start-up reconcile: no half-prepared claim, a spec exactly per completed claim,
        and no stray spec temp file. Only ``unpreparing``, a claim whose unprepare was cut short,
        may have lost its spec already: it stays recorded until the kubelet's retry finishes."""
        claims = self.claims()
        assert {c.state for c in claims.values()} <= {PREPARE_COMPLETED}, claims
        specs = self.specs()
        assert specs <= set(claims)
        assert set(claims) - specs <= {unpreparing}, (claims, specs)
        assert not list(self.cdi.glob(".tmp-*"))
        return claims

    def cleanup(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                run.kill()
        for pid in self.mps_daemon_pids():
            with contextlib.suppress(OSError):
                if b"nvidia-cuda-mps-control" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def make_node(topology: str, *, mig_caps: bool = False, mps: bool = False) -> Node:
    base = Path(tempfile.mkdtemp(prefix="gdc-", dir="/tmp"))  # short: Unix socket path limit
    node = Node(base, topology)
    (base / "reg").mkdir()
    topo = load_topology(topology)
    make_fake_driver_root(node.driver_root, [g.minor for g in topo.gpus])
    state = FakeState.create(node.fake_state, topo, NODE)
    if mig_caps:
        with state.edit() as doc:
            doc["driverRoot"] = str(node.driver_root)  # MIG capability files follow the instances
    if mps:
        install_standins(node.driver_root / "usr" / "bin", node.fake_state)
    return node


@pytest.fixture
def nodes() -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def factory(topology: str, **kwargs: bool) -> Node:
        node = make_node(topology, **kwargs)
        made.append(node)
        return node

    yield factory
    for node in made:
        node.cleanup()
        shutil.rmtree(node.base, ignore_errors=True)


# ---- 1. dynamic MIG: kill -9 at each step of prepare and unprepare ------------------------------

# Nothing runs between writing the CDI spec and recording PrepareCompleted, nor between removing
# the spec and removing the checkpoint entry: "before-complete" is also "after CDI", and
# "unprepare-before-checkpoint" also "after the spec removal" (both are crash points of their own
# in tests.ground.crashpoints; one run each keeps this file quick).
PREPARE_POINTS = [
    "before-create",
    "after-gi",
    "after-ci",
    "after-mig-record",
    "before-complete",
    "after-complete",
]
UNPREPARE_POINTS = [
    "unprepare-before-destroy",
    "unprepare-after-ci-destroy",
    "unprepare-after-gi-destroy",
    "unprepare-before-checkpoint",
]


@pytest.mark.parametrize(
    ("phase", "point"),
    [("prepare", p) for p in PREPARE_POINTS] + [("unprepare", p) for p in UNPREPARE_POINTS],
)
def test_dynamic_mig_survives_kill_9_at_every_step(
    nodes: Callable[..., Node], phase: str, point: str
) -> None:
    """kill -9 at one step; after restart the GPU holds exactly the instances of completed claims,
    no orphan spec, the checkpoint is valid; the claim prepares again and unprepares to the
    instances of the other claim only, then everything unprepares to an empty GPU."""
    node = nodes(MIG_TOPOLOGY, mig_caps=True)
    keep = node.put(claim_for("uid-keep", KEEP_MIG))
    target = node.put(claim_for("uid-target", TARGET_MIG))

    plugin = node.start(crash_at=point, crash_claim="uid-target").wait_ready()
    plugin.prepare(keep)
    keep_instance = node.mig_instances()
    if phase == "prepare":
        plugin.call_into_crash("prepare", target, point)
    else:
        plugin.prepare(target)
        plugin.call_into_crash("unprepare", target, point)
    node.claims()  # the checkpoint the crash left decodes with a valid checksum

    plugin = node.start().wait_ready()
    claims = node.assert_consistent(unpreparing="uid-target" if phase == "unprepare" else None)
    gpu, owned = node.mig_instances(), node.owned_instances()
    if phase == "prepare":
        # A rolled-back prepare left nothing; a completed one left exactly its instance.
        assert gpu == owned
        assert ("uid-target" in claims) == (point == "after-complete")
    else:
        # The unprepare did not finish: the claim stays for the kubelet's retry, and what is left
        # of its instance is what it recorded (a GI whose CI is gone, or nothing).
        assert "uid-target" in claims
        assert set(gpu) <= set(owned)
        assert all(gpu[gi] in (owned[gi], (None, None)) for gi in gpu)
        plugin.unprepare(target)  # the kubelet's retry
        assert node.mig_instances() == keep_instance
        assert node.specs() == {"uid-keep"}
    assert node.mig_instances().items() >= keep_instance.items()

    ids = plugin.prepare(target)
    assert ids == [f"k8s.gpu.nvidia.com/claim=uid-target-{TARGET_MIG}"]
    node.assert_consistent()
    assert node.mig_instances() == node.owned_instances()
    assert len(node.mig_instances()) == 2
    plugin.unprepare(target)
    assert node.mig_instances() == keep_instance
    plugin.unprepare(keep)
    assert node.mig_instances() == {}
    assert node.specs() == set()
    assert node.claims() == {}
    plugin.stop()


# ---- 2. full GPUs: kill -9 at random moments of a prepare/unprepare loop -------------------------


@dataclass
class Loop:
    """A kubelet-like client: prepares and unprepares claims in turn until the plugin dies."""

    plugin: Plugin
    claims: list[dict[str, Any]]
    rng: random.Random
    acked: dict[str, bool]  # uid -> prepared, as the plugin last confirmed
    in_flight: dict[str, Any] | None = None  # the claim of the call the kill interrupted

    def run(self) -> None:
        try:
            while self.plugin.proc.poll() is None:
                if not any(e.get("event") == READY_EVENT for e in self.plugin.events()):
                    time.sleep(0.01)
                    continue
                claim = self.rng.choice(self.claims)
                self.in_flight = claim
                self.send(self.plugin, claim)
                self.in_flight = None
        except (grpc.RpcError, OSError):
            return  # the plugin was killed under the call

    def send(self, plugin: Plugin, claim: dict[str, Any]) -> None:
        """Prepare an unprepared claim or unprepare a prepared one; record what was confirmed."""
        uid = claim["metadata"]["uid"]
        if self.acked.get(uid):
            plugin.unprepare(claim)
            self.acked[uid] = False
        else:
            plugin.prepare(claim)
            self.acked[uid] = True


@pytest.mark.long
@pytest.mark.parametrize("seed", range(1, scaled(3, 30) + 1))
def test_full_gpu_state_survives_kill_9_at_random_moments(nodes: Callable[..., Node], seed: int) -> None:
    """Random SIGKILLs (start-up included) during a prepare/unprepare loop: the checkpoint always
    decodes, after restart the specs are exactly the completed claims, every claim the plugin
    confirmed prepared is still prepared, every confirmed unprepare stays undone, and all claims
    prepare and unprepare again."""
    node = nodes("a100-40gb-x8")
    kill_at = random.Random(seed)
    choices = random.Random(-seed)  # the client's own stream: the worker thread draws from it
    claims = [node.put(claim_for(f"uid-{seed}-{i}", f"gpu-{i}")) for i in range(4)]
    acked: dict[str, bool] = {}
    plugin = node.start()  # the first kill may land in start-up (checkpoint load, reconcile)
    for _round in range(3):
        loop = Loop(plugin, claims, choices, acked)
        worker = threading.Thread(target=loop.run, daemon=True)
        worker.start()
        time.sleep(kill_at.uniform(0.0, 1.2))  # the random moment is the point of this test
        plugin.kill()
        worker.join(TIMEOUT_S)
        assert not worker.is_alive()
        if node.checkpoint.exists():
            node.claims()  # decodes: valid JSON and checksum

        plugin = node.start().wait_ready()
        interrupted = loop.in_flight["metadata"]["uid"] if loop.in_flight else None
        recorded = node.assert_consistent(unpreparing=interrupted if acked.get(str(interrupted)) else None)
        for uid, prepared in acked.items():
            if uid != interrupted:
                assert (uid in recorded) == prepared, (uid, prepared, recorded)
        if loop.in_flight is not None:
            loop.send(plugin, loop.in_flight)  # the kubelet retries the interrupted call

    for claim in claims:
        assert plugin.prepare(claim)
    assert node.specs() == {c["metadata"]["uid"] for c in claims}
    for claim in claims:
        plugin.unprepare(claim)
    assert node.specs() == set()
    assert node.claims() == {}
    plugin.stop()


# ---- 3. MPS: the daemon outlives the plugin; an interrupted prepare is rolled back ---------------


def test_mps_daemon_survives_plugin_kill_9_and_unprepare_stops_it(nodes: Callable[..., Node]) -> None:
    """kill -9 of the plugin after an MPS prepare leaves the daemon serving; the restarted plugin's
    unprepare stops it and restores compute mode DEFAULT."""
    node = nodes("a100-40gb-x8", mps=True)
    claim = node.put(claim_for("uid-mps", "gpu-2", [MPS_CONFIG]))
    plugin = node.start().wait_ready()
    plugin.prepare(claim)
    (record,) = node.claims()["uid-mps"].sharing
    pid = int(record["pid"])
    assert alive(pid)
    assert "EXCLUSIVE_PROCESS" in node.compute_modes()

    plugin.kill()
    assert alive(pid)  # the workload's daemon does not die with the plugin
    plugin = node.start().wait_ready()
    assert alive(pid)
    assert node.assert_consistent().keys() == {"uid-mps"}

    plugin.unprepare(claim)
    poll(lambda: not alive(pid), "MPS daemon exit")
    assert node.compute_modes() == {"DEFAULT"}
    assert list(node.mps_root.iterdir()) == []
    plugin.stop()


@pytest.mark.parametrize("point", ["mps-after-launch", "after-sharing", "after-cdi"])
def test_mps_prepare_killed_before_completion_is_rolled_back(nodes: Callable[..., Node], point: str) -> None:
    """kill -9 inside an MPS prepare: after restart the daemon that prepare started is stopped,
    compute mode is DEFAULT again, and the claim prepares and unprepares cleanly."""
    node = nodes("a100-40gb-x8", mps=True)
    claim = node.put(claim_for("uid-mps", "gpu-2", [MPS_CONFIG]))
    node.start(crash_at=point).wait_ready().call_into_crash("prepare", claim, point)
    (pid,) = node.mps_daemon_pids()

    plugin = node.start().wait_ready()
    poll(lambda: not alive(pid), "the rolled-back prepare's MPS daemon to exit")
    assert node.compute_modes() == {"DEFAULT"}
    assert node.assert_consistent() == {}
    assert not node.mps_root.exists() or list(node.mps_root.iterdir()) == []

    plugin.prepare(claim)
    assert "EXCLUSIVE_PROCESS" in node.compute_modes()
    plugin.unprepare(claim)
    assert node.compute_modes() == {"DEFAULT"}
    assert [p for p in node.mps_daemon_pids() if alive(p)] == []
    plugin.stop()


@pytest.mark.parametrize("point", ["ts-after-apply", "after-sharing"])
def test_time_slice_set_by_an_interrupted_prepare_is_reset(nodes: Callable[..., Node], point: str) -> None:
    """kill -9 right after the time slice was set: the record written before the change lets the
    restarted plugin's rollback restore the GPU's default time slice."""
    node = nodes("a100-40gb-x8", mps=True)
    claim = node.put(claim_for("uid-ts", "gpu-3", [TIMESLICE_CONFIG]))
    node.start(crash_at=point).wait_ready().call_into_crash("prepare", claim, point)
    assert 3 in {g.get("timeslice") for g in node.gpus().values()}  # the crash left it set

    plugin = node.start().wait_ready()
    assert {g.get("timeslice", 0) for g in node.gpus().values()} == {0}
    assert node.compute_modes() == {"DEFAULT"}
    assert node.assert_consistent() == {}

    plugin.prepare(claim)
    assert 3 in {g.get("timeslice") for g in node.gpus().values()}
    plugin.unprepare(claim)
    assert {g.get("timeslice", 0) for g in node.gpus().values()} == {0}
    plugin.stop()


# ---- 4. a corrupt checkpoint is moved aside, reported, and the plugin serves ---------------------


def test_corrupt_checkpoint_is_moved_aside_and_the_plugin_serves(nodes: Callable[..., Node]) -> None:
    node = nodes("a100-40gb-x8")
    node.state_dir.mkdir(parents=True)
    garbage = bytes(range(256)) * 4
    node.checkpoint.write_bytes(garbage)
    claim = node.put(claim_for("uid-after", "gpu-1"))

    plugin = node.start().wait_ready()
    (event,) = [e for e in plugin.events() if e.get("event") == "checkpoint corrupt, moved aside"]
    aside = Path(event["moved_to"])
    assert aside.parent == node.state_dir
    assert aside.read_bytes() == garbage
    assert any("checkpoint was corrupt" in str(e.get("warning", "")) for e in plugin.events())
    assert node.claims() == {}

    plugin.prepare(claim)
    assert node.assert_consistent().keys() == {"uid-after"}
    plugin.unprepare(claim)
    plugin.stop()


# ---- 4. SIGTERM during a prepare: finished within the grace, or rolled back by the next start ----

MPS_DELAY_ENV = "GPU_DRA_FAKE_MPS_READY_DELAY_S"


def _prepare_in_background(plugin: Plugin, claim: dict[str, Any]) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []

    def call() -> None:
        try:
            uid = claim["metadata"]["uid"]
            outcome.append(plugin._call("prepare", [claim]).claims[uid].error or "ok")
        except grpc.RpcError as exc:
            outcome.append(f"rpc {exc.code().name}")

    thread = threading.Thread(target=call, name="prepare-during-sigterm")
    thread.start()
    return thread, outcome


def test_sigterm_lets_a_running_prepare_finish(nodes: Callable[..., Node]) -> None:
    """SIGTERM while an MPS prepare waits for its daemon: the call completes inside the grace,
    the plugin exits 0, and the claim is recorded as prepared. (The grace is generous so that a
    slow machine cannot turn this into the abandoned case below.)"""
    node = nodes("a100-40gb-x8", mps=True)
    claim = node.put(claim_for("uid-term", "gpu-2", [MPS_CONFIG]))
    plugin = node.start(extra_env={MPS_DELAY_ENV: "1.5", "SHUTDOWN_GRACE": "50"}).wait_ready()
    thread, outcome = _prepare_in_background(plugin, claim)
    poll(lambda: bool(node.mps_daemon_pids()), "the MPS daemon of the running prepare to start")
    plugin.stop()  # SIGTERM; must exit 0
    thread.join(TIMEOUT_S)
    assert outcome == ["ok"], plugin.output()
    assert node.claims()["uid-term"].state == PREPARE_COMPLETED
    plugin = node.start().wait_ready()
    assert node.assert_consistent().keys() == {"uid-term"}
    plugin.unprepare(claim)
    assert node.compute_modes() == {"DEFAULT"}
    plugin.stop()


def test_a_prepare_outlasting_the_grace_is_abandoned_and_rolled_back(nodes: Callable[..., Node]) -> None:
    """A prepare still running when the grace ends is left as kill -9 would leave it: the plugin
    exits 0 without it, the checkpoint says PrepareStarted, and the next start rolls it back."""
    node = nodes("a100-40gb-x8", mps=True)
    claim = node.put(claim_for("uid-slow", "gpu-2", [MPS_CONFIG]))
    # The daemon answers long after the grace ends, however fast or slow the machine is.
    plugin = node.start(extra_env={MPS_DELAY_ENV: "8", "SHUTDOWN_GRACE": "1"}).wait_ready()
    thread, outcome = _prepare_in_background(plugin, claim)
    poll(lambda: bool(node.mps_daemon_pids()), "the MPS daemon of the running prepare to start")
    (pid,) = node.mps_daemon_pids()
    plugin.stop()
    thread.join(TIMEOUT_S)
    assert outcome != ["ok"], plugin.output()
    assert node.claims()["uid-slow"].state == PREPARE_STARTED

    plugin = node.start().wait_ready()
    poll(lambda: not alive(pid), "the abandoned prepare's MPS daemon to be stopped")
    assert node.assert_consistent() == {}
    assert node.compute_modes() == {"DEFAULT"}
    plugin.stop()


# ---- fractional shares: one MPS daemon per GPU, kill -9 at every step ------------------------------

SHARE_POINTS = [
    "share-before-join",
    "mps-after-launch",
    "mps-after-ready",
    "share-after-join",
    "before-complete",
]


def share_claim(uid: str, device: str) -> dict[str, Any]:
    """A claim allocated a 10Gi share of ``device``, as the scheduler writes it."""
    claim = claim_for(uid, device)
    result = claim["status"]["allocation"]["devices"]["results"][0]
    result["shareID"] = f"0000000{len(uid)}-aaaa-4bbb-8ccc-{uid[-12:].rjust(12, '0')}"
    result["consumedCapacity"] = {"memory": "10Gi"}
    return claim


def share_members(node: Node) -> set[str]:
    return {p.name.split("_", 1)[0] for p in node.mps_root.glob("shared-*/members/*.json")}


@pytest.mark.parametrize("neighbour", [True, False], ids=["beside-a-share", "alone"])
@pytest.mark.parametrize("point", SHARE_POINTS)
def test_share_prepare_killed_at_every_step_leaves_no_daemon_without_a_share(
    nodes: Callable[..., Node], point: str, neighbour: bool
) -> None:
    """kill -9 inside the prepare of a share: after restart the interrupted share is gone, a
    neighbour share on the same GPU keeps its daemon (same pid) and its limits, a daemon nobody
    uses is stopped, and the share prepares again."""
    if neighbour and point in ("mps-after-launch", "mps-after-ready"):
        pytest.skip("beside a running daemon no daemon is launched")
    node = nodes("a100-40gb-x8", mps=True)
    keep = node.put(share_claim("uid-keep-000001", "gpu-0"))
    target = node.put(share_claim("uid-target-0002", "gpu-0"))
    before: list[int] = []
    if neighbour:
        plugin = node.start().wait_ready()
        plugin.prepare(keep)
        plugin.stop()
        before = node.mps_daemon_pids()
    node.start(crash_at=point, crash_claim="uid-target-0002").wait_ready().call_into_crash(
        "prepare", target, point
    )

    plugin = node.start().wait_ready()
    claims = node.assert_consistent()
    assert set(claims) == ({"uid-keep-000001"} if neighbour else set())
    assert share_members(node) == set(claims)
    started = node.mps_daemon_pids()
    if neighbour:
        assert started == before, "the neighbour's daemon is neither restarted nor doubled"
        assert alive(before[0])
        assert node.compute_modes() == {"EXCLUSIVE_PROCESS", "DEFAULT"}
    else:
        poll(lambda: not any(alive(p) for p in started), "the unused daemon to stop")
        assert node.compute_modes() == {"DEFAULT"}
        assert not node.mps_root.exists() or list(node.mps_root.iterdir()) == []

    (cdi_id,) = plugin.prepare(target)
    assert "-gpu-0-share-" in cdi_id
    assert share_members(node) == set(claims) | {"uid-target-0002"}
    plugin.unprepare(target)
    if neighbour:
        plugin.unprepare(keep)
    poll(lambda: not any(alive(p) for p in node.mps_daemon_pids()), "the last share's daemon to stop")
    assert node.compute_modes() == {"DEFAULT"}
    plugin.stop()


def test_share_unprepare_killed_after_leaving_is_finished_by_the_retry(nodes: Callable[..., Node]) -> None:
    """kill -9 after a share left its GPU but before its checkpoint entry went: the neighbour keeps
    the daemon, and the kubelet's retry of the unprepare finishes without touching it."""
    node = nodes("a100-40gb-x8", mps=True)
    keep = node.put(share_claim("uid-keep-000001", "gpu-0"))
    target = node.put(share_claim("uid-target-0002", "gpu-0"))
    plugin = node.start().wait_ready()
    plugin.prepare(keep)
    plugin.prepare(target)
    plugin.stop()
    (pid,) = node.mps_daemon_pids()
    point = "unprepare-after-share-leave"
    node.start(crash_at=point, crash_claim="uid-target-0002").wait_ready().call_into_crash(
        "unprepare", target, point
    )
    plugin = node.start().wait_ready()
    assert alive(pid)
    assert share_members(node) == {"uid-keep-000001"}
    plugin.unprepare(target)
    assert set(node.assert_consistent()) == {"uid-keep-000001"}
    assert alive(pid) and node.mps_daemon_pids() == [pid]
    plugin.unprepare(keep)
    poll(lambda: not alive(pid), "the last share's daemon to stop")
    plugin.stop()
