"""What ``gpu-dra plugin`` imports before its sockets answer: gRPC, the stubs, and little else.

The kubelet's GetInfo has a 1 s deadline, and every module on the way to the sockets delays it.
Everything named here is needed only after the sockets are up (and loaded then), or never by the
daemon: the debug CLI and its CEL, YAML, the kubernetes package, the device state and publisher.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

NOT_ON_THE_START_PATH = (
    "celpy",
    "yaml",
    "kubernetes",
    "pydantic",
    "urllib3",
    "pynvml",
    "driver.debug",
    "driver.kube",
    "driver.state",
    "driver.ownership",
    "driver.discovery",
    "driver.resourceslices",
    "driver.checkpoint",
    "driver.nvml",
    "cdi.store",
    "sharing.mps",
    "mig.manager",
)


def test_the_daemon_reaches_its_sockets_without_the_heavy_modules() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        from driver import cli
        parser = cli.build_parser(debug_commands=False)   # what `gpu-dra plugin` parses with
        import driver.daemon                                 # everything up to the sockets
        print(json.dumps(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    early = sorted(
        m for m in loaded if any(m == name or m.startswith(name + ".") for name in NOT_ON_THE_START_PATH)
    )
    assert early == [], f"imported before the sockets answer: {early}"
    assert "grpc" in loaded
    assert "driver.kubeletapi.registration_pb2_grpc" in loaded
