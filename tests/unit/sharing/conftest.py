"""Fixtures: a fake GPU state file with the nvidia-smi / nvidia-cuda-mps-control stand-ins installed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ground.standins import install_standins, read_gpu_state, read_journal, standin_env

GPU_UUIDS = (
    "GPU-4f3a1c2e-0000-0000-0000-000000000000",
    "GPU-4f3a1c2e-0000-0000-0000-000000000001",
    "GPU-4f3a1c2e-0000-0000-0000-000000000002",
)
GPU_MEMORY = 40 * 1024**3  # A100-SXM4-40GB


@dataclass
class FakeGpu:
    state_file: Path
    bin_dir: Path
    mps_root: Path
    env: dict[str, str]

    @property
    def nvidia_smi(self) -> Path:
        return self.bin_dir / "nvidia-smi"

    @property
    def mps_control(self) -> Path:
        return self.bin_dir / "nvidia-cuda-mps-control"

    def gpus(self) -> dict[str, Any]:
        return read_gpu_state(self.state_file)

    def full_state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data

    def journal(self) -> list[dict[str, Any]]:
        return read_journal(self.state_file)


def make_fake_gpu(root: Path) -> FakeGpu:
    state = root / "state.json"
    initial = {
        "gpus": {
            uuid: {"computeMode": "DEFAULT", "timeslice": 0, "index": i, "name": "NVIDIA A100-SXM4-40GB"}
            for i, uuid in enumerate(GPU_UUIDS)
        },
        "other": {"kept": True},
    }
    state.write_text(json.dumps(initial))
    bin_dir = root / "bin"
    install_standins(bin_dir, state)
    return FakeGpu(state, bin_dir, root / "mps", standin_env(state))


def daemon_pids(fake: FakeGpu) -> list[int]:
    """Pids of the MPS stand-in daemons this fake GPU's journal saw start."""
    return [e["pid"] for e in fake.journal() if e.get("mode") == "daemon-start"]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def kill_leftover_daemons(fake: FakeGpu) -> None:
    """Kill stand-in daemons a failed test left behind (only ours: the cmdline is checked)."""
    for pid in daemon_pids(fake):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"nvidia-cuda-mps-control" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake_gpu(tmp_path: Path) -> Iterator[FakeGpu]:
    fake = make_fake_gpu(tmp_path)
    yield fake
    kill_leftover_daemons(fake)
