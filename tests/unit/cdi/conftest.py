"""Shared fixtures for the CDI tests: a fake driver root with two GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ground.driverroot import FakeDriverRoot, make_fake_driver_root

UID = "c8593c85-1b2e-4d6f-9a10-3f2e1d0c4b5a"


@pytest.fixture
def fake_root(tmp_path: Path) -> FakeDriverRoot:
    return make_fake_driver_root(tmp_path / "driver-root", [0, 1])
