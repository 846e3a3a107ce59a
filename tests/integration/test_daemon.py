"""`gpu-dra plugin` as a process: fake NVML, claims from files, no API server (--no-publish)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cdi.names import claim_spec_filename
from driver.checkpoint import CheckpointStore
from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc, registration_pb2, registration_pb2_grpc
from driver.nvml.fakestate import FakeState
from driver.nvml.topology import load_topology
from tests.ground.driverroot import make_fake_driver_root
from tests.integration.test_state import DRIVER, _started, make_claim

NODE = "node-d"
REPO = Path(__file__).resolve().parents[2]
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@dataclass
class Layout:
    base: Path
    registry: Path
    plugins: Path
    cdi: Path
    claims: Path
    driver_root: Path

    @property
    def state(self) -> Path:
        return self.plugins / DRIVER

    @property
    def reg_socket(self) -> Path:
        return self.registry / f"{DRIVER}-reg.sock"

    @property
    def dra_socket(self) -> Path:
        return self.state / "dra.sock"

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "driver",
            "plugin",
            "--node-name",
            NODE,
            "--nvml-backend",
            "fake",
            "--fake-topology",
            "a100-40gb-x8",
            "--no-publish",
            "--fake-claims-dir",
            str(self.claims),
            "--kubelet-registrar-directory-path",
            str(self.registry),
            "--kubelet-plugins-directory-path",
            str(self.plugins),
            "--cdi-root",
            str(self.cdi),
            "--driver-root",
            str(self.driver_root),
            "--dev-root",
            str(self.driver_root),
            "--log-format",
            "json",
            *extra,
        ]

    def put_claim(self, claim: dict[str, object]) -> None:
        meta = claim["metadata"]
        assert isinstance(meta, dict)
        path = self.claims / str(meta["namespace"]) / f"{meta['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(claim))


@contextlib.contextmanager
def temp_layout(prefix: str, gpus: int = 8) -> Iterator[Layout]:
    """Directories for one daemon node under a short /tmp path (Unix socket path limit)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    lay = Layout(
        base=base,
        registry=base / "reg",
        plugins=base / "plug",
        cdi=base / "cdi",
        claims=base / "claims",
        driver_root=base / "drv",
    )
    lay.registry.mkdir()
    make_fake_driver_root(lay.driver_root, range(gpus))
    try:
        yield lay
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def layout() -> Iterator[Layout]:
    with temp_layout("gdd-") as lay:
        yield lay


def start(layout: Layout, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        layout.argv(*extra), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_socket(proc: subprocess.Popen[str], path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"plugin exited with {proc.returncode} before {path} appeared:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout_s}s")
        time.sleep(0.02)


def prepare(layout: Layout, namespace: str, name: str, uid: str) -> dra_v1_pb2.NodePrepareResourcesResponse:
    with grpc.insecure_channel(f"unix://{layout.dra_socket}") as channel:
        response: dra_v1_pb2.NodePrepareResourcesResponse = dra_v1_pb2_grpc.DRAPluginStub(
            channel
        ).NodePrepareResources(
            dra_v1_pb2.NodePrepareResourcesRequest(
                claims=[dra_v1_pb2.Claim(namespace=namespace, name=name, uid=uid)]
            ),
            timeout=40,
        )
    return response


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"plugin did not exit after SIGTERM:\n{out}")
    return proc.returncode, out


def test_daemon_serves_reconciles_and_exits_cleanly_on_sigterm(layout: Layout) -> None:
    """Start-up rolls back a half-prepared claim and removes an orphan spec; prepare works over the
    socket; SIGTERM exits 0 and removes only the plugin's own sockets."""
    layout.state.mkdir(parents=True)
    leftover = CheckpointStore(layout.state / "checkpoint.json", BOOT_ID_PATH)
    leftover.startup()
    leftover.put(_started("uid-half", device="gpu-4"))
    layout.cdi.mkdir()
    (layout.cdi / claim_spec_filename("uid-half")).write_text("{}")
    orphan = layout.cdi / claim_spec_filename("uid-orphan")
    orphan.write_text("{}")
    foreign = layout.registry / "other.example.com-reg.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(foreign))
    s.close()

    claim = make_claim("uid-1", [("gpu", "gpu-3")], namespace="team-a", name="train")
    claim["status"]["allocation"]["devices"]["results"][0]["pool"] = NODE
    layout.put_claim(claim)

    proc = start(layout)
    wait_for_socket(proc, layout.reg_socket)
    try:
        assert layout.dra_socket.exists()  # the DRA socket came first
        # The name appears only once the socket listens: a fail-fast first call is answered, and
        # the dot name it was bound under is gone.
        with grpc.insecure_channel(f"unix://{layout.reg_socket}") as channel:
            info = registration_pb2_grpc.RegistrationStub(channel).GetInfo(
                registration_pb2.InfoRequest(), timeout=10, wait_for_ready=False
            )
        assert [p.name for p in layout.registry.iterdir() if p.name.startswith(".")] == []
        assert info.endpoint == str(layout.dra_socket)
        # The first prepare waits at the start-up gate until reconcile is done.
        resp = prepare(layout, "team-a", "train", "uid-1")
        assert not orphan.exists()
        assert not (layout.cdi / claim_spec_filename("uid-half")).exists()
        assert CheckpointStore(layout.state / "checkpoint.json", BOOT_ID_PATH).get("uid-half") is None
        assert resp.claims["uid-1"].error == ""
        assert list(resp.claims["uid-1"].devices[0].cdi_device_ids) == [
            "k8s.gpu.nvidia.com/claim=uid-1-gpu-3"
        ]
        assert (layout.cdi / claim_spec_filename("uid-1")).exists()
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert not layout.reg_socket.exists()
    assert not layout.dra_socket.exists()
    assert foreign.exists()
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events.index("DRA service listening") < events.index("registration socket ready")
    assert events.index("start-up reconcile done") < events.index("plugin ready")
    assert events[-1] == "stopped"
    # What was prepared stays prepared across a plugin restart (the kubelet still uses it).
    assert (layout.cdi / claim_spec_filename("uid-1")).exists()


def test_invalid_configuration_exits_2_naming_the_problem(layout: Layout) -> None:
    """A bad flag combination is reported at once with the flag to fix; exit code 2."""
    argv = [a for a in layout.argv() if a != "--no-publish"]
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--kubeconfig / KUBECONFIG" in proc.stderr


def test_kubelet_is_answered_while_nvml_is_not_ready_and_prepares_wait_for_it(layout: Layout) -> None:
    """Registration needs no GPU: GetInfo is answered while NVML init still fails; a prepare sent
    meanwhile waits at the start-up gate and succeeds once discovery and reconcile are done."""
    fake_state = layout.base / "fake-nvml.json"
    FakeState.create(fake_state, load_topology("a100-40gb-x8"), NODE)
    with FakeState(fake_state).edit() as doc:
        doc["faults"] = [{"op": "nvmlInit", "code": 1, "times": 2}]  # NVML_ERROR_UNINITIALIZED
    claim = make_claim("uid-w", [("gpu", "gpu-0")], namespace="team-b", name="wait")
    claim["status"]["allocation"]["devices"]["results"][0]["pool"] = NODE
    layout.put_claim(claim)

    proc = start(layout, "--fake-state", str(fake_state))
    wait_for_socket(proc, layout.reg_socket)
    try:
        with grpc.insecure_channel(f"unix://{layout.reg_socket}") as channel:
            info = registration_pb2_grpc.RegistrationStub(channel).GetInfo(
                registration_pb2.InfoRequest(), timeout=10
            )
        assert info.name == DRIVER
        assert FakeState(fake_state).read()["faults"], "NVML came up before the kubelet was answered"
        resp = prepare(layout, "team-b", "wait", "uid-w")
        assert resp.claims["uid-w"].error == ""
        assert FakeState(fake_state).read()["faults"] == []
    finally:
        code, out = stop(proc)
    assert code == 0, out
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events.index("registration socket ready") < events.index("NVML not ready, retrying")
    assert events.index("plugin ready") < events.index("claim prepared")


def test_sigterm_releases_a_prepare_waiting_at_the_start_up_gate(layout: Layout) -> None:
    """A plugin stopped before NVML ever comes up answers the waiting call and exits 0 at once."""
    fake_state = layout.base / "fake-nvml.json"
    FakeState.create(fake_state, load_topology("a100-40gb-x8"), NODE)
    with FakeState(fake_state).edit() as doc:
        doc["faults"] = [{"op": "nvmlInit", "code": 1}]  # never ready
    claim = make_claim("uid-n", [("gpu", "gpu-0")], namespace="team-b", name="never")
    claim["status"]["allocation"]["devices"]["results"][0]["pool"] = NODE
    layout.put_claim(claim)
    proc = start(layout, "--fake-state", str(fake_state))
    wait_for_socket(proc, layout.reg_socket)
    errors: list[str] = []

    def call() -> None:
        try:
            resp = prepare(layout, "team-b", "never", "uid-n")
            errors.append(resp.claims["uid-n"].error)
        except grpc.RpcError as exc:
            errors.append(f"rpc {exc.code()}")

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the call is at the gate (no timing is asserted)
    code, out = stop(proc)
    caller.join(30)
    assert code == 0, out
    assert len(errors) == 1
    assert "stopping" in errors[0] or errors[0].startswith("rpc "), errors
    assert not layout.reg_socket.exists()
    assert not layout.dra_socket.exists()
