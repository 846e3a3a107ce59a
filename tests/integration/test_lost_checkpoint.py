"""A lost or corrupt checkpoint does not make the plugin's own GPU changes permanent (issue 17).

With a dynamic MIG claim, an MPS claim and a time-slicing claim prepared, the checkpoint is
damaged in each way seen in the field (or deleted, or replaced by a directory) and the plugin is
restarted. Once, the file was moved aside as designed and then: the plugin's MIG instance was
published as a foreign static device and never destroyed, the MPS daemon kept running with the GPU
in EXCLUSIVE_PROCESS, the time slice stayed set, and the kubelet's unprepares succeeded while
undoing nothing. Now ownership is rebuilt from what the node still says (CDI specs, MPS group
records, the ledger's MIG marks and time-slice records), and the kubelet's re-prepare or unprepare
of each claim converges: afterwards the GPUs are as they were before the first claim.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from driver.checkpoint import PREPARE_COMPLETED, canonical_json
from tests.integration.test_crash_recovery import (
    MPS_CONFIG,
    TIMESLICE_CONFIG,
    Node,
    alive,
    claim_for,
    make_node,
    poll,
)

TOPOLOGY = "a100-40gb-x3-mig1"
MIG_DEVICE = "gpu-0-mig-2g10gb-14-4"


def _doc(raw: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(raw)
    return doc


def _wrong_types(raw: bytes) -> bytes:
    """Valid JSON with a matching checksum, but a field of the wrong type."""
    doc = _doc(raw)
    first = next(iter(doc["data"]["claims"].values()))
    first["devices"] = "gpu-1"
    doc["checksum"] = hashlib.sha256(canonical_json(doc["data"])).hexdigest()
    return json.dumps(doc).encode()


def _other_version(raw: bytes) -> bytes:
    doc = _doc(raw)
    doc["version"] = 2
    return json.dumps(doc).encode()


def _wrong_checksum(raw: bytes) -> bytes:
    doc = _doc(raw)
    doc["checksum"] = "0" * 64
    return json.dumps(doc).encode()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "random-bytes": lambda raw: random.Random(17).randbytes(len(raw)),
    "wrong-checksum": _wrong_checksum,
    "empty": lambda raw: b"",
    "non-object-json": lambda raw: b'["claims", 1, 2]',
    "other-version": _other_version,
    "nul-bytes": lambda raw: b"\0" * len(raw),
    "wrong-field-types": _wrong_types,
}


@pytest.fixture
def node() -> Iterator[Node]:
    made = make_node(TOPOLOGY, mig_caps=True, mps=True)
    yield made
    made.cleanup()
    shutil.rmtree(made.base, ignore_errors=True)


def _timeslices(node: Node) -> set[int]:
    return {int(g.get("timeslice", 0)) for g in node.gpus().values()}


def _damage(node: Node, kind: str) -> None:
    if kind == "deleted":
        node.checkpoint.unlink()
    elif kind == "directory":
        node.checkpoint.unlink()
        (node.checkpoint / "x").mkdir(parents=True)
    else:
        node.checkpoint.write_bytes(CORRUPTIONS[kind](node.checkpoint.read_bytes()))


def _mig_instances(node: Node) -> dict[int, Any]:
    gpu = node.gpus()[next(u for u, g in node.gpus().items() if g.get("mig", {}).get("current"))]
    return dict(gpu["mig"].get("gis", {}))


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*CORRUPTIONS, "deleted", "directory"])
def test_ownership_is_rebuilt_and_every_claim_converges(node: Node, kind: str) -> None:
    mig = node.put(claim_for("uid-mig", MIG_DEVICE))
    mps = node.put(claim_for("uid-mps", "gpu-1", [MPS_CONFIG]))
    ts = node.put(claim_for("uid-ts", "gpu-2", [TIMESLICE_CONFIG]))
    plugin = node.start().wait_ready()
    mig_ids = plugin.prepare(mig)
    mps_ids = plugin.prepare(mps)
    plugin.prepare(ts)
    (record,) = node.claims()["uid-mps"].sharing
    daemon = int(record["pid"])
    instances = _mig_instances(node)
    assert len(instances) == 1
    assert "EXCLUSIVE_PROCESS" in node.compute_modes()
    assert 3 in _timeslices(node)

    plugin.kill()
    _damage(node, kind)
    plugin = node.start().wait_ready()

    # Rebuilt from the node: every claim is known again, the instance is the plugin's.
    claims = node.claims()
    assert set(claims) == {"uid-mig", "uid-mps", "uid-ts"}
    assert {c.state for c in claims.values()} == {PREPARE_COMPLETED}
    (mig_device,) = claims["uid-mig"].devices
    assert (mig_device.device, mig_device.kind) == (MIG_DEVICE, "mig-dynamic")
    assert mig_device.mig is not None
    assert _mig_instances(node) == instances  # nothing destroyed on start, nothing foreign
    assert alive(daemon)
    if kind in CORRUPTIONS or kind == "directory":
        assert list(node.state_dir.glob("checkpoint.json.corrupt-*"))

    # The kubelet re-prepares two claims (adopted, same CDI ids) and unprepares all three.
    assert plugin.prepare(mig) == mig_ids
    assert plugin.prepare(mps) == mps_ids
    assert node.claims()["uid-mig"].devices[0].request_names == ["gpu"]
    for claim in (mig, mps, ts):
        plugin.unprepare(claim)
    assert _mig_instances(node) == {}
    poll(lambda: not alive(daemon), "the rebuilt MPS claim's daemon to exit")
    assert node.compute_modes() == {"DEFAULT"}
    assert _timeslices(node) == {0}
    assert node.specs() == set()
    assert node.claims() == {}
    assert list((node.state_dir / "owned").glob("*")) == []
    assert not node.mps_root.exists() or list(node.mps_root.iterdir()) == []

    # The placement is free for the plugin again, not withheld as a foreign instance.
    again = node.put(claim_for("uid-again", MIG_DEVICE))
    plugin.prepare(again)
    plugin.unprepare(again)
    assert _mig_instances(node) == {}
    plugin.stop()


@pytest.mark.slow
def test_a_marked_instance_without_spec_is_rolled_back_after_a_lost_checkpoint(node: Node) -> None:
    """A prepare killed after creating its instance, then the checkpoint lost: the mark says the
    instance is the plugin's, no spec says it was handed out, so start-up destroys it."""
    mig = node.put(claim_for("uid-mig", MIG_DEVICE))
    node.start(crash_at="after-ci", crash_claim="uid-mig").wait_ready().call_into_crash(
        "prepare", mig, "after-ci"
    )
    assert len(_mig_instances(node)) == 1
    node.checkpoint.unlink()
    plugin = node.start().wait_ready()
    assert _mig_instances(node) == {}
    assert node.claims() == {}
    plugin.prepare(mig)
    plugin.unprepare(mig)
    plugin.stop()


@pytest.mark.slow
def test_an_unmarked_instance_is_never_destroyed_after_a_lost_checkpoint(node: Node) -> None:
    """An instance the plugin has no mark for (an admin's) stays, whatever happened to the checkpoint."""
    mig = node.put(claim_for("uid-mig", MIG_DEVICE))
    plugin = node.start().wait_ready()
    plugin.prepare(mig)
    plugin.kill()
    for mark in (node.state_dir / "owned").glob("mig-*"):
        mark.unlink()  # as if an admin had made the instance
    for spec in node.cdi.glob("*.json"):
        spec.unlink()
    node.checkpoint.unlink()
    plugin = node.start().wait_ready()
    assert len(_mig_instances(node)) == 1
    assert node.claims() == {}
    plugin.stop()
