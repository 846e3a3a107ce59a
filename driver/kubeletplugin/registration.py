"""The kubelet plugin-registration handshake (``pluginregistration.Registration``).

The kubelet dials the registration socket, calls ``GetInfo`` (1 s deadline) and then reports
the outcome with ``NotifyRegistrationStatus``. The answer names the DRA socket and the DRA gRPC
services this plugin serves, ``v1.DRAPlugin`` first because the kubelet takes the first entry
it knows.

This module does not serve DRA calls; it only answers the handshake and remembers its outcome.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import structlog

from driver.kubeletapi import registration_pb2, registration_pb2_grpc

log = structlog.get_logger(__name__)

PLUGIN_TYPE = "DRAPlugin"
DRA_SERVICES: tuple[str, ...] = ("v1.DRAPlugin", "v1beta1.DRAPlugin")


class RegistrationServicer(registration_pb2_grpc.RegistrationServicer):
    """Answers ``GetInfo`` and records ``NotifyRegistrationStatus``."""

    def __init__(self, driver_name: str, dra_endpoint: Path, extra_services: Sequence[str] = ()) -> None:
        """Args:
        driver_name: the DRA driver name the kubelet registers the plugin under.
        dra_endpoint: absolute path of the DRA service socket.
        extra_services: further advertised services (e.g. ``v1alpha1.DRAResourceHealth``).
        """
        self._info = registration_pb2.PluginInfo(
            type=PLUGIN_TYPE,
            name=driver_name,
            endpoint=str(dra_endpoint),
            supported_versions=[*DRA_SERVICES, *extra_services],
        )
        self._registered = threading.Event()
        self.last_error = ""

    @property
    def registered(self) -> threading.Event:
        """Set once the kubelet reported a successful registration."""
        return self._registered

    def GetInfo(
        self, request: registration_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> registration_pb2.PluginInfo:
        """Tell the kubelet who we are and where the DRA service listens."""
        log.debug("registration info requested", endpoint=self._info.endpoint)
        return self._info

    def NotifyRegistrationStatus(
        self, request: registration_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> registration_pb2.RegistrationStatusResponse:
        """Record the kubelet's verdict; a refusal is answered with an error, as the Go helper does."""
        if request.plugin_registered:
            self.last_error = ""
            self._registered.set()
            log.info(
                "registered with kubelet",
                driver=self._info.name,
                services=list(self._info.supported_versions),
            )
            return registration_pb2.RegistrationStatusResponse()
        self.last_error = request.error
        self._registered.clear()
        log.error("kubelet refused registration", driver=self._info.name, error=request.error)
        context.abort(grpc.StatusCode.UNKNOWN, f"plugin registration failed: {request.error}")
        raise AssertionError("unreachable: context.abort raises")
