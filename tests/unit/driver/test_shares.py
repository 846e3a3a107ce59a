"""Consumable shares: the three publishing modes, their slices, and a share's limits."""

from __future__ import annotations

from typing import Any

import pytest

from driver.errors import SliceValidationError
from driver.inventory import AllocatableDevice, Inventory
from driver.resourceslices import build_slices, comparable_spec, validate_pool
from driver.shares import (
    COMPUTE,
    MIN_SHARE_MEMORY,
    ShareMode,
    offer_shares,
    parse_share_mode,
    share_limits,
)
from tests.unit.driver.test_resourceslices import A100_MEMORY, a100_inventory, mig_inventory

GIB = 1 << 30


def offered(mode: str, count: int = 2) -> Inventory:
    return offer_shares(a100_inventory(count), parse_share_mode(mode))


def published(inventory: Inventory) -> dict[str, Any]:
    slices = build_slices(inventory, "node-1", "gpu.nvidia.com", "", 36)
    validate_pool(slices, 36)
    device: dict[str, Any] = slices[0]["spec"]["devices"][0]
    return device


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("memory", ShareMode("memory")),
        (" Unlimited ", ShareMode("unlimited")),
        ("disabled", ShareMode("disabled")),
        ("4", ShareMode("shares", 4)),
    ],
)
def test_share_modes_parse(text: str, mode: ShareMode) -> None:
    assert parse_share_mode(text) == mode


@pytest.mark.parametrize("text", ["0", "-2", "half", "", "1.5"])
def test_bad_share_modes_name_the_accepted_values(text: str) -> None:
    with pytest.raises(ValueError, match="memory \\(default\\), unlimited, a positive number"):
        parse_share_mode(text)


def test_memory_mode_publishes_nvidias_policy_with_a_1gi_minimum() -> None:
    device = published(offered("memory"))
    assert device["allowMultipleAllocations"] is True
    assert device["capacity"]["memory"] == {
        "value": "40Gi",
        "requestPolicy": {"default": "40Gi", "validRange": {"min": "1Gi", "max": "40Gi", "step": "1Mi"}},
    }
    assert device["capacity"][COMPUTE] == {
        "value": "100",
        "requestPolicy": {"default": "0", "validRange": {"min": "0", "max": "100", "step": "1"}},
    }
    assert "shares" not in device["capacity"]


def test_unlimited_mode_defaults_memory_to_zero() -> None:
    policy = published(offered("unlimited"))["capacity"]["memory"]["requestPolicy"]
    assert policy == {"default": "0", "validRange": {"min": "0", "max": "40Gi", "step": "1Mi"}}


def test_n_shares_mode_adds_a_shares_capacity() -> None:
    capacity = published(offered("4"))["capacity"]
    assert capacity["shares"] == {
        "value": "4",
        "requestPolicy": {"default": "1", "validRange": {"min": "1", "max": "4", "step": "1"}},
    }
    assert capacity["memory"]["requestPolicy"]["default"] == "0"


def test_disabled_changes_nothing_and_mig_devices_are_not_shared() -> None:
    plain = a100_inventory(1)
    assert offer_shares(plain, parse_share_mode("disabled")) == plain
    mig = offer_shares(mig_inventory({0: 0}), parse_share_mode("memory"))
    for device in mig.devices:
        assert device.allow_multiple_allocations == (device.kind == "gpu"), device.name
    full = next(d for d in mig.devices if d.kind == "gpu")
    assert full.consumes_counters, "the shared full GPU still consumes every counter of its GPU"


def test_memory_not_a_mib_multiple_is_rounded_down_so_steps_reach_it() -> None:
    odd = Inventory(devices=(_gpu(40 * GIB + 12345),))
    device = published(offer_shares(odd, parse_share_mode("memory")))
    assert device["capacity"]["memory"]["value"] == "40Gi"


def test_the_validator_knows_the_servers_policy_rules() -> None:
    slices = build_slices(offered("memory", 1), "node-1", "gpu.nvidia.com", "", 36)
    policy = slices[0]["spec"]["devices"][0]["capacity"]["memory"]["requestPolicy"]
    policy["default"] = str(A100_MEMORY + 1)
    with pytest.raises(SliceValidationError, match="min <= default <= max <= capacity"):
        validate_pool(slices, 36)
    policy["default"] = str(MIN_SHARE_MEMORY + 1)
    with pytest.raises(SliceValidationError, match=r"not min .* plus a multiple of step"):
        validate_pool(slices, 36)


def test_policy_quantities_compare_by_value() -> None:
    sent = build_slices(offered("memory", 1), "node-1", "gpu.nvidia.com", "", 36)[0]
    stored = {"spec": {**sent["spec"], "devices": [dict(sent["spec"]["devices"][0])]}}
    device = stored["spec"]["devices"][0]
    device["capacity"] = {**device["capacity"]}
    device["capacity"]["memory"] = {
        "value": "40Gi",
        "requestPolicy": {"default": "40Gi", "validRange": {"min": "1Gi", "max": "40Gi", "step": "1Mi"}},
    }
    assert comparable_spec(sent) == comparable_spec(stored)


def _gpu(memory: int) -> AllocatableDevice:
    return AllocatableDevice("gpu-0", "gpu", "GPU-0", 0, {}, {"memory": memory})


def test_share_limits_follow_memory_compute_or_shares() -> None:
    memory = offered("memory", 1).devices[0]
    ten = share_limits(memory, {"memory": "10Gi", COMPUTE: "0"})
    assert (ten.memory_mib, ten.thread_percentage, ten.whole) == (10240, 25, False)
    asked = share_limits(memory, {"memory": "10Gi", COMPUTE: "40"})
    assert asked.thread_percentage == 40
    whole = share_limits(memory, {"memory": str(A100_MEMORY), COMPUTE: "0"})
    assert whole.whole and whole.thread_percentage == 100

    shares = offered("4", 1).devices[0]
    one = share_limits(shares, {"memory": "0", "shares": "1", COMPUTE: "0"})
    assert (one.memory_mib, one.thread_percentage, one.whole) == (10240, 25, False)

    unlimited = offered("unlimited", 1).devices[0]
    free = share_limits(unlimited, {"memory": "0", COMPUTE: "0"})
    assert (free.memory_bytes, free.thread_percentage, free.whole) == (None, 100, False)
    everything = share_limits(unlimited, {"memory": str(A100_MEMORY)})
    assert not everything.whole, "in unlimited mode a 0-memory share can sit beside a full-memory one"


def test_share_limits_refuse_impossible_consumption() -> None:
    memory = offered("memory", 1).devices[0]
    with pytest.raises(ValueError, match=r"consumed .* bytes of memory, the GPU has"):
        share_limits(memory, {"memory": "80Gi"})
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        share_limits(memory, {"memory": "lots"})
