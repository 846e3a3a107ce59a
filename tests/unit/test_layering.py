"""The house's walls: the pure packages never reach up into the daemon or its frameworks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = ("cdi", "mig", "sharing")
FORBIDDEN = ("driver", "grpc", "kubernetes", "pynvml")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_no_daemon_or_framework(package: str) -> None:
    """cdi/, mig/ and sharing/ stay free of driver/, gRPC, Kubernetes and NVML."""
    offenders = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] in FORBIDDEN
    }
    assert not offenders, sorted(offenders)


def test_layering_check_sees_an_offender(tmp_path: Path) -> None:
    """The check itself can fail: a module importing driver is caught."""
    module = tmp_path / "bad.py"
    module.write_text("from driver.state import DeviceState\nimport grpc\n")
    assert {"driver.state", "grpc"} <= imported_modules(module)


def test_only_the_nvml_package_imports_pynvml() -> None:
    """Everything above the NVML seam sees frozen values, never pynvml objects."""
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "driver").rglob("*.py"))
        if "pynvml" in {n.split(".")[0] for n in imported_modules(path)} and path.parent.name != "nvml"
    ]
    assert not offenders, offenders
