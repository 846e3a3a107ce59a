"""Paths to the Go-built test peers, building them on first use.

Why: tests stand on real upstream parts (etcd, kube-*, the kubelet with a fake CRI runtime,
helm, the CDI library, a mock libnvidia-ml) built by ``tests/peers/build.sh`` from pinned Go
modules and cached under ``~/.cache/gpu-dra/peers``. This module is the one place tests ask for
them; it calls the script (cached and idempotent, so a warm call costs a fraction of a second)
and returns paths.

What it does not do: download prebuilt binaries, or decide versions - the pins live in
``tests/peers/pins.env``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
BUILD_SCRIPT = PEERS_DIR / "build.sh"
PINS_FILE = PEERS_DIR / "pins.env"
MOCKNVML_PROFILES = ("dgxa100", "dgxh100", "dgxh200", "dgxb200")

# One build at a time from this process; the script itself is safe to re-run.
_lock = threading.Lock()
_built: set[tuple[str, str]] = set()


class PeerBuildError(RuntimeError):
    """A test peer could not be built; the message carries the build output's tail."""


def cache_dir() -> Path:
    """Where build.sh caches the peers (same rule as the script)."""
    env = os.environ.get("GPU_DRA_PEERS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpu-dra" / "peers"


def pins() -> dict[str, str]:
    """The pinned versions from pins.env (simple KEY=VALUE lines, optional quotes)."""
    out: dict[str, str] = {}
    for raw in PINS_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        parts = shlex.split(value)
        out[key.strip()] = " ".join(parts)
    return out


def _build(target: str, env_extra: dict[str, str] | None = None) -> None:
    key = (target, repr(sorted((env_extra or {}).items())))
    with _lock:
        if key in _built:
            return
        env = dict(os.environ)
        env.update(env_extra or {})
        log.info("peer build", target=target, **(env_extra or {}))
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), target],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise PeerBuildError(
                f"building test peer {target!r} failed (exit {proc.returncode}); run "
                f"`{BUILD_SCRIPT} {target}` by hand to see the whole output. Last lines:\n{tail}"
            )
        _built.add(key)


def _require(path: Path, target: str) -> Path:
    if not path.exists():
        raise PeerBuildError(
            f"{path} is missing after `build.sh {target}` reported success; delete "
            f"{path.parent.parent} and build again"
        )
    return path


def k8s_version() -> str:
    """The Kubernetes version to test against: GPU_DRA_K8S_VERSION or the primary pin."""
    return os.environ.get("GPU_DRA_K8S_VERSION") or pins()["K8S_PRIMARY"]


def k8s_bin_dir(version: str | None = None) -> Path:
    """Directory holding etcd, kube-apiserver, kube-scheduler, kube-controller-manager."""
    ver = version or k8s_version()
    _build("k8s", {"K8S_VERSION": ver})
    bin_dir = cache_dir() / f"k8s-{ver}" / "bin"
    for name in ("etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager"):
        _require(bin_dir / name, "k8s")
    return bin_dir


def kubelet_bin_dir(version: str | None = None) -> Path:
    """Directory holding the real kubelet and fakecri (the fake CRI runtime) of ``version``."""
    ver = version or k8s_version()
    _build("kubelet", {"K8S_VERSION": ver})
    bin_dir = cache_dir() / f"kubelet-{ver}" / "bin"
    for name in ("kubelet", "fakecri"):
        _require(bin_dir / name, "kubelet")
    return bin_dir


def helm_path() -> Path:
    """The pinned helm binary."""
    _build("helm")
    return _require(cache_dir() / f"helm-{pins()['HELM_VERSION']}" / "bin" / "helm", "helm")


def cdi_path() -> Path:
    """A `cdi` command (validate/devices/inject) on the CDI project's pkg/cdi library."""
    _build("cdi")
    return _require(cache_dir() / f"cdi-{pins()['CDI_VERSION']}" / "bin" / "cdi", "cdi")


def promtool_path() -> Path:
    """Prometheus' promtool (``promtool check metrics`` lints an exposition read from stdin)."""
    _build("promtool")
    return _require(cache_dir() / f"promtool-{pins()['PROMETHEUS_VERSION']}" / "bin" / "promtool", "promtool")


def _mocknvml_dir() -> Path:
    return cache_dir() / f"mocknvml-go-nvml-{pins()['GO_NVML_VERSION']}"


def mocknvml_lib_dir() -> Path:
    """Directory with the mock libnvidia-ml.so.1; put it on LD_LIBRARY_PATH of a child process."""
    _build("mocknvml")
    lib = _mocknvml_dir() / "lib"
    _require(lib / "libnvidia-ml.so.1", "mocknvml")
    return lib


def mocknvml_config(profile: str) -> Path:
    """The MOCK_NVML_CONFIG file for `profile` (one of MOCKNVML_PROFILES, e.g. "dgxh100")."""
    if profile not in MOCKNVML_PROFILES:
        raise ValueError(f"unknown mock NVML profile {profile!r}; pick one of {', '.join(MOCKNVML_PROFILES)}")
    mocknvml_lib_dir()
    return _require(_mocknvml_dir() / "profiles" / f"{profile}.yaml", "mocknvml")


def mocknvml_env(profile: str) -> dict[str, str]:
    """Environment entries that make a child process's pynvml load the mock with `profile`."""
    lib = mocknvml_lib_dir()
    prior = os.environ.get("LD_LIBRARY_PATH")
    return {
        "LD_LIBRARY_PATH": f"{lib}:{prior}" if prior else str(lib),
        "MOCK_NVML_CONFIG": str(mocknvml_config(profile)),
    }


def _node_peer(target: str, dirname: str, names: Sequence[str]) -> Path:
    _build(target)
    bin_dir = cache_dir() / dirname / "bin"
    for name in names:
        _require(bin_dir / name, target)
    return bin_dir


def containerd_bin_dir() -> Path:
    """containerd, ctr and containerd-shim-runc-v2 at the pinned version."""
    return _node_peer(
        "containerd",
        f"containerd-{pins()['CONTAINERD_VERSION']}",
        ("containerd", "ctr", "containerd-shim-runc-v2"),
    )


def runc_path() -> Path:
    """The static runc (with seccomp) at the pinned version."""
    return _node_peer("runc", f"runc-{pins()['RUNC_VERSION']}", ("runc",)) / "runc"


def cni_bin_dir() -> Path:
    """The CNI plugins bridge, host-local and loopback at the pinned version."""
    return _node_peer(
        "cni", f"cni-plugins-{pins()['CNI_PLUGINS_VERSION']}", ("bridge", "host-local", "loopback")
    )


def pause_dir() -> Path:
    """The static pause binary (bin/pause) of the Kubernetes release under test, and its image TAG file."""
    ver = k8s_version()
    _build("pause", {"K8S_VERSION": ver})
    d = cache_dir() / f"pause-{ver}"
    _require(d / "bin" / "pause", "pause")
    return d
