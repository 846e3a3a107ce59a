"""The debug subcommands of ``gpu-dra``: read-only answers for the person on call.

``explain`` / ``simulate`` replay the scheduler's allocation of a claim (``explain.py``);
``devices``, ``slices``, ``claims``, ``cdi``, ``mig`` show what this node has, publishes and
holds; ``doctor`` runs a checklist and ``probe`` is the Helm chart's liveness probe. Every
command takes the daemon's path flags and their environment twins (``driver.config``) and
``-o table|json|yaml``. :func:`register` adds them to the ``gpu-dra`` parser.

Nothing here changes node state: no NVML writes, no file writes outside a temporary directory
(the fake NVML's state for ``simulate``), no API writes except server-side dry runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog
import yaml

from driver.debug import render
from driver.debug.explain import (
    BUILTIN_CLASSES,
    Explanation,
    NodeDevices,
    classes_from_objects,
    explain,
    node_from_slices,
    parse_claim,
)
from driver.errors import DriverError
from driver.inventory import DRIVER_NAME, Inventory

log = structlog.get_logger(__name__)

JsonDict = dict[str, Any]
SERVER_MINOR = 36
CHECKPOINT_FILE = "checkpoint.json"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

Handler = Callable[[argparse.Namespace, TextIO], int]


class DebugError(DriverError):
    """A debug command cannot answer (missing input, unreachable source); the message says what to do."""


# -- shared plumbing -----------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from driver import config

    return config.from_args(args)


def _kube(args: argparse.Namespace) -> Any:
    from driver.kube import Kube

    cfg = _config(args)
    return Kube.from_config(cfg.kubeconfig)


def _load_yaml_docs(path: Path) -> list[JsonDict]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DebugError(f"cannot read {path}: {exc}; pass an existing YAML/JSON file") from exc
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


@contextmanager
def _fake_nvml(topology: str, node: str, mig: str | None) -> Iterator[Any]:
    """An NVML session on a fake topology with its state in a throw-away directory."""
    from driver.nvml.backend import Nvml
    from driver.nvml.fakestate import FakeState

    with tempfile.TemporaryDirectory(prefix="gpu-dra-simulate-") as tmp:
        state = Path(tmp) / "fake-nvml.json"
        nvml = Nvml.open("fake", fake_topology=topology, fake_state=state, node_name=node)
        try:
            if mig == "dynamic":
                _enable_mig_everywhere(nvml, FakeState(state))
            yield nvml
        finally:
            nvml.shutdown()


def _enable_mig_everywhere(nvml: Any, _state: Any) -> None:
    from driver.nvml.mig import NvmlMigBackend

    backend = NvmlMigBackend(nvml)
    for gpu in nvml.gpus():
        if gpu.mig_capable and not gpu.mig_mode_current:
            try:
                backend.set_mig_mode(gpu.uuid, True)
            except DriverError as exc:
                log.warning("cannot enable MIG mode on simulated GPU", gpu=gpu.uuid, error=str(exc))


def _mig_hook(nvml: Any, mode: str | None, *, allow_mig_mode_change: bool = True) -> Any:
    """The daemon's discovery MIG hook (dynamic placements + counters, or existing instances).

    A simulated node may enable MIG on demand (Hopper+) unless told otherwise, so ``simulate``
    shows the layouts such a node could offer.
    """
    if mode is None:
        return None
    from driver.migdiscovery import make_mig_hook
    from driver.nvml.mig import NvmlMigBackend

    return make_mig_hook(NvmlMigBackend(nvml), mode, allow_mig_mode_change=allow_mig_mode_change)


def topology_inventory(topology: str, node: str = "simulated-node", mig: str | None = None) -> Inventory:
    """The inventory a node of ``topology`` would publish (fake NVML + discovery, no sysfs)."""
    from driver.discovery import discover

    with _fake_nvml(topology, node, mig) as nvml:
        if mig is None and any(g.mig_capable and g.mig_mode_current for g in nvml.gpus()):
            mig = "static"
        return discover(nvml, node, sysfs_root=None, mig_hook=_mig_hook(nvml, mig))


def inventory_slices(inventory: Inventory, node: str, driver: str = DRIVER_NAME) -> list[JsonDict]:
    from driver.resourceslices import build_slices

    return build_slices(inventory, node, driver, "", SERVER_MINOR)


def topology_node(topology: str, node: str = "simulated-node", mig: str | None = None) -> NodeDevices:
    """The devices a node of ``topology`` would publish, as the scheduler sees them."""
    return node_from_slices(inventory_slices(topology_inventory(topology, node, mig), node))


def _local_inventory(args: argparse.Namespace) -> Inventory:
    """What this node's NVML reports (the daemon's backend settings)."""
    from driver.discovery import discover
    from driver.nvml.backend import Nvml

    cfg = _config(args)
    node = cfg.node_name or "this-node"
    if cfg.nvml_backend == "fake":
        state = cfg.fake_state or (cfg.state_dir / "fake-nvml.json")
        nvml = Nvml.open("fake", fake_topology=cfg.fake_topology, fake_state=state, node_name=node)
    else:
        nvml = Nvml.open("real", cfg.container_driver_root)
    try:
        # The same MIG decision as the daemon's (driver.daemon): node setting, gate, mode changes.
        mig = cfg.mig_mode if cfg.gate("DynamicMIG") else "static"
        sysfs = None if cfg.nvml_backend == "fake" else Path("/sys")
        hook = _mig_hook(nvml, mig, allow_mig_mode_change=cfg.allow_mig_mode_change)
        return discover(nvml, node, sysfs_root=sysfs, mig_hook=hook)
    finally:
        nvml.shutdown()


def _checkpoint_claims(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Claims in the checkpoint (uid -> PreparedClaim) and the problem reading it, if any."""
    from driver.checkpoint import CheckpointStore

    cfg = _config(args)
    path = cfg.state_dir / CHECKPOINT_FILE
    boot = Path(os.environ.get("GPU_DRA_BOOT_ID_PATH", str(BOOT_ID_PATH)))
    try:
        return dict(CheckpointStore(path, boot).load()), None
    except (DriverError, OSError, ValueError) as exc:
        return {}, f"checkpoint {path}: {exc}"


def _holders(claims: Mapping[str, Any]) -> dict[str, str]:
    """device name -> "ns/name (uid)" of the prepared claim that holds it."""
    out: dict[str, str] = {}
    for uid, claim in claims.items():
        for device in claim.devices:
            out[device.device] = f"{claim.namespace}/{claim.name} ({uid})"
    return out


def _attr_text(value: Any) -> str:
    return str(getattr(value, "value", value))


# -- explain / simulate --------------------------------------------------------------------------


def _read_claim(args: argparse.Namespace) -> JsonDict:
    ref = args.claim
    path = Path(ref)
    if path.exists() or ref.endswith((".yaml", ".yml", ".json")):
        docs = [
            d for d in _load_yaml_docs(path) if d.get("kind") in ("ResourceClaim", "ResourceClaimTemplate")
        ]
        if not docs:
            raise DebugError(f"{path} holds no ResourceClaim or ResourceClaimTemplate")
        return docs[0]
    namespace, sep, name = ref.partition("/")
    if not sep:
        namespace, name = "default", ref
    return dict(_kube(args).get_resource_claim(namespace, name))


def _classes(args: argparse.Namespace, docs: Sequence[JsonDict] = ()) -> dict[str, tuple[str, ...]]:
    classes = dict(BUILTIN_CLASSES)
    classes.update(classes_from_objects(docs))
    for file in args.class_file or []:
        classes.update(classes_from_objects(_load_yaml_docs(Path(file))))
    # TODO(kube): read DeviceClasses from the API server once driver/kube.py offers get_device_class.
    return classes


def _explanation_text(exp: Explanation, node_label: str) -> str:
    lines = [f"claim {exp.claim.name} ({exp.claim.kind}) on {node_label}"]
    for rej in exp.rejections:
        lines.append(f"  REJECTED by the API server: {rej.where}: {rej.message}")
        if rej.fix:
            lines.append(f"    fix: {rej.fix}")
    for alt in exp.alternatives:
        a = alt.alternative
        want = "all" if a.mode == "All" else str(a.count)
        lines.append(f"\nrequest {a.name}: class {a.class_name}, wants {want}")
        if alt.problem:
            lines.append(f"  {alt.problem}")
            continue
        rows = []
        for d in alt.devices:
            failing = next((c for c in d.clauses if c.outcome is None or not c.outcome.matched), None)
            if d.matched:
                why = "all clauses true"
            elif failing is not None and failing.outcome is not None and failing.outcome.error:
                why = f"{failing.source}: ERROR {failing.outcome.error}"
            elif failing is not None:
                why = f"{failing.source} false: {failing.expression}"
            else:
                why = "-"
            rows.append((d.device, "match" if d.matched else ("error" if d.error else "no"), why))
        lines.append(render.table(("DEVICE", "RESULT", "WHY"), rows))
    for c in exp.claim.constraints:
        attr = c.match_attribute or c.distinct_attribute
        kind = "matchAttribute" if c.match_attribute else "distinctAttribute"
        lines.append(f"\nconstraint {kind} {attr} over {', '.join(c.requests) or 'all requests'}")
    if exp.fits:
        picked = "; ".join(f"{k}: {', '.join(v)}" for k, v in exp.allocation.items())
        lines.append(f"\nwould fit: yes with devices [{picked}]")
    else:
        lines.append(f"\nwould fit: no ({exp.reason})")
    return "\n".join(lines)


def run_explain(args: argparse.Namespace, out: TextIO) -> int:
    claim_obj = _read_claim(args)
    claim = parse_claim(claim_obj)
    classes = _classes(args)
    if getattr(args, "topology", None):
        node = topology_node(args.topology, mig=getattr(args, "mig", None))
        label = f"simulated {args.topology}"
    elif getattr(args, "slices_file", None):
        node = node_from_slices(
            d for d in _load_yaml_docs(Path(args.slices_file)) if d.get("kind") == "ResourceSlice"
        )
        label = str(args.slices_file)
    else:
        cfg = _config(args)
        if not cfg.node_name:
            raise DebugError("explain needs --node-name / NODE_NAME (or --topology / --slices-file)")
        node = node_from_slices(_kube(args).list_slices(cfg.driver_name, cfg.node_name))
        label = f"node {cfg.node_name}"
        # TODO(kube): exclude devices allocated to other claims (needs a claim list in driver/kube.py).
    exp = explain(claim, node, classes)
    render.emit(exp.to_dict(), args.output, _explanation_text(exp, label), out)
    return 0 if exp.fits else 1


# -- devices / slices / mig ----------------------------------------------------------------------


def run_devices(args: argparse.Namespace, out: TextIO) -> int:
    inventory = topology_inventory(args.topology, mig=args.mig) if args.topology else _local_inventory(args)
    claims, problem = ({}, None) if args.topology else _checkpoint_claims(args)
    holders = _holders(claims)
    data: list[JsonDict] = []
    for d in inventory.devices:
        data.append(
            {
                "name": d.name,
                "kind": d.kind,
                "uuid": str(d.attributes.get("uuid", d.gpu_uuid)),
                "attributes": {k: _attr_text(v) for k, v in d.attributes.items()},
                "capacity": dict(d.capacity),
                "heldBy": holders.get(d.name),
            }
        )
    rows = [
        (
            d["name"],
            d["kind"],
            d["attributes"].get("productName", "-"),
            d["attributes"].get("profile", "-"),
            d["heldBy"] or "free",
        )
        for d in data
    ]
    text = render.table(("DEVICE", "KIND", "PRODUCT", "PROFILE", "HELD BY"), rows)
    if problem:
        text += f"\nwarning: {problem}"
    render.emit(
        {"devices": data, "warnings": list(inventory.warnings) + ([problem] if problem else [])},
        args.output,
        text,
        out,
    )
    return 0


def run_slices(args: argparse.Namespace, out: TextIO) -> int:
    from driver.resourceslices import comparable_spec, validate_pool

    cfg = _config(args)
    node = cfg.node_name or "this-node"
    inventory = topology_inventory(args.topology, node, args.mig) if args.topology else _local_inventory(args)
    slices = inventory_slices(inventory, node, cfg.driver_name)
    result: JsonDict = {"slices": slices, "valid": True, "problems": [], "diff": None}
    try:
        validate_pool(slices, SERVER_MINOR)
    except DriverError as exc:
        result["valid"] = False
        result["problems"].append(str(exc))
    if args.compare:
        published = _kube(args).list_slices(cfg.driver_name, node)
        want = [comparable_spec(s) for s in slices]
        have = [comparable_spec(s) for s in published]
        missing = [s for s in want if s not in have]
        extra = [s for s in have if s not in want]
        result["diff"] = {
            "missing": len(missing),
            "unexpected": len(extra),
            "inSync": not missing and not extra,
        }
    rows = [
        (
            s["metadata"]["generateName"],
            len(s["spec"].get("devices", [])),
            len(s["spec"].get("sharedCounters", [])),
        )
        for s in slices
    ]
    text = render.table(("SLICE", "DEVICES", "COUNTER SETS"), rows)
    text += f"\nvalid: {'yes' if result['valid'] else 'NO: ' + '; '.join(result['problems'])}"
    if result["diff"] is not None:
        d = result["diff"]
        state = "in sync" if d["inSync"] else f"{d['missing']} missing, {d['unexpected']} unexpected"
        text += f"\npublished: {state}"
    render.emit(result, args.output, text, out)
    return 0 if result["valid"] else 1


def mig_picture(inventory: Inventory, holders: Mapping[str, str]) -> list[JsonDict]:
    """Per GPU: its memory slices and which MIG device (and claim) occupies each."""
    gpus: dict[int, JsonDict] = {}
    for d in inventory.devices:
        if d.kind == "gpu":
            gpus.setdefault(
                d.gpu_minor, {"gpu": d.gpu_minor, "uuid": d.gpu_uuid, "slices": 0, "instances": []}
            )
            continue
        spec = d.mig_spec
        if spec is None:
            continue
        entry = gpus.setdefault(
            d.gpu_minor, {"gpu": d.gpu_minor, "uuid": d.gpu_uuid, "slices": 0, "instances": []}
        )
        entry["slices"] = max(entry["slices"], spec.placement_start + spec.placement_size)
        live = d.mig_live is not None
        holder = holders.get(d.name)
        if live or holder:
            entry["instances"].append(
                {
                    "device": d.name,
                    "profile": spec.profile,
                    "start": spec.placement_start,
                    "size": spec.placement_size,
                    "claim": holder,
                }
            )
    return [gpus[k] for k in sorted(gpus)]


def _mig_text(picture: Sequence[JsonDict]) -> str:
    lines = []
    for gpu in picture:
        cells = ["." for _ in range(gpu["slices"])]
        legend = []
        for n, inst in enumerate(gpu["instances"]):
            mark = chr(ord("A") + n % 26)
            for i in range(inst["start"], inst["start"] + inst["size"]):
                if i < len(cells):
                    cells[i] = mark
            legend.append(f"  {mark} = {inst['profile']} {inst['device']} {inst['claim'] or '(no claim)'}")
        bar = "[" + "|".join(cells) + "]" if cells else "(no MIG placements)"
        lines.append(f"gpu {gpu['gpu']} {gpu['uuid']}: {bar}")
        lines.extend(legend)
    return "\n".join(lines) or "no GPUs"


def run_mig(args: argparse.Namespace, out: TextIO) -> int:
    inventory = topology_inventory(args.topology, mig=args.mig) if args.topology else _local_inventory(args)
    claims, _problem = ({}, None) if args.topology else _checkpoint_claims(args)
    picture = mig_picture(inventory, _holders(claims))
    render.emit({"gpus": picture}, args.output, _mig_text(picture), out)
    return 0


# -- claims / cdi --------------------------------------------------------------------------------


def _claim_data(uid: str, claim: Any) -> JsonDict:
    return {
        "uid": uid,
        "namespace": claim.namespace,
        "name": claim.name,
        "state": str(claim.state),
        "devices": [d.device for d in claim.devices],
        "cdiDeviceIds": [i for d in claim.devices for i in d.cdi_device_ids],
        "ageSeconds": int(time.time() - claim.started_at),
    }


def run_claims(args: argparse.Namespace, out: TextIO) -> int:
    claims, problem = _checkpoint_claims(args)
    if args.show:
        match = {u: c for u, c in claims.items() if args.show in (u, f"{c.namespace}/{c.name}")}
        if not match:
            raise DebugError(f"no claim {args.show!r} in the checkpoint; list them with `gpu-dra claims`")
        uid, claim = next(iter(match.items()))
        detail = {**_claim_data(uid, claim), "detail": claim.to_dict()}
        render.emit(detail, args.output, yaml.safe_dump(detail, sort_keys=False), out)
        return 0
    data = [_claim_data(u, c) for u, c in sorted(claims.items())]
    rows = [
        (d["uid"], f"{d['namespace']}/{d['name']}", d["state"], d["devices"], f"{d['ageSeconds']}s")
        for d in data
    ]
    text = render.table(("UID", "CLAIM", "STATE", "DEVICES", "AGE"), rows)
    text += "\ncheckpoint: " + (problem or "valid (checksum and boot id verified)")
    render.emit({"claims": data, "checkpoint": problem or "valid"}, args.output, text, out)
    return 1 if problem else 0


def run_cdi(args: argparse.Namespace, out: TextIO) -> int:
    from cdi.store import CdiStore

    cfg = _config(args)
    store = CdiStore(cfg.cdi_root)
    claims, _problem = _checkpoint_claims(args)
    if args.show:
        spec = store.read_claim_spec(args.show)
        if spec is None:
            raise DebugError(f"no CDI spec for claim {args.show} under {cfg.cdi_root}")
        shown: JsonDict = json.loads(spec.to_json())
        render.emit(shown, args.output, yaml.safe_dump(shown, sort_keys=False), out)
        return 0
    specs = store.list_claim_specs()
    orphans = {str(p) for p in store.orphans(claims.keys())}
    data = [{"claim": uid, "path": str(p), "orphan": str(p) in orphans} for uid, p in sorted(specs.items())]
    rows = [(d["claim"], d["path"], "ORPHAN" if d["orphan"] else "ok") for d in data]
    render.emit(
        {"specs": data, "orphans": sorted(orphans)},
        args.output,
        render.table(("CLAIM", "PATH", "STATUS"), rows),
        out,
    )
    return 0


# -- doctor / probe ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    todo: str = ""


def _socket_paths(args: argparse.Namespace) -> Any:
    from driver.kubeletplugin.sockets import SocketPaths

    cfg = _config(args)
    return SocketPaths.for_driver(
        cfg.kubelet_registrar_directory_path, cfg.kubelet_plugins_directory_path, cfg.driver_name, cfg.pod_uid
    )


def _check(name: str, todo: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except Exception as exc:  # noqa: BLE001 - a checklist reports every failure and goes on
        return Check(name, False, str(exc) or type(exc).__name__, todo)


def doctor_checks(args: argparse.Namespace) -> list[Check]:
    cfg = _config(args)
    checks: list[Check] = []

    def nvml() -> str:
        inv = _local_inventory(args)
        return f"{len(inv.devices)} device(s) discovered"

    checks.append(
        _check(
            "NVML loads and sees GPUs", "check the driver root (--driver-root) and the NVIDIA driver", nvml
        )
    )

    def dev_nodes() -> str:
        if cfg.nvml_backend == "fake":
            return "skipped (fake NVML backend)"
        ctl = cfg.dev_root / "dev" / "nvidiactl"
        if not ctl.exists():
            raise DebugError(f"{ctl} missing")
        return f"{ctl} present"

    checks.append(
        _check("device nodes exist", "load the NVIDIA kernel modules / mount /dev (--dev-root)", dev_nodes)
    )

    def sockets() -> str:
        from driver.kubeletplugin.health import probe

        paths = _socket_paths(args)
        problem = probe(paths, timeout_s=args.timeout)
        if problem:
            raise DebugError(f"{paths.registration}: {problem}")
        return "GetInfo and an empty NodePrepareResources answered"

    checks.append(
        _check("registration and DRA sockets answer", "see the plugin's logs; restart the pod", sockets)
    )

    def cdi_root() -> str:
        probe_file = cfg.cdi_root / f".gpu-dra-doctor-{os.getpid()}"
        probe_file.write_text("")
        probe_file.unlink()
        return f"{cfg.cdi_root} writable"

    checks.append(
        _check("CDI root writable", "mount the CDI root read-write (--cdi-root / CDI_ROOT)", cdi_root)
    )

    def checkpoint() -> str:
        claims, problem = _checkpoint_claims(args)
        if problem:
            raise DebugError(problem)
        return f"valid, {len(claims)} claim(s)"

    checks.append(
        _check("checkpoint valid", "see `gpu-dra claims`; a corrupt file is moved aside on start", checkpoint)
    )

    def api() -> str:
        major, minor = _kube(args).server_version()
        return f"API server {major}.{minor}"

    checks.append(_check("API server reachable", "check --kubeconfig / the service account", api))

    def published() -> str:
        from driver.resourceslices import validate_pool

        slices = _kube(args).list_slices(cfg.driver_name, cfg.node_name)
        if not slices:
            raise DebugError(f"no ResourceSlices of {cfg.driver_name} for node {cfg.node_name}")
        validate_pool(slices, SERVER_MINOR)
        return f"{len(slices)} slice(s) valid"

    checks.append(_check("slices published and valid", "see the plugin's publisher logs", published))
    # TODO(mps): check the MPS control daemons of prepared claims (needs a liveness query in sharing/mps.py).
    return checks


def run_doctor(args: argparse.Namespace, out: TextIO) -> int:
    checks = doctor_checks(args)
    data = [{"check": c.name, "ok": c.ok, "detail": c.detail, "todo": c.todo} for c in checks]
    rows = [
        ("ok" if c.ok else "FAIL", c.name, c.detail + (f" -> {c.todo}" if not c.ok else "")) for c in checks
    ]
    render.emit(
        {"checks": data, "ok": all(c.ok for c in checks)},
        args.output,
        render.table(("", "CHECK", "DETAIL"), rows),
        out,
    )
    return 0 if all(c.ok for c in checks) else 1


def run_probe(args: argparse.Namespace, out: TextIO) -> int:
    from driver.kubeletplugin.health import probe

    problem = probe(_socket_paths(args), timeout_s=args.timeout)
    render.emit({"ok": problem is None, "problem": problem}, args.output, problem or "ok", out)
    return 0 if problem is None else 1


# -- registration --------------------------------------------------------------------------------


def _wrap(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from driver import log as driver_log

        # Command output owns stdout; logs go to stderr and stay quiet unless asked for.
        driver_log.configure(args.log_format or "console", args.log_level or "warning")
        try:
            return handler(args, sys.stdout)
        except (DriverError, ValueError, KeyError) as exc:
            print(f"gpu-dra {args.command}: {exc}", file=sys.stderr)
            return 2

    return run


def _common(parser: argparse.ArgumentParser) -> None:
    from driver.config import add_plugin_flags

    add_plugin_flags(parser)
    parser.add_argument("-o", "--output", choices=render.FORMATS, default="table", help="Output format.")


def _topology_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--topology", required=required, help="Fake topology name or file (e.g. a100-40gb-x8)."
    )
    parser.add_argument(
        "--mig", choices=("dynamic", "static"), default=None, help="MIG mode of the simulated node."
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the debug subcommands to the ``gpu-dra`` parser (each sets ``func``)."""
    p = subparsers.add_parser("explain", help="why a claim does (not) fit this node, per device and clause")
    p.add_argument("claim", help="claim YAML file or ns/name")
    p.add_argument("--class-file", action="append", help="DeviceClass YAML (repeatable)")
    p.add_argument("--slices-file", help="ResourceSlice YAML to explain against instead of the API server")
    _topology_flags(p)
    _common(p)
    p.set_defaults(func=_wrap(run_explain))

    p = subparsers.add_parser("simulate", help="would a claim fit on a node of this topology")
    p.add_argument("claim", help="claim YAML file")
    p.add_argument("--class-file", action="append", help="DeviceClass YAML (repeatable)")
    _topology_flags(p, required=True)
    _common(p)
    p.set_defaults(func=_wrap(run_explain), slices_file=None)

    for name, handler, helptext in (
        ("devices", run_devices, "GPUs and MIG devices of this node, who holds each"),
        ("slices", run_slices, "the ResourceSlices this node would publish now"),
        ("mig", run_mig, "a picture of each GPU's MIG memory slices"),
    ):
        p = subparsers.add_parser(name, help=helptext)
        _topology_flags(p)
        if name == "slices":
            p.add_argument("--compare", action="store_true", help="diff against what is published")
        _common(p)
        p.set_defaults(func=_wrap(handler))

    p = subparsers.add_parser("claims", help="prepared claims in the checkpoint")
    p.add_argument("show", nargs="?", help="uid or ns/name to show in detail")
    _common(p)
    p.set_defaults(func=_wrap(run_claims))

    p = subparsers.add_parser("cdi", help="CDI specs the plugin owns, orphans")
    p.add_argument("show", nargs="?", help="claim uid whose spec to show")
    _common(p)
    p.set_defaults(func=_wrap(run_cdi))

    for name, handler, helptext in (
        ("doctor", run_doctor, "checklist of the node plugin's health"),
        ("probe", run_probe, "liveness probe: GetInfo + empty NodePrepareResources"),
    ):
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("--timeout", type=float, default=5.0, help="seconds per socket call")
        _common(p)
        p.set_defaults(func=_wrap(handler))


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (tests): the debug commands without the daemon's parser."""
    parser = argparse.ArgumentParser(prog="gpu-dra")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    register(sub)
    args = parser.parse_args(list(argv) if argv is not None else None)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
