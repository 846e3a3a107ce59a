"""``gpu-dra doctor``: a checklist of what the node plugin needs, a verdict per line and what to do.

Each check runs on its own: one failing (an exception of any kind) is reported with its fix and
the rest still run, so one call shows everything that is wrong. The exit code of the command is
non-zero when any check fails, which makes ``doctor`` usable as a probe.

It reads only: the socket check sends GetInfo and an *empty* NodePrepareResources; the CDI-root
check creates and removes one probe file; the MPS check asks each recorded daemon for a setting.
It does not repair anything - the "what to do" text says who does.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.config import Config
from driver.debug import nodestate
from driver.errors import DriverError

#: Container runtime configs looked at for the CDI spec dirs (skipped when none is readable).
RUNTIME_CONFIGS = (Path("/etc/containerd/config.toml"), Path("/etc/crio/crio.conf"))
RUNTIME_CONFIGS_ENV = "GPU_DRA_RUNTIME_CONFIGS"
DEFAULT_CDI_DIRS = ("/etc/cdi", "/var/run/cdi")


#: Less free space than this in the state directory and a checkpoint write may fail.
MIN_FREE_BYTES = 1 << 20


class CheckFailedError(DriverError):
    """A doctor check found a problem; the message says what."""


class CheckSkippedError(DriverError):
    """A doctor check cannot say anything here (nothing to look at, or a check it needs failed)."""


OK, FAIL, SKIPPED = "ok", "fail", "skipped"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the checklist: ``status`` is ok, fail or skipped (which is neither)."""

    name: str
    status: str
    detail: str
    todo: str = ""

    @property
    def ok(self) -> bool:
        """Not failed: a skipped check does not fail the verdict (its line says it was skipped)."""
        return self.status != FAIL

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "status": self.status,
            "ok": None if self.status == SKIPPED else self.status == OK,
            "detail": self.detail,
            "todo": self.todo,
        }


def run_check(name: str, todo: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, OK, fn())
    except CheckSkippedError as exc:
        return Check(name, SKIPPED, str(exc))
    except Exception as exc:  # noqa: BLE001 - a checklist reports every failure and goes on
        return Check(name, FAIL, str(exc) or type(exc).__name__, todo)


@dataclass(frozen=True, slots=True)
class Doctor:
    """The checks against one node's configuration.

    ``kube`` makes the API client on first use (None: no API checks possible); ``timeout_s``
    bounds each socket and MPS call.
    """

    cfg: Config
    kube: Callable[[], Any]
    timeout_s: float = 5.0

    def checks(self) -> list[Check]:
        view = nodestate.read_checkpoint(self.cfg.state_dir)
        nvml = run_check(
            "NVML loads and sees GPUs",
            "check the NVIDIA driver is loaded and --driver-root / --container-driver-root point at it",
            lambda: self.nvml(view),
        )
        api = run_check(
            "API server reachable",
            "check --kubeconfig / the pod's service account and the network to the API server",
            self.api_server,
        )
        return [
            nvml,
            run_check(
                "device nodes exist",
                "load the NVIDIA kernel modules (nvidia-smi on the host creates the nodes) and mount "
                "the host's /dev (--dev-root)",
                lambda: self.device_nodes(nvml),
            ),
            run_check(
                "registration and DRA sockets answer",
                "the plugin is not serving: see its logs (kubectl logs) and restart its pod",
                self.sockets,
            ),
            run_check(
                "CDI root writable",
                "mount the CDI root read-write into the plugin (--cdi-root / CDI_ROOT)",
                self.cdi_root_writable,
            ),
            run_check(
                "container runtime reads the CDI root",
                "enable CDI in the runtime (containerd: enable_cdi = true) and list the CDI root in "
                "cdi_spec_dirs, then restart the runtime",
                self.runtime_config,
            ),
            run_check(
                "state directory usable",
                "free space in the plugin's state directory (or move the file named aside); the plugin "
                "refuses claims meanwhile and recovers by itself within seconds",
                self.state_dir,
            ),
            run_check(
                "checkpoint valid",
                "see `gpu-dra claims`; restart the plugin: it moves a damaged file aside and drops "
                "claims of an earlier boot",
                lambda: self.checkpoint(view),
            ),
            run_check(
                "CDI specs match the prepared claims",
                "see `gpu-dra cdi`; restart the plugin (start-up removes orphans); for a damaged or "
                "missing spec delete the pod so the kubelet unprepares and prepares the claim again",
                lambda: self.cdi_specs(view),
            ),
            api,
            run_check(
                "slices published and valid",
                "see the plugin's publisher logs; `gpu-dra slices --compare` shows the difference",
                lambda: self.published(api),
            ),
            run_check(
                "GPUs healthy and untainted",
                "see `gpu-dra taints`; an XID taint goes when the GPU's recovery (reset) is done, "
                "or by `gpu-dra taints clear DEVICE` once the GPU is known good",
                self.device_health,
            ),
            run_check(
                "MPS daemons of prepared claims answer",
                "a daemon died: delete the claim's pods so the claim is unprepared and prepared again; "
                "see the daemon's log dir (<mps root>/<group>/log)",
                lambda: self.mps(view),
            ),
        ]

    # -- the checks -------------------------------------------------------------------------------

    def device_health(self) -> str:
        from driver.debug.taints import device_status, taint_text

        devices = device_status(self.cfg.state_dir)
        if devices is None:
            raise CheckFailedError(
                f"no health status file in {self.cfg.state_dir}: the plugin is not running (it writes "
                "one at start)"
            )
        bad = {n: d for n, d in devices.items() if d.get("taints") or d.get("health") == "UNHEALTHY"}
        if bad:
            raise CheckFailedError(
                "; ".join(
                    f"{n}: {d.get('health')} {taint_text(d.get('taints'))}" for n, d in sorted(bad.items())
                )
            )
        unknown = sorted(n for n, d in devices.items() if d.get("health") == "UNKNOWN")
        note = f" ({len(unknown)} not monitored)" if unknown else ""
        return f"{len(devices)} device(s) healthy, none tainted{note}"

    def nvml(self, view: nodestate.CheckpointView) -> str:
        inventory = nodestate.local_inventory(self.cfg, view.claims.values())
        if not inventory.devices:
            raise CheckFailedError("NVML answered but reports no GPU device to publish")
        gpus = {d.gpu_uuid for d in inventory.devices}
        return f"{len(gpus)} GPU(s), {len(inventory.devices)} device(s) to publish"

    def device_nodes(self, nvml: Check) -> str:
        if self.cfg.nvml_backend == "fake":
            raise CheckSkippedError("a fake NVML backend has no device nodes")
        if nvml.status == FAIL:
            raise CheckSkippedError("needs NVML to list the GPUs (see the NVML line)")
        dev = self.cfg.dev_root / "dev"
        missing = [str(dev / n) for n in ("nvidiactl",) if not (dev / n).exists()]
        minors = sorted({d.gpu_minor for d in nodestate.local_inventory(self.cfg).devices})
        missing += [str(dev / f"nvidia{m}") for m in minors if not (dev / f"nvidia{m}").exists()]
        if missing:
            raise CheckFailedError(f"missing {', '.join(missing)}")
        return f"{dev}/nvidiactl and {len(minors)} GPU node(s) present"

    def sockets(self) -> str:
        from driver.kubeletplugin.health import probe
        from driver.kubeletplugin.sockets import SocketPaths

        cfg = self.cfg
        paths = SocketPaths.for_driver(
            cfg.kubelet_registrar_directory_path,
            cfg.kubelet_plugins_directory_path,
            cfg.driver_name,
            cfg.pod_uid,
        )
        problem = probe(paths, timeout_s=self.timeout_s)
        if problem:
            raise CheckFailedError(f"{paths.registration}: {problem}")
        return "GetInfo and an empty NodePrepareResources answered"

    def cdi_root_writable(self) -> str:
        root = self.cfg.cdi_root
        probe_file = root / f".gpu-dra-doctor-{os.getpid()}"
        try:
            probe_file.write_text("")
            probe_file.unlink()
        except OSError as exc:
            raise CheckFailedError(f"cannot write into {root}: {exc.strerror or exc}") from exc
        return f"{root} writable"

    def runtime_config(self) -> str:
        configs = _runtime_configs()
        readable = [p for p in configs if os.access(p, os.R_OK)]
        if not readable:
            raise CheckSkippedError("no runtime config readable here: " + ", ".join(str(p) for p in configs))
        verdicts = [cdi_root_seen(p, self.cfg.cdi_root) for p in readable]
        return "; ".join(verdicts)

    def state_dir(self) -> str:
        directory = self.cfg.state_dir
        checkpoint = directory / nodestate.CHECKPOINT_FILE
        if checkpoint.is_dir():
            raise CheckFailedError(
                f"{checkpoint} is a directory, where the checkpoint file belongs; the plugin moves it "
                "aside on start - remove it if it is still there"
            )
        try:
            fs = os.statvfs(directory)
        except OSError as exc:
            raise CheckFailedError(f"cannot inspect {directory}: {exc.strerror or exc}") from exc
        free = fs.f_bavail * fs.f_frsize
        if free < MIN_FREE_BYTES:
            raise CheckFailedError(
                f"directory {directory} is full ({free} bytes free): the plugin cannot record claims there"
            )
        if not os.access(directory, os.W_OK):
            raise CheckFailedError(f"directory {directory} is not writable here")
        return f"{directory}: {free >> 20} MiB free"

    def checkpoint(self, view: nodestate.CheckpointView) -> str:
        if view.problem:
            raise CheckFailedError(view.problem)
        if not view.exists:
            return f"{view.path} not written yet (no claim prepared since the plugin started)"
        return f"checksum and boot id verified, {len(view.claims)} claim(s)"

    def cdi_specs(self, view: nodestate.CheckpointView) -> str:
        statuses = nodestate.cdi_specs(self.cfg.cdi_root, view.claims)
        problems = nodestate.spec_problems(statuses)
        if problems:
            raise CheckFailedError("; ".join(problems))
        return f"{len(statuses)} spec(s), each valid and owned by a prepared claim"

    def api_server(self) -> str:
        major, minor = self.kube().server_version()
        return f"API server {major}.{minor}"

    def published(self, api: Check) -> str:
        from driver.resourceslices import validate_pool

        cfg = self.cfg
        if api.status == FAIL:
            raise CheckSkippedError("needs the API server (see the API server line)")
        if not cfg.node_name:
            raise CheckFailedError("no node name: pass --node-name / NODE_NAME")
        slices = self.kube().list_slices(cfg.driver_name, cfg.node_name)
        if not slices:
            raise CheckFailedError(f"no ResourceSlices of {cfg.driver_name} for node {cfg.node_name}")
        validate_pool(slices)
        devices = sum(len(s["spec"].get("devices") or []) for s in slices)
        return f"{len(slices)} slice(s), {devices} device(s), valid"

    def mps(self, view: nodestate.CheckpointView) -> str:
        records = nodestate.mps_records(view.claims)
        if not records:
            raise CheckSkippedError("no MPS daemon recorded")
        manager = self._mps_manager()
        dead = []
        for claim, record in records:
            try:
                found = manager.find(record)
            except Exception as exc:  # noqa: BLE001 - a bad record is a failure of this line
                found = None
                dead.append(f"{nodestate.claim_ref(claim)}: record unusable ({exc})")
                continue
            if found is None:
                dead.append(
                    f"{nodestate.claim_ref(claim)}: daemon {record.get('groupId')} does not answer on "
                    f"{record.get('groupDir')}/pipe"
                )
        if dead:
            raise CheckFailedError("; ".join(dead))
        return f"{len(records)} daemon(s) answer"

    def _mps_manager(self) -> Any:
        from driver.gpusharing import find_tool
        from sharing.mps import MpsManager

        cfg = self.cfg
        env: dict[str, str] = {}
        if cfg.nvml_backend == "fake":
            env["GPU_DRA_FAKE_NVML_STATE"] = str(cfg.fake_state or (cfg.state_dir / "fake-nvml.json"))
        root = cfg.container_driver_root
        return MpsManager(
            cfg.mps_root,
            find_tool(root, "nvidia-cuda-mps-control"),
            env,
            nvidia_smi=find_tool(root, "nvidia-smi"),
            command_timeout_s=self.timeout_s,
        )


def _runtime_configs() -> list[Path]:
    override = os.environ.get(RUNTIME_CONFIGS_ENV)
    if override is not None:
        return [Path(p) for p in override.split(os.pathsep) if p]
    out = list(RUNTIME_CONFIGS)
    crio_d = Path("/etc/crio/crio.conf.d")
    if crio_d.is_dir():
        out.extend(sorted(crio_d.glob("*.conf")))
    return out


def _find_keys(doc: Any, key: str) -> list[Any]:
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == key:
                found.append(v)
            found.extend(_find_keys(v, key))
    return found


def _same_dir(a: str | Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def cdi_root_seen(config: Path, cdi_root: Path) -> str:
    """Whether the runtime config ``config`` enables CDI and scans ``cdi_root``; raises when not."""
    try:
        doc = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CheckFailedError(f"cannot parse {config}: {exc}") from exc
    is_crio = "crio" in config.name or "crio" in str(config.parent)
    enabled = _find_keys(doc, "enable_cdi")
    if not is_crio:
        version = doc.get("version", 1)
        # containerd 2.x (config version 3) has CDI on by default, 1.7 (version 2) off.
        on = bool(enabled[-1]) if enabled else isinstance(version, int) and version >= 3
        if not on:
            raise CheckFailedError(f"{config}: CDI is not enabled (enable_cdi)")
    dirs_found = _find_keys(doc, "cdi_spec_dirs")
    dirs: Iterable[str] = (
        dirs_found[-1] if dirs_found and isinstance(dirs_found[-1], list) else DEFAULT_CDI_DIRS
    )
    if not any(_same_dir(d, cdi_root) for d in dirs):
        raise CheckFailedError(f"{config}: cdi_spec_dirs {list(dirs)} does not include {cdi_root}")
    return f"{config} scans {cdi_root}"


def failed(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]
