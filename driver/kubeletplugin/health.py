"""Liveness for the pod: the standard ``grpc.health.v1.Health/Check`` on a localhost TCP port.

Kubernetes' gRPC probe (``livenessProbe.grpc.port``) calls this. A check is answered SERVING only
when the plugin's own sockets work end to end, the way the kubelet would use them: ``GetInfo`` on
the registration socket and an empty ``NodePrepareResources`` on the DRA socket (NVIDIA's driver
checks the same two things). A wedged server thread pool therefore fails the probe.

The two health messages are tiny (one string in, one enum out), so they are encoded by hand
instead of depending on ``grpcio-health-checking``. Device health (``DRAResourceHealth``) is a
different service and not served here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog

from driver.errors import ConfigError
from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc, registration_pb2, registration_pb2_grpc
from driver.kubeletplugin.draservice import unix_target
from driver.kubeletplugin.sockets import SocketPaths

log = structlog.get_logger(__name__)

SERVICE = "grpc.health.v1.Health"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
NOT_SERVING = b"\x08\x02"  # HealthCheckResponse{status: NOT_SERVING}


def probe(paths: SocketPaths, timeout_s: float = 5.0) -> str | None:
    """Call both sockets once; None when both answer, else what failed."""
    try:
        with grpc.insecure_channel(unix_target(paths.registration)) as channel:
            info = registration_pb2_grpc.RegistrationStub(channel).GetInfo(
                registration_pb2.InfoRequest(), timeout=timeout_s
            )
        dra_socket = Path(info.endpoint) if info.endpoint else paths.registration
        with grpc.insecure_channel(unix_target(dra_socket)) as channel:
            dra_v1_pb2_grpc.DRAPluginStub(channel).NodePrepareResources(
                dra_v1_pb2.NodePrepareResourcesRequest(), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return None


class HealthServer:
    """The health service on ``<address>:<port>`` (port 0: any free port, see :attr:`port`).

    The chart listens on the pod's IP: the kubelet's ``grpc:`` probes call the pod there.
    """

    def __init__(self, paths: SocketPaths, port: int, address: str = "127.0.0.1") -> None:
        self._paths = paths
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
        handler = grpc.unary_unary_rpc_method_handler(
            self._check, request_deserializer=bytes, response_serializer=bytes
        )
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Check": handler})]
        )
        host = f"[{address}]" if ":" in address else address
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise ConfigError(
                f"--healthcheck-address / HEALTHCHECK_ADDRESS {address}:{port} cannot be listened on "
                f"({exc}); use an address of this host or pod, or -1 as the port to turn the service off"
            ) from exc
        self.address = address

    def _check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        problem = probe(self._paths)
        if problem is None:
            return SERVING
        log.warning("health check failed", problem=problem)
        return NOT_SERVING

    def start(self) -> None:
        """Start answering."""
        self._server.start()
        log.info("health service listening", address=self.address, port=self.port)

    def stop(self) -> None:
        """Stop answering."""
        self._server.stop(0.5).wait(1.5)
