"""The figures of the performance table (issue 13), each in the table's form and units.

Prints figures, asserts nothing. One real control plane (tests/ground), a simulated 8x A100-40GB
node (fake NVML), eight one-GPU claims allocated as the scheduler writes them, the daemon as a
process with ResourceSlice publishing on, calls over DRA v1 on its socket:

* start (``--starts`` spawns): spawn to GetInfo answered, spawn to the first ResourceSlice
  stored, CPU seconds from spawn to idle, threads, SIGTERM to exit;
* prepare/unprepare: paced (one call every ``--pace-ms``), back to back, a burst of 8 claims in
  parallel;
* the claim GET's anatomy, through a loopback TCP relay in front of the API server that stamps
  when each request's first bytes arrive and when the answer's first bytes leave: the part of a
  prepare before the GET reaches the server, and the client-side GET time (the plugin's own
  ``get_ms``) beyond the server's time;
* idle (``--idle-seconds``): VmRSS, CPU used while idle, and the plugin's API requests while
  idle (counted by the relay, so only the plugin's own).

Credentials: ``in-cluster`` (default when run as root with ``unshare``) is what the chart runs:
the service-account token and CA in /var/run/secrets/kubernetes.io/serviceaccount, inside a
private mount namespace of the plugin's own (a tmpfs over /run there; the host is untouched), and
KUBERNETES_SERVICE_HOST/PORT. ``kubeconfig`` passes --kubeconfig, as the test ground does; its
loader needs YAML, OAuth and pydantic, which the in-cluster path does not load.

Run: .venv/bin/python benchmarks/bench_table.py [--idle-seconds 60] [--iterations 100]
     [--starts 3] [--credentials in-cluster|kubeconfig]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from _common import (  # noqa: E402
    DRIVER,
    DraClient,
    FakeNode,
    PluginProcess,
    control_plane,
    create_allocated_claims,
    fake_node,
    pct,
)

from driver.kubeletapi import registration_pb2, registration_pb2_grpc  # noqa: E402

NODE = "table-node"
NAMESPACE = "table"
SA_DIR = "/run/secrets/kubernetes.io/serviceaccount"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the relay in front of the API server -----------------------------------------------------


@dataclass
class Exchange:
    """One request on a relayed connection: when its first byte came in, its last byte went up,
    and the first byte of the answer came back (time.monotonic())."""

    first_in: float
    last_in: float
    first_out: float | None = None


@dataclass
class Relay:
    """A loopback TCP relay (TLS passes through untouched) that timestamps requests and answers.

    A connection alternates: bytes from the plugin after an answer (or at the start) open a new
    exchange; the first bytes back from the server close it.
    """

    upstream: tuple[str, int]
    exchanges: list[Exchange] = field(default_factory=list)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: bool = False

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._run, name="relay", daemon=True).start()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def since(self, t: float) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if e.first_in >= t]

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        while not self._stop:
            try:
                events = sel.select(0.2)
            except (OSError, ValueError):
                return
            for key, _ in events:
                if key.data is None:
                    self._accept(sel)
                else:
                    self._forward(sel, key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        server = socket.create_connection(self.upstream)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        current: list[Exchange | None] = [None]
        sel.register(client, selectors.EVENT_READ, (server, True, current))
        sel.register(server, selectors.EVENT_READ, (client, False, current))

    def _forward(
        self,
        sel: selectors.BaseSelector,
        sock: socket.socket,
        peer: tuple[socket.socket, bool, list[Exchange | None]],
    ) -> None:
        other, from_plugin, current = peer
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        now = time.monotonic()
        if not data:
            for s in (sock, other):
                with contextlib.suppress(KeyError, ValueError, OSError):
                    sel.unregister(s)
                s.close()
            return
        if from_plugin:
            if current[0] is None or current[0].first_out is not None:
                exchange = Exchange(now, now)
                current[0] = exchange
                with self._lock:
                    self.exchanges.append(exchange)
            else:
                current[0].last_in = now
        elif current[0] is not None and current[0].first_out is None:
            current[0].first_out = now
        other.sendall(data)


# ---- the plugin as a process ------------------------------------------------------------------


@dataclass
class Credentials:
    """How the plugin finds the API server (through the relay when one is given)."""

    mode: str
    cp: Any
    token: str = ""
    workdir: Path | None = None
    tree: Path = REPO

    def spawn(self, node: FakeNode, server_port: int, log_name: str) -> PluginProcess:
        environ = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        environ["PYTHONPATH"] = str(self.tree)
        argv = node.argv("--log-level", "info")
        if self.mode == "kubeconfig":
            assert self.workdir is not None
            kubeconfig = self.workdir / f"relay-{server_port}.kubeconfig"
            text = self.cp.kubeconfig.read_text().replace(self.cp.server, f"https://127.0.0.1:{server_port}")
            kubeconfig.write_text(text)
            argv += ["--kubeconfig", str(kubeconfig)]
        else:
            assert self.workdir is not None
            environ["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
            environ["KUBERNETES_SERVICE_PORT"] = str(server_port)
            # A mount namespace of its own: /run there is a fresh tmpfs holding the
            # service-account files where the kubernetes client looks for them.
            script = (
                f"mount -t tmpfs tmpfs /run && mkdir -p {SA_DIR} && "
                f'cp "$SA_SRC"/token "$SA_SRC"/ca.crt "$SA_SRC"/namespace {SA_DIR}/ && exec "$@"'
            )
            environ["SA_SRC"] = str(self.workdir / "sa")
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        log_path = node.base / log_name
        with log_path.open("wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=self.tree, env=environ, stdout=out, stderr=subprocess.STDOUT)
        return PluginProcess(proc, log_path, node, started)


def precompile(tree: Path) -> None:
    """Byte-compile the plugin's packages, as pip does when the image installs the wheel.

    The image runs with PYTHONDONTWRITEBYTECODE=1 and bytecode compiled at install time; a source
    tree run with that variable set (as sessions here are) would compile every module on every
    start instead, which is no part of what users run.
    """
    packages = [name for name in ("driver", "cdi", "mig", "sharing") if (tree / name).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], cwd=tree, check=True)


def in_cluster_possible() -> bool:
    """Whether a private mount namespace with a tmpfs over /run can be made here (root, unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /run"]
    return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0


def make_credentials(mode: str, cp: Any, workdir: Path) -> Credentials:
    if mode == "kubeconfig":
        return Credentials(mode, cp, workdir=workdir)
    from kubernetes import client as kclient

    api = cp.api_client()
    try:
        core: Any = kclient.CoreV1Api(api)
        rbac: Any = kclient.RbacAuthorizationV1Api(api)
        core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": "plugin"}})
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": "table-plugin"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "cluster-admin",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "plugin", "namespace": NAMESPACE}],
            }
        )
    finally:
        api.close()
    token = cp.service_account_token(NAMESPACE, "plugin")
    sa = workdir / "sa"
    sa.mkdir(parents=True, exist_ok=True)
    (sa / "token").write_text(token)
    (sa / "namespace").write_text(NAMESPACE)
    shutil.copy(cp.pki.ca_crt, sa / "ca.crt")
    return Credentials(mode, cp, token=token, workdir=workdir)


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used, threads) of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[17])


def plugin_pid(plugin: PluginProcess) -> int:
    """The python process (under unshare/sh it is the exec'd child of the spawned process)."""
    pid = plugin.pid
    for _ in range(200):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm.startswith("python"):
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            pid = int(children[0])
            continue
        time.sleep(0.005)
    return pid


def rss_mib(pid: int) -> float:
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1]) / 1024
    return float("nan")


def get_info_after_spawn(plugin: PluginProcess, timeout_s: float = 60.0) -> float:
    """Seconds from spawn to a GetInfo answer, calling as the kubelet does once the socket is there."""
    plugin.wait_socket(timeout_s)
    with grpc.insecure_channel(f"unix://{plugin.node.reg_socket}") as channel:
        registration_pb2_grpc.RegistrationStub(channel).GetInfo(
            registration_pb2.InfoRequest(), timeout=10, wait_for_ready=False
        )
    return time.perf_counter() - plugin.started


def wait_exit(plugin: PluginProcess) -> float:
    t = time.perf_counter()
    plugin.proc.send_signal(signal.SIGTERM)
    try:
        plugin.proc.wait(30)
    except subprocess.TimeoutExpired:
        plugin.proc.kill()
        plugin.proc.wait(30)
        return float("inf")
    return time.perf_counter() - t


class SliceWatcher:
    """Records when the first ResourceSlice of the node is stored (a watch on the real server)."""

    def __init__(self, cp: Any) -> None:
        from driver.kube import Kube, RestTransport

        self.kube = Kube(RestTransport(cp.api_client().configuration), qps=1000.0, burst=1000)
        self.first: float | None = None

    def clear(self) -> None:
        for s in self.kube.list_slices(DRIVER, NODE):
            meta = s["metadata"]
            self.kube.delete_slice(meta["name"], meta["uid"], "")
        while self.kube.list_slices(DRIVER, NODE):
            time.sleep(0.05)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        self.first = None
        _, rv = self.kube.list_slices_at(DRIVER, NODE)
        watch = self.kube.watch_slices(DRIVER, NODE, rv, timeout_s=120)

        def run() -> None:
            with contextlib.suppress(Exception):
                for event in watch:
                    if event.get("type") == "ADDED" and self.first is None:
                        self.first = time.perf_counter()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            watch.close()
            thread.join(5)


def wait_idle(plugin: PluginProcess, watcher: SliceWatcher, timeout_s: float = 60.0) -> None:
    """Slices stored and the plugin's CPU clock still for a second."""
    deadline = time.monotonic() + timeout_s
    while watcher.first is None and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = plugin_pid(plugin)
    last = proc_stat(pid)[0]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = proc_stat(pid)[0]
        if now - last < 0.02:
            return
        last = now


# ---- the parts --------------------------------------------------------------------------------


@dataclass
class Figures:
    get_info: list[float] = field(default_factory=list)
    first_slice: list[float] = field(default_factory=list)
    cpu_to_idle: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    sigterm: list[float] = field(default_factory=list)
    paced_prepare: list[float] = field(default_factory=list)
    paced_unprepare: list[float] = field(default_factory=list)
    back_to_back: list[float] = field(default_factory=list)
    burst_walls: list[float] = field(default_factory=list)
    before_get: list[float] = field(default_factory=list)
    get_overhead: list[float] = field(default_factory=list)
    server_time: list[float] = field(default_factory=list)
    rss: float = float("nan")
    idle_cpu: float = float("nan")
    idle_requests: int = -1
    idle_seconds: float = 0.0
    loads: list[float] = field(default_factory=list)


def part_starts(
    creds: Credentials, node: FakeNode, watcher: SliceWatcher, relay: Relay, *, f: Figures, n: int
) -> None:
    for i in range(n):
        watcher.clear()
        with watcher.watching():
            plugin = creds.spawn(node, relay.port, f"start-{i}.log")
            try:
                f.get_info.append(get_info_after_spawn(plugin))
                wait_idle(plugin, watcher)
                if watcher.first is not None:
                    f.first_slice.append(watcher.first - plugin.started)
                cpu, threads = proc_stat(plugin_pid(plugin))
                f.cpu_to_idle.append(cpu)
                f.threads.append(threads)
            finally:
                f.sigterm.append(wait_exit(plugin))
        f.loads.append(os.getloadavg()[0])


def _get_ms(plugin: PluginProcess, uid: str) -> float | None:
    for e in reversed(plugin.events()):
        if e.get("event") == "claim prepared" and str(e.get("claim", "")).endswith(":" + uid):
            return float(e["get_ms"]) / 1000
    return None


def part_calls(
    creds: Credentials,
    node: FakeNode,
    relay: Relay,
    *,
    claims: Sequence[dict[str, Any]],
    f: Figures,
    iterations: int,
    pace_s: float,
    idle_s: float,
) -> None:
    plugin = creds.spawn(node, relay.port, "calls.log")
    client = DraClient(node.dra_socket)
    try:
        plugin.wait_event("plugin ready")
        for claim in claims:  # warm-up: every claim once, connection and caches made
            client.prepare([claim])
            client.unprepare([claim])
        # paced: one call at a time, the plugin idle in between (as a kubelet starting pods)
        for i in range(iterations):
            claim = claims[i % len(claims)]
            time.sleep(pace_s)
            t0 = time.monotonic()
            f.paced_prepare.append(client.prepare([claim]))
            time.sleep(pace_s)
            f.paced_unprepare.append(client.unprepare([claim]))
            exchange = next(iter(relay.since(t0)), None)
            get_s = _get_ms(plugin, claim["metadata"]["uid"])
            if exchange is not None and exchange.first_out is not None and get_s is not None:
                server = exchange.first_out - exchange.last_in
                f.before_get.append(exchange.first_in - t0)
                f.server_time.append(server)
                f.get_overhead.append(get_s - server)
        f.loads.append(os.getloadavg()[0])
        # back to back: prepare, unprepare, next, no pause
        for i in range(iterations):
            claim = claims[i % len(claims)]
            f.back_to_back.append(client.prepare([claim]))
            client.unprepare([claim])
        f.loads.append(os.getloadavg()[0])
        # burst: the 8 claims at once, one call each
        for _ in range(5):
            barrier = threading.Barrier(len(claims) + 1)

            def one(claim: dict[str, Any], barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                client.prepare([claim])

            threads = [threading.Thread(target=one, args=(c,)) for c in claims]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            f.burst_walls.append(time.perf_counter() - t0)
            client.unprepare(list(claims))
        f.loads.append(os.getloadavg()[0])
        # idle
        pid = plugin_pid(plugin)
        time.sleep(2.0)
        cpu0 = proc_stat(pid)[0]
        idle_from = time.monotonic()
        time.sleep(idle_s)
        f.idle_seconds = time.monotonic() - idle_from
        f.idle_cpu = proc_stat(pid)[0] - cpu0
        f.idle_requests = len(relay.since(idle_from))
        f.rss = rss_mib(pid)
        f.loads.append(os.getloadavg()[0])
    finally:
        client.close()
        f.sigterm.append(wait_exit(plugin))


# ---- report -----------------------------------------------------------------------------------


def ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms" if values else "n/a"


def report(f: Figures, creds: str, iterations: int, pace_ms: float) -> None:
    def p(values: Sequence[float], q: float) -> str:
        return f"{pct(values, q):.2f}"

    rows = [
        ("spawn to GetInfo answered", ms(f.get_info), f"median of {len(f.get_info)} starts"),
        ("spawn to first ResourceSlice stored", ms(f.first_slice), f"median of {len(f.first_slice)}"),
        (
            "CPU seconds, spawn to idle",
            f"{statistics.median(f.cpu_to_idle):.2f} s" if f.cpu_to_idle else "n/a",
            "utime+stime when the slices are stored and the plugin is still",
        ),
        (
            f"VmRSS after {f.idle_seconds:.0f} s idle (8 GPUs)",
            f"{f.rss:.0f} MiB",
            "after the calls below",
        ),
        ("threads", f"{statistics.median(f.threads):.0f}" if f.threads else "n/a", "at idle"),
        (
            "prepare, paced: whole call p50 / p99",
            f"{p(f.paced_prepare, 50)} / {p(f.paced_prepare, 99)} ms",
            f"{len(f.paced_prepare)} calls, {pace_ms:.0f} ms apart",
        ),
        (
            "of which before the claim GET reaches the server, p50",
            f"{p(f.before_get, 50)} ms",
            "kubelet's call start to the GET's first byte at the relay",
        ),
        (
            "client-side GET overhead over the server's own time, p50",
            f"{p(f.get_overhead, 50)} ms",
            f"plugin's get_ms minus the server's {p(f.server_time, 50)} ms",
        ),
        (
            "unprepare, paced: p50 / p99",
            f"{p(f.paced_unprepare, 50)} / {p(f.paced_unprepare, 99)} ms",
            f"{len(f.paced_unprepare)} calls",
        ),
        ("prepare back to back, p50", f"{p(f.back_to_back, 50)} ms", f"{len(f.back_to_back)} calls"),
        (
            "burst of 8 claims in parallel: wall",
            ms(f.burst_walls),
            f"median of {len(f.burst_walls)} bursts",
        ),
        ("SIGTERM to exit", ms(f.sigterm), f"median of {len(f.sigterm)}, idle plugin"),
        (
            "idle CPU / API requests",
            f"{f.idle_cpu:.2f} s / {f.idle_requests}",
            f"over {f.idle_seconds:.0f} s idle; requests counted at the relay",
        ),
    ]
    print(f"credentials: {creds}; load average during the runs: {', '.join(f'{x:.2f}' for x in f.loads)}")
    print()
    print("| figure | gpu-dra | how |")
    print("|---|---|---|")
    for name, value, how in rows:
        print(f"| {name} | {value} | {how} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--pace-ms", type=float, default=50.0)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument(
        "--plugin-tree",
        type=Path,
        default=REPO,
        help="run the plugin from another checkout (e.g. the commit before a change) under this harness",
    )
    parser.add_argument(
        "--credentials",
        choices=("in-cluster", "kubeconfig"),
        default="in-cluster" if in_cluster_possible() else "kubeconfig",
    )
    args = parser.parse_args()
    if args.credentials == "in-cluster" and not in_cluster_possible():
        raise SystemExit("--credentials in-cluster needs root and unshare (a private mount namespace)")
    print(
        f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    f = Figures()
    precompile(args.plugin_tree.resolve())
    work = Path(tempfile.mkdtemp(prefix="gdt-", dir="/tmp"))
    try:
        with control_plane(NODE, NAMESPACE) as cp, fake_node(NODE) as node:
            claims = create_allocated_claims(cp, NAMESPACE, NODE, [f"gpu-{i}" for i in range(8)])
            creds = make_credentials(args.credentials, cp, work)
            creds.tree = args.plugin_tree.resolve()
            host, port = cp.server.removeprefix("https://").rsplit(":", 1)
            relay = Relay((host, int(port)))
            relay.start()
            watcher = SliceWatcher(cp)
            try:
                part_starts(creds, node, watcher, relay, f=f, n=args.starts)
                part_calls(
                    creds,
                    node,
                    relay,
                    claims=claims,
                    f=f,
                    iterations=args.iterations,
                    pace_s=args.pace_ms / 1000,
                    idle_s=args.idle_seconds,
                )
            finally:
                relay.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"plugin from {args.plugin_tree.resolve()}")
    report(f, args.credentials, args.iterations, args.pace_ms)


if __name__ == "__main__":
    main()
