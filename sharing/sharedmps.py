"""One MPS control daemon per GPU, shared by every share (consumable-capacity claim) on it.

Why per GPU and not per claim: shares of one GPU come from unrelated claims in any namespace, and
MPS clients can only run side by side on a GPU through *one* control daemon (the GPU is in
EXCLUSIVE_PROCESS mode, so a second daemon's server could not open it). The first share starts
the daemon, every later one joins it, the last one stops it.

On disk, under ``<root>/shared-<GPU UUID>/``: ``pipe/``, ``log/``, ``shm/`` as for per-claim
daemons (``sharing.mps``), ``group.json`` (the daemon's record, written before anything is
started) and ``members/<claim UID>_<share id>.json``, one file per share holding its limits. The
member files are the reference count: written (atomically) before the daemon is started or
joined, removed on unprepare, and the daemon is stopped when none is left. So after a kill -9 at
any step the directory says what to keep: a daemon without a member file is stopped by
:meth:`SharedMps.sweep` at start-up, a member whose claim the checkpoint does not know is
removed, and a member of a prepared claim whose daemon died gets the daemon back.

Limits. Each share's container gets ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (the memory it was
allocated) and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (its compute share) in its environment.
NVIDIA's MPS documentation says a client's thread percentage only further constrains the one the
control daemon sets, while the pinned-memory variable is the client's own setting and the
daemon's ``set_default_device_pinned_mem_limit`` / ``set_device_pinned_mem_limit <server PID>``
act per MPS *server*, which all shares of one user id share. So the daemon's default thread
percentage is set to the largest share's (a client cannot go above it), and memory is enforced
per client by :meth:`SharedMps.enforce`: clients over the memory of their share are terminated
(``terminate_client``). The caller maps a client PID to its share (by cgroup).

Callers hold the GPU's lock (``driver.state.DeviceLocks``) around every call of one GPU. This
module never imports ``driver``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cdi.atomicfile import write_atomic
from cdi.spec import ContainerEdits, Mount
from sharing.errors import CommandError, MpsError
from sharing.mps import (
    CONTAINER_PIPE_DIR,
    CONTAINER_SHM_DIR,
    MOUNT_OPTIONS,
    RECORD_FILE,
    MpsDaemon,
    MpsManager,
)

log = structlog.get_logger(__name__)

KIND = "mps-share"
PREFIX = "shared-"
MEMBERS = "members"
CONTAINER_LOG_DIR = "/var/log/nvidia-mps"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class Share:
    """One share of a GPU: whose it is and what it may use."""

    claim_uid: str
    share_id: str
    device: str
    gpu_uuid: str
    memory_mib: int | None  # None: no memory limit (mode unlimited without a request)
    thread_percentage: int

    @property
    def member_name(self) -> str:
        return f"{self.claim_uid}_{self.share_id}.json"

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "claimUid": self.claim_uid,
            "shareId": self.share_id,
            "device": self.device,
            "gpuUuid": self.gpu_uuid,
            "memoryMiB": self.memory_mib,
            "threadPercentage": self.thread_percentage,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Share:
        """Inverse of :meth:`to_record`.

        Raises:
            MpsError: the record is not one this module wrote.
        """
        try:
            memory = record.get("memoryMiB")
            return cls(
                claim_uid=str(record["claimUid"]),
                share_id=str(record["shareId"]),
                device=str(record["device"]),
                gpu_uuid=str(record["gpuUuid"]),
                memory_mib=None if memory is None else int(memory),
                thread_percentage=int(record["threadPercentage"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MpsError(f"MPS share record {dict(record)!r} is malformed ({exc})") from exc

    def env(self) -> tuple[str, ...]:
        out = [
            f"CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE_DIR}",
            f"CUDA_MPS_LOG_DIRECTORY={CONTAINER_LOG_DIR}",
            f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={self.thread_percentage}",
        ]
        if self.memory_mib is not None:
            # The container sees one GPU, and MPS numbers the server's devices from 0.
            out.append(f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={self.memory_mib}M")
        return tuple(out)


def _check_name(what: str, value: str) -> None:
    if not _SAFE.match(value) or len(value) > 128:
        raise MpsError(f"{what} {value!r} cannot name an MPS share file (letters, digits, '_', '.', '-')")


class SharedMps:
    """Joins shares to their GPU's control daemon and leaves them; sweeps after crashes."""

    def __init__(self, manager: MpsManager) -> None:
        self._mps = manager

    @property
    def root(self) -> Path:
        return self._mps.root_dir

    def daemon(self, gpu_uuid: str) -> MpsDaemon:
        """The (possibly not running) shared daemon of ``gpu_uuid``."""
        _check_name("GPU UUID", gpu_uuid)
        group = f"{PREFIX}{gpu_uuid}"
        return MpsDaemon(group, self.root / group, (gpu_uuid,), None, None)

    def members(self, gpu_uuid: str) -> list[Share]:
        """The shares recorded on ``gpu_uuid`` (unreadable member files are skipped, and logged)."""
        directory = self.daemon(gpu_uuid).group_dir / MEMBERS
        out: list[Share] = []
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                out.append(Share.from_record(json.loads(path.read_text())))
            except (OSError, ValueError, MpsError) as exc:
                log.warning("mps share member unreadable", path=str(path), error=str(exc))
        return out

    def gpus(self) -> list[str]:
        """GPU UUIDs that have a shared-daemon directory."""
        if not self.root.is_dir():
            return []
        return sorted(p.name.removeprefix(PREFIX) for p in self.root.glob(f"{PREFIX}*") if p.is_dir())

    # -- join / leave ---------------------------------------------------------------------------

    def join(self, share: Share) -> ContainerEdits:
        """Record ``share`` and make sure its GPU's daemon runs and allows its threads.

        Raises:
            MpsError / CommandError: the daemon could not be started or told (the share's member
                file is removed again, and a daemon started here is stopped).
        """
        _check_name("claim UID", share.claim_uid)
        _check_name("share id", share.share_id)
        daemon = self.daemon(share.gpu_uuid)
        members = daemon.group_dir / MEMBERS
        before = max((s.thread_percentage for s in self.members(share.gpu_uuid)), default=0)
        members.mkdir(parents=True, exist_ok=True)
        write_atomic(members / share.member_name, json.dumps(share.to_record()))
        try:
            started = self._ensure_running(daemon)
            if started or share.thread_percentage > before:
                self._set_ceiling(daemon)
        except BaseException:
            self.leave(share)
            raise
        log.info(
            "mps share joined",
            gpu=share.gpu_uuid,
            share=share.share_id,
            memory_mib=share.memory_mib,
            threads=share.thread_percentage,
            members=len(self.members(share.gpu_uuid)),
        )
        return self.container_edits(share)

    def leave(self, share: Share) -> None:
        """Forget ``share``; the last share of a GPU stops its daemon. A share never joined is fine.

        Raises:
            MpsError / CommandError: the daemon would not stop or compute mode not reset (retry).
        """
        daemon = self.daemon(share.gpu_uuid)
        with contextlib.suppress(FileNotFoundError):
            (daemon.group_dir / MEMBERS / share.member_name).unlink()
        self._stop_if_unused(daemon)

    def leave_claim(self, claim_uid: str) -> None:
        """Forget every share of ``claim_uid`` on every GPU (rollback of a half-done prepare)."""
        for gpu in self.gpus():
            for share in self.members(gpu):
                if share.claim_uid == claim_uid:
                    self.leave(share)
            self._stop_if_unused(self.daemon(gpu))

    def container_edits(self, share: Share) -> ContainerEdits:
        """What a container of ``share`` gets: the daemon's pipe, log and shm dirs, and its limits."""
        daemon = self.daemon(share.gpu_uuid)
        return ContainerEdits(
            env=share.env(),
            mounts=(
                Mount(str(daemon.pipe_dir), CONTAINER_PIPE_DIR, MOUNT_OPTIONS, "bind"),
                Mount(str(daemon.log_dir), CONTAINER_LOG_DIR, MOUNT_OPTIONS, "bind"),
                Mount(str(daemon.shm_dir), CONTAINER_SHM_DIR, MOUNT_OPTIONS, "bind"),
            ),
        )

    # -- start-up ------------------------------------------------------------------------------

    def sweep(self, is_prepared: Callable[[str], bool], gpus: Iterable[str] | None = None) -> list[str]:
        """After a restart: drop members whose claim is not prepared, stop daemons nobody uses,
        restart the daemon of a GPU whose prepared shares lost it. Returns what was done.
        """
        done: list[str] = []
        for gpu in sorted(gpus) if gpus is not None else self.gpus():
            daemon = self.daemon(gpu)
            if not daemon.group_dir.exists():
                continue
            for share in self.members(gpu):
                if not is_prepared(share.claim_uid):
                    with contextlib.suppress(FileNotFoundError):
                        (daemon.group_dir / MEMBERS / share.member_name).unlink()
                    done.append(f"dropped share {share.share_id} of unknown claim {share.claim_uid}")
            if not self.members(gpu):
                self._stop_if_unused(daemon)
                done.append(f"stopped unused daemon of {gpu}")
            elif not self._mps._answers(daemon.pipe_dir):
                log.warning("shared mps daemon gone while shares hold the GPU; starting it again", gpu=gpu)
                self._ensure_running(daemon)
                self._set_ceiling(daemon)
                done.append(f"restarted daemon of {gpu}")
        return done

    # -- enforcement ---------------------------------------------------------------------------

    def enforce(
        self, gpu_uuid: str, share_of: Callable[[int], Share | None], used_mib: Callable[[int], int | None]
    ) -> list[int]:
        """Terminate every client of ``gpu_uuid``'s daemon that uses more memory than its share.

        ``share_of(pid)`` maps a client to its share (None: not ours - left alone and logged);
        ``used_mib(pid)`` is the client's device memory (None: unknown). Returns the pids terminated.
        """
        daemon = self.daemon(gpu_uuid)
        terminated: list[int] = []
        if not self._mps._answers(daemon.pipe_dir):
            return terminated
        for server in _pids(self._mps._command(daemon.pipe_dir, "get_server_list")):
            clients = _pids(self._mps._command(daemon.pipe_dir, f"get_client_list {server}"))
            for client in clients:
                share = share_of(client)
                used = used_mib(client)
                if share is None:
                    log.warning("mps client of no known share", gpu=gpu_uuid, pid=client)
                    continue
                if share.memory_mib is None or used is None or used <= share.memory_mib:
                    continue
                log.warning(
                    "mps client over its share's memory; terminating it",
                    gpu=gpu_uuid,
                    pid=client,
                    used_mib=used,
                    limit_mib=share.memory_mib,
                    claim_uid=share.claim_uid,
                    share=share.share_id,
                )
                self._mps._command(daemon.pipe_dir, f"terminate_client {server} {client}")
                terminated.append(client)
        return terminated

    # -- internals -----------------------------------------------------------------------------

    def _ensure_running(self, daemon: MpsDaemon) -> bool:
        """Start the daemon unless it answers; True when it was started here."""
        if self._mps._answers(daemon.pipe_dir):
            return False
        for sub in (daemon.pipe_dir, daemon.log_dir, daemon.shm_dir):
            sub.mkdir(parents=True, exist_ok=True)
        write_atomic(daemon.group_dir / RECORD_FILE, json.dumps(daemon.to_record()))
        self._mps.smi.set_compute_mode(daemon.uuids[0], "EXCLUSIVE_PROCESS")
        try:
            self._mps._launch(daemon)
            self._mps._wait_ready(daemon)
        except BaseException:
            with contextlib.suppress(MpsError, CommandError):
                self._mps._stop_daemon(daemon, pid_grace_s=1.0)
            raise
        log.info("shared mps daemon started", gpu=daemon.uuids[0], pid=self._mps._read_pid(daemon.pipe_dir))
        return True

    def _set_ceiling(self, daemon: MpsDaemon) -> None:
        """The daemon's thread percentage is the largest share's: no client can ask for more."""
        shares = self.members(daemon.uuids[0])
        if not shares:
            return
        ceiling = max(s.thread_percentage for s in shares)
        self._mps._command(daemon.pipe_dir, f"set_default_active_thread_percentage {ceiling}")
        # The default reaches servers started later; a running server is told on its own.
        for server in _pids(self._mps._command(daemon.pipe_dir, "get_server_list")):
            self._mps._command(daemon.pipe_dir, f"set_active_thread_percentage {server} {ceiling}")

    def _stop_if_unused(self, daemon: MpsDaemon) -> None:
        if not daemon.group_dir.exists() or self.members(daemon.uuids[0]):
            return
        # A daemon launched just before a crash writes its pid file a moment later: wait for it.
        self._mps._stop_daemon(daemon, pid_grace_s=1.0)
        self._mps.smi.set_compute_mode(daemon.uuids[0], "DEFAULT")
        if self._mps.unmount_shm is not None and daemon.shm_dir.exists():
            self._mps.unmount_shm(daemon.shm_dir)
        shutil.rmtree(daemon.group_dir, ignore_errors=True)
        log.info("shared mps daemon stopped, last share gone", gpu=daemon.uuids[0])


def _pids(text: str) -> list[int]:
    return [int(word) for word in text.split() if word.isdigit()]
