"""The kubelet emulator against tiny hand-written plugins on real Unix sockets.

These tests pin the emulator to the kubelet rules of shared/spec/kubelet-dra-protocol.md
(registration handshake, service choice, instance choice, response checks, slice wiping, and
the pod-driven claim bookkeeping) without any driver code: the plugins here are a few lines of
gRPC servicers written in this file.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from driver.kubeletapi import (
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    registration_pb2,
    registration_pb2_grpc,
)
from tests.ground.kubelet import (
    KUBELET_132_SERVICES,
    KUBELET_134_SERVICES,
    SERVICE_V1,
    SERVICE_V1BETA1,
    KubeletEmulator,
    KubeletError,
)

pytestmark = pytest.mark.timeout(30)

DRIVER = "gpu.test.example.com"
WAIT = 5.0

# A prepare handler gets (service, claims) and returns {uid: (devices, error)}, or raises.
Handler = Callable[[str, list[tuple[str, str, str]]], dict[str, tuple[list[dict[str, Any]], str]]]


def one_device_each(
    _service: str, claims: list[tuple[str, str, str]]
) -> dict[str, tuple[list[dict[str, Any]], str]]:
    return {
        uid: (
            [
                {
                    "request_names": ["gpu"],
                    "pool_name": "node-a",
                    "device_name": "gpu-0",
                    "cdi_device_ids": [f"k8s.{DRIVER}/claim={uid}-gpu-0"],
                    "share_id": "3f1c0a52-0000-4000-8000-000000000001",
                }
            ],
            "",
        )
        for _ns, uid, _name in claims
    }


class _Registration(registration_pb2_grpc.RegistrationServicer):
    def __init__(self, plugin: FakePlugin) -> None:
        self.plugin = plugin

    def GetInfo(self, request: Any, context: Any) -> registration_pb2.PluginInfo:
        with self.plugin.cond:
            self.plugin.get_info_calls += 1
        return registration_pb2.PluginInfo(
            type=self.plugin.plugin_type,
            name=self.plugin.name,
            endpoint=self.plugin.advertised_endpoint,
            supported_versions=self.plugin.versions,
        )

    def NotifyRegistrationStatus(
        self, request: Any, context: Any
    ) -> registration_pb2.RegistrationStatusResponse:
        with self.plugin.cond:
            self.plugin.notifications.append((request.plugin_registered, request.error))
            self.plugin.cond.notify_all()
        return registration_pb2.RegistrationStatusResponse()


def _make_dra_servicer(plugin: FakePlugin, service: str, pb: Any, base: Any) -> Any:
    class Servicer(base):  # type: ignore[misc]
        def NodePrepareResources(self, request: Any, context: Any) -> Any:
            claims = [(c.namespace, c.uid, c.name) for c in request.claims]
            plugin.calls.append((service, "prepare", claims))
            try:
                answer = plugin.handler(service, claims)
            except Exception as err:
                context.abort(grpc.StatusCode.INTERNAL, str(err))
            resp = pb.NodePrepareResourcesResponse()
            for uid, (devices, error) in answer.items():
                entry = resp.claims[uid]
                entry.error = error
                for device in devices:
                    fields = dict(device)
                    if service == SERVICE_V1BETA1:
                        fields.pop("share_id", None)
                    entry.devices.append(pb.Device(**fields))
            return resp

        def NodeUnprepareResources(self, request: Any, context: Any) -> Any:
            claims = [(c.namespace, c.uid, c.name) for c in request.claims]
            plugin.calls.append((service, "unprepare", claims))
            answer = plugin.unprepare_handler(claims)
            resp = pb.NodeUnprepareResourcesResponse()
            for uid, error in answer.items():
                resp.claims[uid].error = error
            return resp

    return Servicer()


class FakePlugin:
    """A DRA plugin in miniature: registration socket + DRA v1/v1beta1 socket."""

    def __init__(
        self,
        root: Path,
        registry: Path,
        *,
        name: str = DRIVER,
        reg_name: str | None = None,
        dra_name: str = "dra.sock",
        plugin_type: str = "DRAPlugin",
        versions: tuple[str, ...] = (SERVICE_V1, SERVICE_V1BETA1),
        serve: tuple[str, ...] = (SERVICE_V1, SERVICE_V1BETA1),
        endpoint: str | None = None,
        handler: Handler = one_device_each,
    ) -> None:
        self.name = name
        self.plugin_type = plugin_type
        self.versions = list(versions)
        self.serve = serve
        self.handler = handler
        self.unprepare_handler: Callable[[list[tuple[str, str, str]]], dict[str, str]] = lambda claims: {
            uid: "" for _ns, uid, _n in claims
        }
        self.reg_sock = registry / (reg_name or f"{name}-reg.sock")
        self.dra_sock = root / dra_name
        self.advertised_endpoint = str(self.dra_sock) if endpoint is None else endpoint
        self.cond = threading.Condition()
        self.notifications: list[tuple[bool, str]] = []
        self.get_info_calls = 0
        self.calls: list[tuple[str, str, list[tuple[str, str, str]]]] = []
        self.dra_server: grpc.Server | None = None
        self.reg_server: grpc.Server | None = None

    def _dra_server(self) -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        if SERVICE_V1 in self.serve:
            dra_v1_pb2_grpc.add_DRAPluginServicer_to_server(
                _make_dra_servicer(self, SERVICE_V1, dra_v1_pb2, dra_v1_pb2_grpc.DRAPluginServicer), server
            )
        if SERVICE_V1BETA1 in self.serve:
            dra_v1beta1_pb2_grpc.add_DRAPluginServicer_to_server(
                _make_dra_servicer(
                    self, SERVICE_V1BETA1, dra_v1beta1_pb2, dra_v1beta1_pb2_grpc.DRAPluginServicer
                ),
                server,
            )
        return server

    def start_dra(self) -> None:
        self.dra_sock.unlink(missing_ok=True)
        self.dra_server = self._dra_server()
        self.dra_server.add_insecure_port(f"unix:{self.dra_sock}")
        self.dra_server.start()

    def stop_dra(self) -> None:
        if self.dra_server is not None:
            self.dra_server.stop(None).wait()
            self.dra_server = None
        self.dra_sock.unlink(missing_ok=True)

    def start(self) -> FakePlugin:
        # Like the Go helper: DRA service first, registration socket last.
        if self.advertised_endpoint:
            self.start_dra()
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        else:
            server = self._dra_server()  # one socket for both
        registration_pb2_grpc.add_RegistrationServicer_to_server(_Registration(self), server)
        self.reg_sock.parent.mkdir(parents=True, exist_ok=True)
        self.reg_sock.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{self.reg_sock}")
        server.start()
        self.reg_server = server
        return self

    def stop(self) -> None:
        if self.reg_server is not None:
            self.reg_server.stop(None).wait()
            self.reg_server = None
        self.reg_sock.unlink(missing_ok=True)
        self.stop_dra()

    def wait_notified(self, timeout: float = WAIT) -> tuple[bool, str]:
        with self.cond:
            assert self.cond.wait_for(lambda: self.notifications, timeout), (
                "no NotifyRegistrationStatus arrived"
            )
            return self.notifications[0]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="kem", dir="/tmp"))
    (d / "reg").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def plugins(sockdir: Path) -> Iterator[Callable[..., FakePlugin]]:
    made: list[FakePlugin] = []

    def make(sub: str = "p", **kw: Any) -> FakePlugin:
        root = sockdir / sub
        root.mkdir(exist_ok=True)
        p = FakePlugin(root, sockdir / "reg", **kw)
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def kubelet(sockdir: Path) -> Iterator[Callable[..., KubeletEmulator]]:
    made: list[KubeletEmulator] = []

    def make(**kw: Any) -> KubeletEmulator:
        emu = KubeletEmulator("node-a", None, sockdir / "reg", **kw)
        emu.start()
        made.append(emu)
        return emu

    yield make
    for e in made:
        e.stop()


CLAIM = ("default", "uid-1", "claim-1")


# ---------------------------------------------------------------- registration


def test_handshake_completes_and_notify_true_arrives(plugins, kubelet):
    plugin = plugins()
    emu = kubelet()
    rec = emu.wait_registered(DRIVER, timeout=WAIT)
    assert plugin.wait_notified() == (True, "")
    assert rec.ok
    assert rec.endpoint == str(plugin.dra_sock)
    assert rec.socket_path == plugin.reg_sock
    assert plugin.get_info_calls == 1


def test_kubelet_134_uses_v1_when_plugin_lists_it_first(plugins, kubelet):
    plugin = plugins()
    emu = kubelet(known_services=KUBELET_134_SERVICES)
    assert emu.wait_registered(DRIVER, timeout=WAIT).service == SERVICE_V1
    emu.wait_for(lambda: emu.is_connected(DRIVER), WAIT, "connection")
    result = emu.prepare(DRIVER, [CLAIM])
    assert plugin.calls == [(SERVICE_V1, "prepare", [CLAIM])]
    (dev,) = result["uid-1"]
    assert dev.pool_name == "node-a"
    assert dev.device_name == "gpu-0"
    assert dev.request_names == ("gpu",)
    assert dev.cdi_device_ids == (f"k8s.{DRIVER}/claim=uid-1-gpu-0",)
    assert dev.share_id == "3f1c0a52-0000-4000-8000-000000000001"


def test_plugin_order_decides_between_known_services(plugins, kubelet):
    plugins(versions=(SERVICE_V1BETA1, SERVICE_V1))
    emu = kubelet(known_services=KUBELET_134_SERVICES)
    assert emu.wait_registered(DRIVER, timeout=WAIT).service == SERVICE_V1BETA1


def test_kubelet_132_picks_v1beta1_and_calls_it(plugins, kubelet):
    plugin = plugins(versions=(SERVICE_V1, SERVICE_V1BETA1, "v1alpha1.DRAResourceHealth"))
    emu = kubelet(known_services=KUBELET_132_SERVICES)
    assert emu.wait_registered(DRIVER, timeout=WAIT).service == SERVICE_V1BETA1
    result = emu.prepare(DRIVER, [CLAIM])
    emu.unprepare(DRIVER, [CLAIM])
    assert [(s, m) for s, m, _c in plugin.calls] == [
        (SERVICE_V1BETA1, "prepare"),
        (SERVICE_V1BETA1, "unprepare"),
    ]
    assert result["uid-1"][0].share_id is None


def test_no_common_service_is_rejected_with_notify_false(plugins, kubelet):
    plugin = plugins(versions=("v1alpha4.DRAPlugin",), serve=())
    emu = kubelet()
    ok, error = plugin.wait_notified()
    assert not ok
    assert "none of the services supported by the plugin" in error
    assert "v1alpha4.DRAPlugin" in error
    assert emu.instances(DRIVER) == []
    assert emu.registrations[0].error == error


def test_kubelet_132_rejects_a_v1_only_plugin(plugins, kubelet):
    plugin = plugins(versions=(SERVICE_V1,))
    emu = kubelet(known_services=KUBELET_132_SERVICES)
    ok, error = plugin.wait_notified()
    assert not ok
    assert "supported by the kubelet" in error
    assert emu.plugin_for(DRIVER) is None


def test_wrong_plugin_type_is_rejected(plugins, kubelet):
    plugin = plugins(plugin_type="CSIPlugin")
    emu = kubelet()
    ok, error = plugin.wait_notified()
    assert not ok
    assert "no handler registered for plugin type: CSIPlugin" in error
    assert emu.instances(DRIVER) == []


def test_empty_endpoint_means_the_registration_socket_serves_dra(plugins, kubelet):
    plugin = plugins(endpoint="")
    emu = kubelet()
    rec = emu.wait_registered(DRIVER, timeout=WAIT)
    assert rec.endpoint == str(plugin.reg_sock)
    emu.prepare(DRIVER, [CLAIM])
    assert plugin.calls[0][1] == "prepare"


def test_same_endpoint_twice_is_rejected(plugins, kubelet, sockdir):
    first = plugins(reg_name="a-reg.sock")
    emu = kubelet()
    emu.wait_registered(DRIVER, timeout=WAIT)
    second = plugins(sub="q", reg_name="b-reg.sock", endpoint=str(first.dra_sock))
    ok, error = second.wait_notified()
    assert not ok
    assert f"endpoint {first.dra_sock} already registered" in error
    assert len(emu.instances(DRIVER)) == 1


def test_dot_names_are_ignored_and_subdirs_are_watched(plugins, kubelet, sockdir):
    hidden_file = plugins(sub="h1", name="hidden.example.com", reg_name=".hidden-reg.sock")
    hidden_dir = plugins(sub="h2", name="hidden2.example.com", reg_name=".dir/x-reg.sock")
    emu = kubelet()
    visible = plugins(sub="v", reg_name="sub/dir/gpu-reg.sock")
    emu.wait_registered(DRIVER, timeout=WAIT)
    assert visible.wait_notified() == (True, "")
    # The visible plugin appeared after the hidden ones, so every scan that found it saw them too.
    assert hidden_file.get_info_calls == 0
    assert hidden_dir.get_info_calls == 0
    assert {r.driver for r in emu.registrations} == {DRIVER}


def test_non_socket_files_are_ignored(kubelet, sockdir, plugins):
    (sockdir / "reg" / "not-a-socket.sock").write_text("x")
    emu = kubelet()
    plugins()
    emu.wait_registered(DRIVER, timeout=WAIT)
    assert [r.socket_path.name for r in emu.registrations] == [f"{DRIVER}-reg.sock"]


def test_socket_removal_deregisters(plugins, kubelet):
    plugin = plugins()
    emu = kubelet()
    emu.wait_registered(DRIVER, timeout=WAIT)
    plugin.reg_sock.unlink()
    emu.wait_for(lambda: not emu.instances(DRIVER), WAIT, "deregistration")
    assert emu.plugin_for(DRIVER) is None
    with pytest.raises(KubeletError, match="not registered"):
        emu.prepare(DRIVER, [CLAIM])


def test_recreated_socket_registers_again(plugins, kubelet):
    plugin = plugins()
    emu = kubelet()
    emu.wait_registered(DRIVER, timeout=WAIT)
    plugin.stop()
    plugin.start()
    emu.wait_for(lambda: len([r for r in emu.registrations if r.ok]) == 2, WAIT, "re-registration")
    emu.wait_for(lambda: len(emu.instances(DRIVER)) == 1, WAIT, "one live instance")


def test_newest_connected_instance_wins(plugins, kubelet):
    old = plugins(sub="old", reg_name=f"{DRIVER}-old-reg.sock")
    emu = kubelet()
    emu.wait_registered(DRIVER, timeout=WAIT)
    new = plugins(sub="new", reg_name=f"{DRIVER}-new-reg.sock")
    emu.wait_for(lambda: len(emu.instances(DRIVER)) == 2, WAIT, "second instance")
    emu.wait_for(lambda: emu.plugin_for(DRIVER).endpoint == str(new.dra_sock), WAIT, "newest instance chosen")

    new.stop_dra()  # registration socket stays: still registered, but not connected
    emu.wait_for(lambda: emu.plugin_for(DRIVER).endpoint == str(old.dra_sock), WAIT, "fallback to connected")
    emu.prepare(DRIVER, [CLAIM])
    assert [c[1] for c in old.calls] == ["prepare"]
    assert new.calls == []

    old.stop_dra()  # nobody connected: the most recent one is used
    emu.wait_for(lambda: not emu.is_connected(DRIVER), WAIT, "both disconnected")
    assert emu.plugin_for(DRIVER).endpoint == str(new.dra_sock)
    with pytest.raises(KubeletError, match=r"^NodePrepareResources: rpc error: code = Unavailable"):
        emu.prepare(DRIVER, [CLAIM])


# ---------------------------------------------------------------- response checks


@pytest.fixture
def registered(plugins, kubelet) -> Callable[[Handler], tuple[FakePlugin, KubeletEmulator]]:
    def make(handler: Handler) -> tuple[FakePlugin, KubeletEmulator]:
        plugin = plugins(handler=handler)
        emu = kubelet()
        emu.wait_registered(DRIVER, timeout=WAIT)
        return plugin, emu

    return make


def test_missing_claim_is_skipped_error(registered):
    _p, emu = registered(lambda s, claims: one_device_each(s, claims[:1]))
    with pytest.raises(KubeletError) as info:
        emu.prepare(DRIVER, [CLAIM, ("default", "uid-2", "claim-2")])
    assert str(info.value) == "NodePrepareResources skipped 1 ResourceClaims"
    assert set(info.value.partial) == {"uid-1"}
    assert emu.calls[-1].error == "NodePrepareResources skipped 1 ResourceClaims"


def test_unknown_uid_is_an_error(registered):
    _p, emu = registered(lambda s, claims: one_device_each(s, [*claims, ("default", "uid-x", "x")]))
    with pytest.raises(
        KubeletError, match="NodePrepareResources returned result for unknown claim UID uid-x"
    ):
        emu.prepare(DRIVER, [CLAIM])


def test_per_claim_error_uses_kubelet_text(registered):
    _p, emu = registered(lambda s, claims: {uid: ([], "GPU fell off the bus") for _n, uid, _c in claims})
    with pytest.raises(KubeletError) as info:
        emu.prepare(DRIVER, [CLAIM])
    assert str(info.value) == "NodePrepareResources failed for ResourceClaim claim-1: GPU fell off the bus"


def test_grpc_error_fails_the_whole_call(registered):
    def boom(_s: str, _c: list[tuple[str, str, str]]) -> dict[str, tuple[list[dict[str, Any]], str]]:
        raise RuntimeError("claim not allocated")

    _p, emu = registered(boom)
    with pytest.raises(
        KubeletError, match=r"^NodePrepareResources: rpc error: code = Internal desc = claim not"
    ):
        emu.prepare(DRIVER, [CLAIM])


def test_zero_devices_is_a_valid_answer(registered):
    plugin, emu = registered(lambda s, claims: {uid: ([], "") for _n, uid, _c in claims})
    assert emu.prepare(DRIVER, [CLAIM]) == {"uid-1": []}
    assert plugin.calls[0][2] == [CLAIM]


def test_unprepare_checks(registered):
    plugin, emu = registered(one_device_each)
    plugin.unprepare_handler = lambda claims: {}
    with pytest.raises(KubeletError, match=r"^NodeUnprepareResources skipped 1 ResourceClaims$"):
        emu.unprepare(DRIVER, [CLAIM])
    plugin.unprepare_handler = lambda claims: {"uid-1": "", "uid-9": ""}
    with pytest.raises(
        KubeletError, match="NodeUnprepareResources returned result for unknown claim UID uid-9"
    ):
        emu.unprepare(DRIVER, [CLAIM])
    plugin.unprepare_handler = lambda claims: {"uid-1": "busy"}
    with pytest.raises(
        KubeletError, match=r"^NodeUnprepareResources failed for claim default/claim-1: busy$"
    ):
        emu.unprepare(DRIVER, [CLAIM])
    plugin.unprepare_handler = lambda claims: {"uid-1": ""}
    emu.unprepare(DRIVER, [CLAIM])
    assert emu.calls[-1].error == ""
    assert emu.calls[-1].service == SERVICE_V1


# ---------------------------------------------------------------- slice wiping (no API server: recorded only)


def test_disconnect_wipe_fires_after_delay(plugins, kubelet):
    plugin = plugins()
    emu = kubelet(wipe_delay_s=0.2)
    emu.wait_registered(DRIVER, timeout=WAIT)
    emu.wait_for(lambda: emu.is_connected(DRIVER), WAIT, "connection")
    assert emu.wipes == []
    plugin.stop_dra()
    emu.wait_for(lambda: bool(emu.wipes), WAIT, "disconnect wipe")
    (wipe,) = emu.wipes
    assert wipe.driver == DRIVER
    assert wipe.field_selector == f"spec.nodeName=node-a,spec.driver={DRIVER}"
    assert not wipe.sent


def test_disconnect_wipe_is_cancelled_on_reconnect(plugins, kubelet):
    plugin = plugins()
    emu = kubelet(wipe_delay_s=60)
    emu.wait_registered(DRIVER, timeout=WAIT)
    emu.wait_for(lambda: emu.is_connected(DRIVER), WAIT, "connection")
    assert emu.pending_wipes == {}
    plugin.stop_dra()
    emu.wait_for(lambda: DRIVER in emu.pending_wipes, WAIT, "wipe scheduled")
    plugin.start_dra()
    emu.wait_for(lambda: emu.is_connected(DRIVER), WAIT, "reconnection")
    emu.wait_for(lambda: DRIVER not in emu.pending_wipes, WAIT, "wipe cancelled")
    assert emu.wipes == []


def test_startup_wipe_selects_the_whole_node(sockdir):
    emu = KubeletEmulator("node-b", None, sockdir / "reg")
    emu.wipe_node_slices()
    assert [(w.driver, w.field_selector) for w in emu.wipes] == [(None, "spec.nodeName=node-b")]


# ---------------------------------------------------------------- pod-driven bookkeeping (API seam stubbed)


def _claim(name: str, uid: str, pods: list[str], owner: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "uid": uid}
    if owner:
        meta["ownerReferences"] = [
            {"uid": owner, "controller": True, "kind": "Pod", "name": "x", "apiVersion": "v1"}
        ]
    return {
        "metadata": meta,
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": "gpu", "driver": DRIVER, "pool": "node-a", "device": "gpu-0"},
                        {"request": "mem/big", "driver": DRIVER, "pool": "node-a", "device": "gpu-1"},
                    ]
                }
            },
            "reservedFor": [{"resource": "pods", "name": p, "uid": p} for p in pods],
        },
    }


def _pod(
    uid: str, claims: list[dict[str, Any]], statuses: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": f"pod-{uid}", "namespace": "default", "uid": uid},
        "spec": {
            "nodeName": "node-a",
            "resourceClaims": claims,
            "containers": [
                {"name": "all", "resources": {"claims": [{"name": "c"}]}},
                {"name": "gpu-only", "resources": {"claims": [{"name": "c", "request": "gpu"}]}},
                {"name": "mem-only", "resources": {"claims": [{"name": "c", "request": "mem"}]}},
                {"name": "none"},
            ],
        },
        "status": {"phase": "Pending", "resourceClaimStatuses": statuses or []},
    }


def by_request(_s: str, claims: list[tuple[str, str, str]]) -> dict[str, tuple[list[dict[str, Any]], str]]:
    return {
        uid: (
            [
                {
                    "request_names": ["gpu"],
                    "pool_name": "node-a",
                    "device_name": "gpu-0",
                    "cdi_device_ids": ["v/c=g0"],
                },
                {
                    "request_names": ["mem"],
                    "pool_name": "node-a",
                    "device_name": "gpu-1",
                    "cdi_device_ids": ["v/c=g1"],
                },
                {
                    "request_names": [],
                    "pool_name": "node-a",
                    "device_name": "x",
                    "cdi_device_ids": ["v/c=all"],
                },
            ],
            "",
        )
        for _n, uid, _c in claims
    }


class FakeApi:
    """Stands in for the API calls the emulator makes in pod-driven mode."""

    def __init__(self, emu: KubeletEmulator) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.claims: dict[str, dict[str, Any]] = {}
        self.running: list[str] = []
        self.deleted: list[str] = []
        emu.api_client = object()
        emu._list_pods = lambda: list(self.pods.values())  # type: ignore[method-assign]
        emu._read_claim = lambda namespace, name: self.claims.get(name)  # type: ignore[method-assign]
        emu._mark_running = lambda pod: self.running.append(pod["metadata"]["uid"])  # type: ignore[method-assign]

        def delete(namespace: str, name: str, uid: str) -> None:
            self.deleted.append(uid)
            self.pods.pop(uid, None)

        emu._force_delete = delete  # type: ignore[method-assign]


def test_shared_claim_is_prepared_once_and_unprepared_after_last_pod(registered):
    plugin, emu = registered(by_request)
    api = FakeApi(emu)
    api.claims["shared"] = _claim("shared", "cu-1", ["p1", "p2"])
    api.pods["p1"] = _pod("p1", [{"name": "c", "resourceClaimName": "shared"}])
    emu.sync_pods()
    assert api.running == ["p1"]
    assert plugin.calls == [(SERVICE_V1, "prepare", [("default", "cu-1", "shared")])]
    assert emu.pod_cdi_devices["p1"] == {
        "all": ["v/c=g0", "v/c=g1", "v/c=all"],
        "gpu-only": ["v/c=g0", "v/c=all"],
        "mem-only": ["v/c=g1", "v/c=all"],
        "none": [],
    }

    api.pods["p2"] = _pod("p2", [{"name": "c", "resourceClaimName": "shared"}])
    emu.sync_pods()
    assert api.running == ["p1", "p2"]
    assert len(plugin.calls) == 1, "a prepared claim is not sent again"
    assert emu.claim_pods("cu-1") == {"p1", "p2"}
    assert emu.prepared_claims == {"cu-1"}

    api.pods["p1"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    emu.sync_pods()
    assert api.deleted == ["p1"]
    assert len(plugin.calls) == 1, "claim still used by p2: no unprepare"

    del api.pods["p2"]  # gone without the emulator seeing a deletion
    emu.sync_pods()
    assert plugin.calls[-1] == (SERVICE_V1, "unprepare", [("default", "cu-1", "shared")])
    assert emu.prepared_claims == set()
    assert "p2" not in emu.pod_cdi_devices


def test_template_claim_waits_for_status_and_checks_owner_and_reservation(registered):
    plugin, emu = registered(by_request)
    api = FakeApi(emu)
    api.pods["p1"] = _pod("p1", [{"name": "c", "resourceClaimTemplateName": "t"}])
    emu.sync_pods()
    assert "no resourceClaimStatuses entry yet" in emu.pod_errors["p1"]

    api.pods["p1"]["status"]["resourceClaimStatuses"] = [{"name": "c", "resourceClaimName": "p1-c-abc"}]
    api.claims["p1-c-abc"] = _claim("p1-c-abc", "cu-2", [], owner="someone-else")
    emu.sync_pods()
    assert "was not created for pod" in emu.pod_errors["p1"]

    api.claims["p1-c-abc"] = _claim("p1-c-abc", "cu-2", [], owner="p1")
    emu.sync_pods()
    assert "is not allowed to use ResourceClaim" in emu.pod_errors["p1"]
    assert plugin.calls == []

    api.claims["p1-c-abc"] = _claim("p1-c-abc", "cu-2", ["p1"], owner="p1")
    emu.sync_pods()
    assert "p1" not in emu.pod_errors
    assert api.running == ["p1"]
    assert plugin.calls == [(SERVICE_V1, "prepare", [("default", "cu-2", "p1-c-abc")])]


def test_failed_prepare_is_retried_and_pod_not_running(registered):
    answers: Iterator[dict[str, tuple[list[dict[str, Any]], str]]] = iter([{"cu-1": ([], "not yet")}])

    def handler(s: str, claims: list[tuple[str, str, str]]) -> dict[str, tuple[list[dict[str, Any]], str]]:
        return next(answers, None) or by_request(s, claims)

    plugin, emu = registered(handler)
    api = FakeApi(emu)
    api.claims["c1"] = _claim("c1", "cu-1", ["p1"])
    api.pods["p1"] = _pod("p1", [{"name": "c", "resourceClaimName": "c1"}])
    emu.sync_pods()
    assert emu.pod_errors["p1"] == (
        "prepare dynamic resources: NodePrepareResources failed for ResourceClaim c1: not yet"
    )
    assert api.running == []
    assert emu.prepared_claims == set()
    emu.sync_pods()
    assert api.running == ["p1"]
    assert [c[1] for c in plugin.calls] == ["prepare", "prepare"]


def test_unallocated_claim_is_not_sent(registered):
    plugin, emu = registered(by_request)
    api = FakeApi(emu)
    claim = _claim("c1", "cu-1", ["p1"])
    del claim["status"]["allocation"]
    api.claims["c1"] = claim
    api.pods["p1"] = _pod("p1", [{"name": "c", "resourceClaimName": "c1"}])
    emu.sync_pods()
    assert emu.pod_errors["p1"] == "ResourceClaim default/c1 is not allocated"
    assert plugin.calls == []
