"""MPS control daemons: one per config group, started on prepare, found again after a restart.

Where the daemon lives, and why
-------------------------------
NVIDIA's driver runs each group's daemon as a Kubernetes Deployment because a process started
inside the plugin's container dies with that container (the runtime kills the container's whole
PID namespace and cgroup), and the daemon must outlive plugin restarts and upgrades while
workloads use it. A pod per group costs RBAC for Deployments, an image pull and a scheduling and
kubelet round trip inside a prepare call (seconds), and a readiness path through the API server.

We run the daemon as a **host process that escapes the plugin's container** instead:

* :class:`MpsManager` launches ``nvidia-cuda-mps-control -d`` through a configurable ``launcher``
  argv prefix. In the node deployment (privileged, ``hostPID: true``) the prefix is
  ``nsenter --target 1 --mount --pid -- systemd-run --scope --collect --quiet
  --unit gpu-dra-mps-{group_id} --`` so the daemon is forked in the host's PID and mount namespaces,
  in a cgroup of its own, and survives the plugin container (kill -9 included). Paths given to
  the manager (root dir, the daemon binary) must then be valid on the host too; the plugin
  directory is mounted at the same path in and out of the container.
  In tests the prefix is empty: ``-d`` detaches into its own session (setsid), so kill -9 of the
  plugin process, or of its whole process group, leaves it running.
* Everything needed to find the daemon again lives on disk, under ``<root>/<group_id>/``:
  ``pipe/`` (its control socket and ``nvidia-cuda-mps-control.pid``), ``log/`` and ``shm/``. The
  record put into the checkpoint (:meth:`MpsDaemon.to_record`) holds the group id, directories,
  UUIDs, pid and process start time. Liveness is "the daemon answers on its pipe dir" (works
  whatever PID namespace the plugin is in); pid + start time only guard the last-resort SIGKILL so
  a recycled pid is never killed. :meth:`MpsManager.start` first asks the pipe dir, so a daemon
  started by a plugin that crashed before writing its checkpoint is adopted, never doubled.
* Shared memory: containers get the group's ``shm/`` dir bind-mounted at ``/dev/shm`` (NVIDIA's
  choice too). For the daemon's MPS servers to see the same ``/dev/shm``, the node launcher runs
  the daemon in a private mount namespace with that dir bound over ``/dev/shm`` (placeholder
  ``{shm_dir}`` in the launcher prefix); mounting a size-limited tmpfs on ``shm/`` is left to an
  optional ``mount_shm`` hook (needs CAP_SYS_ADMIN; the tests run without it).

Readiness is a bounded poll of ``get_default_active_thread_percentage`` over the pipe dir; the
wait holds no lock of this module, so prepares of other GPUs proceed meanwhile. Every failure
after something was changed (compute mode, daemon, directories) is rolled back before the error
is raised. This module does not decide which claims share a daemon (``sharing.config`` groups
them) and does not write checkpoints or CDI specs (``driver.state`` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cdi.atomicfile import write_atomic
from cdi.spec import ContainerEdits, Mount
from sharing.config import MpsConfig
from sharing.errors import CommandError, ConfigError, MpsError, MpsStartTimeoutError
from sharing.timeslicing import NvidiaSmi

log = structlog.get_logger(__name__)

PID_FILE = "nvidia-cuda-mps-control.pid"
#: The group's record, written before anything is changed, so a daemon whose starter died before
#: its caller recorded it is still found (:meth:`MpsManager.leftovers`) and stopped.
RECORD_FILE = "group.json"
CONTAINER_PIPE_DIR = "/tmp/nvidia-mps"  # noqa: S108 - path inside the container, MPS default
CONTAINER_SHM_DIR = "/dev/shm"  # noqa: S108 - the container's shm mount point
MOUNT_OPTIONS = ("rw", "nosuid", "nodev", "bind")
READY_PROBE = "get_default_active_thread_percentage"
RECORD_VERSION = 1


def mps_group_id(claim_uid: str, uuids: Sequence[str]) -> str:
    """NVIDIA's daemon id: ``<claimUID>-<first 5 hex of sha256(sorted UUIDs joined by ",")>``."""
    digest = hashlib.sha256(",".join(sorted(uuids)).encode()).hexdigest()[:5]
    return f"{claim_uid}-{digest}"


@dataclass(frozen=True, slots=True)
class MpsDaemon:
    """A running control daemon of one config group."""

    group_id: str
    group_dir: Path
    uuids: tuple[str, ...]
    pid: int | None
    start_time: int | None  # /proc/<pid>/stat field 22, to tell a recycled pid apart
    multi_user: bool = False

    @property
    def pipe_dir(self) -> Path:
        return self.group_dir / "pipe"

    @property
    def log_dir(self) -> Path:
        return self.group_dir / "log"

    @property
    def shm_dir(self) -> Path:
        return self.group_dir / "shm"

    @property
    def full_gpu_uuids(self) -> tuple[str, ...]:
        return full_gpus(self.uuids)

    def to_record(self) -> dict[str, Any]:
        """JSON-able record for the checkpoint; :meth:`MpsManager.find` takes it back."""
        return {
            "version": RECORD_VERSION,
            "groupId": self.group_id,
            "groupDir": str(self.group_dir),
            "uuids": list(self.uuids),
            "pid": self.pid,
            "startTime": self.start_time,
            "multiUser": self.multi_user,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> MpsDaemon:
        """Inverse of :meth:`to_record`.

        Raises:
            MpsError: the record is not one this module wrote.
        """
        try:
            return cls(
                group_id=str(record["groupId"]),
                group_dir=Path(record["groupDir"]),
                uuids=tuple(str(u) for u in record["uuids"]),
                pid=None if record.get("pid") is None else int(record["pid"]),
                start_time=None if record.get("startTime") is None else int(record["startTime"]),
                multi_user=bool(record.get("multiUser", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MpsError(
                f"MPS record {dict(record)!r} is malformed ({exc}); stop the daemon by hand"
            ) from exc

    def container_edits(self) -> ContainerEdits:
        """Env and bind mounts every container of the group gets (added to each device's CDI edits).

        Host paths are as this process sees them; ``cdi.edits.rewrite_host_root`` maps them when
        the plugin's view differs from the host's.
        """
        return ContainerEdits(
            env=(f"CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE_DIR}",),
            mounts=(
                Mount(str(self.pipe_dir), CONTAINER_PIPE_DIR, MOUNT_OPTIONS, "bind"),
                Mount(str(self.shm_dir), CONTAINER_SHM_DIR, MOUNT_OPTIONS, "bind"),
            ),
        )


def full_gpus(uuids: Sequence[str]) -> tuple[str, ...]:
    """The full-GPU UUIDs (``GPU-``); compute mode is a full-GPU setting, MIG UUIDs (``MIG-``) are skipped."""
    return tuple(u for u in uuids if not u.startswith("MIG-"))


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks, or None when it is gone, a zombie, or not visible here."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields after the last ")" are fixed.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _validate(
    group_id: str,
    ordered: Sequence[str],
    cfg: MpsConfig,
    device_memory: Mapping[str, int],
    compute_capability: Mapping[str, tuple[int, int]],
) -> dict[str, int]:
    """Everything checkable before touching anything; returns the pinned limits in MiB per UUID."""
    if not group_id or "/" in group_id or group_id.startswith("."):
        raise ValueError(f"MPS group id {group_id!r} must be a plain directory name")
    if not ordered:
        raise ValueError("an MPS group needs at least one device UUID")
    limits = cfg.pinned_limits_mib(ordered, device_memory)
    if cfg.multi_user:
        too_old = [u for u in ordered if compute_capability.get(u, (0, 0)) < (7, 0)]
        if too_old:
            raise ConfigError(
                "sharing.mpsConfig.multiUser",
                f"needs compute capability >= 7.0 (Volta or newer) on every device; {too_old} "
                "do not have it (or it is unknown); set multiUser: false or pick newer GPUs",
            )
    return limits


class MpsManager:
    """Starts, finds and stops MPS control daemons under ``root_dir``.

    Args:
        root_dir: host directory holding one ``<group_id>/{pipe,log,shm}`` per daemon.
        mps_control: ``nvidia-cuda-mps-control`` as this process runs it (client commands).
        env: environment for the tools, merged over ours (e.g. ``LD_LIBRARY_PATH`` of the driver root).
        nvidia_smi: ``nvidia-smi`` for compute modes (defaults to the one beside ``mps_control``).
        launcher: argv prefix for the daemon start (see the module docstring); ``{group_id}`` and
            ``{shm_dir}`` are substituted.
        daemon_binary: the daemon as the launcher sees it (defaults to ``mps_control``).
        mount_shm / unmount_shm: optional hooks to mount a tmpfs on the group's ``shm`` dir.
    """

    def __init__(
        self,
        root_dir: Path,
        mps_control: Path,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 10.0,
        *,
        nvidia_smi: Path | None = None,
        launcher: Sequence[str] = (),
        daemon_binary: Path | None = None,
        stop_timeout_s: float = 10.0,
        command_timeout_s: float = 10.0,
        mount_shm: Callable[[Path], None] | None = None,
        unmount_shm: Callable[[Path], None] | None = None,
    ) -> None:
        self.root_dir = root_dir
        self.mps_control = mps_control
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.command_timeout_s = command_timeout_s
        self.smi = NvidiaSmi(nvidia_smi or mps_control.with_name("nvidia-smi"), env)
        self.launcher = tuple(launcher)
        self.daemon_binary = daemon_binary or mps_control
        self.mount_shm = mount_shm
        self.unmount_shm = unmount_shm

    # -- public API ---------------------------------------------------------------------------

    def check(
        self,
        uuids: Sequence[str],
        cfg: MpsConfig,
        device_memory: Mapping[str, int],
        compute_capability: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """The checks :meth:`start` makes before changing anything, alone (nothing is run).

        Raises:
            ConfigError: the config does not fit these devices.
        """
        _validate("check", tuple(sorted(uuids)), cfg, device_memory, compute_capability or {})

    def start(
        self,
        group_id: str,
        uuids: Sequence[str],
        cfg: MpsConfig,
        device_memory: Mapping[str, int],
        compute_capability: Mapping[str, tuple[int, int]] | None = None,
    ) -> MpsDaemon:
        """Start (or adopt) the control daemon of a group and return once it answers.

        Validation comes first and changes nothing: pinned limits (<= device memory, keys name a
        device of the group), and ``multiUser`` needs compute capability >= 7.0 on every device
        (``compute_capability`` maps UUID -> (major, minor); a MIG UUID maps to its parent's).
        Then: directories, compute mode EXCLUSIVE_PROCESS on the full GPUs, ``-d`` (``-M`` for
        multiUser), a bounded wait until the daemon answers, the default thread percentage and the
        pinned limits. A daemon already answering on the group's pipe dir is adopted, not doubled.

        Raises:
            ConfigError: the config does not fit these devices (nothing changed).
            MpsStartTimeoutError: the daemon did not answer in time (everything rolled back).
            MpsError / CommandError: a step failed (everything rolled back).
        """
        ordered = tuple(sorted(uuids))
        limits = _validate(group_id, ordered, cfg, device_memory, compute_capability or {})
        daemon = MpsDaemon(group_id, self.root_dir / group_id, ordered, None, None, cfg.multi_user)
        bound = log.bind(mps_group=group_id, gpus=list(ordered))

        existing = self._answers(daemon.pipe_dir)
        created_dirs = not daemon.group_dir.exists()
        modes_set: list[str] = []
        try:
            for sub in (daemon.pipe_dir, daemon.log_dir, daemon.shm_dir):
                sub.mkdir(parents=True, exist_ok=True)
            write_atomic(daemon.group_dir / RECORD_FILE, json.dumps(daemon.to_record()))
            if created_dirs and self.mount_shm is not None:
                self.mount_shm(daemon.shm_dir)
            for uuid in daemon.full_gpu_uuids:
                modes_set.append(uuid)
                self.smi.set_compute_mode(uuid, "EXCLUSIVE_PROCESS")
            if existing:
                bound.info("mps daemon adopted")
            else:
                self._launch(daemon)
                self._wait_ready(daemon)
            if cfg.default_active_thread_percentage is not None:
                self._command(
                    daemon.pipe_dir,
                    f"set_default_active_thread_percentage {cfg.default_active_thread_percentage}",
                )
            for uuid, mib in limits.items():
                self._command(daemon.pipe_dir, f"set_default_device_pinned_mem_limit {uuid} {mib}M")
            self._command(daemon.pipe_dir, READY_PROBE)
            pid = self._read_pid(daemon.pipe_dir)
            started = MpsDaemon(
                group_id,
                daemon.group_dir,
                ordered,
                pid,
                None if pid is None else _proc_start_time(pid),
                cfg.multi_user,
            )
            (daemon.log_dir / "startup.log").write_text("startup complete\n")
        except BaseException as exc:
            bound.warning("mps start failed; rolling back", error=str(exc))
            if not existing:
                self._teardown(daemon, modes_set, remove_dirs=created_dirs)
            raise
        bound.info("mps daemon ready", pid=started.pid)
        return started

    def find(self, record: Mapping[str, Any]) -> MpsDaemon | None:
        """The daemon of ``record`` if it still answers on its pipe dir (pid refreshed), else None."""
        daemon = MpsDaemon.from_record(record)
        if not self._answers(daemon.pipe_dir):
            return None
        pid = self._read_pid(daemon.pipe_dir)
        start_time = None if pid is None else _proc_start_time(pid)
        if daemon.pid is not None and pid != daemon.pid:
            log.warning(
                "mps daemon pid changed since recorded",
                mps_group=daemon.group_id,
                recorded=daemon.pid,
                now=pid,
            )
        return MpsDaemon(daemon.group_id, daemon.group_dir, daemon.uuids, pid, start_time, daemon.multi_user)

    def stop(self, record: Mapping[str, Any]) -> None:
        """Stop the daemon of ``record``, restore compute mode DEFAULT, remove its directories.

        Idempotent: a missing group dir is a no-op; a daemon already gone is fine. The directories
        are removed last, so a failed compute-mode reset is retried by the next call.

        Raises:
            CommandError: the compute mode could not be restored (retry unprepare).
            MpsError: the daemon would not exit.
        """
        daemon = MpsDaemon.from_record(record)
        if not daemon.group_dir.exists():
            return
        self._stop_daemon(daemon)
        for uuid in daemon.full_gpu_uuids:
            self.smi.set_compute_mode(uuid, "DEFAULT")
        self._remove_dirs(daemon)
        log.info("mps daemon stopped", mps_group=daemon.group_id)

    def leftovers(self, prefix: str) -> list[dict[str, Any]]:
        """Records of the groups under the root whose id starts with ``prefix`` (``<claim UID>-``).

        A plugin killed inside :meth:`start`, or before its caller recorded the daemon, leaves a
        group nobody's record names; its undo finds it here and passes it to :meth:`stop`.
        """
        if not self.root_dir.is_dir():
            return []
        records: list[dict[str, Any]] = []
        for group_dir in sorted(self.root_dir.glob(f"{prefix}*")):
            try:
                record = json.loads((group_dir / RECORD_FILE).read_text())
            except FileNotFoundError:
                continue  # not started by this version, or killed before anything was changed
            except (OSError, ValueError) as exc:
                log.warning("mps group record unreadable", group_dir=str(group_dir), error=str(exc))
                continue
            if isinstance(record, dict) and record.get("groupId") == group_dir.name:
                records.append(record)
        return records

    def sweep_unrecorded(self, min_age_s: float = 60.0) -> list[Path]:
        """Remove group directories that never got their record and no daemon answers in.

        :meth:`start` creates the directories and then writes the record; a kill -9 in between
        leaves a directory nothing names (and for MPS on MIG, one per new MIG UUID). One younger
        than ``min_age_s`` may be another plugin instance's start in progress, so it is left.
        """
        if not self.root_dir.is_dir():
            return []
        removed: list[Path] = []
        now = time.time()
        for group_dir in sorted(p for p in self.root_dir.iterdir() if p.is_dir()):
            if (group_dir / RECORD_FILE).exists():
                continue
            try:
                age = now - group_dir.stat().st_mtime
            except OSError:
                continue
            if age < min_age_s or self._answers(group_dir / "pipe"):
                continue
            if self.unmount_shm is not None and (group_dir / "shm").exists():
                self.unmount_shm(group_dir / "shm")
            shutil.rmtree(group_dir, ignore_errors=True)
            removed.append(group_dir)
            log.info("removed mps group directory without a record", group_dir=str(group_dir))
        return removed

    # -- internals ----------------------------------------------------------------------------

    def _tool_env(self, daemon: MpsDaemon) -> dict[str, str]:
        return {
            **self.env,
            "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(daemon.log_dir),
        }

    def _launch(self, daemon: MpsDaemon) -> None:
        prefix = [p.format(group_id=daemon.group_id, shm_dir=daemon.shm_dir) for p in self.launcher]
        argv = [*prefix, str(self.daemon_binary), "-d", *(["-M"] if daemon.multi_user else [])]
        env = {**self._tool_env(daemon), "CUDA_VISIBLE_DEVICES": ",".join(daemon.uuids)}
        try:
            # -d forks the daemon into its own session and returns; the pipes close when it detaches.
            proc = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.command_timeout_s,
                start_new_session=True,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(argv, None, str(exc), hint="check the MPS daemon binary and launcher") from exc
        if proc.returncode != 0:
            raise CommandError(
                argv, proc.returncode, proc.stderr, hint="the MPS control daemon did not start"
            )

    def _wait_ready(self, daemon: MpsDaemon) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        delay = 0.02
        while True:
            if self._answers(daemon.pipe_dir):
                return
            if time.monotonic() >= deadline:
                raise MpsStartTimeoutError(
                    f"MPS control daemon for group {daemon.group_id} did not answer within "
                    f"{self.ready_timeout_s:g}s (pipe dir {daemon.pipe_dir}); "
                    f"see {daemon.log_dir}/control.log; "
                    "the claim is retried by the kubelet"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _control(
        self, pipe_dir: Path, command: str, timeout_s: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        # One client process per command, as NVIDIA's tooling pipes them in.
        argv = [str(self.mps_control)]
        env = {**self.env, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)}
        try:
            return subprocess.run(
                argv,
                input=command + "\n",
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s or self.command_timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError([*argv, f"<<< {command}"], None, str(exc)) from exc

    def _command(self, pipe_dir: Path, command: str) -> str:
        proc = self._control(pipe_dir, command)
        if proc.returncode != 0:
            raise CommandError(
                [str(self.mps_control), f"<<< {command}"],
                proc.returncode,
                proc.stderr or proc.stdout,
                hint="the MPS control daemon refused the setting",
            )
        return proc.stdout

    def _answers(self, pipe_dir: Path) -> bool:
        if not pipe_dir.is_dir():
            return False
        try:
            return (
                self._control(pipe_dir, READY_PROBE, timeout_s=min(self.command_timeout_s, 5.0)).returncode
                == 0
            )
        except CommandError:
            return False

    @staticmethod
    def _read_pid(pipe_dir: Path) -> int | None:
        try:
            return int((pipe_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _stop_daemon(self, daemon: MpsDaemon, pid_grace_s: float = 0.0) -> None:
        """Ask the daemon to quit; kill it by pid only if it will not (and the pid is provably its)."""
        pid = self._read_pid(daemon.pipe_dir)
        grace_end = time.monotonic() + pid_grace_s
        while pid is None and time.monotonic() < grace_end:
            # A just-launched daemon writes its pid file a moment after -d returns.
            time.sleep(0.02)
            pid = self._read_pid(daemon.pipe_dir)
        if pid is None:
            pid = daemon.pid
        start_time = None if pid is None else _proc_start_time(pid)
        recycled = daemon.start_time is not None and pid == daemon.pid and start_time != daemon.start_time
        if recycled:
            pid, start_time = None, None  # the recorded pid now belongs to another process

        def gone() -> bool:
            return (start_time is None or _proc_start_time(pid or 0) != start_time) and not self._answers(
                daemon.pipe_dir
            )

        if self._answers(daemon.pipe_dir):
            with contextlib.suppress(CommandError):
                self._control(daemon.pipe_dir, "quit")
            deadline = time.monotonic() + self.stop_timeout_s
            while time.monotonic() < deadline:
                if gone():
                    return
                time.sleep(0.05)
        elif start_time is None:
            return  # nothing answers and no live process of ours: already stopped
        if pid is not None and start_time is not None and _proc_start_time(pid) == start_time:
            log.warning("mps daemon does not quit; killing it", mps_group=daemon.group_id, pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + self.stop_timeout_s
            while _proc_start_time(pid) == start_time and time.monotonic() < deadline:
                time.sleep(0.02)
        if gone():
            return
        raise MpsError(
            f"MPS control daemon of group {daemon.group_id} (pid {pid}) did not exit within "
            f"{self.stop_timeout_s:g}s; stop it by hand (echo quit | nvidia-cuda-mps-control with "
            f"CUDA_MPS_PIPE_DIRECTORY={daemon.pipe_dir}) and retry"
        )

    def _teardown(self, daemon: MpsDaemon, modes_set: Sequence[str], remove_dirs: bool) -> None:
        """Best-effort rollback of a failed start; logs what it could not undo."""
        try:
            self._stop_daemon(daemon, pid_grace_s=1.0)
        except (MpsError, CommandError) as exc:
            log.exception("mps rollback: daemon left running", mps_group=daemon.group_id, error=str(exc))
        for uuid in modes_set:
            try:
                self.smi.set_compute_mode(uuid, "DEFAULT")
            except CommandError as exc:
                log.exception("mps rollback: compute mode not restored", gpu=uuid, error=str(exc))
        if remove_dirs:
            self._remove_dirs(daemon)

    def _remove_dirs(self, daemon: MpsDaemon) -> None:
        if self.unmount_shm is not None and daemon.shm_dir.exists():
            self.unmount_shm(daemon.shm_dir)
        shutil.rmtree(daemon.group_dir, ignore_errors=True)
