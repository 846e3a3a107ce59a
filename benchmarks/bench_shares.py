"""Prepare latency of fractional GPU shares: the first share of a GPU (starts its MPS daemon) and
later shares (join the running daemon), plus unprepare of a middle share and of the last one.

Prints figures, asserts nothing. The daemon runs as a process on a simulated 8x A100-40GB node
with the stand-in ``nvidia-smi`` and ``nvidia-cuda-mps-control`` in its driver root; claims come
from files (``--fake-claims-dir``) with ``shareID`` and ``consumedCapacity.memory: 10Gi`` as the
scheduler writes them, so "whole call" is the gRPC round trip plus the plugin's work. The
stand-ins are Python processes (a real ``nvidia-cuda-mps-control`` answers faster), so the daemon
start is an upper bound.

Run: .venv/bin/python benchmarks/bench_shares.py [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    DraClient,
    FakeNode,
    allocated_claim,
    fake_node,
    host_line,
    line,
    start_plugin,
)
from bench_sharing import kill_strays  # noqa: E402

NAMESPACE = "shares"
SHARES_PER_GPU = 4


def share_claim(node: FakeNode, name: str, device: str) -> dict[str, Any]:
    claim = allocated_claim(NAMESPACE, name, str(uuid.uuid4()), node.node_name, device)
    result = claim["status"]["allocation"]["devices"]["results"][0]
    result["shareID"] = str(uuid.uuid4())
    result["consumedCapacity"] = {"memory": "10Gi", "computePercent": "0"}
    claim["spec"]["devices"]["requests"][0]["exactly"]["capacity"] = {"requests": {"memory": "10Gi"}}
    node.put_claim(claim)
    return claim


def bench(node: FakeNode, rounds: int) -> None:
    plugin = start_plugin(node, "--no-publish", "--fake-claims-dir", str(node.claims_dir), tag="-shares")
    first: list[float] = []
    later: list[float] = []
    leave_middle: list[float] = []
    leave_last: list[float] = []
    try:
        plugin.wait_socket()
        client = DraClient(node.dra_socket)
        for r in range(rounds + 1):  # round 0 warms up
            claims = [share_claim(node, f"r{r}-s{i}", "gpu-0") for i in range(SHARES_PER_GPU)]
            took = [client.prepare([c]) for c in claims]
            middle = [client.unprepare([c]) for c in claims[:-1]]
            last = client.unprepare([claims[-1]])
            if r == 0:
                continue
            first.append(took[0])
            later.extend(took[1:])
            leave_middle.extend(middle)
            leave_last.append(last)
        client.close()
        time.sleep(0.2)
    finally:
        plugin.stop()
    print(f"fractional shares of one GPU (10Gi each, {SHARES_PER_GPU} per round, {rounds} rounds):")
    print(line("first share: prepare, starts the GPU's MPS daemon", first))
    print(line("later shares: prepare, join the running daemon", later))
    print(line("unprepare of a share that is not the last", leave_middle))
    print(line("unprepare of the last share: stops the daemon", leave_last))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(host_line())
    with fake_node(standins=True) as node:
        try:
            bench(node, args.rounds)
        finally:
            strays = kill_strays(node)
            if strays:
                print(f"  (stopped {strays} stand-in process(es) left running)")


if __name__ == "__main__":
    main()
