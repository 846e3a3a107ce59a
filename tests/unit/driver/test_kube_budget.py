"""A hung API server: the claim GET ends inside its budget with a temporary error (issue 17).

The server here accepts connections and reads requests but never answers, as a SIGSTOPped API
server does. Once a prepare blocked 40 s on it (urllib3's hidden retries: four 10 s attempts),
close to the kubelet's 45 s deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.errors import TemporaryClaimError
from driver.kube import CLAIM_FETCH_BUDGET_S, Kube
from driver.kubeletplugin.claims import ClaimRef, KubeClaimSource, fetch_allocated


class HungServer:
    """Accepts TCP connections on loopback, counts the requests, never replies."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        data = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            data += chunk
            while b"\r\n\r\n" in data:
                _head, data = data.split(b"\r\n\r\n", 1)
                self.requests += 1

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def hung(tmp_path: Path) -> Iterator[tuple[HungServer, Path]]:
    server = HungServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{server.port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
    )
    yield server, kubeconfig
    server.close()


def test_a_hung_server_gets_one_attempt_and_a_temporary_error(hung: tuple[HungServer, Path]) -> None:
    server, kubeconfig = hung
    kube = Kube.from_config(kubeconfig, request_timeout_s=0.5)
    with pytest.raises(TemporaryClaimError, match="could not fetch ResourceClaim default/c"):
        fetch_allocated(KubeClaimSource(kube), ClaimRef("default", "c", "uid-1"))
    # One request reached the server: no hidden client retries multiply the wait.
    assert server.requests == 1


def test_the_budget_bounds_the_whole_fetch_not_each_attempt(hung: tuple[HungServer, Path]) -> None:
    """A per-request timeout larger than the budget does not stretch the fetch beyond the budget."""
    _server, kubeconfig = hung
    kube = Kube.from_config(kubeconfig, request_timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(Exception, match=r"could not reach the API server|time budget is spent"):
        kube.get_resource_claim("default", "c", budget_s=0.5)
    # Functional bound, not a speed target: without the budget this call takes the full 30 s.
    assert time.monotonic() - started < 10.0
    assert CLAIM_FETCH_BUDGET_S <= 20.0  # well inside the kubelet's 45 s
