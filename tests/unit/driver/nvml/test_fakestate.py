"""The fake GPUs' state file: created once, kept across restarts, shared safely."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from driver.errors import ConfigError
from driver.nvml.fakestate import STATE_ENV, FakeState
from driver.nvml.topology import load_topology


def test_create_initialises_from_topology(tmp_path):
    topo = load_topology("a100-40gb-x1-mig")
    state = FakeState.create(tmp_path / "state.json", topo, "node-a")
    doc = state.read()
    uuid = topo.gpu_uuid(0, "node-a")
    assert doc["version"] == 1
    assert doc["topology"] == "a100-40gb-x1-mig"
    assert doc["gpus"][uuid] == {
        "index": 0,
        "minor": 0,
        "computeMode": "DEFAULT",
        "timeslice": 0,
        "mig": {"current": True, "pending": True},
    }
    assert doc["faults"] == []
    assert doc["missingDeviceNodes"] == []
    assert not list(tmp_path.glob(".tmp-*"))


def test_create_keeps_existing_state_and_unknown_keys(tmp_path):
    topo = load_topology("t4-x4")
    path = tmp_path / "state.json"
    state = FakeState.create(path, topo, "n1")
    uuid = topo.gpu_uuid(2, "n1")
    with state.edit() as doc:
        doc["gpus"][uuid]["computeMode"] = "EXCLUSIVE_PROCESS"
        doc["gpus"][uuid]["someToolKey"] = {"x": 1}
        doc["otherTool"] = [1, 2]
    again = FakeState.create(path, topo, "n1").read()
    assert again["gpus"][uuid]["computeMode"] == "EXCLUSIVE_PROCESS"
    assert again["gpus"][uuid]["someToolKey"] == {"x": 1}
    assert again["otherTool"] == [1, 2]


def test_create_refuses_state_of_another_node_or_topology(tmp_path):
    path = tmp_path / "state.json"
    FakeState.create(path, load_topology("t4-x4"), "n1")
    with pytest.raises(ConfigError, match="delete the file"):
        FakeState.create(path, load_topology("t4-x4"), "n2")
    with pytest.raises(ConfigError, match="l4-x2"):
        FakeState.create(path, load_topology("l4-x2"), "n1")


def test_edit_writes_nothing_when_the_block_raises(tmp_path):
    state = FakeState.create(tmp_path / "s.json", load_topology("l4-x2"), "n")
    before = state.path.read_text()
    with pytest.raises(RuntimeError), state.edit() as doc:
        doc["faults"].append({"op": "x", "code": 1})
        raise RuntimeError("boom")
    assert state.path.read_text() == before


def test_corrupt_or_newer_file_is_a_clear_error(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        FakeState(path).read()
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(ConfigError, match="schema version 99"):
        FakeState(path).read()


def test_fault_and_missing_node_helpers(tmp_path):
    state = FakeState.create(tmp_path / "s.json", load_topology("l4-x2"), "n")
    state.add_fault("nvmlDeviceGetName", 999, times=2, uuid="GPU-x")
    state.add_fault("nvmlInit", 9)
    assert state.read()["faults"] == [
        {"op": "nvmlDeviceGetName", "code": 999, "times": 2, "uuid": "GPU-x"},
        {"op": "nvmlInit", "code": 9},
    ]
    state.clear_faults()
    assert state.read()["faults"] == []
    state.set_missing_device_nodes([1, 0, 1])
    assert state.missing_device_nodes() == [0, 1]


def test_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    with pytest.raises(ConfigError, match=STATE_ENV):
        FakeState.from_env()
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "s.json"))
    assert FakeState.from_env().path == tmp_path / "s.json"


def _bump(path: str, n: int) -> None:
    state = FakeState(__import__("pathlib").Path(path))
    for _ in range(n):
        with state.edit() as doc:
            doc["counter"] = doc.get("counter", 0) + 1


def test_concurrent_editors_in_other_processes_lose_no_update(tmp_path):
    path = tmp_path / "s.json"
    FakeState.create(path, load_topology("l4-x2"), "n")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(str(path), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert FakeState(path).read()["counter"] == 100
