"""TimeSlicer against the nvidia-smi stand-in and the fake GPU state."""

from __future__ import annotations

import pytest

from sharing.config import TimeSlicingConfig
from sharing.errors import CommandError, ConfigError
from sharing.timeslicing import NvidiaSmi, TimeSlicer, interval_level
from tests.unit.sharing.conftest import GPU_UUIDS, FakeGpu


def test_apply_sets_default_mode_then_timeslice_and_reset_restores(fake_gpu: FakeGpu) -> None:
    initial = fake_gpu.full_state()
    fake_gpu.state_file.write_text(fake_gpu.state_file.read_text().replace('"DEFAULT"', '"PROHIBITED"', 1))
    slicer = TimeSlicer(fake_gpu.nvidia_smi, fake_gpu.env)
    slicer.apply(GPU_UUIDS[:2], "Long")
    gpus = fake_gpu.gpus()
    assert [gpus[u]["timeslice"] for u in GPU_UUIDS] == [3, 3, 0]
    assert [gpus[u]["computeMode"] for u in GPU_UUIDS[:2]] == ["DEFAULT", "DEFAULT"]
    ops = [(e["op"], e["gpus"]) for e in fake_gpu.journal() if "op" in e]
    assert ops[:2] == [("compute-mode", [GPU_UUIDS[0]]), ("timeslice", [GPU_UUIDS[0]])]
    assert [e["argv"] for e in fake_gpu.journal()][1] == [
        "compute-policy",
        "-i",
        GPU_UUIDS[0],
        "--set-timeslice",
        "3",
    ]
    slicer.reset(GPU_UUIDS[:2])
    assert fake_gpu.full_state() == initial  # other keys kept, everything back


def test_interval_forms() -> None:
    assert interval_level("Medium") == 2
    assert interval_level(1) == 1
    assert interval_level(TimeSlicingConfig("Long")) == 3
    with pytest.raises(ConfigError, match="Default, Short, Medium, Long"):
        interval_level("Forever")


def test_invalid_interval_runs_nothing(fake_gpu: FakeGpu) -> None:
    with pytest.raises(ConfigError):
        TimeSlicer(fake_gpu.nvidia_smi, fake_gpu.env).apply(GPU_UUIDS, "Forever")
    assert fake_gpu.journal() == []


def test_failure_rolls_back_gpus_already_touched(fake_gpu: FakeGpu) -> None:
    initial = fake_gpu.gpus()
    env = {**fake_gpu.env, "GPU_DRA_FAKE_SMI_FAIL": "timeslice", "GPU_DRA_FAKE_SMI_FAIL_UUID": GPU_UUIDS[1]}
    with pytest.raises(CommandError) as info:
        TimeSlicer(fake_gpu.nvidia_smi, env).apply(GPU_UUIDS, "Short")
    assert "Insufficient Permissions" in str(info.value)
    assert GPU_UUIDS[1] in str(info.value)
    assert fake_gpu.gpus() == initial


def test_unknown_gpu_reports_stderr(fake_gpu: FakeGpu) -> None:
    with pytest.raises(CommandError, match="No devices were found"):
        TimeSlicer(fake_gpu.nvidia_smi, fake_gpu.env).apply(["GPU-nope"], "Short")


def test_missing_binary_is_a_clear_error(fake_gpu: FakeGpu) -> None:
    with pytest.raises(CommandError, match="driver root"):
        NvidiaSmi(fake_gpu.bin_dir / "absent").set_compute_mode(GPU_UUIDS[0], "DEFAULT")


def test_standin_rejects_unknown_arguments_like_the_real_one(fake_gpu: FakeGpu) -> None:
    with pytest.raises(CommandError) as info:
        NvidiaSmi(fake_gpu.nvidia_smi, fake_gpu.env).run(["--bogus"])
    assert info.value.returncode == 2
    assert "Invalid combination" in str(info.value)


def test_standin_lists_gpus_and_takes_indices(fake_gpu: FakeGpu) -> None:
    smi = NvidiaSmi(fake_gpu.nvidia_smi, fake_gpu.env)
    assert smi.run(["-L"]).splitlines()[2] == f"GPU 2: NVIDIA A100-SXM4-40GB (UUID: {GPU_UUIDS[2]})"
    smi.run(["-i", "2", "-c", "3"])
    assert fake_gpu.gpus()[GPU_UUIDS[2]]["computeMode"] == "EXCLUSIVE_PROCESS"
