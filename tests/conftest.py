"""Shared pytest fixtures: the real control plane and an admin client, started once per session.

Why: starting etcd + kube-* costs seconds, so one control plane serves every e2e test of a
session; tests isolate themselves by namespace and node names. e2e tests run last so a quick
unit failure shows before the slow ground is built.

What it does not do: build or start anything for tests that do not ask for these fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kclient

from tests.ground import longrun, peers
from tests.ground.controlplane import ControlPlane, start_control_plane

_LOG_HINTS_KEY = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--k8s-version",
        default=None,
        help="Kubernetes version of the control plane for e2e tests (default: env GPU_DRA_K8S_VERSION, "
        "else K8S_PRIMARY in tests/peers/pins.env)",
    )
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run tests marked long at full length (make test runs them shortened)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Read at import time by tests marked ``long`` (hypothesis settings, parametrize sizes).
    if config.getoption("--long"):
        os.environ[longrun.ENV] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Stable sort: e2e tests go last, everything else keeps its order.
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


def _k8s_version(config: pytest.Config) -> str:
    opt = config.getoption("--k8s-version")
    if opt:
        return str(opt)
    return peers.k8s_version()


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-scheduler + kube-controller-manager for the whole session."""
    version = _k8s_version(request.config)
    cp = start_control_plane(tmp_path_factory.mktemp(f"controlplane-{version}"), version=version)
    request.config.stash[_LOG_HINTS_KEY] = cp.logs_hint()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kube_client(control_plane: ControlPlane) -> Iterator[kclient.ApiClient]:
    """Admin (system:masters) ApiClient for the session's control plane."""
    api = control_plane.api_client()
    try:
        yield api
    finally:
        closer: Any = api.close
        closer()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and "control_plane" in getattr(item, "fixturenames", ()):
        hint = item.config.stash.get(_LOG_HINTS_KEY, None)
        if hint:
            report.sections.append(("control plane", hint))
    return report


def pytest_report_header(config: pytest.Config) -> str:
    cache = peers.cache_dir()
    return f"gpu-dra peers: {cache} (k8s {_k8s_version(config)}; rebuild: tests/peers/build.sh)" + (
        "" if Path(cache).exists() else " - not built yet"
    )
