"""Watching the MPS control daemons of prepared claims: how many run, and which one died.

Why: a daemon that dies (OOM killer, a crash, someone's ``kill``) leaves its claim prepared and
its pods unable to start CUDA work, and nothing tells the cluster. Every ``interval_s`` the
checkpoint's MPS records are checked by pid and process start time (a recycled pid is not the
daemon); a daemon seen gone is reported once (a Node Event) and counted out of
``gpu_dra_mps_daemons``.

It only reads ``/proc``; restarting a daemon is left to unprepare/prepare (delete the pods).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import structlog

from sharing.mps import _proc_start_time

if TYPE_CHECKING:
    from driver.checkpoint import PreparedClaim

log = structlog.get_logger(__name__)

MPS_KIND = "mps"


def alive(pid: object, start_time: object) -> bool:
    """The recorded daemon still runs: its pid exists with the recorded start time (when known)."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # nothing recorded to check against; not evidence of death
    now = _proc_start_time(pid)
    if now is None:
        return False
    return not isinstance(start_time, int) or start_time == now


class MpsWatch:
    """Checks the daemons in a thread; ``running`` is the count of the last check."""

    def __init__(
        self,
        claims: Callable[[], Iterable[PreparedClaim]],
        on_died: Callable[[str, str, int | None], None],
        interval_s: float = 10.0,
    ) -> None:
        self._claims = claims
        self._on_died = on_died
        self._interval = interval_s
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.running = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mps-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # the watch must survive a bad read; it tries again next time
                log.exception("checking MPS daemons failed")

    def check(self) -> int:
        """One round: report newly dead daemons; return how many run."""
        running = 0
        live_groups = set()
        for claim in self._claims():
            for record in claim.sharing:
                if record.get("kind") != MPS_KIND:
                    continue
                group = str(record.get("groupId", ""))
                live_groups.add(group)
                if alive(record.get("pid"), record.get("startTime")):
                    running += 1
                    continue
                if group not in self._reported:
                    self._reported.add(group)
                    pid = record.get("pid")
                    log.warning(
                        "MPS control daemon died",
                        mps_group=group,
                        claim=f"{claim.namespace}/{claim.name}",
                        pid=pid,
                    )
                    self._on_died(
                        group, f"{claim.namespace}/{claim.name}", pid if isinstance(pid, int) else None
                    )
        self._reported &= live_groups  # an unprepared claim's daemon is forgotten
        self.running = running
        return running
