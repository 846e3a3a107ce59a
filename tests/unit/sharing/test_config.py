"""Decoding, normalisation, quantities and precedence of the opaque config API."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from sharing.config import (
    MIB,
    GpuConfig,
    MigDeviceConfig,
    MpsConfig,
    Sharing,
    TimeSlicingConfig,
    decode_config,
    encode_config,
    format_mps_limit,
    parse_quantity,
    quantity_bytes,
    resolve_groups,
)
from sharing.errors import ConfigError

DRIVER = "gpu.nvidia.com"
API = "resource.nvidia.com/v1beta1"
SCENARIOS = Path(__file__).resolve().parents[2] / "data" / "scenarios"


def gpu(sharing: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API, "kind": "GpuConfig", **extra}
    if sharing is not None:
        obj["sharing"] = sharing
    return obj


def mig(sharing: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API, "kind": "MigDeviceConfig"}
    if sharing is not None:
        obj["sharing"] = sharing
    return obj


# -- quantities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5Gi", 5 * 1024**3),
        ("512Mi", 512 * MIB),
        ("1Ki", 1024),
        ("2Ti", 2 * 1024**4),
        ("1k", 1000),
        ("4G", 4 * 10**9),
        ("1M", 10**6),
        ("3T", 3 * 10**12),
        ("1e9", 10**9),
        ("1E3", 1000),
        ("1.5Gi", 3 * 1024**3 // 2),
        (".5Ki", 512),
        ("1073741824", 1024**3),
        ("+7", 7),
        ("0", 0),
        (1024, 1024),
        ("1500m", 2),  # 1.5 rounds up to whole bytes, like Quantity.Value()
    ],
)
def test_quantity_bytes(text: object, expected: int) -> None:
    assert quantity_bytes(text, "x") == expected


def test_quantity_is_exact() -> None:
    assert parse_quantity("100m") == Fraction(1, 10)
    assert parse_quantity("-1Mi") == -MIB
    assert parse_quantity("1e-3") == Fraction(1, 1000)


@pytest.mark.parametrize(
    "bad", ["", "5 Gi", "5GB", "Gi", "1.2.3", "5gi", " 5Gi", "0x10", "1e", True, None, [1]]
)
def test_quantity_rejects_garbage_and_names_the_field(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        quantity_bytes(bad, "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit")
    assert info.value.path == "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit"
    assert "quantity" in str(info.value)


def test_mps_limit_is_whole_mib_rounded_down() -> None:
    assert format_mps_limit(5 * 1024**3) == "5120M"
    assert format_mps_limit(MIB + MIB // 2) == "1M"


# -- decoding -----------------------------------------------------------------------------------


def test_no_sharing_decodes_to_exclusive() -> None:
    cfg = decode_config(gpu())
    assert cfg == GpuConfig(sharing=None)
    assert cfg.time_slicing() is None
    assert cfg.mps() is None


def test_time_slicing_defaults_to_default_interval() -> None:
    cfg = decode_config(gpu({"strategy": "TimeSlicing"}))
    assert cfg.time_slicing() == TimeSlicingConfig("Default")
    assert cfg.time_slicing() is not None
    assert cfg.mps() is None


@pytest.mark.parametrize(("name", "level"), [("Default", 0), ("Short", 1), ("Medium", 2), ("Long", 3)])
def test_intervals(name: str, level: int) -> None:
    cfg = decode_config(gpu({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": name}}))
    ts = cfg.time_slicing()
    assert ts is not None
    assert ts.level == level


def test_mps_defaults_to_empty_config() -> None:
    cfg = decode_config(gpu({"strategy": "MPS"}))
    assert cfg.mps() == MpsConfig()


def test_mps_full_config() -> None:
    cfg = decode_config(
        gpu(
            {
                "strategy": "MPS",
                "mpsConfig": {
                    "defaultActiveThreadPercentage": 33,
                    "defaultPinnedDeviceMemoryLimit": "5Gi",
                    "defaultPerDevicePinnedMemoryLimit": {"0": "1Gi", "GPU-x": "2Gi"},
                    "multiUser": True,
                },
            }
        )
    )
    assert cfg.mps() == MpsConfig(33, 5 * 1024**3, (("0", 1024**3), ("GPU-x", 2 * 1024**3)), True)


def test_json_text_is_accepted() -> None:
    assert decode_config(b'{"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig"}') == GpuConfig()


def test_mig_time_slicing_validates_but_has_no_effect() -> None:
    cfg = decode_config(mig({"strategy": "TimeSlicing"}))
    assert isinstance(cfg, MigDeviceConfig)
    assert cfg.sharing == Sharing("TimeSlicing")
    assert cfg.time_slicing() is None
    assert cfg.mps() is None


def test_mig_mps() -> None:
    cfg = decode_config(mig({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}}))
    assert cfg.mps() == MpsConfig(default_active_thread_percentage=50)


@pytest.mark.parametrize(
    ("params", "path", "needles"),
    [
        (
            gpu({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}}),
            "sharing.timeSlicingConfig.interval",
            ["Forever", "Default, Short, Medium, Long"],
        ),
        (gpu({"strategy": "TimeSlice"}), "sharing.strategy", ["TimeSlice", "TimeSlicing, MPS"]),
        (gpu({}), "sharing.strategy", ["TimeSlicing, MPS"]),
        (gpu({"strategy": "TimeSlicing", "intervall": "Long"}), "sharing.intervall", ["unknown field"]),
        (gpu(foo=1), "foo", ["unknown field", "apiVersion, kind, sharing"]),
        (
            gpu({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long", "x": 1}}),
            "sharing.timeSlicingConfig.x",
            ["unknown field", "interval"],
        ),
        (
            gpu({"strategy": "TimeSlicing", "mpsConfig": {}}),
            "sharing.mpsConfig",
            ["TimeSlicing"],
        ),
        (
            gpu({"strategy": "MPS", "timeSlicingConfig": {"interval": "Long"}}),
            "sharing.timeSlicingConfig",
            ["MPS"],
        ),
        (
            mig({"strategy": "MPS", "timeSlicingConfig": {}}),
            "sharing.timeSlicingConfig",
            ["unknown field", "strategy, mpsConfig"],
        ),
        (
            gpu({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 0}}),
            "sharing.mpsConfig.defaultActiveThreadPercentage",
            ["1..100"],
        ),
        (
            gpu({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 101}}),
            "sharing.mpsConfig.defaultActiveThreadPercentage",
            ["1..100"],
        ),
        (
            gpu({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": "33"}}),
            "sharing.mpsConfig.defaultActiveThreadPercentage",
            ["integer"],
        ),
        (
            gpu({"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "512Ki"}}),
            "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit",
            ["at least 1Mi"],
        ),
        (
            gpu({"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "5GB"}}),
            "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit",
            ["quantity"],
        ),
        (
            gpu({"strategy": "MPS", "mpsConfig": {"defaultPerDevicePinnedMemoryLimit": {"0": "1"}}}),
            "sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.0",
            ["at least 1Mi"],
        ),
        (
            gpu({"strategy": "MPS", "mpsConfig": {"multiUser": "yes"}}),
            "sharing.mpsConfig.multiUser",
            ["true or false"],
        ),
        (
            {"apiVersion": "resource.nvidia.com/v1", "kind": "GpuConfig"},
            "apiVersion",
            ["resource.nvidia.com/v1beta1"],
        ),
        ({"apiVersion": API, "kind": "VfioDeviceConfig"}, "kind", ["GpuConfig, MigDeviceConfig"]),
        # A missing field is called missing, not "None is not supported".
        ({"kind": "GpuConfig"}, "apiVersion", ["is missing", f"add apiVersion: {API}"]),
        ({"apiVersion": API}, "kind", ["is missing", "GpuConfig, MigDeviceConfig"]),
        (gpu({"mpsConfig": {}}), "sharing.strategy", ["is missing", "TimeSlicing, MPS"]),
        ({"apiVersion": API, "kind": "GpuConfig", "metadata": {}}, "metadata", ["unknown field"]),
        ("[1, 2", "", ["JSON"]),
        ([1], "", ["expected an object"]),
    ],
)
def test_invalid_configs_name_the_field_and_allowed_values(
    params: Any, path: str, needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        decode_config(params)
    assert info.value.path == path
    message = str(info.value)
    assert message.startswith(path)
    for needle in needles:
        assert needle in message
    assert isinstance(info.value, ValueError)


def test_encode_round_trips() -> None:
    params = gpu(
        {
            "strategy": "MPS",
            "mpsConfig": {
                "defaultActiveThreadPercentage": 10,
                "defaultPinnedDeviceMemoryLimit": "1Gi",
                "defaultPerDevicePinnedMemoryLimit": {"1": "3Mi"},
                "multiUser": True,
            },
        }
    )
    cfg = decode_config(params)
    assert decode_config(encode_config(cfg)) == cfg
    ts = decode_config(gpu({"strategy": "TimeSlicing"}))
    assert encode_config(ts)["sharing"] == {
        "strategy": "TimeSlicing",
        "timeSlicingConfig": {"interval": "Default"},
    }


def test_scenario_manifests_decode() -> None:
    for scenario, strategy in (("02-time-slicing", "TimeSlicing"), ("03-mps", "MPS")):
        docs = list(yaml.safe_load_all((SCENARIOS / scenario / "manifests.yaml").read_text()))
        claim = next(d for d in docs if d["kind"] == "ResourceClaim")
        params = claim["spec"]["devices"]["config"][0]["opaque"]["parameters"]
        cfg = decode_config(params)
        assert cfg.sharing is not None
        assert cfg.sharing.strategy == strategy
    mps = decode_config(params).mps()
    assert mps == MpsConfig(33, 5 * 1024**3)


# -- pinned limits at prepare time --------------------------------------------------------------


def test_pinned_limits_default_per_device_override_and_index_into_sorted_uuids() -> None:
    cfg = MpsConfig(
        default_pinned_device_memory_limit=2 * 1024**3,
        default_per_device_pinned_memory_limit=(("1", 3 * MIB), ("GPU-c", 7 * MIB)),
    )
    limits = cfg.pinned_limits_mib(["GPU-c", "GPU-a", "GPU-b"], {"GPU-a": 10 * 1024**3})
    # sorted: a, b, c -> index 1 is GPU-b
    assert limits == {"GPU-a": 2048, "GPU-b": 3, "GPU-c": 7}


def test_pinned_limit_larger_than_gpu_fails() -> None:
    cfg = MpsConfig(default_pinned_device_memory_limit=41 * 1024**3)
    with pytest.raises(ConfigError) as info:
        cfg.pinned_limits_mib(["GPU-a"], {"GPU-a": 40 * 1024**3})
    assert info.value.path == "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit"
    assert "exceeds" in str(info.value)


@pytest.mark.parametrize("key", ["2", "GPU-z", "-1"])
def test_pinned_limit_key_outside_group_fails(key: str) -> None:
    cfg = MpsConfig(default_per_device_pinned_memory_limit=((key, MIB),))
    with pytest.raises(ConfigError) as info:
        cfg.pinned_limits_mib(["GPU-a", "GPU-b"], {})
    assert info.value.path == f"sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.{key}"
    assert "GPU-a" in str(info.value)


def test_no_limits_means_none_sent() -> None:
    assert MpsConfig().pinned_limits_mib(["GPU-a"], {"GPU-a": 1}) == {}


# -- precedence and grouping --------------------------------------------------------------------


def dtype(name: str) -> str:
    return "mig" if "-mig-" in name else "gpu"


def result(request: str, device: str, driver: str = DRIVER) -> dict[str, Any]:
    return {"request": request, "driver": driver, "pool": "node", "device": device}


def opaque(
    params: Any, requests: list[str] | None = None, source: str = "FromClaim", driver: str = DRIVER
) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": source, "opaque": {"driver": driver, "parameters": params}}
    if requests is not None:
        entry["requests"] = requests
    return entry


TS_LONG = gpu({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})
TS_SHORT = gpu({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Short"}})
MPS = gpu({"strategy": "MPS"})


def test_no_config_gives_default_groups_without_sharing() -> None:
    groups = resolve_groups([result("a", "gpu-0"), result("b", "gpu-0-mig-1g5gb-19-0")], [], DRIVER, dtype)
    assert [g.config for g in groups] == [GpuConfig(), MigDeviceConfig()]
    assert all(g.sharing is None for g in groups)


def test_claim_beats_class_and_later_beats_earlier() -> None:
    configs = [
        opaque(TS_SHORT, source="FromClaim"),
        opaque(MPS, source="FromClass"),
        opaque(TS_LONG, source="FromClaim"),
    ]
    groups = resolve_groups([result("a", "gpu-0"), result("b", "gpu-1")], configs, DRIVER, dtype)
    assert len(groups) == 1
    ts = groups[0].config.time_slicing() if groups[0].config else None
    assert ts == TimeSlicingConfig("Long")
    assert len(groups[0].results) == 2


def test_class_config_applies_when_claim_has_none() -> None:
    groups = resolve_groups([result("a", "gpu-0")], [opaque(MPS, source="FromClass")], DRIVER, dtype)
    assert groups[0].config is not None
    assert groups[0].config.mps() == MpsConfig()


def test_by_request_configs_split_groups_and_subrequests_match_their_parent() -> None:
    configs = [opaque(TS_LONG, ["a"]), opaque(MPS, ["b"])]
    results = [result("a/small", "gpu-0"), result("b", "gpu-1"), result("c", "gpu-2"), result("a", "gpu-3")]
    groups = resolve_groups(results, configs, DRIVER, dtype)
    by_device = {r["device"]: g.config for g in groups for r in g.results}
    assert by_device["gpu-0"] is by_device["gpu-3"]
    assert by_device["gpu-0"] is not None and by_device["gpu-0"].time_slicing() == TimeSlicingConfig("Long")
    assert by_device["gpu-1"] is not None and by_device["gpu-1"].mps() == MpsConfig()
    assert by_device["gpu-2"] == GpuConfig()
    assert len(groups) == 3


def test_exact_subrequest_name_matches() -> None:
    groups = resolve_groups([result("a/small", "gpu-0")], [opaque(MPS, ["a/small"])], DRIVER, dtype)
    assert groups[0].config is not None and groups[0].config.mps() is not None


def test_by_request_kind_mismatch_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_groups([result("m", "gpu-0-mig-1g5gb-19-0")], [opaque(TS_LONG, ["m"])], DRIVER, dtype)
    assert "cannot apply GpuConfig" in str(info.value)
    assert "MigDeviceConfig" in str(info.value)


def test_kind_mismatch_without_requests_is_skipped() -> None:
    configs = [opaque(TS_LONG), opaque(mig({"strategy": "MPS"}))]
    groups = resolve_groups(
        [result("g", "gpu-0"), result("m", "gpu-0-mig-1g5gb-19-0")], configs, DRIVER, dtype
    )
    by_device = {r["device"]: g.config for g in groups for r in g.results}
    assert isinstance(by_device["gpu-0"], GpuConfig) and by_device["gpu-0"].time_slicing() is not None
    assert isinstance(by_device["gpu-0-mig-1g5gb-19-0"], MigDeviceConfig)
    assert by_device["gpu-0-mig-1g5gb-19-0"].mps() is not None


def test_other_drivers_are_ignored() -> None:
    configs = [opaque({"anything": True}, driver="other.example.com")]
    results = [result("a", "gpu-0"), result("a", "x", driver="other.example.com")]
    groups = resolve_groups(results, configs, DRIVER, dtype)
    assert [len(g.results) for g in groups] == [1]


def test_invalid_config_fails_even_if_it_matches_nothing_and_names_the_entry() -> None:
    bad = gpu({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}})
    with pytest.raises(ConfigError) as info:
        resolve_groups([result("a", "gpu-0")], [opaque(bad, ["zzz"])], DRIVER, dtype)
    assert info.value.path == "sharing.timeSlicingConfig.interval"
    assert "config[0]" in str(info.value)
    assert "Default, Short, Medium, Long" in str(info.value)


def test_non_opaque_config_is_an_error() -> None:
    with pytest.raises(ConfigError, match="opaque"):
        resolve_groups([result("a", "gpu-0")], [{"source": "FromClaim", "requests": ["a"]}], DRIVER, dtype)
