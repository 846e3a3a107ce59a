"""Stand-ins for NVIDIA's command-line tools (`nvidia-smi`, `nvidia-cuda-mps-control`) for tests.

They speak the real command line and stdin protocol, change the fake GPU's state file where the
real tools would change the GPU (only ``gpus.<uuid>.computeMode`` and ``gpus.<uuid>.timeslice``),
and append what they were asked to ``<state file>.journal.jsonl``. See each script's docstring
for the supported subset and the fault knobs (environment variables).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STANDIN_DIR = Path(__file__).resolve().parent
TOOLS = ("nvidia-smi", "nvidia-cuda-mps-control")
STATE_ENV = "GPU_DRA_FAKE_NVML_STATE"


def install_standins(bin_dir: Path, state_file: Path) -> dict[str, Path]:
    """Copy the stand-ins into ``bin_dir`` (e.g. ``<fake driver root>/usr/bin``), executable.

    ``state_file`` is baked in as the default state path; ``$GPU_DRA_FAKE_NVML_STATE`` still wins
    when set. Returns tool name -> installed path.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    installed: dict[str, Path] = {}
    for tool in TOOLS:
        text = (STANDIN_DIR / tool).read_text()
        text = text.replace('BAKED_STATE_FILE = ""', f"BAKED_STATE_FILE = {str(state_file.resolve())!r}", 1)
        target = bin_dir / tool
        tmp = bin_dir / f".{tool}.tmp"
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(target)
        installed[tool] = target
    return installed


def journal_path(state_file: Path) -> Path:
    """Where the stand-ins record what they were asked."""
    return state_file.with_name(state_file.name + ".journal.jsonl")


def read_journal(state_file: Path) -> list[dict[str, Any]]:
    """The stand-ins' journal entries, oldest first (empty when nothing ran)."""
    path = journal_path(state_file)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_gpu_state(state_file: Path) -> dict[str, Any]:
    """``gpus`` of the fake state file as the stand-ins see it."""
    if not state_file.exists():
        return {}
    data: dict[str, Any] = json.loads(state_file.read_text()).get("gpus", {})
    return data


def standin_env(state_file: Path) -> dict[str, str]:
    """Environment to run the stand-ins with (the current one plus the state path)."""
    return {**os.environ, STATE_ENV: str(state_file)}
