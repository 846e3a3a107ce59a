"""TCP relays between the host's network namespace and a test node's private one.

Why: a real node runs in a network namespace of its own, so nothing it does (bridges, veths,
routes, pod addresses) reaches the host. Two paths must still cross:

* node -> API server: the kubelet's kubeconfig names ``https://127.0.0.1:<port>`` and pods use
  the in-cluster address ``10.96.0.1:443``. :class:`Relay` listens on those addresses *inside*
  the node's namespace and connects to the API server on the host's loopback (a stand-in for
  kube-proxy).
* API server -> kubelet (``kubectl exec``, logs): the API server sends its cluster traffic through
  an egress proxy (``EgressSelectorConfiguration``, HTTP CONNECT over a Unix socket, the mechanism
  Konnectivity uses). :class:`EgressProxy` answers CONNECTs to a registered node address by dialing
  it from inside that node's namespace; other destinations are dialed from the host.

A socket belongs to the network namespace it was created in, so both create their sockets on a
short-lived thread that has joined the node's namespace with ``setns(2)`` (only that thread moves;
the test process stays where it is). No interface, route or address is added on the host.

What it does not do: UDP, or any load balancing: one destination per listening address.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_BUF = 65536


def _setns(fd: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)} (needs CAP_SYS_ADMIN)")


def in_netns(netns: Path, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that has joined the network namespace ``netns`` (e.g. /proc/PID/ns/net)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(netns, os.O_RDONLY)
            try:
                _setns(target)
                try:
                    result.append(fn())
                finally:
                    _setns(own)
            finally:
                os.close(target)
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)
        finally:
            os.close(own)

    t = threading.Thread(target=run, name="netns", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides have finished sending; then close both."""
    open_ = [a, b]
    try:
        while open_:
            readable, _, _ = select.select(open_, [], [], 60.0)
            for s in readable:
                other = b if s is a else a
                data = s.recv(_BUF)
                if data:
                    other.sendall(data)
                    continue
                with contextlib.suppress(OSError):
                    other.shutdown(socket.SHUT_WR)
                open_.remove(s)
    except OSError:
        pass
    finally:
        a.close()
        b.close()


class Relay:
    """Listen on ``listen`` inside ``netns``; forward each connection to ``target`` from here."""

    def __init__(self, netns: Path, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(listen)
            s.listen(64)
            return s

        self._sock = in_netns(netns, make)
        self._closed = False
        name = f"relay-{listen[0]}:{listen[1]}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=10)
                up.settimeout(None)
            except OSError as exc:
                log.warning("relay could not reach its target", target=self.target, error=str(exc))
                conn.close()
                continue
            threading.Thread(target=_pump, args=(conn, up), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class EgressProxy:
    """An HTTP CONNECT proxy on a Unix socket for the API server's cluster egress (see module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._routes: dict[str, tuple[Path, str]] = {}  # address or node name -> (netns, address)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(64)
        self._closed = False
        threading.Thread(target=self._serve, name="egress-proxy", daemon=True).start()

    def route(self, netns: Path, address: str, *names: str) -> None:
        """Dial ``address`` and ``names`` (e.g. the node's name, which the API server prefers) as
        ``address``, from inside ``netns``."""
        with self._lock:
            for name in (address, *names):
                self._routes[name] = (netns, address)

    def unroute(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._routes.pop(name, None)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    conn.close()
                    return
                head += chunk
            request_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
            method, _, rest = request_line.partition(" ")
            host, _, port = rest.partition(" ")[0].rpartition(":")
            host = host.strip("[]")
            if method != "CONNECT" or not port.isdigit():
                conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                conn.close()
                return
            with self._lock:
                route = self._routes.get(host)
            if route is not None:
                netns, ip = route
                up = in_netns(netns, lambda: socket.create_connection((ip, int(port)), timeout=10))
            else:
                address = (host, int(port))
                up = socket.create_connection(address, timeout=10)
            up.settimeout(None)
        except OSError as exc:
            log.warning("egress proxy could not connect", request=head[:200], error=str(exc))
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            conn.close()
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        _pump(conn, up)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @staticmethod
    def config_yaml(path: Path) -> str:
        """The API server's ``--egress-selector-config-file`` content for a proxy at ``path``."""
        return (
            "apiVersion: apiserver.k8s.io/v1beta1\n"
            "kind: EgressSelectorConfiguration\n"
            "egressSelections:\n"
            "- name: cluster\n"
            "  connection:\n"
            "    proxyProtocol: HTTPConnect\n"
            "    transport:\n"
            "      uds:\n"
            f"        udsName: {path}\n"
        )
