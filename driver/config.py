"""The plugin daemon's settings: one frozen value built from flags and their environment twins.

Every flag has an environment twin (the Helm chart sets the environment; a person at a shell
uses flags). A flag given on the command line wins over its variable. :func:`validate` holds
every cross-flag rule in one place and names the flag *and* the variable to fix.

This module does not read files, touch the kubelet directories or import Kubernetes; it only
turns strings into a :class:`Config`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from driver.errors import ConfigError
from driver.inventory import DRIVER_NAME

_N = TypeVar("_N", int, float)

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_POD_UID = re.compile(r"^[a-z0-9][-a-z0-9]{0,62}$")

#: Feature gates this build knows; unknown names are rejected so a typo is not silently ignored.
#: NVIDIA's driver keeps sharing and dynamic MIG behind alpha gates; here they are on by default so
#: manifests written for that driver work unchanged, and a gate set to false turns the feature off.
KNOWN_FEATURE_GATES: Mapping[str, bool] = {
    "TimeSlicingSettings": True,
    "MPSSupport": True,
    "DynamicMIG": True,
    # Device taints from health (NVIDIA's gate of the same name is alpha and off; here it is on,
    # combined with dynamic MIG, MPS and time-slicing).
    "NVMLDeviceHealthCheck": True,
    "PassthroughSupport": False,
    # On by default, unlike NVIDIA's: shares are published only where the API server keeps the
    # consumable-capacity fields (a dry-run probe decides), and mode "memory" makes a claim that
    # asks for no capacity take the whole GPU, so existing manifests behave as before.
    "ConsumableShares": True,
    "DRAListTypeAttributes": False,
}

#: Gates NVIDIA's chart knows that this build does not implement: accepted as false (so a values
#: file written for that chart keeps working), refused as true, because a gate that is silently
#: ignored makes an operator believe a feature is on.
UNIMPLEMENTED_FEATURE_GATES: Mapping[str, str] = {
    "PassthroughSupport": "VFIO passthrough of whole GPUs",
    "DRAListTypeAttributes": "list-typed device attributes",
}


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of ``gpu-dra plugin``; see :func:`add_plugin_flags` for the flag of each field."""

    node_name: str
    """Name of the Node this plugin serves; the ResourceSlice pool and nodeName. (NODE_NAME)"""

    driver_name: str = DRIVER_NAME
    """DRA driver name: results[].driver we act on, registration name, ResourceSlice driver."""

    kubelet_registrar_directory_path: Path = Path("/var/lib/kubelet/plugins_registry")
    """Directory the kubelet watches for registration sockets."""

    kubelet_plugins_directory_path: Path = Path("/var/lib/kubelet/plugins")
    """Parent of the plugin's data directory (DRA socket, checkpoint, locks)."""

    cdi_root: Path = Path("/var/run/cdi")
    """Directory the container runtime reads CDI specs from; claim specs are written here."""

    driver_root: Path = Path("/")
    """Host path of the NVIDIA driver installation; CDI specs name host paths under it."""

    container_driver_root: Path = Path("/")
    """Where ``driver_root`` is visible inside this container (the plugin looks files up here)."""

    dev_root: Path = Path("/")
    """Root under which ``dev/nvidia*`` device nodes are checked (inside this container)."""

    proc_root: Path = Path("/proc")
    """Where ``devices`` and ``driver/nvidia/capabilities`` are read (MIG capability nodes)."""

    state_dir_override: Path | None = None
    """Checkpoint and lock directory; None means ``<plugins dir>/<driver name>``."""

    kubeconfig: Path | None = None
    """kubeconfig file; None means in-cluster configuration."""

    log_format: str = "json"
    """``json`` (one object per line, for pods) or ``console`` (for people)."""

    log_level: str = "info"
    """Minimum log level: debug, info, warning, error."""

    nvml_backend: str = "real"
    """``real`` (nvidia-ml-py over libnvidia-ml) or ``fake`` (file-backed simulated GPUs)."""

    fake_topology: str | None = None
    """Topology of the fake backend, e.g. ``a100-40gb-x8``."""

    fake_state: Path | None = None
    """State file of the fake backend; it outlives the process as a real GPU's state would."""

    fake_claims_dir: Path | None = None
    """Read ResourceClaims from ``<dir>/<namespace>/<name>.json`` instead of the API (tests, demos)."""

    publish: bool = True
    """Publish ResourceSlices; off only for tests and demos without an API server."""

    pod_uid: str | None = None
    """This pod's UID: per-instance socket names so a rolling update can overlap two instances."""

    namespace: str = "default"
    """Namespace the plugin runs in (MPS control daemons are created there)."""

    mps_root: Path = Path("/run/nvidia/mps")
    """Host directory under which per-claim MPS pipe and log directories are created."""

    nvidia_cdi_hook_path: Path | None = None
    """Host path of ``nvidia-cdi-hook`` named in CDI hooks; None means ``<driver root>/usr/bin/...``."""

    in_cluster: bool = False
    """KUBERNETES_SERVICE_HOST is set: service-account credentials are available when no kubeconfig is."""

    healthcheck_port: int = -1
    """TCP port of the gRPC health service; -1 disables it, 0 picks a free port."""

    healthcheck_address: str = "127.0.0.1"
    """Address the health service listens on; the chart sets the pod IP (kubelet grpc probes)."""

    feature_gates: Mapping[str, bool] = field(default_factory=lambda: dict(KNOWN_FEATURE_GATES))
    """Feature gate values (defaults filled in)."""

    mig_mode: str = "dynamic"
    """dynamic: MIG layouts follow the workloads; static: publish existing MIG devices only. (MIG_MODE)"""

    allow_mig_mode_change: bool = False
    """Enable MIG mode on demand where that needs no GPU reset (Hopper+). (ALLOW_MIG_MODE_CHANGE)"""

    mps_ready_timeout_s: float = 10.0
    """How long prepare waits for a new MPS control daemon to answer. (MPS_READY_TIMEOUT)"""

    consumable_shares: str = "memory"
    """How full GPUs are offered as shares: memory, unlimited, N (shares) or disabled. (CONSUMABLE_SHARES)"""

    shutdown_grace_s: float = 5.0
    """After SIGTERM, how long running kubelet calls may take to finish. (SHUTDOWN_GRACE)"""

    additional_xids_to_ignore: frozenset[int] = frozenset()
    """XIDs treated as application errors on top of NVIDIA's list. (ADDITIONAL_XIDS_TO_IGNORE)"""

    gpu_lost_taint_effect: str = "NoSchedule"
    """Effect of the gpu.nvidia.com/gpu-lost taint; NoExecute evicts running pods. (GPU_LOST_TAINT_EFFECT)"""

    recovery_poll_s: float = 10.0
    """How often GPUs with faults are checked for recovery. (RECOVERY_POLL_INTERVAL)"""

    event_interval_s: float = 60.0
    """Least time between two Events of one object and reason (the rate limit). (EVENT_MIN_INTERVAL)"""

    metrics_port: int = -1
    """TCP port of the Prometheus /metrics endpoint (all addresses); -1 off, 0 any. (METRICS_PORT)"""

    @property
    def state_dir(self) -> Path:
        """Where the checkpoint, locks and the DRA socket live."""
        if self.state_dir_override is not None:
            return self.state_dir_override
        return self.kubelet_plugins_directory_path / self.driver_name

    def gate(self, name: str) -> bool:
        """The value of feature gate ``name`` (False when unknown)."""
        return bool(self.feature_gates.get(name, False))


@dataclass(frozen=True, slots=True)
class _Flag:
    flag: str
    env: tuple[str, ...]
    help: str
    default: str | None = None
    choices: tuple[str, ...] | None = None


_FLAGS: tuple[_Flag, ...] = (
    _Flag("--node-name", ("NODE_NAME",), "Node this plugin serves (required)."),
    _Flag("--driver-name", ("DRIVER_NAME",), "DRA driver name.", DRIVER_NAME),
    _Flag(
        "--kubelet-registrar-directory-path",
        ("KUBELET_REGISTRAR_DIRECTORY_PATH",),
        "Kubelet plugin registration directory.",
        "/var/lib/kubelet/plugins_registry",
    ),
    _Flag(
        "--kubelet-plugins-directory-path",
        ("KUBELET_PLUGINS_DIRECTORY_PATH",),
        "Kubelet plugins directory (the plugin's data dir is <this>/<driver name>).",
        "/var/lib/kubelet/plugins",
    ),
    _Flag("--cdi-root", ("CDI_ROOT",), "Directory for CDI specs.", "/var/run/cdi"),
    _Flag(
        "--driver-root", ("NVIDIA_DRIVER_ROOT", "HOST_DRIVER_ROOT"), "Host path of the NVIDIA driver.", "/"
    ),
    _Flag(
        "--container-driver-root",
        ("DRIVER_ROOT_CTR_PATH",),
        "Path of the driver root inside this container (default: same as --driver-root).",
    ),
    _Flag("--dev-root", ("DEV_ROOT",), "Root under which /dev/nvidia* nodes are found.", "/"),
    _Flag("--proc-root", ("PROC_ROOT",), "Root of /proc for MIG capability lookups.", "/proc"),
    _Flag("--state-dir", ("STATE_DIR",), "Checkpoint and lock directory (default <plugins dir>/<driver>)."),
    _Flag("--kubeconfig", ("KUBECONFIG",), "kubeconfig file (default: in-cluster configuration)."),
    _Flag("--log-format", ("LOG_FORMAT",), "Log output format.", "json", ("json", "console")),
    _Flag("--log-level", ("LOG_LEVEL",), "Minimum log level.", "info", ("debug", "info", "warning", "error")),
    _Flag("--nvml-backend", ("NVML_BACKEND",), "NVML implementation.", "real", ("real", "fake")),
    _Flag("--fake-topology", ("FAKE_TOPOLOGY",), "Fake backend topology, e.g. a100-40gb-x8."),
    _Flag("--fake-state", ("FAKE_STATE",), "Fake backend state file (default <state dir>/fake-nvml.json)."),
    _Flag(
        "--fake-claims-dir",
        ("FAKE_CLAIMS_DIR",),
        "Read claims from <dir>/<namespace>/<name>.json instead of the API server (fake backend only).",
    ),
    _Flag(
        "--pod-uid", ("POD_UID",), "This pod's UID; enables per-instance socket names for rolling updates."
    ),
    _Flag("--namespace", ("POD_NAMESPACE", "NAMESPACE"), "Namespace the plugin runs in.", "default"),
    _Flag("--mps-root", ("MPS_ROOT",), "Host directory for MPS pipes and logs.", "/run/nvidia/mps"),
    _Flag("--nvidia-cdi-hook-path", ("NVIDIA_CDI_HOOK_PATH",), "Host path of nvidia-cdi-hook."),
    _Flag("--healthcheck-port", ("HEALTHCHECK_PORT",), "gRPC health service port (-1: off).", "-1"),
    _Flag(
        "--healthcheck-address",
        ("HEALTHCHECK_ADDRESS",),
        "Address the gRPC health service listens on (the chart: the pod IP, for the kubelet's grpc probes).",
        "127.0.0.1",
    ),
    _Flag("--feature-gates", ("FEATURE_GATES",), "Feature gates, e.g. MPSSupport=true,DynamicMIG=false.", ""),
    _Flag(
        "--mig-mode", ("MIG_MODE",), "How MIG-capable GPUs are published.", "dynamic", ("dynamic", "static")
    ),
    _Flag(
        "--allow-mig-mode-change",
        ("ALLOW_MIG_MODE_CHANGE",),
        "Enable MIG mode on demand where no GPU reset is needed (Hopper+): true|false.",
        "false",
        ("true", "false"),
    ),
    _Flag(
        "--mps-ready-timeout", ("MPS_READY_TIMEOUT",), "Seconds to wait for an MPS daemon to answer.", "10"
    ),
    _Flag(
        "--consumable-shares",
        ("CONSUMABLE_SHARES",),
        "How full GPUs are offered as shares (gate ConsumableShares): memory, unlimited, a number N "
        "of shares, or disabled.",
        "memory",
    ),
    _Flag(
        "--shutdown-grace",
        ("SHUTDOWN_GRACE",),
        "Seconds running kubelet calls may take to finish after SIGTERM (keep it below the pod's "
        "terminationGracePeriodSeconds); a call still running then is rolled back by the next start.",
        "5",
    ),
    _Flag(
        "--additional-xids-to-ignore",
        ("ADDITIONAL_XIDS_TO_IGNORE",),
        "Comma-separated XIDs to treat as application errors (taint effect None).",
        "",
    ),
    _Flag(
        "--gpu-lost-taint-effect",
        ("GPU_LOST_TAINT_EFFECT",),
        "Effect of the gpu.nvidia.com/gpu-lost device taint (NoExecute evicts the GPU's pods).",
        "NoSchedule",
        ("NoSchedule", "NoExecute"),
    ),
    _Flag(
        "--recovery-poll-interval",
        ("RECOVERY_POLL_INTERVAL",),
        "Seconds between recovery checks of GPUs with health faults.",
        "10",
    ),
    _Flag(
        "--event-min-interval",
        ("EVENT_MIN_INTERVAL",),
        "Seconds between two Events of one object and reason (repeats are counted, not sent).",
        "60",
    ),
    _Flag("--metrics-port", ("METRICS_PORT",), "Prometheus /metrics port on all addresses (-1: off).", "-1"),
)


def add_plugin_flags(
    parser: argparse.ArgumentParser, *, hidden: bool = False, skip: Sequence[str] = ()
) -> None:
    """Add every ``gpu-dra plugin`` flag to ``parser`` (environment twins are applied later).

    The debug commands take them ``hidden`` (accepted, not in their help, which shows only the
    command's own flags) and ``skip`` those they define themselves.
    """
    for spec in _FLAGS:
        if spec.flag in skip:
            continue
        env_help = " / ".join(spec.env)
        default_help = f" Default: {spec.default}." if spec.default else ""
        parser.add_argument(
            spec.flag,
            default=None,
            choices=spec.choices,
            help=argparse.SUPPRESS if hidden else f"{spec.help}{default_help} Env: {env_help}.",
        )
    parser.add_argument(
        "--no-publish",
        action="store_true",
        default=None,
        help=argparse.SUPPRESS
        if hidden
        else "Do not publish ResourceSlices (tests and demos without an API server). Env: NO_PUBLISH=true.",
    )


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _resolve(ns: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for spec in _FLAGS:
        value: str | None = getattr(ns, _dest(spec.flag), None)
        if value is None:
            value = next((env[name] for name in spec.env if env.get(name)), None)
        if value is None:
            value = spec.default
        values[_dest(spec.flag)] = value
    return values


def parse_feature_gates(text: str) -> dict[str, bool]:
    """``A=true,B=false`` -> gate map with defaults filled in; unknown gates are a ConfigError."""
    gates = dict(KNOWN_FEATURE_GATES)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or raw.lower() not in ("true", "false"):
            raise ConfigError(
                f"--feature-gates / FEATURE_GATES entry {item!r} is not NAME=true|false; fix the value"
            )
        if name not in KNOWN_FEATURE_GATES:
            raise ConfigError(
                f"--feature-gates / FEATURE_GATES names unknown gate {name!r}; "
                f"known gates: {', '.join(sorted(KNOWN_FEATURE_GATES))}"
            )
        gates[name] = raw.lower() == "true"
    return gates


def from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """Build a :class:`Config` from parsed flags, falling back to ``env`` (default ``os.environ``).

    Raises:
        ConfigError: a value cannot be converted; the message names flag and variable.
    """
    environ = os.environ if env is None else env
    v = _resolve(ns, environ)

    def path(key: str) -> Path | None:
        raw = v[key]
        return Path(raw) if raw else None

    def number(key: str, default: str, kind: Callable[[str], _N]) -> _N:
        """``v[key]`` as ``kind``; a bad value is a ConfigError naming the flag and its env twin."""
        try:
            return kind(v[key] or default)
        except ValueError:
            what = "an integer" if kind is int else "a number of seconds"
            raise ConfigError(
                f"--{key.replace('_', '-')} / {key.upper()} must be {what}, got {v[key]!r}"
            ) from None

    port = number("healthcheck_port", "-1", int)
    mps_timeout = number("mps_ready_timeout", "10", float)
    shutdown_grace = number("shutdown_grace", "5", float)
    recovery_poll = number("recovery_poll_interval", "10", float)
    metrics_port = number("metrics_port", "-1", int)
    event_interval = number("event_min_interval", "60", float)
    from driver.health import parse_xid_list

    no_publish = bool(getattr(ns, "no_publish", None)) or environ.get("NO_PUBLISH", "").lower() in (
        "1",
        "true",
        "yes",
    )
    driver_root = Path(v["driver_root"] or "/")
    return Config(
        node_name=v["node_name"] or "",
        driver_name=v["driver_name"] or DRIVER_NAME,
        kubelet_registrar_directory_path=Path(v["kubelet_registrar_directory_path"] or ""),
        kubelet_plugins_directory_path=Path(v["kubelet_plugins_directory_path"] or ""),
        cdi_root=Path(v["cdi_root"] or ""),
        driver_root=driver_root,
        container_driver_root=path("container_driver_root") or driver_root,
        dev_root=Path(v["dev_root"] or "/"),
        proc_root=Path(v["proc_root"] or "/proc"),
        state_dir_override=path("state_dir"),
        kubeconfig=path("kubeconfig"),
        log_format=v["log_format"] or "json",
        log_level=v["log_level"] or "info",
        nvml_backend=v["nvml_backend"] or "real",
        fake_topology=v["fake_topology"],
        fake_state=path("fake_state"),
        fake_claims_dir=path("fake_claims_dir"),
        publish=not no_publish,
        pod_uid=v["pod_uid"],
        namespace=v["namespace"] or "default",
        mps_root=Path(v["mps_root"] or "/run/nvidia/mps"),
        nvidia_cdi_hook_path=path("nvidia_cdi_hook_path"),
        in_cluster=bool(environ.get("KUBERNETES_SERVICE_HOST")),
        healthcheck_port=port,
        healthcheck_address=v["healthcheck_address"] or "127.0.0.1",
        feature_gates=parse_feature_gates(v["feature_gates"] or ""),
        mig_mode=v["mig_mode"] or "dynamic",
        allow_mig_mode_change=(v["allow_mig_mode_change"] or "false").lower() == "true",
        mps_ready_timeout_s=mps_timeout,
        consumable_shares=(v["consumable_shares"] or "memory").strip().lower(),
        shutdown_grace_s=shutdown_grace,
        additional_xids_to_ignore=parse_xid_list(v["additional_xids_to_ignore"] or ""),
        gpu_lost_taint_effect=v["gpu_lost_taint_effect"] or "NoSchedule",
        recovery_poll_s=recovery_poll,
        metrics_port=metrics_port,
        event_interval_s=event_interval,
    )


def validate(cfg: Config) -> list[str]:
    """Every cross-flag rule in one place; returns the problems (empty when the config is usable).

    Each message names the flag and its environment variable and says what to set.
    """
    return [
        *_identity_problems(cfg),
        *_path_problems(cfg),
        *_backend_problems(cfg),
        *_api_problems(cfg),
        *_gate_problems(cfg.feature_gates),
        *_share_problems(cfg),
    ]


def _identity_problems(cfg: Config) -> list[str]:
    problems: list[str] = []
    if not cfg.node_name:
        problems.append("--node-name / NODE_NAME is required: set it to this node's name (spec.nodeName)")
    if len(cfg.driver_name) > 63 or not _DNS_SUBDOMAIN.match(cfg.driver_name):
        problems.append(
            f"--driver-name / DRIVER_NAME {cfg.driver_name!r} must be a lower-case DNS subdomain of at most "
            "63 characters, e.g. gpu.nvidia.com"
        )
    if cfg.pod_uid is not None and not _POD_UID.match(cfg.pod_uid):
        problems.append(
            f"--pod-uid / POD_UID {cfg.pod_uid!r} is not a pod UID (lower-case letters, digits, '-'); "
            "set it from the downward API (metadata.uid)"
        )
    if not -1 <= cfg.metrics_port <= 65535:
        problems.append(
            f"--metrics-port / METRICS_PORT {cfg.metrics_port} is out of range; "
            "use -1 (off), 0 (any free port) or 1-65535"
        )
    if cfg.metrics_port > 0 and cfg.metrics_port == cfg.healthcheck_port:
        problems.append(
            f"--metrics-port / METRICS_PORT and --healthcheck-port / HEALTHCHECK_PORT are both "
            f"{cfg.metrics_port}; give them different ports"
        )
    if cfg.event_interval_s < 0:
        problems.append(
            f"--event-min-interval / EVENT_MIN_INTERVAL {cfg.event_interval_s} must be >= 0 seconds"
        )
    if not cfg.recovery_poll_s > 0:
        problems.append(
            f"--recovery-poll-interval / RECOVERY_POLL_INTERVAL {cfg.recovery_poll_s} must be > 0 seconds"
        )
    if not -1 <= cfg.healthcheck_port <= 65535:
        problems.append(
            f"--healthcheck-port / HEALTHCHECK_PORT {cfg.healthcheck_port} is out of range; "
            "use -1 (off), 0 (any free port) or 1-65535"
        )
    if not 0 <= cfg.shutdown_grace_s <= 600:
        problems.append(
            f"--shutdown-grace / SHUTDOWN_GRACE {cfg.shutdown_grace_s:g} is out of range; use 0-600 seconds"
        )
    return problems


def _path_problems(cfg: Config) -> list[str]:
    paths = (
        (
            "--kubelet-registrar-directory-path",
            "KUBELET_REGISTRAR_DIRECTORY_PATH",
            cfg.kubelet_registrar_directory_path,
        ),
        (
            "--kubelet-plugins-directory-path",
            "KUBELET_PLUGINS_DIRECTORY_PATH",
            cfg.kubelet_plugins_directory_path,
        ),
        ("--cdi-root", "CDI_ROOT", cfg.cdi_root),
        ("--driver-root", "NVIDIA_DRIVER_ROOT", cfg.driver_root),
        ("--container-driver-root", "DRIVER_ROOT_CTR_PATH", cfg.container_driver_root),
        ("--dev-root", "DEV_ROOT", cfg.dev_root),
        ("--proc-root", "PROC_ROOT", cfg.proc_root),
    )
    return [
        f"{flag} / {env} must be an absolute path, got {str(value)!r}"
        for flag, env, value in paths
        if not value.is_absolute()
    ]


def _backend_problems(cfg: Config) -> list[str]:
    if cfg.nvml_backend == "fake":
        if not cfg.fake_topology:
            return ["--nvml-backend=fake needs --fake-topology / FAKE_TOPOLOGY (e.g. a100-40gb-x8)"]
        return []
    fake_only = (
        ("--fake-topology", "FAKE_TOPOLOGY", cfg.fake_topology),
        ("--fake-state", "FAKE_STATE", cfg.fake_state),
        ("--fake-claims-dir", "FAKE_CLAIMS_DIR", cfg.fake_claims_dir),
    )
    return [
        f"{flag} / {env} only applies with --nvml-backend=fake; unset it or use the fake backend"
        for flag, env, given in fake_only
        if given
    ]


def _api_problems(cfg: Config) -> list[str]:
    problems: list[str] = []
    needs_api = cfg.publish or cfg.fake_claims_dir is None
    if needs_api and cfg.kubeconfig is None and not cfg.in_cluster:
        problems.append(
            "no API server configured: set --kubeconfig / KUBECONFIG or run in a pod "
            "(KUBERNETES_SERVICE_HOST); a test without an API server passes --no-publish "
            "and --fake-claims-dir"
        )
    if cfg.kubeconfig is not None and not cfg.kubeconfig.is_file():
        problems.append(f"--kubeconfig / KUBECONFIG {str(cfg.kubeconfig)!r} is not a file; fix the path")
    return problems


def _gate_problems(gates: Mapping[str, bool]) -> list[str]:
    # MIG and MPS combine here (NVIDIA's driver refuses DynamicMIG with MPSSupport).
    return [
        f"--feature-gates / FEATURE_GATES: {name}=true is not implemented by gpu-dra ({what}); "
        f"remove it or set {name}=false (chart: plugin.featureGates.{name})"
        for name, what in UNIMPLEMENTED_FEATURE_GATES.items()
        if gates.get(name)
    ]


def _share_problems(cfg: Config) -> list[str]:
    from driver.shares import parse_share_mode

    try:
        parse_share_mode(cfg.consumable_shares)
    except ValueError as exc:
        return [f"--consumable-shares / CONSUMABLE_SHARES: {exc}"]
    return []


def load(argv_ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """:func:`from_args` then :func:`validate`; raises one ConfigError listing every problem."""
    cfg = from_args(argv_ns, env)
    problems = validate(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def parse(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Config:
    """Parse plugin flags alone (tests, benchmarks): ``parse(["--node-name", "n1"])``."""
    parser = argparse.ArgumentParser(prog="gpu-dra plugin")
    add_plugin_flags(parser)
    return load(parser.parse_args(list(argv)), env)
