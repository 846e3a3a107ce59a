"""Property tests: generated opaque configs, valid and not.

* Thousands of configs through the decoder: a config built valid decodes (and round-trips through
  its wire form); one built invalid raises ConfigError naming a field, never anything else.
* Invalid configs through the whole "prepare" path against the stand-ins: ConfigError, the fake
  GPU unchanged, nothing run, no daemon, no directory.
* Valid configs applied through TimeSlicer / MpsManager and undone: the fake GPU state is back to
  the initial one and no daemon is left. Each example spawns tool processes, so fewer examples.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sharing.config import API_VERSION, MIB, decode_config, encode_config
from sharing.errors import ConfigError
from sharing.mps import MpsManager
from sharing.timeslicing import TimeSlicer
from tests.unit.sharing.conftest import GPU_MEMORY, GPU_UUIDS, FakeGpu, alive, daemon_pids, make_fake_gpu

MIG_UUIDS = ("MIG-aaaaaaaa-0000-0000-0000-000000000001", "MIG-aaaaaaaa-0000-0000-0000-000000000002")
MIG_MEMORY = 5 * 1024**3
INTERVALS = ("Default", "Short", "Medium", "Long")

Case = tuple[dict[str, Any], tuple[str, ...]]  # (opaque parameters, the group's device UUIDs)


@st.composite
def quantities(draw: st.DrawFn, low: int, high: int) -> str | int:
    """A quantity in [low, high] bytes, written in one of the forms users write."""
    unit = draw(st.sampled_from([1, 1024, MIB, 1024**3, 1000, 10**6, 10**9]))
    n = draw(st.integers(max(1, -(-low // unit)), max(1, high // unit)))
    value = n * unit
    if value < low or value > high:
        value = low
        unit = 1
    suffix = {1: "", 1024: "Ki", MIB: "Mi", 1024**3: "Gi", 1000: "k", 10**6: "M", 10**9: "G"}[unit]
    if unit == 1 and draw(st.booleans()):
        return value
    if unit == 10**9 and draw(st.booleans()):
        return f"{value // 10**9}e9"
    return f"{value // unit}{suffix}"


@st.composite
def valid_cases(draw: st.DrawFn) -> Case:
    mig = draw(st.booleans())
    pool, memory = (MIG_UUIDS, MIG_MEMORY) if mig else (GPU_UUIDS, GPU_MEMORY)
    uuids = tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool), unique=True)))
    params: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "MigDeviceConfig" if mig else "GpuConfig"}
    strategy = draw(st.sampled_from([None, "TimeSlicing", "MPS", "MPS"]))
    if strategy is None:
        return params, uuids
    sharing: dict[str, Any] = {"strategy": strategy}
    if strategy == "TimeSlicing" and not mig and draw(st.booleans()):
        sharing["timeSlicingConfig"] = (
            {"interval": draw(st.sampled_from(INTERVALS))} if draw(st.booleans()) else {}
        )
    if strategy == "MPS" and draw(st.booleans()):
        mps: dict[str, Any] = {}
        if draw(st.booleans()):
            mps["defaultActiveThreadPercentage"] = draw(st.integers(1, 100))
        if draw(st.booleans()):
            mps["defaultPinnedDeviceMemoryLimit"] = draw(quantities(MIB, memory))
        if draw(st.booleans()):
            keys = draw(
                st.lists(
                    st.one_of(st.sampled_from(uuids), st.integers(0, len(uuids) - 1).map(str)),
                    max_size=3,
                    unique=True,
                )
            )
            mps["defaultPerDevicePinnedMemoryLimit"] = {k: draw(quantities(MIB, memory)) for k in keys}
        if draw(st.booleans()):
            mps["multiUser"] = draw(st.booleans())
        sharing["mpsConfig"] = mps
    params["sharing"] = sharing
    return params, uuids


def _mutations(params: dict[str, Any], uuids: tuple[str, ...]) -> list[Callable[[dict[str, Any]], None]]:
    """Edits that each make a valid case invalid (statically or for these devices)."""

    def top_unknown(p: dict[str, Any]) -> None:
        p["spec"] = {}

    def wrong_version(p: dict[str, Any]) -> None:
        p["apiVersion"] = "resource.nvidia.com/v1"

    def wrong_kind(p: dict[str, Any]) -> None:
        p["kind"] = "GPUConfig"

    def bad_strategy(p: dict[str, Any]) -> None:
        p.setdefault("sharing", {})["strategy"] = "TimeSlice"

    edits: list[Callable[[dict[str, Any]], None]] = [top_unknown, wrong_version, wrong_kind, bad_strategy]
    sharing = params.get("sharing")
    if sharing is None:
        return edits

    def sharing_unknown(p: dict[str, Any]) -> None:
        p["sharing"]["intervall"] = "Long"

    edits.append(sharing_unknown)
    mig = params["kind"] == "MigDeviceConfig"
    if sharing["strategy"] == "TimeSlicing":

        def with_mps(p: dict[str, Any]) -> None:
            p["sharing"]["mpsConfig"] = {}

        edits.append(with_mps)
        if not mig:

            def forever(p: dict[str, Any]) -> None:
                p["sharing"]["timeSlicingConfig"] = {"interval": "Forever"}

            edits.append(forever)
        return edits

    def with_ts(p: dict[str, Any]) -> None:
        p["sharing"]["timeSlicingConfig"] = {"interval": "Long"}

    def percentage_out_of_range(p: dict[str, Any]) -> None:
        p["sharing"].setdefault("mpsConfig", {})["defaultActiveThreadPercentage"] = 0

    def percentage_too_high(p: dict[str, Any]) -> None:
        p["sharing"].setdefault("mpsConfig", {})["defaultActiveThreadPercentage"] = 150

    def limit_too_low(p: dict[str, Any]) -> None:
        p["sharing"].setdefault("mpsConfig", {})["defaultPinnedDeviceMemoryLimit"] = "1023Ki"

    def limit_above_device(p: dict[str, Any]) -> None:
        mps = p["sharing"].setdefault("mpsConfig", {})
        mps["defaultPinnedDeviceMemoryLimit"] = "41Gi"
        mps.pop("defaultPerDevicePinnedMemoryLimit", None)  # an override would hide the default

    def limit_garbage(p: dict[str, Any]) -> None:
        p["sharing"].setdefault("mpsConfig", {})["defaultPinnedDeviceMemoryLimit"] = "5 GB"

    def key_outside_group(p: dict[str, Any]) -> None:
        p["sharing"].setdefault("mpsConfig", {})["defaultPerDevicePinnedMemoryLimit"] = {
            str(len(uuids)): "1Gi"
        }

    def mps_unknown(p: dict[str, Any]) -> None:
        p["sharing"].setdefault("mpsConfig", {})["activeThreadPercentage"] = 50

    return [
        *edits,
        with_ts,
        percentage_out_of_range,
        percentage_too_high,
        limit_too_low,
        limit_above_device,
        limit_garbage,
        key_outside_group,
        mps_unknown,
    ]


@st.composite
def invalid_cases(draw: st.DrawFn) -> Case:
    params, uuids = draw(valid_cases())
    bad = copy.deepcopy(params)
    draw(st.sampled_from(_mutations(params, uuids)))(bad)
    return bad, uuids


def memory_of(uuids: tuple[str, ...]) -> dict[str, int]:
    return {u: MIG_MEMORY if u.startswith("MIG-") else GPU_MEMORY for u in uuids}


def prepare(fake: FakeGpu, params: dict[str, Any], uuids: tuple[str, ...]) -> Callable[[], None]:
    """What driver.state does for one group: decode, apply; returns the undo."""
    cfg = decode_config(params)
    ts = cfg.time_slicing()
    if ts is not None:
        slicer = TimeSlicer(fake.nvidia_smi, fake.env)
        slicer.apply(uuids, ts)
        return lambda: slicer.reset(uuids)
    mps = cfg.mps()
    if mps is not None:
        mgr = MpsManager(fake.mps_root, fake.mps_control, fake.env, stop_timeout_s=5)
        caps = dict.fromkeys(uuids, (8, 0))
        daemon = mgr.start("prop", uuids, mps, memory_of(uuids), caps)
        record = daemon.to_record()
        return lambda: mgr.stop(record)
    return lambda: None


def _decodes(params: dict[str, Any], uuids: tuple[str, ...]) -> None:
    cfg = decode_config(params)
    mps = cfg.mps()
    if mps is not None:
        mps.pinned_limits_mib(uuids, memory_of(uuids))


@settings(max_examples=1500, deadline=None)
@given(valid_cases())
def test_valid_configs_decode_and_round_trip(case: Case) -> None:
    params, uuids = case
    _decodes(params, uuids)
    cfg = decode_config(params)
    assert decode_config(encode_config(cfg)) == cfg


@settings(max_examples=1500, deadline=None)
@given(invalid_cases())
def test_invalid_configs_raise_config_error_naming_a_field(case: Case) -> None:
    params, uuids = case
    try:
        _decodes(params, uuids)
    except ConfigError as exc:
        assert exc.path
        assert str(exc).startswith(exc.path)
    else:
        raise AssertionError(f"accepted invalid config {params!r}")


_FAKE_DIR = tempfile.TemporaryDirectory(prefix="gpu-dra-sharing-prop-")
_FAKE: list[FakeGpu] = []


def shared_fake() -> FakeGpu:
    """One fake GPU for all examples (hypothesis does not re-run function-scoped fixtures)."""
    if not _FAKE:
        _FAKE.append(make_fake_gpu(Path(_FAKE_DIR.name)))
    return _FAKE[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_cases())
def test_invalid_config_changes_nothing_on_the_fake_gpu(case: Case) -> None:
    fake = shared_fake()
    before_state = fake.full_state()
    before_journal = len(fake.journal())
    params, uuids = case
    try:
        prepare(fake, params, uuids)
    except ConfigError:
        pass
    else:
        raise AssertionError(f"prepared invalid config {params!r}")
    assert fake.full_state() == before_state
    assert len(fake.journal()) == before_journal
    assert not fake.mps_root.exists() or not any(fake.mps_root.iterdir())


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_cases())
def test_valid_config_prepares_and_unprepares_to_the_initial_state(case: Case) -> None:
    fake = shared_fake()
    initial = fake.full_state()
    params, uuids = case
    undo = prepare(fake, params, uuids)
    event(f"{params['kind']} {params.get('sharing', {}).get('strategy', 'exclusive')}")
    undo()
    assert fake.full_state() == initial
    assert not any(alive(p) for p in daemon_pids(fake))
    assert not fake.mps_root.exists() or not any(fake.mps_root.iterdir())
