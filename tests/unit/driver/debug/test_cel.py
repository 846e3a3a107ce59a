"""The DRA CEL environment: Kubernetes semantics on top of celpy, and the API server's static rejections."""

from __future__ import annotations

from fractions import Fraction

import pytest

from driver.debug.cel import Quantity, Semver, check, compile_selector, device_activation
from driver.inventory import Version

ACT = device_activation(
    "gpu.nvidia.com",
    {
        "type": "gpu",
        "productName": "NVIDIA A100-SXM4-40GB",
        "driverVersion": Version("580.126.20"),
        "cudaComputeCapability": Version("8.0.0"),
        "resource.kubernetes.io/numaNode": 1,
        "example.com/flag": True,
    },
    {"memory": 42949672960},
)


def run(expr: str):
    sel = compile_selector(expr)
    assert sel.valid, sel.issues
    return sel.evaluate(ACT)


@pytest.mark.parametrize(
    ("expr", "matched"),
    [
        ('device.driver == "gpu.nvidia.com"', True),
        ('device.attributes["gpu.nvidia.com"].type == "gpu"', True),
        ('device.attributes["resource.kubernetes.io"].numaNode == 1', True),
        ('device.attributes["example.com"].flag', True),
        ('device.capacity["gpu.nvidia.com"].memory.compareTo(quantity("40Gi")) == 0', True),
        ('device.capacity["gpu.nvidia.com"].memory.isGreaterThan(quantity("40Gi"))', False),
        ('device.capacity["gpu.nvidia.com"].memory.isLessThan(quantity("41Gi"))', True),
        ('device.capacity["gpu.nvidia.com"].memory == quantity("42949672960")', True),
        (
            'device.capacity["gpu.nvidia.com"].memory.sub(quantity("1Gi")).compareTo(quantity("39Gi")) == 0',
            True,
        ),
        ('device.capacity["gpu.nvidia.com"].memory.asApproximateFloat() > 4.0e10', True),
        ('sign(device.capacity["gpu.nvidia.com"].memory) == 1', True),
        ('device.attributes["gpu.nvidia.com"].driverVersion.isGreaterThan(semver("580.9.0"))', True),
        (
            'device.attributes["gpu.nvidia.com"].cudaComputeCapability.compareTo(semver("8.0.0-rc.1")) > 0',
            True,
        ),
        ('device.attributes["gpu.nvidia.com"].driverVersion.patch() == 20', True),
        ('device.attributes["gpu.nvidia.com"].driverVersion == "580.126.20"', False),
        ('device.attributes["gpu.nvidia.com"].productName == 3', False),
        ('has(device.attributes["gpu.nvidia.com"].profile)', False),
        ('has(device.attributes["nope.com"].x)', False),
        ('"gpu.nvidia.com" in device.attributes', True),
        ('device.attributes["gpu.nvidia.com"].productName.lowerAscii().startsWith("nvidia a100")', True),
        ('device.attributes["gpu.nvidia.com"].productName.split("-")[1] == "SXM4"', True),
        ('device.attributes["gpu.nvidia.com"].productName.matches("A100-SXM[0-9]")', True),
        ('isQuantity("1Gi") && !isQuantity("1 Gi") && isSemver("1.2.3") && !isSemver("1.2")', True),
    ],
)
def test_evaluates_like_kubernetes(expr, matched):
    outcome = run(expr)
    assert outcome.error is None
    assert outcome.matched is matched


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ('device.attributes["gpu.nvidia.com"].profile == "1g.5gb"', "no such key: profile"),
        ('device.attributes["nope.com"].x == 1', "no such key: x"),
        ('device.attributes["gpu.nvidia.com"].productName > 3', "no such overload"),
        ('quantity("forty") == quantity("40")', "quantity"),
    ],
)
def test_runtime_errors_are_reported_not_false(expr, error):
    outcome = run(expr)
    assert not outcome.matched
    assert outcome.error is not None and error in outcome.error


def test_error_absorbed_by_or_like_cel():
    assert run(
        'device.driver == "gpu.nvidia.com" || device.attributes["gpu.nvidia.com"].profile == "x"'
    ).matched


@pytest.mark.parametrize(
    ("expr", "message", "fix"),
    [
        (
            'device.capacity["gpu.nvidia.com"].memory >= quantity("40Gi")',
            "not defined for quantities",
            "compareTo",
        ),
        (
            'device.capacity["gpu.nvidia.com"].memory < quantity("40Gi")',
            "not defined for quantities",
            "isLessThan",
        ),
        ('semver("1.0.0") > semver("0.9.0")', "semantic versions", "compareTo"),
        ('device.capacity["gpu.nvidia.com"].memory == "40Gi"', "(Quantity, string)", "quantity("),
        (
            'device.capacity["gpu.nvidia.com"].memory.isGreaterThan("1Gi")',
            "needs a Quantity",
            'quantity("1Gi")',
        ),
        ('device.attributes.productName == "x"', "without its domain", '["gpu.nvidia.com"].productName'),
        (
            'device.capacity.memory.isGreaterThan(quantity("1"))',
            "without its domain",
            'capacity["gpu.nvidia.com"]',
        ),
        ('gpu.type == "gpu"', "undeclared reference to 'gpu'", "device.attributes"),
        ('device.name == "gpu-0"', "undefined field 'name'", ""),
        ("device.driver", "must evaluate to bool", ""),
        ("device.driver == 3", "(string, int)", ""),
        ('device.capacity["gpu.nvidia.com"].memory.sign() == 1', "not a method", "sign(device"),
        ('device.capacity["gpu.nvidia.com"].memory + quantity("1") == quantity("2")', "'+'", ".add("),
        ("device.driver ==", "syntax error", ""),
        ("frob(device.driver)", "undeclared reference to function 'frob'", ""),
        ('"x" * 2 == "xx"', "no matching overload", ""),
        ("x" * 10241, "more than 10240", ""),
    ],
)
def test_static_check_rejects_with_fix(expr, message, fix):
    issues = check(expr)
    assert issues, f"{expr} should be rejected"
    assert message in issues[0].message
    assert fix in issues[0].fix


@pytest.mark.parametrize(
    "expr",
    [
        'device.attributes["gpu.nvidia.com"].driverVersion == "580"',  # dyn == string: legal, false
        'device.attributes["gpu.nvidia.com"].x > 3',  # dyn: checked at runtime
        '["a", "b"].exists(v, v == device.attributes["gpu.nvidia.com"].type)',
        'has(device.attributes["gpu.nvidia.com"].profile) ? '
        'device.attributes["gpu.nvidia.com"].profile == "1g.5gb" : false',
        'device.capacity["gpu.nvidia.com"].memory.add(1).isInteger()',
    ],
)
def test_static_check_accepts_what_the_server_accepts(expr):
    assert check(expr) == ()


def test_semver_precedence_and_normalize():
    assert Semver.parse("1.0.0-alpha") < Semver.parse("1.0.0-alpha.1") < Semver.parse("1.0.0-beta")
    assert Semver.parse("1.0.0-rc.1") < Semver.parse("1.0.0")
    assert Semver.parse("1.0.0+build") == Semver.parse("1.0.0")
    assert Semver.parse("v1.2", normalize=True) == Semver.parse("1.2.0")
    with pytest.raises(ValueError, match="semantic version"):
        Semver.parse("1.2")


def test_quantity_compares_by_value():
    assert Quantity.parse("1Ki") == Quantity.parse("1024")
    assert Quantity.parse("1k").value == Fraction(1000)


def test_invalid_version_attribute_is_an_error_like_the_scheduler():
    with pytest.raises(ValueError, match="semantic version"):
        device_activation("gpu.nvidia.com", {"v": Version("1.2")}, {})
