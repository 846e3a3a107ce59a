"""No side effect before validation (issue 17): every config decoded, every device checked, first.

Once, for MIG devices the opaque config was decoded after the GPU instance existed, so 1,072 of
2,341 rejected configs first created and destroyed a real MIG instance. Here a rejected claim
must leave the fake GPU state, the tools' journal, the CDI root, the checkpoint and the MPS root
exactly as they were, and must never have asked for a MIG instance.

The fuzz is marked ``long``: ``make test`` runs a shortened number of examples, ``--long`` the
full count.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from driver.boundedjson import check_depth, loads
from driver.errors import PermanentClaimError
from driver.gpusharing import GpuSharing
from driver.inventory import AllocatableDevice
from driver.kubeletplugin.claims import ClaimRef, StaticClaimSource, fetch_allocated
from driver.state import DeviceState, default_actions
from mig.spec import MigLive, MigSpec
from sharing.config import API_VERSION
from sharing.mps import MpsManager
from sharing.timeslicing import TimeSlicer
from tests.ground.driverroot import FakeDriverRoot
from tests.ground.longrun import scaled
from tests.integration.test_state import (
    DRIVER,
    Node,
    build_state,
    gpu_inventory,
    gpu_uuid,
    make_claim,
    make_node,
)
from tests.unit.sharing.conftest import FakeGpu, make_fake_gpu
from tests.unit.sharing.test_properties import Case, invalid_cases

MIG_MEMORY = 5 * 1024**3


class CountingMig:
    """MigDevices that records every create; creates GI 1 / CI 0."""

    def __init__(self, fake_root: FakeDriverRoot) -> None:
        self.fake_root = fake_root
        self.creates: list[str] = []
        self.live: dict[str, MigLive] = {}

    def create(self, spec: MigSpec) -> MigLive:
        self.creates.append(spec.name)
        live = MigLive(
            spec.parent_minor, spec.parent_uuid, 1, 0, "MIG-x-1", spec.gi_profile_id, spec.placement_start
        )
        self.fake_root.add_mig_caps(spec.parent_minor, 1, 0)
        self.live[spec.name] = live
        return live

    def destroy(self, live: MigLive) -> bool:
        return any(self.live.pop(k) for k, v in list(self.live.items()) if v == live)

    def rollback(self, spec: MigSpec) -> bool:
        return self.live.pop(spec.name, None) is not None


def fake_gpu_at(root: Path) -> FakeGpu:
    root.mkdir(parents=True, exist_ok=True)
    return make_fake_gpu(root)


def mig_device(minor: int, start: int = 0) -> AllocatableDevice:
    spec = MigSpec(minor, gpu_uuid(minor), "1g.5gb", 19, start, 1)
    return AllocatableDevice(
        name=spec.name,
        kind="mig-dynamic",
        gpu_uuid=gpu_uuid(minor),
        gpu_minor=minor,
        attributes={"type": "mig"},
        capacity={"memory": MIG_MEMORY},
        mig_spec=spec,
    )


MIG_DEVICES = (mig_device(6, 0), mig_device(6, 1), mig_device(7, 0))


class World:
    """One node with dynamic MIG and real sharing over the tool stand-ins."""

    def __init__(self, root: Path) -> None:
        self.node: Node = make_node(root / "node")
        self.fake: FakeGpu = fake_gpu_at(root / "gpu")
        self.mig = CountingMig(self.node.driver_root)
        sharing = GpuSharing(
            DRIVER,
            TimeSlicer(self.fake.nvidia_smi, self.fake.env),
            MpsManager(self.fake.mps_root, self.fake.mps_control, self.fake.env, stop_timeout_s=5),
        )
        self.state: DeviceState = build_state(
            self.node,
            inventory=gpu_inventory(6, extra=MIG_DEVICES),
            actions=default_actions(self.mig),
            sharing=sharing,
        )

    def snapshot(self) -> tuple[Any, ...]:
        cdi = sorted(p.name for p in self.node.cdi.root.glob("*")) if self.node.cdi.root.exists() else []
        mps = sorted(p.name for p in self.fake.mps_root.glob("*")) if self.fake.mps_root.exists() else []
        return (
            self.fake.state_file.read_bytes(),
            len(self.fake.journal()),
            cdi,
            self.node.checkpoint.load(),
            mps,
            tuple(self.mig.creates),
        )


def fuzz_claim(n: int, case: Case) -> dict[str, Any]:
    """The case's config on a claim whose devices match the case: MIG devices for a MIG group."""
    params, uuids = case
    mig = uuids[0].startswith("MIG-")
    devices = [d.name for d in MIG_DEVICES[: len(uuids)]] if mig else [f"gpu-{i}" for i in range(len(uuids))]
    config = {"source": "FromClaim", "requests": ["r"], "opaque": {"driver": DRIVER, "parameters": params}}
    return make_claim(f"uid-fuzz-{n}", [("r", d) for d in devices], config=[config])


_WORLD_DIR = tempfile.TemporaryDirectory(prefix="gpu-dra-fuzz-")
_WORLD: list[World] = []


def world() -> World:
    """One world for all examples (hypothesis does not re-run function-scoped fixtures)."""
    if not _WORLD:
        _WORLD.append(World(Path(_WORLD_DIR.name)))
    return _WORLD[0]


_COUNT = [0]


@pytest.mark.long
@settings(
    max_examples=scaled(200, 2500),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(invalid_cases())
def test_a_rejected_config_changes_nothing_anywhere(case: Case) -> None:
    """The no-side-effect oracle: GPU state, tool journal, CDI root, checkpoint, MPS root, MIG."""
    w = world()
    before = w.snapshot()
    _COUNT[0] += 1
    with pytest.raises(PermanentClaimError):
        w.state.prepare(fuzz_claim(_COUNT[0], case))
    assert w.snapshot() == before


def _mps_config(**mps: Any) -> dict[str, Any]:
    return {
        "source": "FromClaim",
        "requests": ["r"],
        "opaque": {
            "driver": DRIVER,
            "parameters": {
                "apiVersion": API_VERSION,
                "kind": "MigDeviceConfig",
                "sharing": {"strategy": "MPS", "mpsConfig": mps},
            },
        },
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_mps_config(defaultPinnedDeviceMemoryLimit="6Gi"), "exceeds its memory"),
        (_mps_config(multiUser=True), "compute capability"),
        (_mps_config(defaultPerDevicePinnedMemoryLimit={"3": "1Gi"}), "names no device of this group"),
        (_mps_config(bogus=1), "unknown field"),
    ],
)
def test_mig_claims_with_a_bad_config_never_create_an_instance(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    w = World(tmp_path)
    before = w.snapshot()
    claim = make_claim("uid-mig", [("r", MIG_DEVICES[0].name), ("r", MIG_DEVICES[2].name)], config=[config])
    with pytest.raises(PermanentClaimError, match=message):
        w.state.prepare(claim)
    assert w.mig.creates == []
    assert w.snapshot() == before


def test_a_missing_device_node_is_found_before_any_instance_is_created(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.node.driver_root.remove_node("nvidia7")
    claim = make_claim("uid-mig", [("r", MIG_DEVICES[0].name), ("r", MIG_DEVICES[2].name)])
    with pytest.raises(PermanentClaimError, match="/dev/nvidia7"):
        w.state.prepare(claim)
    assert w.mig.creates == []


def test_an_unpreparable_device_is_refused_before_the_first_change(tmp_path: Path) -> None:
    """A full GPU with time-slicing plus a dynamic MIG device on a node without dynamic MIG."""
    node = make_node(tmp_path)
    fake = fake_gpu_at(tmp_path / "gpu")
    state = build_state(
        node,
        inventory=gpu_inventory(6, extra=MIG_DEVICES),
        sharing=GpuSharing(
            DRIVER,
            TimeSlicer(fake.nvidia_smi, fake.env),
            MpsManager(fake.mps_root, fake.mps_control, fake.env),
        ),
    )
    ts = {
        "source": "FromClaim",
        "requests": ["g"],
        "opaque": {
            "driver": DRIVER,
            "parameters": {
                "apiVersion": API_VERSION,
                "kind": "GpuConfig",
                "sharing": {"strategy": "TimeSlicing"},
            },
        },
    }
    claim = make_claim("uid-x", [("g", "gpu-0"), ("m", MIG_DEVICES[0].name)], config=[ts])
    journal = len(fake.journal())
    with pytest.raises(PermanentClaimError, match="DynamicMIG"):
        state.prepare(claim)
    assert len(fake.journal()) == journal  # nvidia-smi never ran
    assert node.checkpoint.load() == {}


# ---- bounded decoding (item 5) -------------------------------------------------------------------


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def _limit_config(limit: Any) -> dict[str, Any]:
    return {
        "source": "FromClaim",
        "requests": [],
        "opaque": {
            "driver": DRIVER,
            "parameters": {
                "apiVersion": API_VERSION,
                "kind": "GpuConfig",
                "sharing": {"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": limit}},
            },
        },
    }


@pytest.mark.parametrize("limit", ["1" * 5000, "9" * 65 + "Gi"])
def test_a_5000_digit_quantity_is_refused_by_field(tmp_path: Path, limit: str) -> None:
    w = World(tmp_path)
    with pytest.raises(PermanentClaimError) as info:
        w.state.prepare(make_claim("uid-q", [("gpu", "gpu-0")], config=[_limit_config(limit)]))
    text = str(info.value)
    assert "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit" in text
    assert "4300" not in text
    assert "set_int_max_str_digits" not in text
    assert len(text) < 1000


def test_a_5000_digit_json_number_is_refused_by_field(tmp_path: Path) -> None:
    """As the API server sends it: a bare JSON number, decoded by the plugin's bounded decoder."""
    w = World(tmp_path)
    claim = make_claim("uid-n", [("gpu", "gpu-0")], config=[_limit_config(0)])
    text = json.dumps(claim).replace(
        '"defaultPinnedDeviceMemoryLimit": 0', '"defaultPinnedDeviceMemoryLimit": ' + "7" * 5000
    )
    with pytest.raises(PermanentClaimError, match=r"defaultPinnedDeviceMemoryLimit.*5000 digits"):
        w.state.prepare(loads(text))


def test_deep_nesting_is_refused_naming_the_field_not_with_recursion_error(tmp_path: Path) -> None:
    claim = make_claim("uid-deep", [("gpu", "gpu-0")], config=[_limit_config(_deep(1500))])
    source = StaticClaimSource()
    source.put(claim)
    with pytest.raises(PermanentClaimError) as info:
        fetch_allocated(source, ClaimRef("default", "claim-uid-deep", "uid-deep"))
    text = str(info.value)
    assert "status.allocation.devices.config[0].opaque.parameters.sharing.mpsConfig" in text
    assert "nests deeper than 64 levels" in text
    assert len(text) < 1000
    # Shallower than the claim bound but deeper than any config: the config decoder names it.
    w = World(tmp_path)
    shallow = make_claim("uid-d2", [("gpu", "gpu-0")], config=[_limit_config(_deep(20))])
    with pytest.raises(
        PermanentClaimError, match=r"defaultPinnedDeviceMemoryLimit(\.a)*: nests deeper than 8"
    ):
        w.state.prepare(shallow)


def test_json_too_deep_for_python_is_a_clear_error() -> None:
    from driver.boundedjson import JsonTooDeepError

    with pytest.raises(JsonTooDeepError, match="nests deeper than 500 levels"):
        loads("[" * 1500 + "]" * 1500)
    with pytest.raises(JsonTooDeepError, match="nests deeper than 500 levels"):
        loads('{"a": ' * 600 + '"[[[[]]]]"' + "}" * 600)
    # Brackets inside strings are not nesting; a wide document is not a deep one.
    assert loads(json.dumps({"s": "[" * 5000, "l": [[1]] * 3000}))["s"] == "[" * 5000
    with pytest.raises(JsonTooDeepError, match=r"a\.a\.a"):
        check_depth(_deep(100), 10)


def test_log_lines_are_capped(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from driver import log as logsetup

    logsetup.configure("json", "info")
    structlog.get_logger("t").warning("huge", error="E" * 400_000)

    def boom() -> None:
        raise ValueError("V" * 400_000)

    try:
        boom()
    except ValueError:
        structlog.get_logger("t").exception("with traceback")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    assert all(len(line) < 20_000 for line in lines), [len(line) for line in lines]
    assert "400000 characters in all" in lines[0]
    assert "characters in all" in lines[1]  # the traceback field was cut too
