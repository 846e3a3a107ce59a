"""cel-python is an optional extra: only explain and simulate may need it.

Why: the plugin's image installs the wheel without ``[cel]``; the start path (``gpu-dra``,
``plugin``, ``probe``, ``doctor``) must not import it, and explain/simulate must say how to get it.
The block is done in a child interpreter (``sys.modules['celpy'] = None`` makes every import of it
fail as if it were not installed), so this process keeps its celpy. The bare-wheel integration test
proves the same against a real install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]

_CHILD = """
import sys
sys.modules["celpy"] = None
from driver.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
loaded = sorted(m for m in sys.modules if m.startswith(("celpy", "driver.debug.cel")) and sys.modules[m])
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "argv", [("--help",), ("plugin", "--help"), ("probe", "--help"), ("doctor", "--help")]
)
def test_start_path_never_imports_cel(argv: tuple[str, ...]) -> None:
    proc = _run(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED=\n" in proc.stderr


def test_simulate_without_cel_says_to_install_the_extra(tmp_path: Path) -> None:
    claim = tmp_path / "claim.yaml"
    claim.write_text(
        "apiVersion: resource.k8s.io/v1\nkind: ResourceClaim\nmetadata: {name: c}\n"
        "spec: {devices: {requests: [{name: gpu, exactly: {deviceClassName: gpu.nvidia.com}}]}}\n"
    )
    proc = _run("simulate", str(claim), "--topology", "a100-40gb-x8")
    assert proc.returncode == 2, proc.stderr
    assert "gpu-dra simulate: explain and simulate evaluate CEL with cel-python" in proc.stderr
    assert "pip install 'gpu-dra[cel]'" in proc.stderr


def test_simulate_with_cel_still_answers(tmp_path: Path) -> None:
    claim = tmp_path / "claim.yaml"
    claim.write_text(
        "apiVersion: resource.k8s.io/v1\nkind: ResourceClaim\nmetadata: {name: c}\n"
        "spec: {devices: {requests: [{name: gpu, exactly: {deviceClassName: gpu.nvidia.com}}]}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "driver", "simulate", str(claim), "--topology", "a100-40gb-x8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "would fit: yes" in proc.stdout
