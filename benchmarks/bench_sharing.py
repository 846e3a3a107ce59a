"""Prepare latency of shared GPUs (MPS, time-slicing), and whether an MPS start blocks other GPUs.

Prints figures, asserts nothing. The daemon runs as a process on a simulated 8x A100-40GB node
with the stand-in ``nvidia-smi`` and ``nvidia-cuda-mps-control`` (tests/ground/standins) in its
driver root; claims come from files (``--fake-claims-dir``), so no API server is involved and
"whole call" is the gRPC round trip plus the plugin's work:

* an MPS claim: prepare starts a control daemon, sets EXCLUSIVE_PROCESS and the limits, and
  returns once the daemon answers; unprepare stops it and restores the compute mode;
* a time-slicing claim: compute mode and time-slice set through ``nvidia-smi``;
* an MPS prepare whose daemon answers only after 2 s (``GPU_DRA_FAKE_MPS_READY_DELAY_S=2``) and,
  while it waits, a plain prepare on another GPU: its latency shows whether the wait holds a
  lock other GPUs need.

Run: .venv/bin/python benchmarks/bench_sharing.py [--iterations N] [--ready-delay-s 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    DRIVER,
    DraClient,
    FakeNode,
    allocated_claim,
    fake_node,
    host_line,
    line,
    start_plugin,
)

NAMESPACE = "sharing"


def gpu_config(sharing: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": "FromClaim",
        "requests": [],
        "opaque": {
            "driver": DRIVER,
            "parameters": {
                "apiVersion": "resource.nvidia.com/v1beta1",
                "kind": "GpuConfig",
                "sharing": sharing,
            },
        },
    }


MPS = gpu_config({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}})
TIME_SLICING = gpu_config({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})


def claim(node: FakeNode, name: str, device: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    c = allocated_claim(
        NAMESPACE, name, f"uid-{name}", node.node_name, device, config=[config] if config else []
    )
    node.put_claim(c)
    return c


def _own(events: list[dict[str, Any]], uid: str, event: str, key: str) -> list[float]:
    return [
        float(e[key]) / 1000
        for e in events
        if e.get("event") == event and key in e and uid in str(e.get("claim"))
    ]


def kill_strays(node: FakeNode) -> int:
    """Stop stand-in MPS daemons left by an interrupted run (only processes started from this node's tree)."""
    killed = 0
    marker = str(node.driver_root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def bench_latency(node: FakeNode, iterations: int) -> None:
    plugin = start_plugin(node, "--no-publish", "--fake-claims-dir", str(node.claims_dir), tag="-latency")
    cases = [
        ("MPS claim (control daemon start to ready)", claim(node, "mps", "gpu-0", MPS)),
        ("time-slicing claim (interval Long)", claim(node, "ts", "gpu-1", TIME_SLICING)),
        ("plain claim (no sharing config)", claim(node, "plain", "gpu-2")),
    ]
    results: dict[str, tuple[list[float], list[float]]] = {}
    try:
        plugin.wait_socket()
        client = DraClient(node.dra_socket)
        for label, c in cases:
            client.prepare([c])  # warm-up
            client.unprepare([c])
            prep: list[float] = []
            unprep: list[float] = []
            for _ in range(iterations):
                prep.append(client.prepare([c]))
                unprep.append(client.unprepare([c]))
            results[label] = (prep, unprep)
        client.close()
        time.sleep(0.3)
        events = plugin.events()
    finally:
        plugin.stop()
    print(f"shared-GPU claims, sequential prepare+unprepare, {iterations} iterations each:")
    for label, c in cases:
        prep, unprep = results[label]
        uid = c["metadata"]["uid"]
        print(f"  {label}:")
        print(line("  prepare, whole call", prep))
        print(line("  prepare, plugin's own part", _own(events, uid, "claim prepared", "prepare_ms")[1:]))
        print(line("  unprepare, whole call", unprep))


def bench_no_blocking(node: FakeNode, delay_s: float) -> None:
    env = {"GPU_DRA_FAKE_MPS_READY_DELAY_S": f"{delay_s:g}"}
    plugin = start_plugin(
        node,
        "--no-publish",
        "--fake-claims-dir",
        str(node.claims_dir),
        "--mps-ready-timeout",
        str(max(10.0, delay_s * 4)),
        env=env,
        tag="-blocking",
    )
    slow = claim(node, "mps-slow", "gpu-3", MPS)
    others = [claim(node, f"plain-{i}", f"gpu-{i}") for i in (4, 5, 6)]
    ts = claim(node, "ts-during", "gpu-7", TIME_SLICING)
    mps_took: list[float] = []
    try:
        plugin.wait_socket()
        client = DraClient(node.dra_socket)
        worker = threading.Thread(target=lambda: mps_took.append(client.prepare([slow])), name="mps-prepare")
        started = time.perf_counter()
        worker.start()
        time.sleep(min(0.5, delay_s / 4))  # the MPS prepare is now waiting for its daemon
        during = [client.prepare([c]) for c in others]
        ts_during = client.prepare([ts])
        during_at = time.perf_counter() - started
        worker.join(delay_s * 10)
        client.unprepare([slow, *others, ts])
        client.close()
    finally:
        plugin.stop()
    mps_ms = mps_took[0] * 1000 if mps_took else float("nan")
    print(f"MPS readiness wait vs. other GPUs (daemon answers after {delay_s:g} s):")
    print(f"  MPS prepare on gpu-3, whole call               {mps_ms:8.1f} ms")
    print(line("plain prepares on gpu-4..6 during the wait", during))
    print(f"  time-slicing prepare on gpu-7 during the wait  {ts_during * 1000:8.1f} ms")
    verdict = "yes" if during_at * 1000 < mps_ms else "NO"
    print(
        f"  all four done while the MPS prepare waited: {verdict} ({during_at * 1000:.0f} ms after it began)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--ready-delay-s", type=float, default=2.0)
    args = parser.parse_args()
    print(host_line())
    with fake_node(standins=True) as node:
        try:
            bench_latency(node, args.iterations)
            bench_no_blocking(node, args.ready_delay_s)
        finally:
            strays = kill_strays(node)
            if strays:
                print(f"  (stopped {strays} stand-in process(es) left running)")


if __name__ == "__main__":
    main()
