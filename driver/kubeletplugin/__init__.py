"""The kubelet-facing half of the plugin, a port of the Go ``kubeletplugin`` helper.

:class:`KubeletPlugin` owns the two sockets and their gRPC servers. Start order matters: the DRA
service listens first, and only then does the registration socket appear, so by the time the
kubelet sees the plugin its endpoint already answers. Stop runs the other way round: the
registration socket goes first (the kubelet deregisters the instance), then the DRA server.

Nothing here knows about GPUs; the work is done by a :class:`~.draservice.ClaimPreparer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import structlog

from driver.kubeletapi import registration_pb2_grpc
from driver.kubeletplugin.draservice import DraService, dra_handlers, serve
from driver.kubeletplugin.registration import RegistrationServicer
from driver.kubeletplugin.sockets import (
    OwnedSocket,
    SocketPaths,
    prepare_socket_path,
    restrict_socket,
    staging_path,
)

log = structlog.get_logger(__name__)

__all__ = ["KubeletPlugin", "SocketPaths"]


class KubeletPlugin:
    """The DRA gRPC server plus the registration server, started and stopped in the right order."""

    def __init__(
        self,
        driver_name: str,
        paths: SocketPaths,
        service: DraService,
        *,
        extra_handlers: Sequence[Callable[[grpc.Server], None]] = (),
        extra_services: Sequence[str] = (),
        max_workers: int = 16,
    ) -> None:
        """Args:
        driver_name: DRA driver name sent in GetInfo.
        paths: where the two sockets go.
        service: the DRA node service core.
        extra_handlers: more servicers on the DRA socket (e.g. resource health).
        extra_services: the service names those add to GetInfo's supported_versions.
        max_workers: gRPC worker threads on the DRA socket (concurrent kubelet calls).
        """
        self.paths = paths
        self.service = service
        self.registration = RegistrationServicer(driver_name, paths.dra, extra_services)
        self._extra_handlers = list(extra_handlers)
        self._max_workers = max_workers
        self._dra_server: grpc.Server | None = None
        self._reg_server: grpc.Server | None = None
        self._owned: list[OwnedSocket] = []

    def start(self) -> None:
        """Listen on the DRA socket, then create the registration socket."""
        self._dra_server = self._listen(
            self.paths.dra, [*dra_handlers(self.service), *self._extra_handlers], self._max_workers
        )
        log.info("DRA service listening", socket=str(self.paths.dra))
        registration = self.registration
        self._reg_server = self._listen(
            self.paths.registration,
            [lambda s: registration_pb2_grpc.add_RegistrationServicer_to_server(registration, s)],
            2,
            appear_when_listening=True,
        )
        log.info("registration socket ready", socket=str(self.paths.registration))

    def _listen(
        self,
        path: Path,
        handlers: Sequence[Callable[[grpc.Server], None]],
        workers: int,
        *,
        appear_when_listening: bool = False,
    ) -> grpc.Server:
        """Serve on ``path``. ``appear_when_listening``: bind under a dot name (the kubelet's
        plugin watcher skips dot files) and rename it into place once it listens and has its
        mode, so the kubelet's first connect, made as soon as the name appears, never finds a
        socket that is bound but not yet listening."""
        prepare_socket_path(path, own_dir=path == self.paths.dra)
        bind_at = staging_path(path) if appear_when_listening else path
        if bind_at != path:
            prepare_socket_path(bind_at)  # left by a start killed between bind and rename
        owned = OwnedSocket(path)
        server = serve(bind_at, handlers, workers)
        restrict_socket(bind_at)
        if bind_at != path:
            bind_at.rename(path)
        owned.mark_bound()
        self._owned.append(owned)
        return server

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace_s``, remove our sockets only.

        Both servers stop at once (new calls are refused from here on); the wait is for the calls
        already running, so an idle plugin stops in milliseconds. A call still running after the
        grace is cancelled towards the kubelet and its thread is not waited for.
        """
        servers = [server for server in (self._reg_server, self._dra_server) if server is not None]
        stopped = [server.stop(grace_s) for server in servers]
        deadline = time.monotonic() + grace_s + 0.5
        for done in stopped:
            done.wait(max(0.0, deadline - time.monotonic()))
        self._reg_server = self._dra_server = None
        for owned in reversed(self._owned):
            if owned.remove():
                log.info("removed socket", socket=str(owned.path))
        self._owned.clear()
        self.service.close()
