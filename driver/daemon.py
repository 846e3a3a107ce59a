"""``gpu-dra plugin``: the start-up order, the signal handling and the shutdown of the node daemon.

Start-up, in this order:

1. configuration is already validated (``driver.config``); logging is configured; the API client
   is loaded on a thread of its own (only when an API server is configured);
2. DRA gRPC server, **then** the registration socket (the kubelet must find a live endpoint).
   They need only gRPC and the generated stubs, so the kubelet's ``GetInfo`` (1 s deadline) is
   answered within a few hundred milliseconds of the spawn; a prepare, unprepare or health
   stream that arrives now waits (up to :data:`STARTUP_WAIT_S`) at the start-up gate;
3. NVML session (real or fake) and discovery -> :class:`~driver.inventory.Inventory`; when NVML
   is not ready or finds no GPU, retry with backoff and say so each time - never serve or publish
   an empty node and go quiet (waiting calls get a temporary error naming the step);
4. checkpoint start-up (earlier boot dropped, corrupt file moved aside; a missing or moved-aside
   checkpoint's claims rebuilt from the node by ``driver.ownership``) and
   :meth:`~driver.state.DeviceState.reconcile` (unfinished prepares rolled back, orphan CDI specs
   removed); then the gate opens (``plugin ready``). A state directory that cannot be written
   (full, read-only) does not stop the plugin: it serves, refuses each claim with the reason,
   and a recovery thread finishes this step once the cause is gone;
5. ResourceSlice publisher (unless ``--no-publish``), gRPC health port (when configured);
6. wait for SIGTERM/SIGINT; then stop accepting calls, let running ones finish for at most
   ``--shutdown-grace`` (5 s), remove only our sockets, and exit without the interpreter's teardown
   (a call still running past the grace is abandoned, exactly as kill -9 would: the checkpoint
   says ``PrepareStarted`` and the next start rolls it back).

Nothing on the way to the sockets imports the debug CLI, CEL, YAML or the Kubernetes client.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
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
from driver.errors import ConfigError, DriverError, NvmlError, TemporaryClaimError
from driver.inventory import Inventory
from driver.kubeletplugin import KubeletPlugin, SocketPaths
from driver.kubeletplugin.claims import Claim, ClaimRef, ClaimSource, DirectoryClaimSource, KubeClaimSource
from driver.kubeletplugin.draservice import DraService
from driver.kubeletplugin.draservice import PreparedDevice as ReplyDevice
from driver.kubeletplugin.healthstream import HEALTH_SERVICES, health_handlers
from driver.kubeletplugin.sockets import private_dir

if TYPE_CHECKING:
    from driver.checkpoint import CheckpointStore, PreparedClaim
    from driver.discovery import MigHook
    from driver.events import EventRecorder
    from driver.health import HealthMonitor, Snapshot
    from driver.kube import Kube
    from driver.metrics import Metrics
    from driver.nvml.backend import Nvml
    from driver.nvml.mig import NvmlMigBackend
    from driver.ownership import Ledger
    from driver.resourceslices import SlicePublisher
    from driver.state import DeviceState, ShareAction, SharingAction
    from driver.taints import DeviceTaints, TaintChange, TaintSync
    from sharing.mps import MpsManager

log = structlog.get_logger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: How long a kubelet call that arrives during start-up waits for discovery, reconcile and the
#: API client before it gets a temporary error (the kubelet retries; its own call timeout is 45 s).
STARTUP_WAIT_S = 30.0
#: The main thread looks this often whether the plugin has gone quiet after some work ...
QUIET_CHECK_S = 5.0
#: ... and, once no kubelet call came for this long, hands the memory that work freed back.
QUIET_AFTER_S = 5.0
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


class Activity:
    """How many kubelet calls reached the device state, and when the last one did."""

    def __init__(self) -> None:
        self.calls = 0
        self.last = time.monotonic()

    def touch(self) -> None:
        self.calls += 1  # a lost increment under a race only delays one memory release
        self.last = time.monotonic()


@dataclass
class Daemon:
    """One run of the plugin; :meth:`run` blocks until ``stop`` is set."""

    cfg: Config
    stop: threading.Event = field(default_factory=threading.Event)
    backoff: Backoff = field(default_factory=Backoff)
    started_at: float = field(default_factory=time.monotonic)
    stop_requested_at: float | None = None
    plugin: KubeletPlugin | None = None
    state: DeviceState | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _mig_backend: NvmlMigBackend | None = None
    _nvml: Nvml | None = None
    _checkpoint_store: CheckpointStore | None = None
    _publisher: SlicePublisher | None = None
    _static_fallback: bool = False
    _shares_fallback: bool = False
    _lost: bool = False
    _pending_events: list[tuple[str, str, str]] = field(default_factory=list)
    _events_lock: threading.Lock = field(default_factory=threading.Lock)
    _taint_sync: TaintSync | None = None
    _service: DraService | None = None
    _monitor: HealthMonitor | None = None
    _quarantined: str | None = None
    _metrics: Metrics | None = None
    _events: EventRecorder | None = None
    gate: StartupGate = field(default_factory=lambda: StartupGate(STARTUP_WAIT_S))
    activity: Activity = field(default_factory=Activity)
    _health: LateHealthMonitor = field(default_factory=lambda: LateHealthMonitor(STARTUP_WAIT_S))

    def run(self) -> int:
        """Start everything, wait for a stop signal, shut down; return the exit code."""
        try:
            self._start()
            self._serve_until_stopped()
            log.info("stopping")
            return 0
        except DriverError as exc:
            log.error("plugin failed to start", error=str(exc), error_type=type(exc).__name__)  # noqa: TRY400
            return 1
        finally:
            self._shutdown()

    def _serve_until_stopped(self) -> None:
        """Wait for SIGTERM/SIGINT; meanwhile, after start-up and after each spell of kubelet calls,
        hand the memory that work freed back once the plugin has been quiet for a while."""
        released_at = -1
        while not self.stop.wait(QUIET_CHECK_S):
            calls, last = self.activity.calls, self.activity.last
            if calls != released_at and time.monotonic() - last >= QUIET_AFTER_S:
                release_freed_memory()
                released_at = calls

    def _start(self) -> None:
        cfg = self.cfg
        private_dir(cfg.state_dir)  # checkpoint, locks, sockets: 0700 whatever the umask
        # The API client loads on its own thread, while the sockets come up and NVML discovers.
        kube_future: Future[Kube] | None = None
        if cfg.publish or cfg.fake_claims_dir is None:
            kube_future = Future()
            threading.Thread(
                target=self._connect_kube, args=(kube_future,), name="kube-client", daemon=True
            ).start()
        source: ClaimSource = (
            DirectoryClaimSource(cfg.fake_claims_dir)
            if cfg.fake_claims_dir is not None
            else _DeferredClaimSource(_need(kube_future), self.gate)
        )
        paths = SocketPaths.for_driver(
            cfg.kubelet_registrar_directory_path,
            cfg.kubelet_plugins_directory_path,
            cfg.driver_name,
            cfg.pod_uid,
        )
        self._service = DraService(_GatedPreparer(self.gate, self.activity), source)
        self.plugin = KubeletPlugin(
            cfg.driver_name,
            paths,
            self._service,
            extra_handlers=health_handlers(self._health),
            extra_services=HEALTH_SERVICES,
        )
        self.plugin.start()
        log.info("sockets ready", startup_ms=_ms_since(self.started_at))

        self.gate.phase = "opening NVML"
        nvml = self._open_nvml()
        if nvml is None or self.stop.is_set():
            return
        self.gate.phase = "loading the checkpoint"
        checkpoint, problem = self._checkpoint()
        self._mig_backend = self._mig(nvml)
        sharing = self._sharing()
        from driver.ownership import LEDGER_DIR, Ledger

        ledger = Ledger(cfg.state_dir / LEDGER_DIR)
        if problem is None and self._lost:
            self.gate.phase = "rebuilding what the plugin owns after a lost checkpoint"
            problem = self._rebuild(nvml, checkpoint, ledger, sharing)
        self.gate.phase = "discovering GPUs"
        inventory = self._discover(nvml, self._mig_hook(checkpoint, self.cfg.mig_mode))
        if inventory is None or self.stop.is_set():
            return
        inventory = self._offer_shares(inventory)
        self._checkpoint_store = checkpoint
        self.gate.phase = "rolling back unfinished prepares"
        self.state = self._device_state(inventory, checkpoint, sharing, ledger)
        if problem is None:
            self.state.reconcile()
        else:
            # Serve, refuse claims with the reason, and finish start-up once the cause is gone:
            # a crash loop would only hide the reason behind restarts.
            self.state.unavailable = problem
            self._announce(
                "Warning",
                "CheckpointUnusable",
                f"claims are refused until the plugin can record them: {problem}",
            )
            threading.Thread(
                target=self._recover, args=(nvml, checkpoint, ledger, sharing), name="recovery", daemon=True
            ).start()
        self._start_health(nvml, self.state)
        self.gate.open(self.state)
        log.info("plugin ready", startup_ms=_ms_since(self.started_at))
        # Metrics, Events and the MPS watch load on a thread of their own: prometheus_client and
        # the API client stay off the way to serving the kubelet.
        threading.Thread(
            target=self._start_observability,
            args=(kube_future, self.state),
            name="observability",
            daemon=True,
        ).start()
        if cfg.healthcheck_port >= 0:
            from driver.kubeletplugin.health import HealthServer

            health = HealthServer(paths, cfg.healthcheck_port, cfg.healthcheck_address)
            health.start()
            self._closers.append(health.stop)
        if cfg.publish:
            kube = self._wait_for(_need(kube_future))
            if kube is not None:
                self._start_publisher(kube, inventory)

    def _wait_for(self, future: Future[Kube]) -> Kube | None:
        """The API client once loaded; None if a stop signal comes first (no wait past SIGTERM)."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                return future.result(0.05)
        return None

    def _start_health(self, nvml: Nvml, state: DeviceState) -> None:
        """The device health monitor behind the health streams (driver.health, kubeletplugin.healthstream)."""
        from driver.health import IGNORED_XIDS, HealthMonitor, open_source
        from driver.recovery import ClearRequests, NvmlRecoveryProbe, RecoveryRules

        cfg = self.cfg
        monitor = HealthMonitor(
            cfg.node_name,
            lambda: state.inventory.devices,
            open_source(
                cfg.nvml_backend,
                nvml,
                (d.gpu_uuid for d in state.inventory.devices),
                fake_state=cfg.fake_state or (cfg.state_dir / "fake-nvml.json"),
                ignored=IGNORED_XIDS | cfg.additional_xids_to_ignore,
            ),
            recovery=RecoveryRules(NvmlRecoveryProbe(nvml)),
            recovery_poll_s=cfg.recovery_poll_s,
            clears=ClearRequests(cfg.state_dir),
        )
        monitor.start()
        self._monitor = monitor
        self._health.attach(monitor)
        self._start_taints(monitor)

    def _start_taints(self, monitor: HealthMonitor) -> None:
        """Device taints from the health snapshots (gate NVMLDeviceHealthCheck), plus the status file."""
        from driver.taints import STATUS_FILE, TaintSync

        cfg = self.cfg
        taints_on = cfg.gate("NVMLDeviceHealthCheck")

        def publish(taints: DeviceTaints) -> None:
            if self._publisher is not None:
                self._publisher.set_taints(taints)

        sync = TaintSync(
            monitor,
            publish if taints_on and cfg.publish else None,
            cfg.state_dir / STATUS_FILE,
            lost_effect=cfg.gpu_lost_taint_effect,
        )
        sync.start()
        self._taint_sync = sync if taints_on else None
        self._closers.append(sync.stop)

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
            self._nvml = nvml
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
        # reconcile can roll them back); anything else on a GPU is left alone. An unusable
        # checkpoint owns nothing yet: discovery runs again once it is usable.
        try:
            owned = owned_mig_placements(checkpoint.load().values())
        except (DriverError, OSError):
            owned = []
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

    def _checkpoint(self) -> tuple[CheckpointStore, str | None]:
        """The checkpoint store after its start-up, and why it cannot be used (None: it can)."""
        from driver.checkpoint import CheckpointStore

        cfg = self.cfg
        checkpoint = CheckpointStore(cfg.state_dir / CHECKPOINT_FILE, BOOT_ID_PATH)
        report = checkpoint.startup()
        for warning in report.warnings:
            log.warning("checkpoint start-up", warning=warning)
        self._lost = report.lost
        if report.moved_aside is not None:
            self._quarantined = report.warnings[0]
        return checkpoint, report.problem

    def _announce(self, event_type: str, reason: str, note: str) -> None:
        """A Node Event now, or once the Event recorder runs (it starts after the sockets)."""
        with self._events_lock:
            events = self._events
            if events is None:
                self._pending_events.append((event_type, reason, note))
        if events is not None:
            events.node_event(event_type, reason, "StartPlugin", note)

    def _rebuild(
        self, nvml: Nvml, checkpoint: CheckpointStore, ledger: Ledger, sharing: SharingAction
    ) -> str | None:
        """Checkpoint entries for what the node shows the plugin owns (the checkpoint was lost).

        Returns why the rebuilt entries could not be recorded, or None.
        """
        from cdi.store import CdiStore
        from driver.ownership import Gpu, SharingRecords, rebuild

        cfg = self.cfg
        rebuilt = rebuild(
            pool=cfg.node_name,
            cdi=CdiStore(cfg.cdi_root),
            ledger=ledger,
            gpus=[Gpu(g.minor, g.uuid) for g in nvml.gpus()],
            mig=self._mig_backend,
            mps=sharing if isinstance(sharing, SharingRecords) else None,
            dynamic_mig=cfg.gate("DynamicMIG") and cfg.mig_mode == "dynamic",
        )
        for note in rebuilt.notes:
            log.warning("ownership rebuild", note=note)
        if not rebuilt.claims:
            return None

        def merge(claims: dict[str, PreparedClaim]) -> None:
            for uid, claim in rebuilt.claims.items():
                claims.setdefault(uid, claim)

        try:
            checkpoint.update(merge)
        except (DriverError, OSError) as exc:
            return f"the claims rebuilt from the node cannot be recorded: {exc}"
        self._lost = False
        self._announce(
            "Warning",
            "OwnershipRebuilt",
            f"the checkpoint was lost; {len(rebuilt.claims)} claim(s) rebuilt from the node (CDI specs, MPS "
            "records, MIG marks); the kubelet's next prepare or unprepare of each completes or undoes it",
        )
        log.warning(
            "checkpoint was lost; what the plugin owns was rebuilt from the node",
            claims={uid: c.state for uid, c in rebuilt.claims.items()},
            devices={uid: [d.device for d in c.devices] for uid, c in rebuilt.claims.items()},
            hint="the kubelet's next prepare or unprepare of each claim completes or undoes it",
        )
        return None

    def _recover(
        self, nvml: Nvml, checkpoint: CheckpointStore, ledger: Ledger, sharing: SharingAction
    ) -> None:
        """Retry the checkpoint's start-up until it is usable, then finish start-up and serve."""
        state = self.state
        if state is None:
            return
        for delay in Backoff(1.0, 5.0).delays():
            if self.stop.wait(delay):
                return
            report = checkpoint.startup()
            if report.moved_aside is not None and self._events is not None:
                self._events.checkpoint_quarantined(report.warnings[0])
            problem = report.problem
            self._lost = self._lost or report.lost
            if problem is None and self._lost:
                problem = self._rebuild(nvml, checkpoint, ledger, sharing)
            if problem is not None:
                state.unavailable = problem
                log.warning("checkpoint still unusable; claims refused", problem=problem, retry_in_s=delay)
                continue
            from driver.discovery import DiscoveryError, discover

            try:
                inventory = discover(
                    nvml,
                    self.cfg.node_name,
                    sysfs_root=self._sysfs_root,
                    mig_hook=self._mig_hook(checkpoint, self.cfg.mig_mode),
                )
            except (NvmlError, DiscoveryError) as exc:
                log.warning("discovery after recovery failed; retrying", error=str(exc))
                continue
            inventory = self._offer_shares(inventory)
            state.inventory = inventory
            if self._publisher is not None:
                self._publisher.update(inventory)
            state.reconcile()
            state.unavailable = None
            log.info("checkpoint usable again; serving claims", path=str(checkpoint.path))
            self._announce(
                "Normal", "CheckpointUsable", f"checkpoint {checkpoint.path} usable again; serving claims"
            )
            return

    def _sharing(self) -> SharingAction:
        from driver.gpusharing import GpuSharing, find_tool
        from sharing.timeslicing import TimeSlicer

        cfg = self.cfg
        root = cfg.container_driver_root
        return GpuSharing(
            cfg.driver_name,
            TimeSlicer(find_tool(root, "nvidia-smi"), self._tool_env()),
            self._mps_manager(),
            time_slicing_enabled=cfg.gate("TimeSlicingSettings"),
            mps_enabled=cfg.gate("MPSSupport"),
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

    def _device_state(
        self, inventory: Inventory, checkpoint: CheckpointStore, sharing: SharingAction, ledger: Ledger
    ) -> DeviceState:
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
            # Claim specs are void after a reboot (the checkpoint drops every claim, the start-up
            # sweep removes their specs), so they are written atomically but not fsync'd.
            cdi=CdiStore(cfg.cdi_root, durable=False),
            edits=edits,
            # Cross-process GPU locks matter only when two instances overlap (rolling update).
            locks=DeviceLocks(cfg.state_dir / "locks" if cfg.pod_uid else None),
            actions=default_actions(mig),
            sharing=sharing,
            shares=self._shares(),
            single_instance=cfg.pod_uid is None,
            ledger=ledger,
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
            kube,
            self.cfg.node_name,
            self.cfg.driver_name,
            on_dropped_fields=self._fields_dropped,
            taintable=self._taint_sync is not None,
        )
        if self._taint_sync is not None:
            publisher.set_taints(self._taint_sync.current)
        self._publisher = publisher
        publisher.start(inventory)
        self._closers.append(publisher.stop)

    def _start_observability(self, kube_future: Future[Kube] | None, state: DeviceState) -> None:
        """Events (with an API server), the MPS watch and /metrics (with --metrics-port), wired in."""
        from driver.mpswatch import MpsWatch

        cfg = self.cfg
        try:
            events = None
            if kube_future is not None:
                from driver.events import EventRecorder, RateLimit

                events = EventRecorder(
                    kube_future.result(), cfg.node_name, RateLimit(min_interval_s=cfg.event_interval_s)
                )
                events.start()
                self._closers.append(events.stop)
                if self._quarantined is not None:
                    events.checkpoint_quarantined(self._quarantined)
            with self._events_lock:
                self._events = events
                pending, self._pending_events = self._pending_events, []
            if events is not None:
                for event_type, reason, note in pending:
                    events.node_event(event_type, reason, "StartPlugin", note)
            mps = MpsWatch(
                state.prepared_claims,
                events.mps_daemon_died if events is not None else lambda *_: None,
            )
            mps.check()
            mps.start()
            self._closers.append(mps.stop)
            metrics = None
            if cfg.metrics_port >= 0:
                from driver.metrics import Metrics

                metrics = Metrics(
                    cfg.driver_name,
                    cfg.node_name,
                    published=lambda: [d.kind for d in state.inventory.devices],
                    prepared=lambda: [[d.kind for d in c.devices] for c in state.prepared_claims()],
                    mps_daemons=lambda: mps.running,
                    publishing=self._publish_stats,
                )
                metrics.install()
                metrics.serve(cfg.metrics_port)
                self._closers.append(metrics.stop)
                if self._monitor is not None:
                    self._monitor.on_faults = metrics.faults_seen
            self._metrics = metrics
            observers = [o for o in (metrics, events) if o is not None]
            if self._service is not None and observers:
                self._service.observer = _Observers(observers)
            sync = self._taint_sync
            if sync is not None:
                sync.on_change = self._taints_changed
                if metrics is not None:
                    metrics.taints_now(sync.current)
        except Exception:  # observability must never take the plugin down
            log.exception("starting metrics / events failed; the plugin serves on without them")

    def _taints_changed(self, changes: Sequence[TaintChange]) -> None:
        if self._metrics is not None and self._taint_sync is not None:
            self._metrics.taints_now(self._taint_sync.current)
        if self._events is not None:
            self._events.taints_changed(changes)

    def _publish_stats(self) -> tuple[int, dict[str, int]]:
        publisher = self._publisher
        return (0, {}) if publisher is None else (publisher.sync_attempts, dict(publisher.sync_errors))

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
        if any(f.endswith(".taints") for f in fields):
            log.warning(
                "API server does not keep device taints; unhealthy GPUs stay schedulable "
                "(the kubelet's health stream still reports them)",
                fields=list(fields),
                fix="enable the DRADeviceTaints feature gate on the API server and scheduler "
                "(on by default from Kubernetes 1.36)",
            )
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
        """Stop serving the kubelet first (health streams end, running calls get the grace), then
        everything else in the reverse order of start-up."""
        self.gate.close()
        monitor_done = self._health.close()
        if self.plugin is not None:
            self.plugin.stop(self.cfg.shutdown_grace_s)
        closers = list(reversed(self._closers))
        # NVML goes last, and only once the health monitor no longer sits in an NVML event
        # wait: shutting NVML down under it is undefined, and the process ends in a moment anyway.
        if self._nvml is not None and monitor_done:
            closers.append(self._nvml.shutdown)
        for close in closers:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on; each step is independent
                log.warning("shutdown step failed", step=getattr(close, "__qualname__", "?"), error=str(exc))
        self._closers.clear()
        log.info("stopped", shutdown_ms=_ms_since(self._stop_requested_at()))

    def _stop_requested_at(self) -> float:
        return self.stop_requested_at if self.stop_requested_at is not None else time.monotonic()


def release_freed_memory() -> None:
    """Collect garbage and hand the freed heap back to the kernel.

    Start-up (imports, the topology, the first publication) and bursts of calls (claim JSON,
    specs, TLS buffers) leave freed blocks that glibc keeps for reuse; an idle daemon does not
    reuse them, so they would stay resident (~3 MiB after start-up) for nothing.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)


def _ms_since(t: float) -> float:
    return round((time.monotonic() - t) * 1000, 1)


class StartupGate:
    """Holds kubelet calls that arrive before start-up is done, each for at most ``wait_s``.

    ``phase`` names the start-up step in progress; a call that waits too long gets a temporary
    error naming it, and the kubelet retries.
    """

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.phase = "starting"
        self._state: DeviceState | None = None
        self._done = threading.Event()

    def open(self, state: DeviceState) -> None:
        """Start-up is done: let every waiting and later call through to ``state``."""
        self._state = state
        self._done.set()

    def close(self) -> None:
        """The plugin stops: release the waiting calls (they fail; the kubelet retries elsewhere)."""
        self.phase = "stopping"
        self._done.set()

    def wait(self) -> None:
        """Return once start-up is done; raises TemporaryClaimError after ``wait_s`` or on stop."""
        if not self._done.wait(self.wait_s):
            raise TemporaryClaimError(
                f"the plugin is still starting ({self.phase}) after {self.wait_s:.0f}s; "
                "the kubelet retries - if this lasts, see the plugin log for the step that does not finish"
            )

    def state(self) -> DeviceState:
        """The device state once start-up is done (see :meth:`wait`)."""
        self.wait()
        if self._state is None:
            raise TemporaryClaimError(
                f"the plugin is {self.phase}; the kubelet retries with the next instance"
            )
        return self._state


class _GatedPreparer:
    """The kubelet's calls go to the device state once the start-up gate opens."""

    def __init__(self, gate: StartupGate, activity: Activity) -> None:
        self._gate = gate
        self._activity = activity

    def prepare(self, claim: Claim) -> Sequence[ReplyDevice]:
        try:
            return self._gate.state().prepare(claim)
        finally:
            self._activity.touch()

    def unprepare(self, ref: ClaimRef) -> None:
        try:
            self._gate.state().unprepare(ref)
        finally:
            self._activity.touch()


class _Observers:
    """Fans a claim's start and outcome out to metrics and Events (``RequestObserver``)."""

    def __init__(self, observers: Sequence[Any]) -> None:
        self._observers = tuple(observers)

    def started(self, op: str) -> None:
        for o in self._observers:
            o.started(op)

    def finished(self, op: str, ref: ClaimRef, seconds: float, error: Exception | None, message: str) -> None:
        for o in self._observers:
            try:
                o.finished(op, ref, seconds, error, message)
            except Exception:  # an observer must not change a claim's outcome
                log.exception("request observer failed", observer=type(o).__name__)


class LateHealthMonitor:
    """The health monitor as the DRA socket sees it before discovery has made the real one.

    A health stream the kubelet opens right after registration waits (up to ``wait_s``) for the
    real monitor instead of being sent an empty device list; after that every call goes to it.
    """

    def __init__(self, wait_s: float) -> None:
        self._wait_s = wait_s
        self._monitor: HealthMonitor | None = None
        self._settled = threading.Event()
        self._closed = False

    def attach(self, monitor: HealthMonitor) -> None:
        self._monitor = monitor
        self._settled.set()

    def close(self) -> bool:
        """End every stream at once; return whether the monitor's thread is gone (or never ran)."""
        self._closed = True
        self._settled.set()
        return self._monitor.stop(join_s=0.0) if self._monitor is not None else True

    @property
    def stopped(self) -> bool:
        return self._closed or (self._monitor is not None and self._monitor.stopped)

    def snapshot(self) -> Snapshot | None:
        self._settled.wait(self._wait_s)
        monitor = self._monitor
        return None if monitor is None or self._closed else monitor.snapshot()

    def wait_for_change(
        self, version: int, timeout_s: float, cancelled: Callable[[], bool] = lambda: False
    ) -> Snapshot | None:
        monitor = self._monitor
        return None if monitor is None else monitor.wait_for_change(version, timeout_s, cancelled)

    def wake(self) -> None:
        if self._monitor is not None:
            self._monitor.wake()


def _need(kube: Future[Kube] | None) -> Future[Kube]:
    if kube is None:  # validate() makes this unreachable
        raise ConfigError("an API server is required: set --kubeconfig / KUBECONFIG or run in a pod")
    return kube


class _DeferredClaimSource:
    """Claim GETs through the API client once it is loaded (see ``Daemon._start``), waiting for it
    as long as the start-up gate lets a call wait."""

    def __init__(self, kube: Future[Kube], gate: StartupGate) -> None:
        self._kube = kube
        self._gate = gate
        self._source: KubeClaimSource | None = None

    def get(self, namespace: str, name: str) -> Claim:
        if self._source is None:
            try:
                kube = self._kube.result(self._gate.wait_s)
            except TimeoutError:
                raise TemporaryClaimError(
                    f"the plugin is still loading its API client after {self._gate.wait_s:.0f}s; "
                    "the kubelet retries"
                ) from None
            self._source = KubeClaimSource(kube)
        return self._source.get(namespace, name)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM / SIGINT stop the daemon; a second signal is the same request, not a crash."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        if daemon.stop_requested_at is None:
            daemon.stop_requested_at = time.monotonic()
        log.info("signal received", signal=signal.Signals(signum).name)
        daemon.stop.set()

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
    install_signal_handlers(daemon)
    code = daemon.run()
    # Everything is on disk and our sockets are gone. The interpreter's teardown would join every
    # worker thread - a call abandoned after the grace included - and unload every module.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
