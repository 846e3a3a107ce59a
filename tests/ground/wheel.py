"""The gpu-dra wheel as CI builds it, and a bare virtual environment that installs it.

Why: users install the wheel without extras (the plugin's image does exactly that), while the
development venv holds every extra; a start-up that needs an optional package only fails in the
former. Tests build the wheel from a copy of the tree (other work in the checkout is left alone)
and install it the way ``deploy/container/Dockerfile`` does.

What it does not do: reach anything but PyPI (through pip, with pip's own cache).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


class WheelError(RuntimeError):
    """Building or installing the wheel failed; the message carries pip's output."""


def _run(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise WheelError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def build_wheel(workdir: Path) -> Path:
    """Build the wheel (``pip wheel --no-deps``, as CI does) under ``workdir``; return its path."""
    tree = workdir / "src"
    shutil.copytree(ROOT, tree, ignore=_IGNORE)
    out = workdir / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=tree,
    )
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelError(f"expected one wheel in {out}, found {[w.name for w in wheels]}")
    shutil.rmtree(tree)
    return wheels[0]


def bare_venv(path: Path, wheel: Path) -> Path:
    """A fresh venv holding only ``wheel`` and its declared dependencies (binary wheels, no extras).

    Returns the venv's ``bin`` directory. The install line is the Dockerfile's.
    """
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    bindir = path / "bin"
    _run(
        [
            str(bindir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            str(wheel),
        ]
    )
    return bindir
