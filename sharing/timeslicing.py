"""Time-slicing of full GPUs, done the way NVIDIA's tools do it: through ``nvidia-smi``.

There is no public NVML call for the bare-metal compute time-slice, so NVIDIA's driver runs
``nvidia-smi -i <uuid> -c DEFAULT`` and then ``nvidia-smi compute-policy -i <uuid>
--set-timeslice <0..3>`` (0 Default, 1 Short, 2 Medium, 3 Long) from the driver root. We do the
same; the caller passes the path of that ``nvidia-smi`` and the environment to run it with
(e.g. ``LD_PRELOAD`` of the driver's ``libnvidia-ml.so.1``), merged over our own environment.

This module does not decide which GPUs to touch (MIG devices have no interval; GPUs still used by
another prepared claim are not reset): ``driver.state`` does. :class:`NvidiaSmi` is also what
``sharing.mps`` uses to switch compute modes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from sharing.config import INTERVALS, TimeSlicingConfig
from sharing.errors import CommandError, ConfigError

log = structlog.get_logger(__name__)

COMPUTE_MODES = ("DEFAULT", "EXCLUSIVE_PROCESS", "PROHIBITED")


class NvidiaSmi:
    """Runs ``nvidia-smi`` for the two settings the driver changes: compute mode and time-slice."""

    def __init__(
        self, nvidia_smi: Path, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
    ) -> None:
        self.path = nvidia_smi
        self.env = {**os.environ, **(env or {})}
        self.timeout_s = timeout_s

    def run(self, args: Sequence[str]) -> str:
        """Run ``nvidia-smi args...``; return stdout.

        Raises:
            CommandError: it could not be started, timed out or exited non-zero (stderr kept).
        """
        argv = [str(self.path), *args]
        try:
            proc = subprocess.run(
                argv, env=self.env, capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(
                argv, None, str(exc), hint=f"check that {self.path} exists in the driver root and runs"
            ) from exc
        if proc.returncode != 0:
            raise CommandError(
                argv, proc.returncode, proc.stderr or proc.stdout, hint="the GPU setting was not changed"
            )
        return proc.stdout

    def set_compute_mode(self, uuid: str, mode: str) -> None:
        """``nvidia-smi -i <uuid> -c <mode>``."""
        if mode not in COMPUTE_MODES:
            raise ValueError(f"compute mode {mode!r} is not one of {', '.join(COMPUTE_MODES)}")
        self.run(["-i", uuid, "-c", mode])
        log.info("compute mode set", gpu=uuid, mode=mode)

    def set_timeslice(self, uuid: str, level: int) -> None:
        """``nvidia-smi compute-policy -i <uuid> --set-timeslice <level>``."""
        if level not in INTERVALS.values():
            raise ValueError(f"time-slice level {level!r} is not one of 0..3")
        self.run(["compute-policy", "-i", uuid, "--set-timeslice", str(level)])
        log.info("time-slice set", gpu=uuid, level=level)


def interval_level(interval: str | int | TimeSlicingConfig) -> int:
    """``Long`` / ``3`` / ``TimeSlicingConfig(interval="Long")`` -> 3.

    Raises:
        ConfigError: not one of Default, Short, Medium, Long (or 0..3).
    """
    if isinstance(interval, TimeSlicingConfig):
        return interval.level
    if isinstance(interval, int) and not isinstance(interval, bool) and interval in INTERVALS.values():
        return interval
    if isinstance(interval, str) and interval in INTERVALS:
        return INTERVALS[interval]
    raise ConfigError(
        "sharing.timeSlicingConfig.interval",
        f"{interval!r} is not a valid interval; allowed values: {', '.join(INTERVALS)}",
    )


class TimeSlicer:
    """Applies and resets the time-slice of full GPUs."""

    def __init__(
        self, nvidia_smi: Path, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
    ) -> None:
        self.smi = NvidiaSmi(nvidia_smi, env, timeout_s)

    def apply(self, gpu_uuids: Sequence[str], interval: str | int | TimeSlicingConfig) -> None:
        """Set compute mode DEFAULT and the time-slice on each GPU.

        All or nothing: if one GPU fails, the GPUs already touched (and the failing one) are reset
        to DEFAULT + level 0 before the error is raised.

        Raises:
            ConfigError: the interval is invalid (nothing is run).
            CommandError: nvidia-smi failed; the message carries its stderr.
        """
        level = interval_level(interval)
        touched: list[str] = []
        try:
            for uuid in gpu_uuids:
                touched.append(uuid)
                self.smi.set_compute_mode(uuid, "DEFAULT")
                self.smi.set_timeslice(uuid, level)
        except CommandError:
            log.warning("time-slice apply failed; rolling back", gpus=touched)
            self._reset_quietly(touched)
            raise

    def reset(self, gpu_uuids: Sequence[str]) -> None:
        """Set compute mode DEFAULT and time-slice Default (0) on each GPU.

        Tries every GPU; raises the first failure afterwards so one bad GPU does not leave the others
        unreset.

        Raises:
            CommandError: nvidia-smi failed for at least one GPU.
        """
        first: CommandError | None = None
        for uuid in gpu_uuids:
            try:
                self.smi.set_compute_mode(uuid, "DEFAULT")
                self.smi.set_timeslice(uuid, 0)
            except CommandError as exc:
                log.warning("time-slice reset failed", gpu=uuid, error=str(exc))
                first = first or exc
        if first is not None:
            raise first

    def _reset_quietly(self, gpu_uuids: Sequence[str]) -> None:
        try:
            self.reset(gpu_uuids)
        except CommandError as exc:
            log.exception(
                "time-slice rollback incomplete; reset these GPUs by hand",
                gpus=list(gpu_uuids),
                error=str(exc),
            )
