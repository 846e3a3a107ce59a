"""Prepare/unprepare latency and burst throughput through the real DRA socket; plugin start time.

Prints figures, asserts nothing. The claim source is in-process (no API server), so "whole call"
is the gRPC round trip plus the plugin's work, and "own part" is the plugin's work after the
GET: DeviceState.prepare / unprepare (locks, checkpoint writes, CDI spec write, fsyncs).
The real-API-server variant (GET included) belongs with the e2e ground.

Run: .venv/bin/python benchmarks/bench_prepare.py [--iterations N] [--dir PATH]
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


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile in milliseconds (nearest rank)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k] * 1000


def line(label: str, values: Sequence[float]) -> str:
    return f"  {label:<34} p50 {pct(values, 50):7.2f} ms   p99 {pct(values, 99):7.2f} ms   (n={len(values)})"


def claim_msg(claim: dict[str, Any]) -> dra_v1_pb2.Claim:
    m = claim["metadata"]
    return dra_v1_pb2.Claim(namespace=m["namespace"], name=m["name"], uid=m["uid"])


def plugin_node(work: Path, cdi: Path) -> Any:
    """A node set up as the daemon runs it: single instance, CDI specs on tmpfs like /var/run/cdi."""
    node = make_node(work, single_instance=True, locks=DeviceLocks(None))
    node.cdi.root = cdi
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where state and CDI files go (default: a temp dir)"
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    work = args.dir or Path(tempfile.mkdtemp(prefix="gd-bench-"))
    # Short path (Unix socket limit); on tmpfs when there is one, as /var/run/cdi is.
    sockets = Path(tempfile.mkdtemp(prefix="gds-", dir="/dev/shm" if Path("/dev/shm").is_dir() else "/tmp"))
    print(
        f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, python {sys.version.split()[0]}"
    )
    try:
        bench_sequential(work, sockets, args.iterations)
        bench_burst(work, sockets, args.rounds)
        bench_startup(work, args.starts)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
