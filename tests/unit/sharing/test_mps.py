"""MpsManager against the nvidia-cuda-mps-control and nvidia-smi stand-ins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sharing.config import MIB, MpsConfig
from sharing.errors import CommandError, ConfigError, MpsStartTimeoutError
from sharing.mps import MpsDaemon, MpsManager, mps_group_id
from tests.unit.sharing.conftest import GPU_MEMORY, GPU_UUIDS, FakeGpu, alive, daemon_pids

GIB = 1024**3
MEMORY = dict.fromkeys(GPU_UUIDS, GPU_MEMORY)
REPO = Path(__file__).resolve().parents[3]


def manager(fake: FakeGpu, env: dict[str, str] | None = None, ready_timeout_s: float = 10) -> MpsManager:
    return MpsManager(fake.mps_root, fake.mps_control, env or fake.env, ready_timeout_s, stop_timeout_s=5)


def daemon_status(fake: FakeGpu, daemon: MpsDaemon) -> dict[str, object]:
    out = subprocess.run(
        [str(fake.mps_control)],
        input="get_status\n",
        env={**fake.env, "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe_dir)},
        capture_output=True,
        text=True,
        check=True,
    )
    status: dict[str, object] = json.loads(out.stdout)
    return status


def client_commands(fake: FakeGpu) -> list[str]:
    return [e["command"] for e in fake.journal() if e.get("mode") == "client"]


def test_group_id_follows_nvidia() -> None:
    gid = mps_group_id("uid-1", ["GPU-b", "GPU-a"])
    assert gid == mps_group_id("uid-1", ["GPU-a", "GPU-b"])
    assert gid.startswith("uid-1-")
    assert len(gid) == len("uid-1-") + 5


def test_start_configures_daemon_and_stop_restores(fake_gpu: FakeGpu) -> None:
    initial = fake_gpu.full_state()
    mgr = manager(fake_gpu)
    cfg = MpsConfig(default_active_thread_percentage=33, default_pinned_device_memory_limit=5 * GIB)
    daemon = mgr.start("claim-abcde", GPU_UUIDS[:2], cfg, MEMORY)

    gpus = fake_gpu.gpus()
    assert [gpus[u]["computeMode"] for u in GPU_UUIDS] == [
        "EXCLUSIVE_PROCESS",
        "EXCLUSIVE_PROCESS",
        "DEFAULT",
    ]
    assert daemon.pid is not None and alive(daemon.pid)
    assert daemon.pipe_dir.is_dir() and daemon.log_dir.is_dir() and daemon.shm_dir.is_dir()
    status = daemon_status(fake_gpu, daemon)
    assert status["devices"] == list(GPU_UUIDS[:2])
    assert status["percentage"] == 33.0
    assert status["limits"] == {GPU_UUIDS[0]: "5120M", GPU_UUIDS[1]: "5120M"}
    assert status["multiUser"] is False
    commands = client_commands(fake_gpu)
    assert "set_default_active_thread_percentage 33" in commands
    assert f"set_default_device_pinned_mem_limit {GPU_UUIDS[0]} 5120M" in commands
    invoke = [e for e in fake_gpu.journal() if e.get("mode") == "invoke"]
    assert invoke[0]["argv"] == ["-d"]
    assert invoke[0]["visibleDevices"] == ",".join(GPU_UUIDS[:2])

    edits = daemon.container_edits()
    assert edits.env == ("CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps",)
    assert {(m.host_path, m.container_path, m.options) for m in edits.mounts} == {
        (str(daemon.pipe_dir), "/tmp/nvidia-mps", ("rw", "nosuid", "nodev", "bind")),
        (str(daemon.shm_dir), "/dev/shm", ("rw", "nosuid", "nodev", "bind")),
    }
    assert edits.device_nodes == ()

    record = json.loads(json.dumps(daemon.to_record()))
    mgr.stop(record)
    assert not alive(daemon.pid)
    assert not daemon.group_dir.exists()
    assert fake_gpu.full_state() == initial
    mgr.stop(record)  # idempotent


def test_start_is_idempotent_and_find_sees_the_daemon(fake_gpu: FakeGpu) -> None:
    mgr = manager(fake_gpu)
    first = mgr.start("g1", GPU_UUIDS[:1], MpsConfig(), MEMORY)
    again = mgr.start("g1", GPU_UUIDS[:1], MpsConfig(), MEMORY)
    assert again.pid == first.pid
    assert len(daemon_pids(fake_gpu)) == 1
    found = manager(fake_gpu).find(first.to_record())
    assert found == first
    mgr.stop(first.to_record())
    assert manager(fake_gpu).find(first.to_record()) is None


def test_never_ready_times_out_and_leaves_nothing(fake_gpu: FakeGpu) -> None:
    initial = fake_gpu.full_state()
    env = {**fake_gpu.env, "GPU_DRA_FAKE_MPS_NEVER_READY": "1"}
    with pytest.raises(MpsStartTimeoutError, match=r"did not answer within 0\.5s"):
        manager(fake_gpu, env, ready_timeout_s=0.5).start("g2", GPU_UUIDS, MpsConfig(), MEMORY)
    pids = daemon_pids(fake_gpu)
    assert len(pids) == 1
    assert not alive(pids[0])
    assert not (fake_gpu.mps_root / "g2").exists()
    assert fake_gpu.full_state() == initial


def test_refused_setting_rolls_back(fake_gpu: FakeGpu) -> None:
    initial = fake_gpu.full_state()
    env = {**fake_gpu.env, "GPU_DRA_FAKE_MPS_FAIL_COMMAND": "set_default_device_pinned_mem_limit"}
    with pytest.raises(CommandError, match="injected"):
        manager(fake_gpu, env).start(
            "g3", GPU_UUIDS[:1], MpsConfig(default_pinned_device_memory_limit=GIB), MEMORY
        )
    assert not any(alive(p) for p in daemon_pids(fake_gpu))
    assert not (fake_gpu.mps_root / "g3").exists()
    assert fake_gpu.full_state() == initial


def test_compute_mode_failure_rolls_back_earlier_gpus(fake_gpu: FakeGpu) -> None:
    initial = fake_gpu.full_state()
    env = {
        **fake_gpu.env,
        "GPU_DRA_FAKE_SMI_FAIL": "compute-mode",
        "GPU_DRA_FAKE_SMI_FAIL_UUID": GPU_UUIDS[1],
    }
    with pytest.raises(CommandError, match="Insufficient Permissions"):
        manager(fake_gpu, env).start("g4", GPU_UUIDS, MpsConfig(), MEMORY)
    assert fake_gpu.full_state() == initial
    assert daemon_pids(fake_gpu) == []


@pytest.mark.parametrize(
    ("cfg", "path"),
    [
        (
            MpsConfig(default_pinned_device_memory_limit=41 * GIB),
            "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit",
        ),
        (
            MpsConfig(default_per_device_pinned_memory_limit=(("7", MIB),)),
            "sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.7",
        ),
        (MpsConfig(multi_user=True), "sharing.mpsConfig.multiUser"),
    ],
)
def test_invalid_for_these_devices_changes_nothing(fake_gpu: FakeGpu, cfg: MpsConfig, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        manager(fake_gpu).start("g5", GPU_UUIDS[:1], cfg, MEMORY, {GPU_UUIDS[0]: (6, 0)})
    assert info.value.path == path
    assert fake_gpu.journal() == []
    assert not (fake_gpu.mps_root / "g5").exists()


def test_multi_user_passes_dash_m(fake_gpu: FakeGpu) -> None:
    mgr = manager(fake_gpu)
    daemon = mgr.start("g6", GPU_UUIDS[:1], MpsConfig(multi_user=True), MEMORY, {GPU_UUIDS[0]: (8, 0)})
    assert daemon_status(fake_gpu, daemon)["multiUser"] is True
    mgr.stop(daemon.to_record())


def test_mig_group_leaves_compute_mode_alone(fake_gpu: FakeGpu) -> None:
    initial = fake_gpu.full_state()
    mig = "MIG-11111111-2222-3333-4444-555555555555"
    mgr = manager(fake_gpu)
    daemon = mgr.start("g7", [mig], MpsConfig(default_pinned_device_memory_limit=GIB), {mig: 5 * GIB})
    assert fake_gpu.full_state() == initial
    assert daemon_status(fake_gpu, daemon)["limits"] == {mig: "1024M"}
    mgr.stop(daemon.to_record())
    assert not any(e.get("tool") == "nvidia-smi" for e in fake_gpu.journal())


_STARTER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from sharing.config import MpsConfig
    from sharing.mps import MpsManager
    root, ctl, out, uuids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    mgr = MpsManager(Path(root), Path(ctl), ready_timeout_s=10)
    daemon = mgr.start("survivor", uuids, MpsConfig(default_active_thread_percentage=33), {})
    Path(out).write_text(json.dumps(daemon.to_record()))
    time.sleep(3600)
    """
)


def test_daemon_survives_kill_9_of_the_plugin_and_is_not_started_twice(
    fake_gpu: FakeGpu, tmp_path: Path
) -> None:
    record_file = tmp_path / "record.json"
    plugin = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _STARTER,
            str(fake_gpu.mps_root),
            str(fake_gpu.mps_control),
            str(record_file),
            ",".join(GPU_UUIDS[:1]),
        ],
        env={**fake_gpu.env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        start_new_session=True,  # its own process group: kill -9 of the group = the container dying
    )
    try:
        for _ in range(600):
            if record_file.exists() or plugin.poll() is not None:
                break
            time.sleep(0.05)
        assert record_file.exists(), "the plugin stand-in never started the daemon"
    finally:
        os.killpg(plugin.pid, signal.SIGKILL)
        plugin.wait()

    record = json.loads(record_file.read_text())
    assert alive(record["pid"])
    mgr = manager(fake_gpu)
    found = mgr.find(record)
    assert found is not None
    assert found.pid == record["pid"]
    assert daemon_status(fake_gpu, found)["percentage"] == 33.0
    # The restarted plugin prepares the same claim again: adopted, not doubled.
    again = mgr.start("survivor", GPU_UUIDS[:1], MpsConfig(default_active_thread_percentage=33), MEMORY)
    assert again.pid == record["pid"]
    assert len(daemon_pids(fake_gpu)) == 1
    assert fake_gpu.gpus()[GPU_UUIDS[0]]["computeMode"] == "EXCLUSIVE_PROCESS"

    mgr.stop(record)
    assert not alive(record["pid"])
    assert fake_gpu.gpus()[GPU_UUIDS[0]]["computeMode"] == "DEFAULT"


def test_sweep_removes_old_group_dirs_without_a_record_only(fake_gpu: FakeGpu) -> None:
    """Issue 17: a start killed between mkdir and its record left a directory nothing names (for
    MPS on MIG one per new MIG UUID); start-up removes it, but not a young one (another instance
    may be starting it) nor one with a record."""
    from sharing.mps import RECORD_FILE

    mgr = MpsManager(fake_gpu.mps_root, fake_gpu.mps_control, fake_gpu.env)
    old, young, recorded = (fake_gpu.mps_root / n for n in ("uid-a-11111", "uid-b-22222", "uid-c-33333"))
    for group in (old, young, recorded):
        (group / "pipe").mkdir(parents=True)
    (recorded / RECORD_FILE).write_text("{}")
    past = time.time() - 3600
    for group in (old, recorded):
        os.utime(group, (past, past))
    assert mgr.sweep_unrecorded() == [old]
    assert not old.exists()
    assert young.exists()
    assert recorded.exists()
