"""An API server outage, as the plugin sees it, against the real API server (issue 17).

The plugin's client talks through a TCP relay the test can cut: while cut, every connection is
reset (a killed or unreachable API server); the server itself keeps running for the other tests.
During the outage the node's slices are deleted by someone else, and claim GETs must end with a
temporary error instead of hanging. Once, after a 90 s outage the deleted slices came back only
35 s after the server returned (a 60 s backoff cap); now they return within a few seconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes import client as kclient

from driver.errors import TemporaryClaimError
from driver.inventory import DRIVER_NAME
from driver.kube import Kube
from driver.kubeletplugin.claims import ClaimRef, KubeClaimSource, fetch_allocated
from driver.resourceslices import BACKOFF_MAX_S, SlicePublisher
from tests.ground.controlplane import ControlPlane
from tests.unit.driver.test_resourceslices import a100_inventory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTAGE_S = 35.0
#: The requirement: slices are back within a few seconds of the server (one capped retry plus a
#: sync). With the old 60 s cap, after this outage the next retry was over 30 s away.
RETURN_BOUND_S = 12.0


class Relay:
    """A TCP relay to ``upstream``; :meth:`cut` resets every connection until :meth:`restore`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST: connection refused as far as the client can tell
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.down = True
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def relay(control_plane: ControlPlane) -> Iterator[Relay]:
    url = urlparse(control_plane.server)
    r = Relay((url.hostname or "127.0.0.1", int(url.port or 443)))
    yield r
    r.close()


@pytest.fixture
def relayed_kube(control_plane: ControlPlane, relay: Relay, tmp_path: Path) -> Kube:
    config: dict[str, Any] = yaml.safe_load(control_plane.kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
    path = tmp_path / "relayed.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return Kube.from_config(path)


def test_outage_gives_temporary_errors_and_slices_return_within_seconds(
    control_plane: ControlPlane, relay: Relay, relayed_kube: Kube, kube_client: kclient.ApiClient
) -> None:
    node = control_plane.create_node(f"outage-{uuid.uuid4().hex[:8]}")["metadata"]["name"]
    admin = Kube.from_config(control_plane.kubeconfig)
    assert BACKOFF_MAX_S * 1.2 < RETURN_BOUND_S
    publisher = SlicePublisher(relayed_kube, node, DRIVER_NAME)
    try:
        publisher.start(a100_inventory(2))
        assert publisher.wait_synced(60), publisher.last_error
        assert len(admin.list_slices(DRIVER_NAME, node)) == 1

        relay.cut()
        started = time.monotonic()
        with pytest.raises(TemporaryClaimError, match="could not fetch ResourceClaim default/outage"):
            fetch_allocated(KubeClaimSource(relayed_kube), ClaimRef("default", "outage", "uid-outage"))
        for s in admin.list_slices(DRIVER_NAME, node):  # deleted behind the plugin's back
            admin.delete_slice(s["metadata"]["name"], s["metadata"]["uid"], "")
        # The publisher's watch broke with the cut: it retries, backing off, for the whole outage.
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
        assert admin.list_slices(DRIVER_NAME, node) == []

        relay.restore()
        assert wait_for(lambda: len(admin.list_slices(DRIVER_NAME, node)) == 1, RETURN_BOUND_S), (
            f"slices not back within {RETURN_BOUND_S:.0f}s of the server's return; last error "
            f"{publisher.last_error}"
        )
    finally:
        publisher.stop()
