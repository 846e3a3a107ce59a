"""Generate the Python gRPC stubs for the kubelet wire contracts into driver/kubeletapi/.

Each .proto is compiled from a flat staging copy so that the generated modules import each
other relatively inside ``driver.kubeletapi`` instead of needing a top-level ``proto`` or
``kubelet`` package on sys.path. ``--check`` regenerates into a temp dir and fails when the
committed stubs differ (stale generated code).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "driver" / "kubeletapi"
HEADER = '"""Generated kubelet wire stubs (make proto). Do not edit; see proto/README.md."""\n'


def generate(out: Path) -> None:
    from grpc_tools import protoc  # noqa: PLC0415  (dev-only dependency)

    # protoc finds the mypy plugins (protoc-gen-mypy*) on PATH, next to this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as staging_name:
        staging = Path(staging_name)
        for proto in protos:
            shutil.copy(proto, staging / proto.name)
        include = str(Path(protoc.__file__).parent / "_proto")
        args = [
            "protoc",
            f"-I{staging}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *[str(staging / p.name) for p in protos],
        ]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
    for py in out.glob("*_pb2_grpc.py"):
        text = py.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        py.write_text(text)
    (out / "__init__.py").write_text(HEADER)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        OUT_DIR.mkdir(parents=True)
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate(tmp)
        fresh = sorted(p.name for p in tmp.iterdir() if p.is_file())
        committed = sorted(p.name for p in OUT_DIR.iterdir() if p.is_file()) if OUT_DIR.exists() else []
        stale = [n for n in fresh if n not in committed or not filecmp.cmp(tmp / n, OUT_DIR / n, shallow=False)]
        extra = [n for n in committed if n not in fresh]
        if stale or extra:
            print(f"generated stubs are stale: {stale + extra}; run 'make proto'", file=sys.stderr)
            return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
