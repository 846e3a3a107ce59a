"""The fake GPUs' mutable state, kept in a JSON file so it outlives the plugin process.

A real GPU keeps its compute mode and MIG layout when the plugin crashes or restarts; the
fake keeps them in this file for the same reason. Several processes share it: the plugin
(through the fake pynvml), the test stand-ins for ``nvidia-smi`` and the test harness
(fault injection). Every change is a read-modify-write under ``flock`` on ``<file>.lock``
followed by an atomic replace, and keys this module does not know are carried through
untouched, so tools can add their own.

Schema v1::

    {"version": 1, "topology": "<name>", "nodeSeed": "<node name>",
     "gpus": {"<uuid>": {"index": 0, "minor": 0, "computeMode": "DEFAULT",
                         "timeslice": 0, "mig": {"current": false, "pending": false, ...}}},
     "faults": [{"op": "nvmlDeviceGetHandleByIndex", "code": 999, "times": 1, "uuid": "GPU-..."}],
     "missingDeviceNodes": [3]}

``mig`` keys other than ``current``/``pending`` belong to the fake's MIG part
(``driver.nvml.fakemig``). A fault without ``times`` fires forever; ``uuid`` limits it to one
GPU. ``missingDeviceNodes`` lists minors whose ``/dev/nvidia<minor>`` a fake driver root
should lack. This module does not interpret NVML semantics; :mod:`driver.nvml.fakepynvml` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cdi.atomicfile import write_atomic
from driver.errors import ConfigError
from driver.nvml.topology import Topology

STATE_ENV = "GPU_DRA_FAKE_NVML_STATE"
SCHEMA_VERSION = 1
COMPUTE_MODES = ("DEFAULT", "EXCLUSIVE_PROCESS", "PROHIBITED")


class FakeState:
    """Reader/writer of one fake NVML state file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @classmethod
    def from_env(cls) -> FakeState:
        """The state file named by ``GPU_DRA_FAKE_NVML_STATE`` (for tools and stand-ins)."""
        value = os.environ.get(STATE_ENV)
        if not value:
            raise ConfigError(f"{STATE_ENV} is not set; point it at the fake NVML state file of the node")
        return cls(Path(value))

    @classmethod
    def create(cls, path: Path, topology: Topology, node_seed: str) -> FakeState:
        """Initialise the file from ``topology`` unless it exists; return the state either way.

        An existing file is kept (a restart must see the GPUs as they were left), but it must
        describe the same topology and node.

        Raises:
            ConfigError: the existing file belongs to another topology or node seed.
        """
        state = cls(path)
        with state.edit() as doc:
            if doc.get("version") is None:
                doc.update(_initial(topology, node_seed))
        doc = state.read()
        if doc.get("topology") != topology.name or doc.get("nodeSeed") != node_seed:
            raise ConfigError(
                f"fake NVML state {path} was made for topology {doc.get('topology')!r} and node "
                f"{doc.get('nodeSeed')!r}, not {topology.name!r} / {node_seed!r}; "
                "delete the file to start over"
            )
        return state

    def read(self) -> dict[str, Any]:
        """The current content, read without the lock ({} when the file does not exist).

        Writers replace the file atomically, so an unlocked read sees one whole document. It
        is read afresh every time: other processes change it, and file timestamps are too
        coarse to cache on.
        """
        return self._load()

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Lock the file, yield its content to mutate in place, write it back atomically.

        Nothing is written if the block raises.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                doc = self._load() if self.path.exists() else {}
                yield doc
                write_atomic(self.path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # --- helpers for tests and tools -------------------------------------------------------

    def add_fault(self, op: str, code: int, times: int | None = None, uuid: str | None = None) -> None:
        """Make ``op`` fail with NVML return ``code`` (``times`` calls, or forever; one GPU or all)."""
        fault: dict[str, Any] = {"op": op, "code": code}
        if times is not None:
            fault["times"] = times
        if uuid is not None:
            fault["uuid"] = uuid
        with self.edit() as doc:
            doc.setdefault("faults", []).append(fault)

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self.edit() as doc:
            doc["faults"] = []

    def missing_device_nodes(self) -> list[int]:
        """Minors whose ``/dev/nvidia<minor>`` a fake driver root should lack."""
        return [int(m) for m in self.read().get("missingDeviceNodes", [])]

    def set_missing_device_nodes(self, minors: list[int]) -> None:
        """Declare which ``/dev/nvidia<minor>`` nodes a fake driver root should lack."""
        with self.edit() as doc:
            doc["missingDeviceNodes"] = sorted(set(minors))

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"fake NVML state {self.path} is unreadable ({exc}); delete it to start over"
            ) from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"fake NVML state {self.path} is not a JSON object; delete it to start over")
        if doc.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ConfigError(
                f"fake NVML state {self.path} has schema version {doc.get('version')}, this build reads "
                f"{SCHEMA_VERSION}; delete it to start over"
            )
        return doc


def _initial(topology: Topology, node_seed: str) -> dict[str, Any]:
    gpus = {
        topology.gpu_uuid(g.index, node_seed): {
            "index": g.index,
            "minor": g.minor,
            "computeMode": "DEFAULT",
            "timeslice": 0,
            "mig": {"current": g.mig_mode, "pending": g.mig_mode},
        }
        for g in topology.gpus
    }
    return {
        "version": SCHEMA_VERSION,
        "topology": topology.name,
        "nodeSeed": node_seed,
        "gpus": gpus,
        "faults": [],
        "missingDeviceNodes": [],
    }
