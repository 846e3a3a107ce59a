"""56 MIG creates at once on 8x A100-40GB (7 x 1g.5gb per GPU) through MigManager.

The fake NVML sleeps 300 ms per GPU-instance create, serialised per GPU like a real GPU
reconfiguring; with per-GPU locking the wall time should be near 7 creates, not 56.
Prints wall, p50 and p99 of the per-create latency. Run: .venv/bin/python benchmarks/bench_mig_prepare.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from driver.log import configure
from driver.nvml.backend import Nvml
from driver.nvml.fakepynvml import make_fake_pynvml
from driver.nvml.mig import NvmlMigBackend
from mig.manager import MigManager
from mig.profiles import mig_specs
from mig.spec import MigSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=300.0, help="fake GI create latency")
    args = parser.parse_args()
    configure("console", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        module = make_fake_pynvml("a100-40gb-x8", Path(tmp) / "state.json", "bench")
        with module.fake.state.edit() as doc:
            doc["migCreateLatencyMs"] = args.latency_ms
            for gpu in doc["gpus"].values():
                gpu["mig"] = {"current": True, "pending": True}
        nvml = Nvml(module)
        backend = NvmlMigBackend(nvml)
        manager = MigManager(backend)
        specs: list[MigSpec] = []
        for gpu in nvml.gpus():
            profiles = backend.profiles(gpu.uuid)
            specs += [s for s in mig_specs(gpu.minor, gpu.uuid, profiles) if s.profile == "1g.5gb"]

        def create(spec: MigSpec) -> float:
            start = time.perf_counter()
            manager.create(spec)
            return time.perf_counter() - start

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(specs)) as pool:
            latencies = sorted(pool.map(create, specs))
        wall = time.perf_counter() - started
        created = sum(len(backend.list_instances(g.uuid)) for g in nvml.gpus())
        nvml.shutdown()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    per_gi = args.latency_ms / 1000
    print(f"creates: {len(specs)} (instances on GPUs afterwards: {created})")
    print(f"wall: {wall:.2f}s  (7 serial creates = {7 * per_gi:.2f}s, 56 serial = {56 * per_gi:.2f}s)")
    print(f"p50: {statistics.median(latencies):.2f}s  p99: {p99:.2f}s")


if __name__ == "__main__":
    main()
