"""Fixtures: fake pynvml nodes with the MIG extension, and a manager over one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mig.manager import MigManager
from tests.unit.mig.fakenode import FakeNode, make_node


@pytest.fixture
def a100(tmp_path: Path) -> Iterator[FakeNode]:
    """One A100-SXM4-40GB with MIG mode already on (no instances)."""
    node = make_node(tmp_path, "a100-40gb-x1-mig")
    yield node
    node.nvml.shutdown()


@pytest.fixture
def h100(tmp_path: Path) -> Iterator[FakeNode]:
    """Eight H100 80GB, MIG off."""
    node = make_node(tmp_path, "h100-80gb-x8")
    yield node
    node.nvml.shutdown()


@pytest.fixture
def a100_manager(a100: FakeNode) -> MigManager:
    return MigManager(a100.backend)
