"""The kubelet's view: real gRPC over Unix sockets to the DRA service and the registration service."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from driver.errors import ConfigError
from driver.kubeletapi import (
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    registration_pb2,
    registration_pb2_grpc,
)
from driver.kubeletplugin import KubeletPlugin, SocketPaths
from driver.kubeletplugin.claims import StaticClaimSource
from driver.kubeletplugin.draservice import DraService
from driver.kubeletplugin.health import HealthServer, probe
from driver.kubeletplugin.sockets import MAX_SOCKET_PATH
from tests.integration.test_state import DRIVER, NODE, Node, make_claim, make_node


@dataclass
class Plugin:
    node: Node
    claims: StaticClaimSource
    plugin: KubeletPlugin
    paths: SocketPaths

    def channel(self, path: Path | None = None) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{path or self.paths.dra}")

    def v1(self) -> Any:
        return dra_v1_pb2_grpc.DRAPluginStub(self.channel())

    def v1beta1(self) -> Any:
        return dra_v1beta1_pb2_grpc.DRAPluginStub(self.channel())


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_plugin(node: Node, sockets_root: Path, pod_uid: str | None = None) -> Plugin:
    claims = StaticClaimSource()
    paths = SocketPaths.for_driver(sockets_root / "registry", sockets_root / "plugins", DRIVER, pod_uid)
    plugin = KubeletPlugin(DRIVER, paths, DraService(node.state, claims))
    plugin.start()
    return Plugin(node, claims, plugin, paths)


@pytest.fixture
def plugin(tmp_path: Path, short_dir: Path) -> Iterator[Plugin]:
    p = start_plugin(make_node(tmp_path), short_dir)
    yield p
    p.plugin.stop(grace_s=0.5)


def v1_claim(claim: dict[str, Any]) -> dra_v1_pb2.Claim:
    m = claim["metadata"]
    return dra_v1_pb2.Claim(namespace=m["namespace"], name=m["name"], uid=m["uid"])


def v1beta1_claim(claim: dict[str, Any]) -> dra_v1beta1_pb2.Claim:
    m = claim["metadata"]
    return dra_v1beta1_pb2.Claim(namespace=m["namespace"], name=m["name"], uid=m["uid"])


# ---- registration ---------------------------------------------------------------------------


def test_getinfo_names_driver_endpoint_and_services(plugin: Plugin) -> None:
    """GetInfo: type DRAPlugin, the driver name, the DRA socket, v1 before v1beta1."""
    stub = registration_pb2_grpc.RegistrationStub(plugin.channel(plugin.paths.registration))
    info = stub.GetInfo(registration_pb2.InfoRequest(), timeout=5)
    assert info.type == "DRAPlugin"
    assert info.name == DRIVER
    assert info.endpoint == str(plugin.paths.dra)
    assert list(info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    assert plugin.paths.dra == plugin.paths.dra.parent / "dra.sock"
    assert plugin.paths.registration.name == f"{DRIVER}-reg.sock"


def test_registration_status_is_recorded_and_refusal_answered_with_error(plugin: Plugin) -> None:
    """A successful notification sets `registered`; a refusal is logged and answered with an error."""
    stub = registration_pb2_grpc.RegistrationStub(plugin.channel(plugin.paths.registration))
    stub.NotifyRegistrationStatus(registration_pb2.RegistrationStatus(plugin_registered=True), timeout=5)
    assert plugin.plugin.registration.registered.is_set()
    with pytest.raises(grpc.RpcError) as info:
        stub.NotifyRegistrationStatus(
            registration_pb2.RegistrationStatus(plugin_registered=False, error="no overlap"), timeout=5
        )
    assert "no overlap" in (info.value.details() or "")
    assert not plugin.plugin.registration.registered.is_set()


def test_pod_uid_gives_per_instance_socket_names(tmp_path: Path, short_dir: Path) -> None:
    """With a pod UID both sockets carry it (rolling updates)."""
    p = start_plugin(make_node(tmp_path), short_dir, pod_uid="abc-123")
    try:
        assert p.paths.dra.name == "dra-abc-123.sock"
        assert p.paths.registration.name == f"{DRIVER}-abc-123-reg.sock"
        assert p.paths.dra.exists()
        assert p.paths.registration.exists()
    finally:
        p.plugin.stop(0.5)


# ---- prepare / unprepare over the wire ----------------------------------------------------------


def test_v1_prepare_and_unprepare(plugin: Plugin) -> None:
    """v1: devices with pool, name, CDI id; unprepare removes the spec; entries keyed by UID."""
    claim = make_claim("uid-1", [("gpu", "gpu-0")])
    plugin.claims.put(claim)
    resp = plugin.v1().NodePrepareResources(
        dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(claim)]), timeout=10
    )
    entry = resp.claims["uid-1"]
    assert entry.error == ""
    [device] = entry.devices
    assert (device.pool_name, device.device_name, list(device.request_names)) == (NODE, "gpu-0", ["gpu"])
    assert list(device.cdi_device_ids) == ["k8s.gpu.nvidia.com/claim=uid-1-gpu-0"]
    assert not device.HasField("share_id")
    assert plugin.node.spec_path("uid-1").exists()
    un = plugin.v1().NodeUnprepareResources(
        dra_v1_pb2.NodeUnprepareResourcesRequest(claims=[v1_claim(claim)]), timeout=10
    )
    assert "uid-1" in un.claims
    assert un.claims["uid-1"].error == ""
    assert not plugin.node.spec_path("uid-1").exists()


def test_v1beta1_prepare_and_unprepare(plugin: Plugin) -> None:
    """v1beta1 (kubelet 1.32/1.33) gets the same devices, without share_id."""
    claim = make_claim(
        "uid-1", [("gpu", "gpu-1")], share_ids={"gpu-1": "5a0b6c1e-1111-4222-8333-444455556666"}
    )
    plugin.claims.put(claim)
    resp = plugin.v1beta1().NodePrepareResources(
        dra_v1beta1_pb2.NodePrepareResourcesRequest(claims=[v1beta1_claim(claim)]), timeout=10
    )
    [device] = resp.claims["uid-1"].devices
    assert device.device_name == "gpu-1"
    assert list(device.cdi_device_ids) == ["k8s.gpu.nvidia.com/claim=uid-1-gpu-1"]
    un = plugin.v1beta1().NodeUnprepareResources(
        dra_v1beta1_pb2.NodeUnprepareResourcesRequest(claims=[v1beta1_claim(claim)]), timeout=10
    )
    assert un.claims["uid-1"].error == ""
    assert plugin.node.recorded("uid-1") is None


def test_v1_carries_share_id(plugin: Plugin) -> None:
    """results[].shareID is sent as Device.share_id on v1."""
    share = "5a0b6c1e-1111-4222-8333-444455556666"
    claim = make_claim("uid-1", [("gpu", "gpu-1")], share_ids={"gpu-1": share})
    plugin.claims.put(claim)
    resp = plugin.v1().NodePrepareResources(
        dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(claim)]), timeout=10
    )
    assert resp.claims["uid-1"].devices[0].share_id == share


def test_subrequest_names_are_stripped(plugin: Plugin) -> None:
    """'req/sub' results are reported under 'req', once."""
    claim = make_claim("uid-1", [("big/a100", "gpu-2"), ("big/a100", "gpu-3")])
    plugin.claims.put(claim)
    resp = plugin.v1().NodePrepareResources(
        dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(claim)]), timeout=10
    )
    assert [list(d.request_names) for d in resp.claims["uid-1"].devices] == [["big"], ["big"]]


def test_empty_request_answers_at_once(plugin: Plugin) -> None:
    """An empty NodePrepareResources (liveness probe) gets an empty answer and fetches nothing."""
    resp = plugin.v1().NodePrepareResources(dra_v1_pb2.NodePrepareResourcesRequest(), timeout=5)
    assert len(resp.claims) == 0
    assert plugin.claims.gets == 0


def test_per_claim_errors_never_fail_the_call(plugin: Plugin) -> None:
    """Bad claims get their own error text; the good claim in the same call is prepared."""
    good = make_claim("uid-good", [("gpu", "gpu-0")])
    unallocated = make_claim("uid-unalloc", [("gpu", "gpu-1")], allocated=False)
    replaced = make_claim("uid-new", [("gpu", "gpu-2")], name="replaced")
    held = make_claim("uid-held", [("gpu", "gpu-0")])
    for c in (good, unallocated, replaced, held):
        plugin.claims.put(c)
    # The held claim comes second: gpu-0 is taken by the good one first.
    plugin.v1().NodePrepareResources(
        dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(good)]), timeout=10
    )
    request = dra_v1_pb2.NodePrepareResourcesRequest(
        claims=[
            v1_claim(good),
            v1_claim(unallocated),
            dra_v1_pb2.Claim(namespace="default", name="replaced", uid="uid-old"),
            dra_v1_pb2.Claim(namespace="default", name="gone", uid="uid-gone"),
            v1_claim(held),
        ]
    )
    resp = plugin.v1().NodePrepareResources(request, timeout=10)
    assert set(resp.claims) == {"uid-good", "uid-unalloc", "uid-old", "uid-gone", "uid-held"}
    assert resp.claims["uid-good"].error == ""
    assert [d.device_name for d in resp.claims["uid-good"].devices] == ["gpu-0"]
    assert "not allocated" in resp.claims["uid-unalloc"].error
    assert "got replaced" in resp.claims["uid-old"].error
    assert "uid-new" in resp.claims["uid-old"].error
    assert "not found" in resp.claims["uid-gone"].error
    assert "already prepared for another claim (UID uid-good)" in resp.claims["uid-held"].error
    assert "default/claim-uid-good" not in resp.claims["uid-held"].error
    for uid in ("uid-unalloc", "uid-old", "uid-gone", "uid-held"):
        assert len(resp.claims[uid].devices) == 0


def test_unprepare_of_unknown_claim_succeeds(plugin: Plugin) -> None:
    """The kubelet may unprepare a claim this instance never saw: success, and no API call."""
    resp = plugin.v1().NodeUnprepareResources(
        dra_v1_pb2.NodeUnprepareResourcesRequest(
            claims=[dra_v1_pb2.Claim(namespace="ns", name="x", uid="uid-x")]
        ),
        timeout=10,
    )
    assert resp.claims["uid-x"].error == ""
    assert plugin.claims.gets == 0


def test_64_concurrent_calls_prepare_each_claim_once(plugin: Plugin) -> None:
    """8 claims on 8 GPUs, each named by 8 pods' calls at once: all succeed, each spec written once."""
    claims = [make_claim(f"uid-{i}", [("gpu", f"gpu-{i}")]) for i in range(8)]
    for c in claims:
        plugin.claims.put(c)
    start = threading.Barrier(64)
    stub = plugin.v1()

    def call(i: int) -> Any:
        claim = claims[i % 8]
        start.wait(30)
        return stub.NodePrepareResources(
            dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(claim)]), timeout=30
        )

    with ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(call, range(64)))
    for i, resp in enumerate(responses):
        uid = f"uid-{i % 8}"
        assert resp.claims[uid].error == ""
        assert [d.device_name for d in resp.claims[uid].devices] == [f"gpu-{i % 8}"]
    assert sorted(plugin.node.spec_writes) == sorted(f"uid-{i}" for i in range(8))


def test_claims_of_one_call_are_prepared(plugin: Plugin) -> None:
    """Several claims in one call (prepared in parallel) each get their devices."""
    claims = [make_claim(f"uid-{i}", [("gpu", f"gpu-{i}")]) for i in range(8)]
    for c in claims:
        plugin.claims.put(c)
    resp = plugin.v1().NodePrepareResources(
        dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(c) for c in claims]), timeout=30
    )
    assert {uid: [d.device_name for d in e.devices] for uid, e in resp.claims.items()} == {
        f"uid-{i}": [f"gpu-{i}"] for i in range(8)
    }


# ---- sockets ----------------------------------------------------------------------------------


def test_stale_socket_is_replaced_and_only_ours_removed_on_stop(tmp_path: Path, short_dir: Path) -> None:
    """A stale socket from an earlier run is replaced; stop removes our two sockets and nothing else."""
    registry = short_dir / "registry"
    registry.mkdir()
    stale = registry / f"{DRIVER}-reg.sock"
    other = registry / "other.example.com-reg.sock"
    for path in (stale, other):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    p = start_plugin(make_node(tmp_path), short_dir)
    stub = registration_pb2_grpc.RegistrationStub(p.channel(p.paths.registration))
    assert stub.GetInfo(registration_pb2.InfoRequest(), timeout=5).name == DRIVER
    p.plugin.stop(0.5)
    assert not p.paths.registration.exists()
    assert not p.paths.dra.exists()
    assert other.exists()


def test_a_regular_file_in_the_socket_place_is_not_deleted(tmp_path: Path, short_dir: Path) -> None:
    """A non-socket file where the socket goes is an error, never silently removed."""
    dra = short_dir / "plugins" / DRIVER / "dra.sock"
    dra.parent.mkdir(parents=True)
    dra.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        start_plugin(make_node(tmp_path), short_dir)
    assert dra.read_text() == "precious"


def test_health_service_checks_both_sockets(plugin: Plugin) -> None:
    """The gRPC health check answers SERVING while both sockets work, NOT_SERVING after stop."""
    assert probe(plugin.paths) is None
    health = HealthServer(plugin.paths, 0)
    health.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health.port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check", None, None)
            assert check(b"", timeout=10) == b"\x08\x01"
            plugin.plugin.stop(0.5)
            assert check(b"", timeout=10) == b"\x08\x02"
    finally:
        health.stop()
    assert probe(plugin.paths, timeout_s=1) is not None


def test_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    """A socket path over the Unix limit fails with a message naming the flags to shorten."""
    deep = tmp_path / ("x" * 120)
    too_long = "set --kubelet-{}-directory-path to a directory at most 83 "
    with pytest.raises(ConfigError, match=too_long.format("registrar")):
        SocketPaths.for_driver(deep, Path("/tmp/gd"), DRIVER)
    with pytest.raises(ConfigError, match=too_long.format("plugins")):
        SocketPaths.for_driver(Path("/tmp/gd"), deep, DRIVER)


def test_registration_socket_binds_where_its_name_just_fits(short_dir: Path) -> None:
    """The hidden name the registration socket is bound under before its rename is never longer
    than the socket's own name, so a registrar dir whose final path just fits works (a staging
    name of the form ``.<name>.tmp`` failed to bind there with gRPC's bare "Failed to bind")."""
    pod_uid = "0f6c1e2a-8d4b-4c3e-9a7f-5b2d1c0e9f8a"
    name = f"{DRIVER}-{pod_uid}-reg.sock"
    registry = short_dir / ("r" * (MAX_SOCKET_PATH - len(str(short_dir)) - 2 - len(name)))
    paths = SocketPaths.for_driver(registry, short_dir / "p", DRIVER, pod_uid)
    assert len(str(paths.registration)) == MAX_SOCKET_PATH
    node = make_node(short_dir / "n")
    plugin = KubeletPlugin(DRIVER, paths, DraService(node.state, StaticClaimSource()))
    plugin.start()
    try:
        assert paths.registration.is_socket()
        assert [p.name for p in registry.iterdir()] == [name]
    finally:
        plugin.stop(grace_s=0.5)


def test_health_address_that_cannot_be_listened_on_names_the_flag(plugin: Plugin) -> None:
    """A wrong --healthcheck-address is a config error saying which flag, not a grpc traceback."""
    with pytest.raises(ConfigError, match=r"--healthcheck-address / HEALTHCHECK_ADDRESS 192\.0\.2\.7"):
        HealthServer(plugin.paths, 0, "192.0.2.7")
