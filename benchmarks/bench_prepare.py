"""Prepare/unprepare latency and burst throughput through the real DRA socket; plugin start time.

Prints figures, asserts nothing. Four parts:

1. in-process plugin (claims from memory): "whole call" is the gRPC round trip plus the plugin's
   work, "own part" is DeviceState.prepare / unprepare (locks, checkpoint write, CDI spec write,
   fsyncs), timed around the call;
2. the daemon as a process against the real API server (tests/ground control plane; claims
   allocated by writing their status as the scheduler does): the whole call includes the claim
   GET; the own part is what the daemon logs after the GET (``prepare_ms`` / ``unprepare_ms``).
   Then a burst of 64 concurrent calls (8 claims x 8 pods), and 64 concurrent claim GETs through
   ``driver.kube.Kube`` with the old shared token bucket (5 qps, burst 10) and the claim bucket;
3. the file lock and the checkpoint write on their own (the costs inside "own part");
4. start (process spawn) to registration socket ready, without an API server.

Run: .venv/bin/python benchmarks/bench_prepare.py [--iterations N] [--no-api] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import structlog  # noqa: E402
from _common import (  # noqa: E402
    DirWatch,
    DraClient,
    PluginProcess,
    control_plane,
    create_allocated_claims,
    fake_node,
    host_line,
    line,
    pct,
    start_plugin,
)

from cdi.names import claim_spec_filename  # noqa: E402
from driver.kubeletapi import dra_v1_pb2, dra_v1_pb2_grpc  # noqa: E402
from driver.kubeletplugin import KubeletPlugin, SocketPaths  # noqa: E402
from driver.kubeletplugin.claims import ClaimRef, StaticClaimSource  # noqa: E402
from driver.kubeletplugin.draservice import DraService, PreparedDevice  # noqa: E402
from driver.state import DeviceLocks, DeviceState  # noqa: E402
from tests.integration.test_state import DRIVER, make_claim, make_node  # noqa: E402


class TimedPreparer:
    """Wraps DeviceState and records how long its own work takes (after the claim GET)."""

    def __init__(self, state: DeviceState) -> None:
        self.state = state
        self.prepare_s: list[float] = []
        self.unprepare_s: list[float] = []
        self._lock = threading.Lock()

    def prepare(self, claim: dict[str, Any]) -> Sequence[PreparedDevice]:
        t = time.perf_counter()
        out = self.state.prepare(claim)
        with self._lock:
            self.prepare_s.append(time.perf_counter() - t)
        return out

    def unprepare(self, ref: ClaimRef) -> None:
        t = time.perf_counter()
        self.state.unprepare(ref)
        with self._lock:
            self.unprepare_s.append(time.perf_counter() - t)


def claim_msg(claim: dict[str, Any]) -> dra_v1_pb2.Claim:
    m = claim["metadata"]
    return dra_v1_pb2.Claim(namespace=m["namespace"], name=m["name"], uid=m["uid"])


def plugin_node(work: Path, cdi: Path) -> Any:
    """A node set up as the daemon runs it: single instance, CDI specs on tmpfs like /var/run/cdi."""
    node = make_node(work, single_instance=True, locks=DeviceLocks(None))
    node.cdi.root = cdi
    node.cdi.durable = False  # as the daemon writes claim specs
    return node


def bench_sequential(work: Path, sockets: Path, iterations: int) -> None:
    node = plugin_node(work / "seq", sockets / "cdi-seq")
    source = StaticClaimSource()
    timed = TimedPreparer(node.state)
    paths = SocketPaths.for_driver(sockets / "reg", sockets / "plug", DRIVER)
    plugin = KubeletPlugin(DRIVER, paths, DraService(timed, source))
    plugin.start()
    whole_prep: list[float] = []
    whole_unprep: list[float] = []
    with grpc.insecure_channel(f"unix://{paths.dra}") as channel:
        stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
        for i in range(iterations + 20):
            claim = make_claim(f"bench-{i:06d}", [("gpu", f"gpu-{i % 8}")])
            source.put(claim)
            msg = claim_msg(claim)
            t0 = time.perf_counter()
            resp = stub.NodePrepareResources(dra_v1_pb2.NodePrepareResourcesRequest(claims=[msg]), timeout=30)
            t1 = time.perf_counter()
            un = stub.NodeUnprepareResources(
                dra_v1_pb2.NodeUnprepareResourcesRequest(claims=[msg]), timeout=30
            )
            t2 = time.perf_counter()
            assert not resp.claims[msg.uid].error and not un.claims[msg.uid].error
            if i >= 20:  # warm-up excluded
                whole_prep.append(t1 - t0)
                whole_unprep.append(t2 - t1)
    plugin.stop(0.5)
    own_prep, own_unprep = timed.prepare_s[20:], timed.unprepare_s[20:]
    print(
        f"one-GPU claim, sequential, {iterations} iterations (checkpoint under {work}, CDI specs on tmpfs):"
    )
    print(line("prepare, whole call", whole_prep))
    print(line("prepare, plugin's own part", own_prep))
    print(line("unprepare, whole call", whole_unprep))
    print(line("unprepare, plugin's own part", own_unprep))
    both_whole = [a + b for a, b in zip(whole_prep, whole_unprep, strict=True)]
    both_own = [a + b for a, b in zip(own_prep, own_unprep, strict=True)]
    print(line("prepare+unprepare, whole calls", both_whole))
    print(line("prepare+unprepare, own part", both_own))


def bench_burst(work: Path, sockets: Path, rounds: int) -> None:
    node = plugin_node(work / "burst", sockets / "cdi-burst")
    source = StaticClaimSource()
    paths = SocketPaths.for_driver(sockets / "reg2", sockets / "plug2", DRIVER)
    plugin = KubeletPlugin(DRIVER, paths, DraService(node.state, source))
    plugin.start()
    latencies: list[float] = []
    walls: list[float] = []
    once = True
    with grpc.insecure_channel(f"unix://{paths.dra}") as channel, ThreadPoolExecutor(max_workers=64) as pool:
        stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
        for r in range(rounds):
            claims = [make_claim(f"burst-{r}-{i}", [("gpu", f"gpu-{i}")]) for i in range(8)]
            for c in claims:
                source.put(c)
            barrier = threading.Barrier(64)
            node.spec_writes.clear()

            def call(
                k: int, claims: list[dict[str, Any]] = claims, barrier: threading.Barrier = barrier
            ) -> float:
                msg = claim_msg(claims[k % 8])
                barrier.wait()
                t = time.perf_counter()
                resp = stub.NodePrepareResources(
                    dra_v1_pb2.NodePrepareResourcesRequest(claims=[msg]), timeout=60
                )
                assert not resp.claims[msg.uid].error, resp.claims[msg.uid].error
                return time.perf_counter() - t

            t0 = time.perf_counter()
            latencies.extend(pool.map(call, range(64)))
            walls.append(time.perf_counter() - t0)
            once = once and sorted(node.spec_writes) == sorted(c["metadata"]["uid"] for c in claims)
            stub.NodeUnprepareResources(
                dra_v1_pb2.NodeUnprepareResourcesRequest(claims=[claim_msg(c) for c in claims]), timeout=60
            )
    plugin.stop(0.5)
    wall = statistics.median(walls)
    print(f"burst: 64 concurrent prepare calls, 8 claims x 8 pods over 8 GPUs, {rounds} rounds:")
    print(
        f"  median burst wall time {wall * 1000:.1f} ms -> {64 / wall:.0f} calls/s, {8 / wall:.0f} claims/s"
    )
    print(line("per-call latency", latencies))
    print(f"  each claim prepared exactly once: {'yes' if once else 'NO'}")


# ---- 2. the daemon against the real API server -------------------------------------------------

API_NODE = "bench-node"
API_NAMESPACE = "bench"


def _own(events: list[dict[str, Any]], event: str, key: str, skip: int) -> list[float]:
    return [float(e[key]) / 1000 for e in events if e.get("event") == event and key in e][skip:]


def bench_api(iterations: int, rounds: int) -> None:
    print("real API server (tests/ground control plane), daemon with --kubeconfig, fake a100-40gb-x8:")
    started = time.perf_counter()
    with control_plane(API_NODE, API_NAMESPACE) as cp, fake_node(API_NODE) as node:
        print(f"  control plane up in {time.perf_counter() - started:.1f} s")
        claims = create_allocated_claims(cp, API_NAMESPACE, API_NODE, [f"gpu-{i}" for i in range(8)])
        plugin = start_plugin(node, "--kubeconfig", str(cp.kubeconfig), "--log-level", "info")
        try:
            print(f"  spawn to registration socket: {plugin.wait_socket() * 1000:.0f} ms")
            _api_sequential(plugin, claims, iterations)
            _api_burst(plugin, claims, rounds)
        finally:
            plugin.stop()
        _claim_get_burst(cp, claims)


def _api_sequential(plugin: PluginProcess, claims: list[dict[str, Any]], iterations: int) -> None:
    warm = 20
    whole_prep: list[float] = []
    whole_unprep: list[float] = []
    client = DraClient(plugin.node.dra_socket)
    for i in range(iterations + warm):
        claim = claims[i % len(claims)]
        p = client.prepare([claim])
        u = client.unprepare([claim])
        if i >= warm:
            whole_prep.append(p)
            whole_unprep.append(u)
    client.close()
    time.sleep(0.3)  # the last log lines
    events = plugin.events()
    own_prep = _own(events, "claim prepared", "prepare_ms", warm)
    own_unprep = _own(events, "claim unprepared", "unprepare_ms", warm)
    print(f"  one-GPU claim, sequential, {iterations} iterations (own part from the daemon's log):")
    print(line("prepare, whole call (GET included)", whole_prep))
    print(line("prepare, claim GET", _own(events, "claim prepared", "get_ms", warm)))
    print(line("prepare, plugin's own part after the GET", own_prep))
    print(line("unprepare, whole call", whole_unprep))
    print(line("unprepare, plugin's own part", own_unprep))
    print(
        line("prepare+unprepare, whole calls", [a + b for a, b in zip(whole_prep, whole_unprep, strict=True)])
    )
    print(line("prepare+unprepare, own part", [a + b for a, b in zip(own_prep, own_unprep, strict=True)]))


def _api_burst(plugin: PluginProcess, claims: list[dict[str, Any]], rounds: int) -> None:
    walls: list[float] = []
    latencies: list[float] = []
    once = True
    watch = DirWatch(plugin.node.cdi)  # each real prepare writes the claim's CDI spec once
    client = DraClient(plugin.node.dra_socket)
    with ThreadPoolExecutor(max_workers=64) as pool:
        for _ in range(rounds):
            barrier = threading.Barrier(64)
            watch.drain()
            watch.counts.clear()

            def call(k: int, barrier: threading.Barrier = barrier) -> float:
                barrier.wait()
                return client.prepare([claims[k % 8]])

            t0 = time.perf_counter()
            latencies.extend(pool.map(call, range(64)))
            walls.append(time.perf_counter() - t0)
            written = watch.drain()
            expected = {claim_spec_filename(c["metadata"]["uid"]): 1 for c in claims}
            once = once and written == expected
            client.unprepare(claims)
    client.close()
    watch.close()
    wall = statistics.median(walls)
    print(f"  burst: 64 concurrent prepare calls, 8 claims x 8 pods over 8 GPUs, {rounds} rounds:")
    print(
        f"    median burst wall time {wall * 1000:.1f} ms -> {64 / wall:.0f} calls/s, {8 / wall:.0f} claims/s"
    )
    print(line("  per-call latency (GET included)", latencies))
    verdict = "yes" if once else "NO"
    print(f"    each claim prepared exactly once (one CDI spec write per claim and round): {verdict}")


def _claim_get_burst(cp: Any, claims: list[dict[str, Any]]) -> None:
    """64 concurrent claim GETs through driver.kube.Kube: one shared bucket (before) vs the claim bucket."""
    from driver.kube import Kube, RestTransport

    print("  64 concurrent claim GETs through driver.kube.Kube (a kubelet syncing 64 pods):")
    for label, kwargs in (
        ("shared bucket 5 qps / burst 10 (before)", {"claim_qps": 5.0, "claim_burst": 10}),
        ("claim bucket (default, after)", {}),
    ):
        kube = Kube(RestTransport(cp.api_client().configuration), **kwargs)  # type: ignore[arg-type]
        kube.resource_api_version()  # discovery is a one-off, not part of the burst
        barrier = threading.Barrier(64)

        def get(k: int, kube: Kube = kube, barrier: threading.Barrier = barrier) -> float:
            meta = claims[k % 8]["metadata"]
            barrier.wait()
            t = time.perf_counter()
            kube.get_resource_claim(meta["namespace"], meta["name"])
            return time.perf_counter() - t

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=64) as pool:
            took = list(pool.map(get, range(64)))
        wall = time.perf_counter() - t0
        figures = f"p50 {pct(took, 50):8.1f} ms   p99 {pct(took, 99):8.1f} ms"
        print(f"    {label:<40} wall {wall * 1000:8.1f} ms   {figures}")


# ---- 3. the file lock and the checkpoint on their own -----------------------------------------


def bench_storage(work: Path, n: int) -> None:
    from driver.checkpoint import PREPARE_COMPLETED, CheckpointStore, PreparedClaim
    from driver.checkpoint import PreparedDevice as Recorded
    from driver.flock import FileLock

    d = work / "storage"
    d.mkdir(parents=True, exist_ok=True)
    times: list[float] = []
    for _ in range(n * 5):
        t = time.perf_counter()
        with FileLock(d / "x.lock"):
            pass
        times.append(time.perf_counter() - t)
    print(f"storage primitives ({d}):")
    print(line("FileLock acquire+release", times))

    def claim(uid: str, minor: int) -> PreparedClaim:
        dev = Recorded(
            ["gpu"],
            API_NODE,
            f"gpu-{minor}",
            [f"k8s.gpu.nvidia.com/claim={uid}-gpu-{minor}"],
            "gpu",
            f"GPU-{minor}",
        )
        return PreparedClaim(uid, "ns", f"c-{uid}", PREPARE_COMPLETED, [dev], [], 1.0, 2.0)

    store = CheckpointStore(d / "checkpoint.json")
    store.startup()
    for i in range(7):
        store.put(claim(f"held-{i}", i))
    times = []
    for i in range(n):
        t = time.perf_counter()
        store.put(claim(f"new-{i}", 7))
        store.remove(f"new-{i}")
        times.append((time.perf_counter() - t) / 2)
    print(line("checkpoint write (7-8 claims recorded)", times))


# ---- 4. start-up ------------------------------------------------------------------------------


def bench_startup(work: Path, runs: int) -> None:
    from tests.ground.driverroot import make_fake_driver_root

    root = Path(tempfile.mkdtemp(prefix="gdb-", dir="/tmp"))
    try:
        make_fake_driver_root(root / "drv", range(8))
        (root / "reg").mkdir()
        times: list[float] = []
        for i in range(runs):
            reg = root / "reg" / f"{DRIVER}-reg.sock"
            argv = [
                sys.executable, "-m", "driver", "plugin", "--node-name", "bench-node",
                "--nvml-backend", "fake", "--fake-topology", "a100-40gb-x8",
                "--fake-state", str(root / f"fake-{i}.json"),
                "--no-publish", "--fake-claims-dir", str(root / "claims"),
                "--kubelet-registrar-directory-path", str(root / "reg"),
                "--kubelet-plugins-directory-path", str(root / "plug"),
                "--cdi-root", str(root / "cdi"), "--driver-root", str(root / "drv"),
                "--dev-root", str(root / "drv"),
            ]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
            env["PYTHONPATH"] = str(REPO)
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            while not reg.exists() and proc.poll() is None and time.perf_counter() - t0 < 60:
                time.sleep(0.002)
            times.append(time.perf_counter() - t0)
            proc.terminate()
            proc.wait(30)
        print(f"start (process spawn, fake a100-40gb-x8) to registration socket ready, {runs} runs:")
        print(f"  median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, "
              f"max {max(times) * 1000:.0f} ms")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--no-api", action="store_true", help="skip the real-API-server part (no Go peers)")
    parser.add_argument("--dir", type=Path, default=None, help="where state files go (default: a temp dir)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    work = args.dir or Path(tempfile.mkdtemp(prefix="gd-bench-"))
    # Short path (Unix socket limit); on tmpfs when there is one, as /var/run/cdi is.
    sockets = Path(tempfile.mkdtemp(prefix="gds-", dir="/dev/shm" if Path("/dev/shm").is_dir() else "/tmp"))
    print(host_line())
    try:
        print("--- 1. in-process plugin, claims from memory")
        bench_sequential(work, sockets, args.iterations)
        bench_burst(work, sockets, args.rounds)
        if not args.no_api:
            print("--- 2. daemon process, real API server")
            bench_api(args.iterations, args.rounds)
        print("--- 3. storage primitives")
        bench_storage(work, args.iterations)
        print("--- 4. start-up")
        bench_startup(work, args.starts)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
