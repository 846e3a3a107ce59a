"""The CEL agreement corpus (tests/data/cel-corpus) and the nodes it runs on, shared by unit and e2e tests."""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from driver.debug.commands import inventory_slices, topology_inventory
from driver.inventory import Inventory

CORPUS_DIR = Path(__file__).resolve().parents[4] / "tests" / "data" / "cel-corpus"
VERDICTS = ("fits", "unschedulable", "rejected")


@dataclass(frozen=True)
class Case:
    file: str
    node: str  # a100t4 | mig
    name: str
    expect: str
    devices: dict[str, Any]

    def claim(self, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": self.name, "namespace": namespace},
            "spec": {"devices": copy.deepcopy(self.devices)},
        }


def _devices(raw: dict[str, Any]) -> dict[str, Any]:
    if "devices" in raw:
        return dict(raw["devices"])
    exactly: dict[str, Any] = {"deviceClassName": raw.get("class", "gpu.nvidia.com")}
    if raw.get("mode") == "All":
        exactly["allocationMode"] = "All"
    else:
        exactly["count"] = int(raw.get("count", 1))
    if raw.get("selectors"):
        exactly["selectors"] = [{"cel": {"expression": e}} for e in raw["selectors"]]
    return {"requests": [{"name": "r", "exactly": exactly}]}


def load_corpus() -> list[Case]:
    cases = []
    for path in sorted(CORPUS_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for raw in doc["cases"]:
            assert raw["expect"] in VERDICTS, f"{path.name}: case {raw['name']} has bad expect"
            cases.append(Case(path.name, doc["node"], raw["name"], raw["expect"], _devices(raw)))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "corpus case names must be unique"
    return cases


@functools.cache
def node_inventory(kind: str) -> Inventory:
    """a100t4: 8x A100-40GB (gpu-0..7) + 4x T4 (gpu-8..11); mig: one A100-40GB in dynamic MIG mode."""
    if kind == "mig":
        return topology_inventory("a100-40gb-x1-mig", "corpus")
    a100 = topology_inventory("a100-40gb-x8", "corpus")
    t4 = topology_inventory("t4-x4", "corpus-t4")
    renamed = tuple(
        dataclasses.replace(d, name=f"gpu-{d.gpu_minor + 8}", gpu_minor=d.gpu_minor + 8) for d in t4.devices
    )
    return Inventory(devices=a100.devices + renamed)


def node_slices(kind: str, node_name: str, server_minor: int = 36) -> list[dict[str, Any]]:
    return inventory_slices(node_inventory(kind), node_name, server_minor=server_minor)
