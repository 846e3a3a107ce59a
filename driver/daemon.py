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
from collections.abc import Callable
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
from driver.kubeletplugin.claims import ClaimSource, DirectoryClaimSource, KubeClaimSource
from driver.kubeletplugin.draservice import DraService

if TYPE_CHECKING:
    from driver.kube import Kube
    from driver.nvml.backend import Nvml
    from driver.state import DeviceState

log = structlog.get_logger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
CHECKPOINT_FILE = "checkpoint.json"


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
        nvml = self._open_nvml()
        if nvml is None:
            return
        inventory = self._discover(nvml)
        if inventory is None:
            return
        self.state = self._device_state(inventory)
        self.state.reconcile()
        kube = self._kube() if (cfg.publish or cfg.fake_claims_dir is None) else None
        source: ClaimSource = (
            DirectoryClaimSource(cfg.fake_claims_dir)
            if cfg.fake_claims_dir is not None
            else KubeClaimSource(_need(kube))
        )
        paths = SocketPaths.for_driver(
            cfg.kubelet_registrar_directory_path,
            cfg.kubelet_plugins_directory_path,
            cfg.driver_name,
            cfg.pod_uid,
        )
        self.plugin = KubeletPlugin(cfg.driver_name, paths, DraService(self.state, source))
        self.plugin.start()
        self._closers.append(self.plugin.stop)
        log.info("plugin ready", startup_ms=round((time.monotonic() - self.started_at) * 1000, 1))
        if cfg.healthcheck_port >= 0:
            from driver.kubeletplugin.health import HealthServer

            health = HealthServer(paths, cfg.healthcheck_port)
            health.start()
            self._closers.append(health.stop)
        if cfg.publish:
            self._start_publisher(_need(kube), inventory)

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

    def _discover(self, nvml: Nvml) -> Inventory | None:
        from driver.discovery import DiscoveryError, discover

        # A simulated node's PCI bus ids mean nothing on this host's /sys.
        sysfs_root = None if self.cfg.nvml_backend == "fake" else Path("/sys")
        for delay in self.backoff.delays():
            try:
                inventory = discover(nvml, self.cfg.node_name, sysfs_root=sysfs_root)
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

    def _device_state(self, inventory: Inventory) -> DeviceState:
        from cdi.store import CdiStore
        from driver.checkpoint import CheckpointStore
        from driver.state import DeviceLocks, DeviceState, DriverRootEdits, NoSharing

        cfg = self.cfg
        checkpoint = CheckpointStore(cfg.state_dir / CHECKPOINT_FILE, BOOT_ID_PATH)
        try:
            checkpoint.startup()
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {cfg.state_dir / CHECKPOINT_FILE} unusable: {exc}") from exc
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
            locks=DeviceLocks(cfg.state_dir / "locks"),
            sharing=NoSharing(cfg.driver_name),
        )

    def _kube(self) -> Kube:
        from driver.kube import Kube

        return Kube.from_config(self.cfg.kubeconfig)

    def _start_publisher(self, kube: Kube, inventory: Inventory) -> None:
        try:
            from driver.resourceslices import SlicePublisher
        except ImportError as exc:  # pragma: no cover - until the publisher lands
            raise ConfigError(f"ResourceSlice publishing is not available in this build: {exc}") from exc
        publisher = SlicePublisher(kube, self.cfg.node_name, self.cfg.driver_name)
        publisher.start(inventory)
        self._closers.append(publisher.stop)

    def _shutdown(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on; each step is independent
                log.warning("shutdown step failed", step=getattr(close, "__qualname__", "?"), error=str(exc))
        self._closers.clear()
        log.info("stopped")


def _need(kube: Kube | None) -> Kube:
    if kube is None:  # validate() makes this unreachable
        raise ConfigError("an API server is required: set --kubeconfig / KUBECONFIG or run in a pod")
    return kube


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
