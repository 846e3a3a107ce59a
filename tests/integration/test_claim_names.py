"""Names and UIDs from the kubelet are checked before anything is fetched or changed (issue 17).

A claim reference whose namespace or name Kubernetes could never have produced must not reach
the API (``../../B/resourceclaims/victim`` once prepared another namespace's claim), one UID sent
under two names must get an answer that says what was done, a refusal must not name another
namespace's claim, and the sockets must not be reachable by others whatever the umask.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driver.errors import PermanentClaimError
from driver.kube import Kube, segment
from driver.kubeletapi import dra_v1_pb2
from driver.kubeletplugin.claims import ClaimRef, KubeClaimSource, check_claim_ref, fetch_allocated
from tests.integration.test_draservice import Plugin, start_plugin, v1_claim
from tests.integration.test_state import make_claim, make_node

VICTIM_UID = "0b7f0a4c-5c1e-4d59-9b7a-8a1d2f3e4c5d"

BAD_REFS = [
    ("a", "../../b/resourceclaims/victim", VICTIM_UID),  # path traversal into namespace b
    ("a", "good?x=y", "uid-q"),  # query smuggling
    ("a", "good#frag", "uid-f"),
    ("a", "good/sub", "uid-s"),
    ("a", "Good", "uid-u"),  # upper case
    ("a", "", "uid-e"),
    ("a", "x" * 254, "uid-l"),  # longer than a DNS-1123 subdomain
    ("a", "good\n", "uid-n"),  # a trailing newline must not pass a $-anchored check
    ("../b", "good", "uid-ns"),
    ("a.b", "good", "uid-nsd"),  # namespaces are labels: no dots
    ("n" * 64, "good", "uid-nsl"),
    ("", "good", "uid-nse"),
    ("a", "good", ""),
    ("a", "good", "../uid"),
    ("a", "good", "u" * 129),
]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gd-", dir="/tmp"))  # Unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin(tmp_path: Path, short_dir: Path) -> Iterator[Plugin]:
    p = start_plugin(make_node(tmp_path), short_dir)
    yield p
    p.plugin.stop(grace_s=0.5)


@pytest.mark.parametrize(("namespace", "name", "uid"), BAD_REFS)
def test_invalid_reference_is_refused_before_the_claim_is_fetched(
    plugin: Plugin, namespace: str, name: str, uid: str
) -> None:
    victim = make_claim(VICTIM_UID, [("gpu", "gpu-0")], namespace="b", name="victim")
    plugin.claims.put(victim)
    request = dra_v1_pb2.NodePrepareResourcesRequest(
        claims=[dra_v1_pb2.Claim(namespace=namespace, name=name, uid=uid)]
    )
    resp = plugin.v1().NodePrepareResources(request, timeout=10)
    error = resp.claims[uid].error
    assert error.startswith("refused claim reference"), error
    assert len(error) < 1000  # a huge name is cut short in the message
    assert plugin.claims.gets == 0  # nothing was fetched
    assert plugin.node.checkpoint.load() == {}
    assert list(plugin.node.cdi.root.glob("*")) == []
    unprep = plugin.v1().NodeUnprepareResources(
        dra_v1_pb2.NodeUnprepareResourcesRequest(claims=request.claims), timeout=10
    )
    assert unprep.claims[uid].error.startswith("refused claim reference")


@pytest.mark.parametrize(
    ("namespace", "name", "uid"),
    [
        ("default", "a", "uid-1"),
        ("kube-system", "gpu-claim.v2", "0b7f0a4c-5c1e-4d59-9b7a-8a1d2f3e4c5d"),
        ("n" * 63, "x" * 253, "u" * 128),
    ],
)
def test_valid_references_pass(namespace: str, name: str, uid: str) -> None:
    check_claim_ref(ClaimRef(namespace, name, uid))


def test_every_bad_reference_fails_the_check() -> None:
    for ref in BAD_REFS:
        with pytest.raises(PermanentClaimError):
            check_claim_ref(ClaimRef(*ref))


class _RecordingTransport:
    """Stands in for driver.kube.RestTransport: records the paths the facade builds."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def send(self, method: str, path: str, **_: Any) -> Any:
        self.paths.append(path)

        class Response:
            status = 200
            data = b'{"metadata": {"uid": "u"}}'

        return Response()


def test_api_paths_escape_every_segment() -> None:
    """The second wall: even an unchecked name stays inside its own path segment."""
    client = _RecordingTransport()
    kube = Kube(client)
    kube._resource_version = "v1"
    kube.get_resource_claim("a", "../../b/resourceclaims/victim")
    kube.get_resource_claim("a", "good?x=y")
    kube.get_node("node#1")
    assert client.paths == [
        "/apis/resource.k8s.io/v1/namespaces/a/resourceclaims/..%2F..%2Fb%2Fresourceclaims%2Fvictim",
        "/apis/resource.k8s.io/v1/namespaces/a/resourceclaims/good%3Fx%3Dy",
        "/api/v1/nodes/node%231",
    ]
    for bad in ("", ".", ".."):
        with pytest.raises(ValueError, match="cannot be an API path segment"):
            segment(bad)


def test_one_uid_under_two_names_is_refused_and_nothing_is_done(plugin: Plugin) -> None:
    """The reply has one entry per UID: it must say nothing was prepared, and nothing was."""
    real = plugin.claims
    a = make_claim("uid-dup", [("gpu", "gpu-0")], name="first")
    b = make_claim("uid-dup", [("gpu", "gpu-1")], name="second")
    real.put(a)
    real.put(b)
    request = dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(a), v1_claim(b)])
    resp = plugin.v1().NodePrepareResources(request, timeout=10)
    error = resp.claims["uid-dup"].error
    assert "sent 2 times in one call under different names" in error
    assert "nothing was prepared" in error
    assert plugin.claims.gets == 0
    assert plugin.node.checkpoint.load() == {}
    assert not plugin.node.spec_path("uid-dup").exists()


def test_the_same_reference_twice_is_prepared_once(plugin: Plugin) -> None:
    claim = make_claim("uid-twice", [("gpu", "gpu-0")])
    plugin.claims.put(claim)
    request = dra_v1_pb2.NodePrepareResourcesRequest(claims=[v1_claim(claim), v1_claim(claim)])
    resp = plugin.v1().NodePrepareResources(request, timeout=10)
    assert resp.claims["uid-twice"].error == ""
    assert [d.device_name for d in resp.claims["uid-twice"].devices] == ["gpu-0"]
    assert plugin.claims.gets == 1
    assert plugin.node.spec_path("uid-twice").exists()


def test_sockets_and_plugin_dir_are_private_whatever_the_umask(tmp_path: Path, short_dir: Path) -> None:
    previous = os.umask(0)
    try:
        p = start_plugin(make_node(tmp_path), short_dir)
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(p.paths.dra.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(p.paths.dra.lstat().st_mode) == 0o600
        assert stat.S_IMODE(p.paths.registration.lstat().st_mode) == 0o600
    finally:
        p.plugin.stop(0.5)


class _DeepTransport:
    """Answers every GET with a claim whose opaque parameters nest 1,500 deep."""

    def send(self, method: str, path: str, **_: Any) -> Any:
        class Response:
            status = 200
            data = b'{"metadata": {"uid": "uid-deep"}, "p": ' + b'{"a": ' * 1500 + b"1" + b"}" * 1500 + b"}"

        return Response()


def test_a_claim_too_deep_to_decode_is_a_permanent_error_not_an_internal_one() -> None:
    kube = Kube(_DeepTransport())
    kube._resource_version = "v1"
    with pytest.raises(PermanentClaimError, match="nests deeper than 500 levels") as info:
        fetch_allocated(KubeClaimSource(kube), ClaimRef("default", "deep", "uid-deep"))
    assert "RecursionError" not in str(info.value)
