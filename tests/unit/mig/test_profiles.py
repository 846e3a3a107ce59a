"""Profile names, MigSpecs, counters and consumption against the shared profile table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mig.counters import (
    counter_set_name,
    full_gpu_capacity,
    full_gpu_consumption,
    gpu_counters,
    mig_consumption,
    profile_capacity,
)
from mig.profiles import GiProfile, Placement, memory_gb, mig_specs, profile_name
from mig.spec import MigInstance, MigSpec, canonical_name, parse_name
from tests.unit.mig.fakenode import make_node

TABLE = yaml.safe_load((Path(__file__).parents[2] / "data" / "mig-profiles.yaml").read_text())
MIB = 1 << 20


def table_profiles(key: str) -> list[GiProfile]:
    """GiProfiles straight from tests/data/mig-profiles.yaml (rows with every fact known)."""
    rows = TABLE["gpus"][key]["gpu_instance_profiles"]
    return [
        GiProfile(
            nvml_index=r["nvml_profile_index"],
            profile_id=r["profile_id"],
            name=r["name"],
            slice_count=r["slice_count"],
            instance_count=r["max_instances"],
            multiprocessors=r["multiprocessors"],
            copy_engines=r["copy_engines"],
            decoders=r["decoders"],
            encoders=r["encoders"],
            jpeg_engines=r["jpeg"],
            ofa_engines=r["ofa"],
            memory_mib=r["memory_mib"],
            placements=tuple(Placement(p["start"], p["size"]) for p in r["placements"]),
        )
        for r in rows
        if r["profile_id"] is not None and r["memory_mib"] is not None
    ]


@pytest.mark.parametrize(
    ("topology", "key"),
    [
        ("a100-40gb-x1-mig", "A100-SXM4-40GB"),
        ("a100-80gb-x4", "A100-80GB"),
        ("h100-80gb-x8", "H100-80GB"),
        ("h200-x1", "H200-141GB"),
    ],
)
def test_names_computed_from_nvml_match_the_table(tmp_path, topology, key):
    node = make_node(tmp_path, topology)
    got = {(p.profile_id, p.nvml_index): p.name for p in node.backend.profiles(node.uuid())}
    want = {(p.profile_id, p.nvml_index): p.name for p in table_profiles(key)}
    assert got == want


def test_memory_rounds_half_away_from_zero_like_go():
    # H200 3g: 4/8 of ceil(140.4 GiB) = 70.5 -> 71 (Python's round() would say 70)
    assert memory_gb(71168, 150754820096) == 71
    assert profile_name(3, 71168, 150754820096, 2) == "3g.71gb"
    assert profile_name(1, 4864, 40 << 30, 7) == "1g.5gb+me"
    with pytest.raises(ValueError, match="total memory"):
        memory_gb(4864, 0)


def test_canonical_names_and_parse():
    assert canonical_name(0, "1g.5gb", 19, 3) == "gpu-0-mig-1g5gb-19-3"
    assert canonical_name(2, "1g.10gb+me", 20, 0) == "gpu-2-mig-1g10gb-me-20-0"
    parsed = parse_name("gpu-2-mig-1g10gb-me-20-0")
    assert parsed is not None
    assert (parsed.parent_minor, parsed.profile_slug, parsed.gi_profile_id, parsed.placement_start) == (
        2,
        "1g10gb-me",
        20,
        0,
    )


def test_a100_specs_one_per_profile_and_placement():
    specs = mig_specs(0, "GPU-x", table_profiles("A100-SXM4-40GB"))
    # 1g.5gb x7, 1g.5gb+me x7, 1g.10gb x4, 2g x3, 3g x2, 4g x1, 7g x1
    assert len(specs) == 25
    assert len({s.name for s in specs}) == 25
    assert [s.name for s in specs if s.profile == "1g.5gb"] == [f"gpu-0-mig-1g5gb-19-{i}" for i in range(7)]
    assert {s.name for s in specs if s.profile == "3g.20gb"} == {
        "gpu-0-mig-3g20gb-9-0",
        "gpu-0-mig-3g20gb-9-4",
    }


def test_a100_40gb_counter_set():
    counters = gpu_counters(table_profiles("A100-SXM4-40GB"))
    expected = {
        "multiprocessors": 98,
        "copy-engines": 7,
        "decoders": 5,
        "encoders": 0,
        "jpeg-engines": 1,
        "ofa-engines": 1,
        "memory": 40192 * MIB,
    } | {f"memory-slice-{i}": 1 for i in range(8)}
    assert counters == expected
    assert counter_set_name(3) == "gpu-3-counter-set"
    assert full_gpu_consumption(table_profiles("A100-SXM4-40GB")) == expected


def test_h100_counter_set_and_full_capacity():
    profiles = table_profiles("H100-80GB")
    counters = gpu_counters(profiles)
    assert counters["multiprocessors"] == 132
    assert counters["copy-engines"] == 8
    assert counters["decoders"] == 7
    assert counters["jpeg-engines"] == 7
    assert counters["ofa-engines"] == 1
    assert counters["memory"] == 81152 * MIB
    assert sorted(k for k in counters if k.startswith("memory-slice")) == [
        f"memory-slice-{i}" for i in range(8)
    ]
    assert full_gpu_capacity(profiles) == {
        "multiprocessors": 132,
        "copyEngines": 8,
        "decoders": 7,
        "encoders": 0,
        "jpegEngines": 7,
        "ofaEngines": 1,
        "memory": 81152 * MIB,
    }


def test_mig_consumption_and_capacity():
    profiles = {p.name: p for p in table_profiles("A100-SXM4-40GB")}
    one_g = profiles["1g.5gb"]
    assert mig_consumption(one_g, Placement(3, 1)) == {
        "multiprocessors": 14,
        "copy-engines": 1,
        "decoders": 0,
        "encoders": 0,
        "jpeg-engines": 0,
        "ofa-engines": 0,
        "memory": 4864 * MIB,
        "memory-slice-3": 1,
    }
    three_g = mig_consumption(profiles["3g.20gb"], Placement(4, 4))
    assert [k for k in three_g if k.startswith("memory-slice")] == [f"memory-slice-{i}" for i in range(4, 8)]
    assert profile_capacity(profiles["7g.40gb"])["memory"] == 40192 * MIB


def test_seven_1g_fit_the_counters_an_eighth_does_not():
    profiles = table_profiles("A100-SXM4-40GB")
    counters = gpu_counters(profiles)
    one_g = next(p for p in profiles if p.name == "1g.5gb")
    left = dict(counters)
    for start in range(7):
        for name, value in mig_consumption(one_g, Placement(start, 1)).items():
            left[name] -= value
    assert all(v >= 0 for v in left.values())
    assert left["multiprocessors"] == 0  # nothing left for an eighth 1g.5gb anywhere


def test_no_profiles_no_counters():
    assert gpu_counters([]) == {}


def test_mig_instance_to_live_and_matches():
    spec = MigSpec(0, "GPU-a", "1g.5gb", 19, 2, 1)
    partial = MigInstance("GPU-a", 9, 19, 2, 1)
    assert partial.to_live(0) is None
    assert partial.matches(spec)
    full = MigInstance("GPU-a", 9, 19, 2, 1, ci_id=0, mig_uuid="MIG-1")
    live = full.to_live(0)
    assert live is not None
    assert (live.gi_id, live.ci_id, live.mig_uuid, live.placement_start) == (9, 0, "MIG-1", 2)
    assert not MigInstance("GPU-a", 9, 19, 3, 1).matches(spec)
