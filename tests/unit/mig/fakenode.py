"""A fake pynvml node with the MIG extension, for MIG tests here and under tests/unit/driver."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.nvml.backend import Nvml
from driver.nvml.fakepynvml import make_fake_pynvml
from driver.nvml.mig import NvmlMigBackend


@dataclass
class FakeNode:
    module: Any
    nvml: Nvml
    backend: NvmlMigBackend
    state_path: Path

    @property
    def state(self) -> Any:
        return self.module.fake.state

    def uuid(self, index: int = 0) -> str:
        return self.nvml.gpu(index).uuid


def make_node(tmp_path: Path, topology: str) -> FakeNode:
    state_path = tmp_path / f"{topology}.json"
    module = make_fake_pynvml(topology, state_path, "node-a")
    nvml = Nvml(module)
    return FakeNode(module, nvml, NvmlMigBackend(nvml), state_path)
