"""Soak: many prepare/unprepare cycles through the real plugin process leave it as it began (issue 17).

File descriptors, threads, resident memory and the files the plugin keeps (state dir, CDI root,
MPS root) are measured after a warm-up and again at the end, and must not grow: a leak of one fd
or one temp file per call shows here long before it takes a node down. Marked ``long``: ``make
test`` runs a shortened number of cycles, ``pytest --long`` the full soak.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ground.longrun import scaled
from tests.integration.test_crash_recovery import TIMESLICE_CONFIG, Node, Plugin, claim_for, make_node

WARMUP = 10


@dataclass(frozen=True)
class Footprint:
    fds: int
    threads: int
    rss_kib: int
    files: frozenset[str]


def footprint(plugin: Plugin, node: Node) -> Footprint:
    pid = plugin.proc.pid
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    files: set[str] = set()
    for root in (node.state_dir, node.cdi, node.mps_root):
        if root.exists():
            files |= {str(p.relative_to(node.base)) for p in root.rglob("*") if not p.name.endswith(".log")}
    return Footprint(
        fds=len(list(Path(f"/proc/{pid}/fd").iterdir())),
        threads=int(status["Threads"].strip()),
        rss_kib=int(status["VmRSS"].split()[0]),
        files=frozenset(files),
    )


@pytest.fixture
def node() -> Iterator[Node]:
    made = make_node("a100-40gb-x8", mps=True)
    yield made
    made.cleanup()
    shutil.rmtree(made.base, ignore_errors=True)


@pytest.mark.long
@pytest.mark.slow
def test_prepare_unprepare_cycles_leave_fds_threads_memory_and_files_flat(node: Node) -> None:
    cycles = scaled(60, 2200)
    plain = [node.put(claim_for(f"uid-soak-{i}", f"gpu-{i}")) for i in range(4)]
    sliced = node.put(claim_for("uid-soak-ts", "gpu-5", [TIMESLICE_CONFIG]))
    plugin = node.start().wait_ready()
    baseline: Footprint | None = None
    for n in range(cycles):
        batch = [*plain, sliced] if n % 10 == 0 else plain
        for claim in batch:
            plugin.prepare(claim)
        for claim in batch:
            plugin.unprepare(claim)
        if n == WARMUP:
            baseline = footprint(plugin, node)
    assert baseline is not None
    end = footprint(plugin, node)
    assert end.files == baseline.files, sorted(end.files ^ baseline.files)
    assert end.fds <= baseline.fds + 2, (baseline, end)
    assert end.threads <= baseline.threads + 2, (baseline, end)
    assert end.rss_kib <= baseline.rss_kib + 16 * 1024, (baseline, end)
    assert node.claims() == {}
    assert node.specs() == set()
    plugin.stop()
