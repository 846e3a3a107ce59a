"""Fixtures for end-to-end tests on simulated GPU nodes: ``cluster`` and ``node_factory``.

Why: every scenario test needs the same ground - the session's control plane with the chart's
ServiceAccount, RBAC and admission policy, and a few nodes (real kubelet, fake GPUs, the real
plugin) that are gone again when the test ends (the scheduler must never see a node of an
earlier test). On a failing test the plugin's log tail and the kubelet's records of each node are
added to the report. A test marked ``real_kubelet`` fails if any of its nodes ran the emulator.

What it does not do: start the control plane (tests/conftest.py does, once per session).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest
from kubernetes import client as kclient

from tests.ground.controlplane import ControlPlane
from tests.ground.node import REAL_KUBELET, Cluster, NodeFactory, start_cluster_objects

_FACTORY_KEY = pytest.StashKey[NodeFactory]()


@pytest.fixture(scope="session")
def cluster(control_plane: ControlPlane, kube_client: kclient.ApiClient) -> Cluster:
    """The session's control plane with the chart's objects (DeviceClasses come per test)."""
    return start_cluster_objects(control_plane, kube_client)


@pytest.fixture
def node_factory(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeFactory]:
    """Simulated nodes and applied manifests for one test; all deleted again at its end."""
    factory = NodeFactory(cluster, tmp_path_factory.mktemp("nodes"))
    request.node.stash[_FACTORY_KEY] = factory
    made: list[tuple[str, str]] = []
    try:
        yield factory
        made = [(n.name, n.kubelet_kind) for n in factory.nodes]
    finally:
        factory.cleanup()
    # A test marked real_kubelet must not have run on the emulator behind the mark's back.
    emulated = [name for name, kind in made if kind != REAL_KUBELET]
    if request.node.get_closest_marker("real_kubelet") is not None and emulated:
        pytest.fail(f"test marked real_kubelet ran nodes {emulated} on the kubelet emulator")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    factory = item.stash.get(_FACTORY_KEY, None)
    if report.failed and factory is not None:
        for node in factory.nodes:
            report.sections.append((f"simulated node {node.name}", node.diagnostics()))
    return report
