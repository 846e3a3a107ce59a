"""``gpu-dra plugin``: the start-up order, the signal handling and the shutdown of the node daemon.

Start-up, in this order (each step needs the one before):

1. configuration is already validated (``driver.config``); logging is configured;
2. NVML session (real or fake) and discovery -> :class:`~driver.inventory.Inventory`; when NVML
   is not ready or finds no GPU, retry with backoff and say so each time - never serve or publish
   an empty node and go quiet;
3. checkpoint start-up (earlier boot dropped, corrupt file moved aside) and
   :meth:`~driver.state.DeviceState.reconcile` (unfinished prepares rolled back, orphan CDI specs
   removed);
4. DRA gRPC server, **then** the registration socket (the kubelet must find a live endpoint);
5. ResourceSlice publisher (unless ``--no-publish``), gRPC health port (when configured);
6. wait for SIGTERM/SIGINT; then stop accepting calls, remove only our sockets, exit 0.

The Kubernetes client is imported only when an API server is configured, which keeps it off the
start-up path of tests and of the fake backend's demos.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from driver import log as logsetup
from driver.config import Config
from driver.errors import CheckpointError, ConfigError, DriverError, NvmlError
from driver.inventory import Inventory
from driver.kubeletplugin import KubeletPlugin, SocketPaths
from driver.kubeletplugin.claims import Claim, ClaimSource, DirectoryClaimSource, KubeClaimSource
from driver.kubeletplugin.draservice import DraService

if TYPE_CHECKING:
    from driver.checkpoint import CheckpointStore
    from driver.discovery import MigHook
    from driver.kube import Kube
    from driver.nvml.backend import Nvml
    from driver.nvml.mig import NvmlMigBackend
    from driver.resourceslices import SlicePublisher
    from driver.state import DeviceState, ShareAction, SharingAction
    from sharing.mps import MpsManager

log = structlog.get_logger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
CHECKPOINT_FILE = "checkpoint.json"
#: argv prefix that starts an MPS control daemon in the host's namespaces, in a scope of its own.
MPS_HOST_LAUNCHER = (
    "nsenter",
    "--target",
    "1",
    "--mount",
    "--pid",
    "--",
    "systemd-run",
    "--scope",
    "--collect",
    "--unit",
    "gpu-dra-mps-{group_id}",
    "--",
)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential retry delays: ``first``, doubling, capped at ``cap`` seconds."""

    first: float = 1.0
    cap: float = 30.0

    def delays(self) -> Any:
        delay = self.first
        while True:
            yield delay
            delay = min(self.cap, delay * 2)


@dataclass
class Daemon:
    """One run of the plugin; :meth:`run` blocks until ``stop`` is set."""

    cfg: Config
    stop: threading.Event = field(default_factory=threading.Event)
    backoff: Backoff = field(default_factory=Backoff)
    started_at: float = field(default_factory=time.monotonic)
    plugin: KubeletPlugin | None = None
    state: DeviceState | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _mig_backend: NvmlMigBackend | None = None
    _nvml: Nvml | None = None
    _checkpoint_store: CheckpointStore | None = None
    _publisher: SlicePublisher | None = None
    _static_fallback: bool = False
    _shares_fallback: bool = False

    def run(self) -> int:
        """Start everything, wait for a stop signal, shut down; return the exit code."""
        try:
            self._start()
            if not self.stop.is_set():
                self.stop.wait()
            log.info("stopping")
            return 0
        except DriverError as exc:
            log.error("plugin failed to start", error=str(exc), error_type=type(exc).__name__)  # noqa: TRY400
            return 1
        finally:
            self._shutdown()

    def _start(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        # Importing the Kubernetes client costs more than the rest of start-up together; it runs
        # while NVML opens and discovers, so the kubelet finds the sockets sooner.
        kube_future: Future[Kube] | None = None
        if cfg.publish or cfg.fake_claims_dir is None:
            kube_future = Future()
            threading.Thread(
                target=self._connect_kube, args=(kube_future,), name="kube-client", daemon=True
            ).start()
        nvml = self._open_nvml()
        if nvml is None:
            return
        checkpoint = self._checkpoint()
        self._mig_backend = self._mig(nvml)
        inventory = self._discover(nvml, self._mig_hook(checkpoint, self.cfg.mig_mode))
        if inventory is None:
            return
        inventory = self._offer_shares(inventory)
        self._nvml = nvml
        self._checkpoint_store = checkpoint
        self.state = self._device_state(inventory, checkpoint)
        self.state.reconcile()
        source: ClaimSource = (
            DirectoryClaimSource(cfg.fake_claims_dir)
            if cfg.fake_claims_dir is not None
            else _DeferredClaimSource(_need(kube_future))
        )
        paths = SocketPaths.for_driver(
            cfg.kubelet_registrar_directory_path,
            cfg.kubelet_plugins_directory_path,
            cfg.driver_name,
            cfg.pod_uid,
        )
        # --- device health stream (driver.health, driver.kubeletplugin.healthstream) ---
        from driver.health import HealthMonitor, open_source
        from driver.kubeletplugin.healthstream import HEALTH_SERVICES, health_handlers

        device_state = self.state
        monitor = HealthMonitor(
            cfg.node_name,
            lambda: device_state.inventory.devices,
            open_source(
                cfg.nvml_backend,
                nvml,
                (d.gpu_uuid for d in inventory.devices),
                fake_state=cfg.fake_state or (cfg.state_dir / "fake-nvml.json"),
            ),
        )
        monitor.start()
        self.plugin = KubeletPlugin(
            cfg.driver_name,
            paths,
            DraService(self.state, source),
            extra_handlers=health_handlers(monitor),
            extra_services=HEALTH_SERVICES,
        )
        self.plugin.start()
        self._closers.append(self.plugin.stop)
        # Closers run in reverse: the monitor stops first, which ends the open health streams so
        # the DRA server's graceful stop does not wait for them.
        self._closers.append(monitor.stop)
        # --- end device health stream ---
        log.info("plugin ready", startup_ms=round((time.monotonic() - self.started_at) * 1000, 1))
        if cfg.healthcheck_port >= 0:
            from driver.kubeletplugin.health import HealthServer

            health = HealthServer(paths, cfg.healthcheck_port)
            health.start()
            self._closers.append(health.stop)
        if cfg.publish:
            self._start_publisher(_need(kube_future).result(), inventory)

    def _open_nvml(self) -> Nvml | None:
        from driver.nvml.backend import Nvml

        cfg = self.cfg
        fake_state = cfg.fake_state or (cfg.state_dir / "fake-nvml.json")
        for delay in self.backoff.delays():
            try:
                if cfg.nvml_backend == "fake":
                    nvml = Nvml.open(
                        "fake",
                        fake_topology=cfg.fake_topology,
                        fake_state=fake_state,
                        node_name=cfg.node_name,
                    )
                else:
                    nvml = Nvml.open("real", cfg.container_driver_root)
            except NvmlError as exc:
                log.warning("NVML not ready, retrying", error=str(exc), retry_in_s=delay)
                if self.stop.wait(delay):
                    return None
                continue
            self._closers.append(nvml.shutdown)
            return nvml
        return None  # pragma: no cover - the delay generator never ends

    def _mig(self, nvml: Nvml) -> NvmlMigBackend | None:
        if not self.cfg.gate("DynamicMIG") and self.cfg.mig_mode == "dynamic":
            log.info("dynamic MIG off (feature gate DynamicMIG=false): MIG GPUs publish existing instances")
        from driver.nvml.mig import NvmlMigBackend

        return NvmlMigBackend(nvml)

    def _mig_hook(self, checkpoint: CheckpointStore, mode: str) -> MigHook | None:
        from driver.migdiscovery import make_mig_hook
        from driver.state import owned_mig_placements

        if self._mig_backend is None:
            return None
        if not self.cfg.gate("DynamicMIG"):
            mode = "static"
        # Instances of checkpointed claims are ours (a crashed prepare's leftovers included, so
        # reconcile can roll them back); anything else on a GPU is left alone.
        owned = owned_mig_placements(checkpoint.load().values())
        return make_mig_hook(
            self._mig_backend, mode, allow_mig_mode_change=self.cfg.allow_mig_mode_change, owned=owned
        )

    @property
    def _sysfs_root(self) -> Path | None:
        """Where PCI facts (pcieRoot, NUMA) are read; a simulated node's bus ids mean nothing here."""
        return None if self.cfg.nvml_backend == "fake" else Path("/sys")

    def _discover(self, nvml: Nvml, mig_hook: MigHook | None = None) -> Inventory | None:
        from driver.discovery import DiscoveryError, discover

        for delay in self.backoff.delays():
            try:
                inventory = discover(nvml, self.cfg.node_name, sysfs_root=self._sysfs_root, mig_hook=mig_hook)
            except (NvmlError, DiscoveryError) as exc:
                log.warning(
                    "GPU discovery failed, not serving an empty node; retrying",
                    error=str(exc),
                    retry_in_s=delay,
                    hint="check that the NVIDIA driver is loaded and --driver-root points at it",
                )
            else:
                if inventory.devices:
                    log.info(
                        "GPUs discovered",
                        devices=len(inventory.devices),
                        names=[d.name for d in inventory.devices],
                        warnings=list(inventory.warnings),
                    )
                    return inventory
                log.warning(
                    "no GPUs found, not serving an empty node; retrying",
                    retry_in_s=delay,
                    hint="check that the NVIDIA driver is loaded and --driver-root points at it",
                )
            if self.stop.wait(delay):
                return None
        return None  # pragma: no cover

    def _checkpoint(self) -> CheckpointStore:
        from driver.checkpoint import CheckpointStore

        cfg = self.cfg
        checkpoint = CheckpointStore(cfg.state_dir / CHECKPOINT_FILE, BOOT_ID_PATH)
        try:
            report = checkpoint.startup()
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {cfg.state_dir / CHECKPOINT_FILE} unusable: {exc}") from exc
        for warning in report.warnings:
            log.warning("checkpoint start-up", warning=warning)
        return checkpoint

    def _sharing(self) -> SharingAction:
        from driver.gpusharing import GpuSharing, find_tool
        from driver.state import NoSharing
        from sharing.timeslicing import TimeSlicer

        cfg = self.cfg
        if not (cfg.gate("TimeSlicingSettings") or cfg.gate("MPSSupport")):
            return NoSharing(cfg.driver_name)
        root = cfg.container_driver_root
        return GpuSharing(
            cfg.driver_name,
            TimeSlicer(find_tool(root, "nvidia-smi"), self._tool_env()),
            self._mps_manager(),
        )

    def _shares(self) -> ShareAction:
        from driver.gpushares import GpuShares
        from driver.state import NoShares
        from sharing.sharedmps import SharedMps

        if not (self.cfg.gate("ConsumableShares") and self.cfg.gate("MPSSupport")):
            return NoShares()
        return GpuShares(SharedMps(self._mps_manager()))

    def _tool_env(self) -> dict[str, str]:
        cfg = self.cfg
        if cfg.nvml_backend == "fake":
            # The stand-in tools change the simulated GPU, whose state file the fake NVML shares.
            return {"GPU_DRA_FAKE_NVML_STATE": str(cfg.fake_state or (cfg.state_dir / "fake-nvml.json"))}
        return {}

    def _mps_manager(self) -> MpsManager:
        from driver.gpusharing import find_tool
        from sharing.mps import MpsManager

        cfg = self.cfg
        root = cfg.container_driver_root
        launcher: tuple[str, ...] = ()
        daemon_binary = None
        if cfg.nvml_backend != "fake":
            # A daemon started inside the plugin's container dies with it; started in the host's
            # mount and PID namespaces in its own transient scope, it outlives plugin restarts
            # and upgrades (the chart runs the plugin with hostPID and privileged).
            launcher = MPS_HOST_LAUNCHER
            daemon_binary = find_tool(cfg.driver_root, "nvidia-cuda-mps-control")
        return MpsManager(
            cfg.mps_root,
            find_tool(root, "nvidia-cuda-mps-control"),
            self._tool_env(),
            cfg.mps_ready_timeout_s,
            nvidia_smi=find_tool(root, "nvidia-smi"),
            launcher=launcher,
            daemon_binary=daemon_binary,
        )

    def _device_state(self, inventory: Inventory, checkpoint: CheckpointStore) -> DeviceState:
        from cdi.store import CdiStore
        from driver.state import DeviceLocks, DeviceState, DriverRootEdits, default_actions
        from mig.manager import MigManager

        cfg = self.cfg
        mig = (
            MigManager(self._mig_backend, allow_mig_mode_change=cfg.allow_mig_mode_change)
            if self._mig_backend is not None
            else None
        )
        edits = DriverRootEdits.from_config(cfg)
        with contextlib.suppress(DriverError, OSError, ValueError):
            edits.common()  # warm the cache; a problem here is reported per claim, with its fix
        return DeviceState(
            driver_name=cfg.driver_name,
            pool_name=cfg.node_name,
            inventory=inventory,
            checkpoint=checkpoint,
            cdi=CdiStore(cfg.cdi_root),
            edits=edits,
            # Cross-process GPU locks matter only when two instances overlap (rolling update).
            locks=DeviceLocks(cfg.state_dir / "locks" if cfg.pod_uid else None),
            actions=default_actions(mig),
            sharing=self._sharing(),
            shares=self._shares(),
            single_instance=cfg.pod_uid is None,
        )

    def _connect_kube(self, future: Future[Kube]) -> None:
        try:
            from driver.kube import Kube

            future.set_result(Kube.from_config(self.cfg.kubeconfig))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the client
            future.set_exception(exc)

    def _start_publisher(self, kube: Kube, inventory: Inventory) -> None:
        try:
            from driver.resourceslices import SlicePublisher
        except ImportError as exc:  # pragma: no cover - until the publisher lands
            raise ConfigError(f"ResourceSlice publishing is not available in this build: {exc}") from exc
        publisher = SlicePublisher(
            kube, self.cfg.node_name, self.cfg.driver_name, on_dropped_fields=self._fields_dropped
        )
        self._publisher = publisher
        publisher.start(inventory)
        self._closers.append(publisher.stop)

    def _offer_shares(self, inventory: Inventory) -> Inventory:
        """Full GPUs as consumable shares (gate ConsumableShares), unless the server dropped them."""
        from driver.shares import offer_shares, parse_share_mode

        if not self.cfg.gate("ConsumableShares") or self._shares_fallback:
            return inventory
        return offer_shares(inventory, parse_share_mode(self.cfg.consumable_shares))

    def _fields_dropped(self, fields: Sequence[str]) -> None:
        """The API server did not keep fields we publish: fall back, once per kind of field.

        A 1.34/1.35 server without DRAPartitionableDevices drops counters silently; publishing
        placements there would let the scheduler hand out overlapping MIG slices. A server
        without DRAConsumableCapacity drops ``allowMultipleAllocations`` and request policies;
        GPUs are then published whole (the scheduler would otherwise see a plain device whose
        claims still carry no share).
        """
        counters = not self._static_fallback and any("ounter" in f for f in fields)
        shares = not self._shares_fallback and any(
            "allowMultipleAllocations" in f or "requestPolicy" in f for f in fields
        )
        if not (counters or shares):
            log.debug("API server dropped ResourceSlice fields", fields=list(fields))
            return
        if counters:
            self._static_fallback = True
            log.warning(
                "API server does not keep partitionable-device fields; publishing existing MIG devices "
                "(static MIG) instead of dynamic placements",
                fields=list(fields),
                fix="enable the DRAPartitionableDevices feature gate on the API server and scheduler",
            )
        if shares:
            self._shares_fallback = True
            log.warning(
                "API server does not keep consumable-capacity fields; publishing GPUs whole, not as shares",
                fields=list(fields),
                fix="enable the DRAConsumableCapacity feature gate on the API server and scheduler "
                "(beta and on from 1.36), or set --consumable-shares=disabled to silence this",
            )
        threading.Thread(target=self._republish_fallback, name="publish-fallback", daemon=True).start()

    def _republish_fallback(self) -> None:
        if self._nvml is None or self._checkpoint_store is None or self.state is None:
            return
        from driver.discovery import DiscoveryError, discover

        try:
            inventory = discover(
                self._nvml,
                self.cfg.node_name,
                sysfs_root=self._sysfs_root,
                mig_hook=self._mig_hook(
                    self._checkpoint_store, "static" if self._static_fallback else self.cfg.mig_mode
                ),
            )
            inventory = self._offer_shares(inventory)
        except (NvmlError, DiscoveryError) as exc:
            # Nothing was published with counters (the publisher probes first), so the node simply
            # offers nothing until the server keeps partitionable devices or MIG devices exist.
            log.error(  # noqa: TRY400 - the message and the fix say it all
                "static MIG fallback has nothing to publish",
                error=str(exc),
                fix="create MIG devices (nvidia-smi mig -cgi ... -C) or enable DRAPartitionableDevices",
            )
            return
        if self._publisher is None:
            return
        # The state learns the new devices before the scheduler can see them.
        self.state.inventory = inventory
        self._publisher.update(inventory)

    def _shutdown(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on; each step is independent
                log.warning("shutdown step failed", step=getattr(close, "__qualname__", "?"), error=str(exc))
        self._closers.clear()
        log.info("stopped")


def _need(kube: Future[Kube] | None) -> Future[Kube]:
    if kube is None:  # validate() makes this unreachable
        raise ConfigError("an API server is required: set --kubeconfig / KUBECONFIG or run in a pod")
    return kube


class _DeferredClaimSource:
    """Claim GETs through the API client once it is connected (see ``Daemon._start``)."""

    def __init__(self, kube: Future[Kube]) -> None:
        self._kube = kube

    def get(self, namespace: str, name: str) -> Claim:
        return KubeClaimSource(self._kube.result()).get(namespace, name)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM / SIGINT set ``stop``; a second signal is the same request, not a crash."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def run(cfg: Config) -> int:
    """Entry point of ``gpu-dra plugin`` after flag parsing."""
    logsetup.configure(cfg.log_format, cfg.log_level)
    log.info(
        "starting gpu-dra plugin",
        node=cfg.node_name,
        driver=cfg.driver_name,
        nvml_backend=cfg.nvml_backend,
        state_dir=str(cfg.state_dir),
        cdi_root=str(cfg.cdi_root),
        publish=cfg.publish,
    )
    daemon = Daemon(cfg)
    install_signal_handlers(daemon.stop)
    return daemon.run()
