"""Run the real ``gpu-dra`` command with one named crash point armed: SIGKILL at an exact step.

Why: crash safety means "kill -9 at any step of a prepare or unprepare, restart, and the node is
consistent". Killing from outside at a wall-clock moment cannot hit "after the GI, before the CI"
reliably, and the product should carry no test hooks. So tests start the plugin as
``python -m tests.ground.crashpoints <gpu-dra args...>`` with ``GPU_DRA_TEST_CRASH_AT=<point>``:
this module wraps the one product function at that step so the process prints
``crashpoint reached: <point>`` and sends itself SIGKILL (no cleanup, no flush, no atexit - as
the OOM killer or a node problem would), then runs ``driver.cli.main`` unchanged. Without the
variable it is exactly ``gpu-dra``.

With ``GPU_DRA_TEST_CRASH_CLAIM=<uid>`` a point fires only inside a call for that claim (the
plugin binds ``claim="ns/name:uid"`` in structlog's context vars), so other claims can be
prepared by the same process first.

What it does not do: pick moments at random (tests kill from outside for that), or change
anything else about the plugin; it lives in tests/, the product carries no crash hook.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CRASH_ENV = "GPU_DRA_TEST_CRASH_AT"
#: Optional: fire only while the plugin handles this claim UID (other claims pass the step).
CLAIM_ENV = "GPU_DRA_TEST_CRASH_CLAIM"
REACHED = "crashpoint reached: "


@dataclass(frozen=True, slots=True)
class CrashPoint:
    """Kill the process ``when`` ("before"/"after") ``owner.method`` runs, if ``only`` accepts the call."""

    module: str
    owner: str
    method: str
    when: str
    only: Callable[..., bool] | None = None


def _started_with_mig(_self: Any, claim: Any) -> bool:
    return claim.state == "PrepareStarted" and any(d.mig is not None for d in claim.devices)


def _completed(_self: Any, claim: Any) -> bool:
    return bool(claim.state == "PrepareCompleted")


_MIG = "driver.nvml.mig"
_CP = "driver.checkpoint"
_CDI = "cdi.store"
_MPS = "sharing.mps"
_SHARED = "sharing.sharedmps"

#: The named steps, in the order a prepare (then an unprepare) passes them.
POINTS: dict[str, CrashPoint] = {
    # prepare
    "before-create": CrashPoint(_MIG, "NvmlMigBackend", "create_gi", "before"),
    "after-gi": CrashPoint(_MIG, "NvmlMigBackend", "create_gi", "after"),
    "after-ci": CrashPoint(_MIG, "NvmlMigBackend", "create_ci", "after"),
    "after-mig-record": CrashPoint(_CP, "CheckpointStore", "put", "after", _started_with_mig),
    "mps-after-launch": CrashPoint(_MPS, "MpsManager", "_launch", "after"),
    "mps-after-ready": CrashPoint(_MPS, "MpsManager", "_wait_ready", "after"),
    "ts-after-apply": CrashPoint("sharing.timeslicing", "TimeSlicer", "apply", "after"),
    "after-sharing": CrashPoint("driver.gpusharing", "GpuSharing", "apply", "after"),
    "share-before-join": CrashPoint(_SHARED, "SharedMps", "join", "before"),
    "share-after-join": CrashPoint(_SHARED, "SharedMps", "join", "after"),
    "after-cdi": CrashPoint(_CDI, "CdiStore", "write_claim_spec", "after"),
    "before-complete": CrashPoint(_CP, "CheckpointStore", "put", "before", _completed),
    "after-complete": CrashPoint(_CP, "CheckpointStore", "put", "after", _completed),
    # unprepare
    "unprepare-before-destroy": CrashPoint(_MIG, "NvmlMigBackend", "destroy_ci", "before"),
    "unprepare-after-ci-destroy": CrashPoint(_MIG, "NvmlMigBackend", "destroy_ci", "after"),
    "unprepare-after-gi-destroy": CrashPoint(_MIG, "NvmlMigBackend", "destroy_gi", "after"),
    "unprepare-after-mps-stop": CrashPoint(_MPS, "MpsManager", "stop", "after"),
    "unprepare-after-share-leave": CrashPoint(_SHARED, "SharedMps", "leave", "after"),
    "unprepare-after-cdi-remove": CrashPoint(_CDI, "CdiStore", "remove_claim_spec", "after"),
    "unprepare-before-checkpoint": CrashPoint(_CP, "CheckpointStore", "remove", "before"),
}


def die(point: str) -> None:
    """Say which point was reached (the test checks it), then SIGKILL this process."""
    sys.stdout.write(REACHED + point + "\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _handling(uid: str | None) -> bool:
    if uid is None:
        return True
    import structlog

    return str(structlog.contextvars.get_contextvars().get("claim", "")).endswith(":" + uid)


def arm(name: str, claim_uid: str | None = None) -> None:
    """Wrap the product function of crash point ``name`` (only for ``claim_uid`` when given)."""
    point = POINTS.get(name)
    if point is None:
        raise SystemExit(f"{CRASH_ENV}={name!r} is not a crash point; use one of {', '.join(POINTS)}")
    module = __import__(point.module, fromlist=[point.owner])
    owner = getattr(module, point.owner)
    original = getattr(owner, point.method)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        fire = _handling(claim_uid) and (point.only is None or point.only(self, *args, **kwargs))
        if fire and point.when == "before":
            die(name)
        result = original(self, *args, **kwargs)
        if fire and point.when == "after":
            die(name)
        return result

    setattr(owner, point.method, wrapper)


def main(argv: list[str]) -> int:
    """``gpu-dra`` with the crash point of ``$GPU_DRA_TEST_CRASH_AT`` (if any) armed."""
    name = os.environ.get(CRASH_ENV)
    if name:
        arm(name, os.environ.get(CLAIM_ENV) or None)
    from driver.cli import main as gpu_dra

    return gpu_dra(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
