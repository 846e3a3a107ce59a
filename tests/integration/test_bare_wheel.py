"""What users install starts: the wheel without extras, in a venv that holds nothing else.

Why: the plugin's image installs the wheel without the ``[cel]`` extra, and an import of
cel-python on the start path made ``gpu-dra --help``, ``plugin`` and ``probe`` die with
``ModuleNotFoundError`` there, while the development venv (every extra installed) never showed it.

What it does not do: run the daemon (the real-node tests run the image itself).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.ground.wheel import bare_venv, build_wheel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    return bare_venv(tmp_path_factory.mktemp("bare") / "venv", wheel)


def _gpu_dra(bindir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # -I semantics for the console script: no user site, no PYTHONPATH from the dev environment.
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "PYTHONNOUSERSITE": "1", "HOME": str(bindir.parent)}
    return subprocess.run(
        [str(bindir / "gpu-dra"), *argv], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_the_venv_is_bare(bare_bin: Path) -> None:
    proc = subprocess.run(
        [str(bare_bin / "python"), "-c", "import celpy"], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "No module named 'celpy'" in proc.stderr, (
        "the bare venv must not hold the [cel] extra, or this test proves nothing"
    )


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        ((), "plugin"),
        (("plugin",), "--kubelet-registrar-directory-path"),
        (("probe",), "--timeout"),
    ],
    ids=["gpu-dra", "plugin", "probe"],
)
def test_help_starts_without_extras(bare_bin: Path, argv: tuple[str, ...], expect: str) -> None:
    proc = _gpu_dra(bare_bin, *argv, "--help")
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
    assert "Traceback" not in proc.stderr


def test_simulate_without_cel_names_the_extra(bare_bin: Path, tmp_path: Path) -> None:
    claim = tmp_path / "claim.yaml"
    claim.write_text(
        "apiVersion: resource.k8s.io/v1\nkind: ResourceClaim\nmetadata: {name: c}\n"
        "spec: {devices: {requests: [{name: gpu, exactly: {deviceClassName: gpu.nvidia.com}}]}}\n"
    )
    proc = _gpu_dra(bare_bin, "simulate", str(claim), "--topology", "a100-40gb-x8")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "pip install 'gpu-dra[cel]'" in proc.stderr
    assert "Traceback" not in proc.stderr
