"""SharedMps: one daemon per GPU for every share on it, against the MPS and nvidia-smi stand-ins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cdi.spec import ContainerEdits
from sharing.errors import MpsError
from sharing.mps import MpsManager
from sharing.sharedmps import Share, SharedMps
from tests.unit.sharing.conftest import GPU_UUIDS, FakeGpu, alive, daemon_pids

GPU = GPU_UUIDS[0]


def shared(fake: FakeGpu) -> SharedMps:
    return SharedMps(MpsManager(fake.mps_root, fake.mps_control, fake.env, 10, stop_timeout_s=5))


def share(claim: str, sid: str, memory_mib: int | None = 10240, threads: int = 25, gpu: str = GPU) -> Share:
    return Share(claim, sid, "gpu-0", gpu, memory_mib, threads)


def env_of(edits: ContainerEdits) -> dict[str, str]:
    return dict(e.split("=", 1) for e in edits.env)


def status(fake: FakeGpu, pipe_dir: Path) -> dict[str, object]:
    out = subprocess.run(
        [str(fake.mps_control)],
        input="get_status\n",
        env={**fake.env, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def client(
    fake: FakeGpu,
    edits: ContainerEdits,
    pipe_dir: Path,
    wanted: str,
    *,
    env: dict[str, str] | None = None,
    hold: float = 0,
) -> subprocess.Popen[str]:
    """A fake CUDA program in a share's container: its env from the CDI edits (pipe dir as on the host)."""
    container_env = {**env_of(edits), "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir), **(env or {})}
    return subprocess.Popen(
        [str(fake.mps_control), "--fake-client", wanted, "--hold", str(hold)],
        env={**fake.env, **container_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_shares_of_one_gpu_use_one_daemon_started_by_the_first_stopped_with_the_last(
    fake_gpu: FakeGpu,
) -> None:
    mps = shared(fake_gpu)
    daemon = mps.daemon(GPU)
    a, b = share("claim-a", "s1", 10240, 25), share("claim-b", "s2", 20480, 50)
    edits_a = mps.join(a)
    edits_b = mps.join(b)
    assert len(daemon_pids(fake_gpu)) == 1, "the second share joins the running daemon"
    assert fake_gpu.gpus()[GPU]["computeMode"] == "EXCLUSIVE_PROCESS"
    assert {s.share_id for s in mps.members(GPU)} == {"s1", "s2"}

    env = env_of(edits_a)
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=10240M"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"
    assert env["CUDA_MPS_LOG_DIRECTORY"] == "/var/log/nvidia-mps"
    mounts = {m.container_path: m.host_path for m in edits_a.mounts}
    assert mounts == {
        "/tmp/nvidia-mps": str(daemon.pipe_dir),
        "/var/log/nvidia-mps": str(daemon.log_dir),
        "/dev/shm": str(daemon.shm_dir),
    }
    assert {m.host_path for m in edits_b.mounts} == set(mounts.values()), "same daemon for both shares"
    # The daemon's ceiling is the largest share's threads: no client can ask for more.
    assert status(fake_gpu, daemon.pipe_dir)["percentage"] == 50.0

    pid = daemon_pids(fake_gpu)[0]
    mps.leave(a)
    assert alive(pid), "the other share still uses the daemon"
    assert [s.share_id for s in mps.members(GPU)] == ["s2"]
    mps.leave(b)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert not daemon.group_dir.exists()
    assert fake_gpu.gpus()[GPU]["computeMode"] == "DEFAULT"
    mps.leave(b)  # leaving twice is fine


def test_shares_on_two_gpus_get_two_daemons(fake_gpu: FakeGpu) -> None:
    mps = shared(fake_gpu)
    mps.join(share("claim-a", "s1"))
    mps.join(share("claim-b", "s2", gpu=GPU_UUIDS[1]))
    assert len(daemon_pids(fake_gpu)) == 2
    assert mps.gpus() == sorted(GPU_UUIDS[:2])
    mps.leave_claim("claim-a")
    mps.leave_claim("claim-b")
    assert mps.gpus() == []


def test_a_client_over_its_env_limit_is_refused_and_one_within_is_granted(fake_gpu: FakeGpu) -> None:
    mps = shared(fake_gpu)
    one = share("claim-a", "s1", 10240, 25)
    edits = mps.join(one)
    pipe = mps.daemon(GPU).pipe_dir
    over = client(fake_gpu, edits, pipe, "12Gi")
    out, err = over.communicate(timeout=30)
    assert over.returncode == 2, (out, err)
    assert "CUDA_ERROR_OUT_OF_MEMORY" in err and "client limit 10240M" in err
    within = client(fake_gpu, edits, pipe, "8Gi")
    out, err = within.communicate(timeout=30)
    assert within.returncode == 0, err
    assert out.strip() == "granted 8192M threads 25"
    mps.leave(one)


def test_a_client_that_raises_its_env_limit_is_terminated_by_enforce(fake_gpu: FakeGpu) -> None:
    mps = shared(fake_gpu)
    one = share("claim-a", "s1", 10240, 25)
    edits = mps.join(one)
    pipe = mps.daemon(GPU).pipe_dir
    # A hostile workload rewrites its environment: MPS itself then grants the memory.
    hostile = client(
        fake_gpu, edits, pipe, "12Gi", env={"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=40G"}, hold=60
    )
    assert hostile.stdout is not None
    assert hostile.stdout.readline().startswith("granted 12288M")

    def used(pid: int) -> int | None:
        out = subprocess.run(
            [str(fake_gpu.mps_control)],
            input=f"get_client_memory {pid}\n",
            env={**fake_gpu.env, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)},
            capture_output=True,
            text=True,
            check=False,
        )
        return int(out.stdout) if out.returncode == 0 else None

    terminated = mps.enforce(GPU, lambda pid: one if pid == hostile.pid else None, used)
    assert terminated == [hostile.pid]
    assert hostile.wait(timeout=30) == -signal.SIGKILL
    assert status(fake_gpu, pipe)["terminated"] == [hostile.pid]
    mps.leave(one)


def test_sweep_drops_unknown_shares_stops_unused_daemons_and_restarts_lost_ones(fake_gpu: FakeGpu) -> None:
    mps = shared(fake_gpu)
    mps.join(share("gone-claim", "s1"))
    mps.join(share("kept-claim", "s2", gpu=GPU_UUIDS[1]))
    pids = dict(zip((GPU, GPU_UUIDS[1]), daemon_pids(fake_gpu), strict=True))
    os.kill(pids[GPU_UUIDS[1]], signal.SIGKILL)  # the kept share's daemon dies with the node's plugin
    done = mps.sweep(lambda uid: uid == "kept-claim")
    assert f"stopped unused daemon of {GPU}" in done
    assert f"restarted daemon of {GPU_UUIDS[1]}" in done
    assert not mps.daemon(GPU).group_dir.exists()
    assert len(daemon_pids(fake_gpu)) == 3
    assert alive(daemon_pids(fake_gpu)[-1])
    assert status(fake_gpu, mps.daemon(GPU_UUIDS[1]).pipe_dir)["percentage"] == 25.0
    mps.leave_claim("kept-claim")


def test_names_that_could_escape_the_directory_are_refused(fake_gpu: FakeGpu) -> None:
    mps = shared(fake_gpu)
    with pytest.raises(MpsError, match="cannot name an MPS share file"):
        mps.join(share("../x", "s1"))
    assert not fake_gpu.mps_root.exists() or not any(fake_gpu.mps_root.iterdir())
