"""The debug subcommands of ``gpu-dra``: read-only answers for the person on call.

``explain`` / ``simulate`` replay the scheduler's allocation of a claim (``explain.py``);
``devices``, ``slices``, ``claims``, ``cdi``, ``mig`` show what this node has, publishes and
holds; ``doctor`` runs a checklist and ``probe`` is the Helm chart's liveness probe. Every
command takes the daemon's path flags and their environment twins (``driver.config``) and
``-o table|json|yaml``. :func:`register` adds them to the ``gpu-dra`` parser.

Nothing here changes node state: no NVML writes, no API writes, no file writes except in a
temporary directory (the fake NVML's state for ``simulate``) and ``doctor``'s probe file in the
CDI root, created and removed at once. With ``--kubeconfig`` (or in a pod) ``explain`` reads
DeviceClasses and the other claims' allocations from the API server, and ``claims show`` the
claim's consumers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import structlog
import yaml

from driver.checkpoint import PreparedClaim
from driver.debug import nodestate, render
from driver.debug.doctor import Check, Doctor
from driver.debug.explain import (
    BUILTIN_CLASSES,
    ClaimSpec,
    Explanation,
    NodeDevices,
    classes_from_objects,
    explain,
    load_cel,
    node_from_slices,
    parse_claim,
)
from driver.errors import DriverError
from driver.inventory import DRIVER_NAME, Inventory

log = structlog.get_logger(__name__)

JsonDict = dict[str, Any]
SERVER_MINOR = 36

Handler = Callable[[argparse.Namespace, TextIO], int]


#: Node name of a simulated node (``--topology``): every command names it the same, so the UUIDs
#: (derived from the node name) agree between ``devices``, ``slices``, ``mig`` and ``simulate``.
SIMULATED_NODE = "simulated-node"

EXIT_OK, EXIT_NO, EXIT_USAGE, EXIT_ENVIRONMENT = 0, 1, 2, 3
EXIT_CODES_HELP = """exit codes:
  0  ok
  1  a negative answer: the claim does not fit, a check failed, slices differ
  2  bad usage or bad input: a flag, a file, a claim name
  3  the environment: no NVML, API server unreachable, no credentials"""


class DebugError(DriverError):
    """A debug command cannot answer from what it was given; the message says what to fix."""

    exit_code = EXIT_USAGE


class EnvironmentProblemError(DebugError):
    """What the command needs from the node or cluster is not there (NVML, API server, files)."""

    exit_code = EXIT_ENVIRONMENT


def exit_code_of(exc: BaseException) -> int:
    """The documented exit code for an error a debug command ran into."""
    from driver.errors import ApiError, ApiNotFoundError, CheckpointError, NvmlError
    from driver.kube import ResourceNotServedError

    if isinstance(exc, DebugError):
        return exc.exit_code
    if isinstance(exc, ApiNotFoundError) and not isinstance(exc, ResourceNotServedError):
        return EXIT_USAGE  # the claim (or class) named on the command line does not exist
    if isinstance(exc, (ApiError, NvmlError, CheckpointError, OSError)):
        return EXIT_ENVIRONMENT
    return EXIT_USAGE


# -- shared plumbing -----------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from driver import config

    return config.from_args(args)


def _kube(args: argparse.Namespace) -> Any:
    from driver.kube import Kube, resolve_credentials

    creds = resolve_credentials(getattr(args, "kubeconfig", None), getattr(args, "context", None))
    return Kube.from_config(creds.kubeconfig, context=creds.context)


def _style(args: argparse.Namespace) -> render.Style:
    return render.Style(wide=args.output == "wide", headers=not getattr(args, "no_headers", False))


def _load_yaml_docs(path: Path) -> list[JsonDict]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DebugError(
            f"cannot read {path}: {exc.strerror or exc}; pass an existing YAML/JSON file"
        ) from exc
    try:
        return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DebugError(f"{path} is not valid YAML{where}: {problem}; fix the file") from exc


@contextmanager
def _fake_nvml(topology: str, node: str) -> Iterator[Any]:
    """An NVML session on a fake topology with its state in a throw-away directory."""
    from driver.nvml.backend import Nvml

    with tempfile.TemporaryDirectory(prefix="gpu-dra-simulate-") as tmp:
        nvml = Nvml.open(
            "fake", fake_topology=topology, fake_state=Path(tmp) / "fake-nvml.json", node_name=node
        )
        try:
            yield nvml
        finally:
            nvml.shutdown()


def topology_inventory(
    topology: str,
    node: str = SIMULATED_NODE,
    mig_mode: str = "dynamic",
    *,
    allow_mig_mode_change: bool = False,
) -> Inventory:
    """What the plugin would publish on a node of ``topology`` (fake NVML + discovery, no sysfs).

    The plugin's own discovery with the chart's defaults (``migMode: dynamic``, no MIG mode
    changes), so a simulated node shows what a real one with this hardware would offer.
    """
    from driver.discovery import discover
    from driver.migdiscovery import make_mig_hook
    from driver.nvml.mig import NvmlMigBackend

    with _fake_nvml(topology, node) as nvml:
        hook = make_mig_hook(NvmlMigBackend(nvml), mig_mode, allow_mig_mode_change=allow_mig_mode_change)
        return discover(nvml, node, sysfs_root=None, mig_hook=hook)


def _simulated(args: argparse.Namespace) -> Inventory:
    """The inventory of the simulated node the command's ``--topology`` flags describe.

    Full GPUs are offered as shares as the plugin's defaults do (``--consumable-shares``), so
    claims with ``capacity.requests`` are answered too.
    """
    from driver.shares import offer_shares, parse_share_mode

    inventory = topology_inventory(
        args.topology,
        _node_name(args),
        args.mig_mode or "dynamic",
        allow_mig_mode_change=(args.allow_mig_mode_change or "false") == "true",
    )
    mode = getattr(args, "consumable_shares", None) or "memory"
    return offer_shares(inventory, parse_share_mode(mode))


def _node_name(args: argparse.Namespace) -> str:
    """``--node-name`` (or NODE_NAME); a simulated node is always called the same by default."""
    from driver import config

    given = config.from_args(args).node_name
    if given:
        return str(given)
    if getattr(args, "topology", None):
        return SIMULATED_NODE
    raise DebugError(
        f"gpu-dra {args.command} needs --node-name (or NODE_NAME, set in the plugin's pod), "
        "or --topology for a simulated node"
    )


def inventory_slices(
    inventory: Inventory, node: str, driver: str = DRIVER_NAME, server_minor: int = SERVER_MINOR
) -> list[JsonDict]:
    """The ResourceSlices ``inventory`` is published as, laid out for that API server version."""
    from driver.resourceslices import build_slices

    return build_slices(inventory, node, driver, "", server_minor)


def topology_node(
    topology: str,
    node: str = SIMULATED_NODE,
    mig_mode: str = "dynamic",
    *,
    allow_mig_mode_change: bool = False,
) -> NodeDevices:
    """The devices a node of ``topology`` would publish, as the scheduler sees them."""
    inventory = topology_inventory(topology, node, mig_mode, allow_mig_mode_change=allow_mig_mode_change)
    return node_from_slices(inventory_slices(inventory, node))


def _checkpoint(args: argparse.Namespace) -> nodestate.CheckpointView:
    return nodestate.read_checkpoint(_config(args).state_dir)


def _local_inventory(args: argparse.Namespace, view: nodestate.CheckpointView | None = None) -> Inventory:
    """What this node's NVML reports (the daemon's backend and MIG settings, its owned instances)."""
    claims = view.claims.values() if view is not None else ()
    return nodestate.local_inventory(_config(args), claims)


def _label(claim: PreparedClaim | None) -> str | None:
    return None if claim is None else f"{nodestate.claim_ref(claim)} ({claim.uid})"


def _attr_value(value: Any) -> Any:
    """An attribute as JSON keeps it: int, bool and string as they are, a version as its string."""
    from driver.inventory import Version

    return value.value if isinstance(value, Version) else value


def _server_allowed(args: argparse.Namespace) -> bool:
    """Whether to ask the API server for context: a kubeconfig was given, or we run in a pod."""
    cfg = _config(args)
    return cfg.kubeconfig is not None or bool(cfg.in_cluster)


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


def _classes(
    args: argparse.Namespace, claim: ClaimSpec, kube: Any, warnings: list[str]
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """DeviceClass selectors by name and where each came from.

    Precedence: ``--class-file`` over the API server over the chart's built-in classes. A class the
    server does not have is dropped (the scheduler would not find it either); when the server
    cannot be read the built-in class stands in, with a warning.
    """
    classes = dict(BUILTIN_CLASSES)
    sources = dict.fromkeys(classes, "built-in")
    wanted = sorted({a.class_name for r in claim.requests for a in r.alternatives})
    if kube is not None:
        from driver.errors import ApiError, ApiNotFoundError

        for name in wanted:
            try:
                obj = kube.get_device_class(name)
            except ApiNotFoundError:
                classes.pop(name, None)
                sources[name] = "absent on the API server"
                continue
            except ApiError as exc:
                warnings.append(
                    f"cannot read DeviceClass {name} from the API server ({exc}); "
                    f"using {'the built-in class' if name in classes else 'nothing'} instead - "
                    "grant get on deviceclasses or pass --class-file"
                )
                continue
            classes.update(classes_from_objects([obj]))
            sources[name] = "API server"
    for file in args.class_file or []:
        from_file = classes_from_objects(_load_yaml_docs(Path(file)))
        classes.update(from_file)
        sources.update(dict.fromkeys(from_file, f"file {file}"))
    return classes, {name: sources.get(name, "unknown") for name in wanted}


def _allocated_elsewhere(
    kube: Any, claim_uid: str, driver: str, warnings: list[str]
) -> tuple[list[str], list[JsonDict]]:
    """``driver/pool/device`` keys allocated to claims other than ``claim_uid``, and who holds them."""
    from driver.errors import ApiError

    try:
        claims = kube.list_resource_claims()
    except ApiError as exc:
        warnings.append(
            f"cannot list ResourceClaims ({exc}); devices allocated to other claims are counted as free "
            "- grant list on resourceclaims or run with an admin kubeconfig"
        )
        return [], []
    keys: list[str] = []
    held: list[JsonDict] = []
    for other in claims:
        meta = other.get("metadata") or {}
        if meta.get("uid") == claim_uid:
            continue
        results = (((other.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results")
        for r in results or []:
            keys.append(f"{r.get('driver')}/{r.get('pool')}/{r.get('device')}")
            if r.get("driver") == driver:
                held.append(
                    {
                        "device": r.get("device"),
                        "pool": r.get("pool"),
                        "claim": f"{meta.get('namespace')}/{meta.get('name')}",
                    }
                )
    return keys, held


def _current_allocation(claim_obj: Mapping[str, Any]) -> list[str]:
    results = (((claim_obj.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results")
    return [f"{r.get('request')}: {r.get('pool')}/{r.get('device')}" for r in results or []]


def _explanation_header(exp: Explanation, node_label: str, extra: Mapping[str, Any]) -> list[str]:
    lines = [f"claim {exp.claim.name} ({exp.claim.kind}) on {node_label}"]
    for name, source in extra.get("deviceClasses", {}).items():
        lines.append(f"  DeviceClass {name}: {source}")
    if extra.get("currentAllocation"):
        lines.append(f"  allocated now: {', '.join(extra['currentAllocation'])}")
    held = extra.get("allocatedToOtherClaims") or []
    if held:
        lines.append("  held by other claims: " + ", ".join(f"{h['device']} ({h['claim']})" for h in held))
    for warning in extra.get("warnings", []):
        lines.append(f"  warning: {warning}")
    for rej in exp.rejections:
        lines.append(f"  REJECTED by the API server: {rej.where}: {rej.message}")
        if rej.fix:
            lines.append(f"    fix: {rej.fix}")
    return lines


_REFERENCE = re.compile(r"""device\.(attributes|capacity)\[\s*["']([^"']+)["']\s*\]\.(\w+)""")


def _actual_values(expression: str, device: Any) -> str:
    """What the device has for each attribute/capacity ``expression`` reads: ``productName="..."``."""
    if device is None:
        return ""
    shown: list[str] = []
    for group, domain, name in dict.fromkeys(_REFERENCE.findall(expression)):
        values = device.attributes if group == "attributes" else device.capacity
        value = values.get(name) if domain == device.driver else None
        value = values.get(f"{domain}/{name}", value)
        if value is None:
            shown.append(f"{name} absent")
        elif group == "capacity":
            shown.append(
                f"{name}={render.quantity(int(value))}" if value == int(value) else f"{name}={value}"
            )
        else:
            text = getattr(value, "value", value)
            shown.append(f"{name}={json.dumps(text) if isinstance(text, str) else text}")
    return ", ".join(shown)


def _why(d: Any, taken: set[str], device: Any) -> str:
    failing = next((c for c in d.clauses if c.outcome is None or not c.outcome.matched), None)
    if d.matched:
        return "all clauses true" + (" (but held by another claim)" if d.device in taken else "")
    if failing is not None and failing.outcome is not None and failing.outcome.error:
        from driver.debug.cel import compile_selector

        if not compile_selector(failing.expression).valid:
            # About the claim, not this device: said once, under REJECTED.
            return f"{failing.source}: not evaluated, the API server rejects this selector (see REJECTED)"
        return f"{failing.source}: ERROR {failing.outcome.error}"
    if failing is not None:
        actual = _actual_values(failing.expression, device)
        return f"{failing.source} false: {failing.expression}" + (f" (device has {actual})" if actual else "")
    return "-"


def _explanation_text(
    exp: Explanation, node_label: str, extra: Mapping[str, Any], node: NodeDevices | None = None
) -> str:
    """Verdict first, then the context, then per request one row per distinct reason."""
    if exp.rejections:
        verdict = "would fit: no (the API server rejects the claim as written; see REJECTED below)"
    elif exp.fits:
        picked = "; ".join(f"{k}: {', '.join(v)}" for k, v in exp.allocation.items())
        verdict = f"would fit: yes with devices [{picked}]"
    else:
        verdict = f"would fit: no ({exp.reason})"
    lines = [verdict, "", *_explanation_header(exp, node_label, extra)]
    taken = {h["device"] for h in extra.get("allocatedToOtherClaims") or []}
    by_name = {dev.name: dev for dev in (node.devices if node is not None else ())}
    for alt in exp.alternatives:
        a = alt.alternative
        want = "all" if a.mode == "All" else str(a.count)
        lines.append(f"\nrequest {a.name}: class {a.class_name}, wants {want}")
        if alt.problem:
            lines.append(f"  {alt.problem}")
            continue
        # Identical answers are one row: a 200-placement MIG node otherwise prints 200 lines.
        groups: dict[tuple[str, str], list[str]] = {}
        for d in alt.devices:
            result = "match" if d.matched else ("error" if d.error else "no")
            groups.setdefault((result, _why(d, taken, by_name.get(d.device))), []).append(d.device)
        rows = []
        for (result, why), names in groups.items():
            if len(names) == len(alt.devices) > 1:
                label = f"all {len(names)} devices"
            elif len(names) > 1:
                label = f"{names[0]} (+{len(names) - 1} more)"
            else:
                label = names[0]
            rows.append((label, result, why))
        lines.append(render.table(("DEVICES", "RESULT", "WHY"), rows))
    for c in exp.claim.constraints:
        attr = c.match_attribute or c.distinct_attribute
        kind = "matchAttribute" if c.match_attribute else "distinctAttribute"
        lines.append(f"\nconstraint {kind} {attr} over {', '.join(c.requests) or 'all requests'}")
    return "\n".join(lines)


def run_explain(args: argparse.Namespace, out: TextIO) -> int:
    load_cel()  # before any file or API server is read: without the [cel] extra nothing can be answered
    cfg = _config(args)
    claim_obj = _read_claim(args)
    claim = parse_claim(claim_obj)
    topology = getattr(args, "topology", None)
    slices_file = getattr(args, "slices_file", None)
    live = not topology and not slices_file
    kube = _kube(args) if live or cfg.kubeconfig is not None else None
    warnings: list[str] = []
    classes, sources = _classes(args, claim, kube, warnings)
    allocated: list[str] = []
    held: list[JsonDict] = []
    if topology:
        node = node_from_slices(inventory_slices(_simulated(args), _node_name(args)))
        label = f"simulated {topology}"
    elif slices_file:
        node = node_from_slices(
            d for d in _load_yaml_docs(Path(slices_file)) if d.get("kind") == "ResourceSlice"
        )
        label = str(slices_file)
    else:
        if not cfg.node_name:
            raise DebugError("explain needs --node-name / NODE_NAME (or --topology / --slices-file)")
        kube = kube or _kube(args)
        node = node_from_slices(kube.list_slices(cfg.driver_name, cfg.node_name))
        label = f"node {cfg.node_name}"
        uid = str((claim_obj.get("metadata") or {}).get("uid") or "")
        allocated, every = _allocated_elsewhere(kube, uid, cfg.driver_name, warnings)
        held = [h for h in every if h["pool"] == cfg.node_name]
    exp = explain(claim, node, classes, allocated)
    extra: JsonDict = {
        "deviceClasses": sources,
        "currentAllocation": _current_allocation(claim_obj),
        "allocatedToOtherClaims": held,
        "warnings": warnings,
    }
    render.emit({**exp.to_dict(), **extra}, args.output, _explanation_text(exp, label, extra, node), out)
    return 0 if exp.fits else 1


# -- devices / slices / mig ----------------------------------------------------------------------


def run_devices(args: argparse.Namespace, out: TextIO) -> int:
    if args.topology:
        inventory, view = _simulated(args), None
    else:
        view = _checkpoint(args)
        inventory = _local_inventory(args, view)
    holdings = nodestate.device_holdings(inventory, view.claims if view else {})
    from driver.debug.taints import device_status, taint_text

    health = {} if args.topology else (device_status(_config(args).state_dir) or {})
    data: list[JsonDict] = []
    for d in inventory.devices:
        h = holdings[d.name]
        own = health.get(d.name) or {}
        data.append(
            {
                "name": d.name,
                "kind": d.kind,
                "uuid": str(d.attributes.get("uuid", d.gpu_uuid)),
                "gpu": d.gpu_minor,
                "attributes": {k: _attr_value(v) for k, v in d.attributes.items()},
                "capacity": dict(d.capacity),
                "status": h.status,
                "heldBy": None if h.held_by is None else nodestate.claim_ref(h.held_by),
                "heldByUid": None if h.held_by is None else h.held_by.uid,
                "blockedBy": [nodestate.claim_ref(c) for c in h.blocked_by],
                "health": own.get("health", "-" if args.topology else "UNKNOWN"),
                "healthMessage": own.get("message"),
                "taints": own.get("taints") or [],
            }
        )
    rows = [
        (
            d["name"],
            d["kind"],
            d["attributes"].get("productName", "-"),
            d["attributes"].get("profile", "-"),
            d["heldBy"] or (f"blocked by {', '.join(d['blockedBy'])}" if d["blockedBy"] else "free"),
            d["health"],
            taint_text(d["taints"]),
            d["uuid"],
            d["gpu"],
            render.quantity(d["capacity"].get("memory")),
            d["attributes"].get("pcieRoot", "-"),
        )
        for d in data
    ]
    text = render.table(
        (
            "DEVICE",
            "KIND",
            "PRODUCT",
            "PROFILE",
            "HELD BY",
            "HEALTH",
            "TAINTS",
            "UUID",
            "GPU",
            "MEMORY",
            "PCIE ROOT",
        ),
        rows,
        _style(args),
        wide_from=7,
    )
    problems = [view.problem] if view is not None and view.problem else []
    for warning in [*inventory.warnings, *problems]:
        text += f"\nwarning: {warning}"
    render.emit({"devices": data, "warnings": [*inventory.warnings, *problems]}, args.output, text, out)
    return 0


def _by_name(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {str(i.get("name")): i for i in items}


def slice_diff(want: Sequence[Mapping[str, Any]], have: Sequence[Mapping[str, Any]]) -> JsonDict:
    """Device- and counter-set-level difference between two sets of slices (values compared by meaning)."""
    from driver.resourceslices import comparable_spec

    def parts(slices: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in slices:
            out.update(_by_name(comparable_spec(s).get(key) or []))
        return out

    diff: JsonDict = {"slicesWanted": len(want), "slicesPublished": len(have)}
    in_sync = True
    for key, label in (("devices", "Devices"), ("sharedCounters", "CounterSets")):
        w, h = parts(want, key), parts(have, key)
        missing = sorted(set(w) - set(h))
        extra = sorted(set(h) - set(w))
        changed = sorted(n for n in set(w) & set(h) if w[n] != h[n])
        diff[f"missing{label}"] = missing
        diff[f"unexpected{label}"] = extra
        diff[f"changed{label}"] = changed
        in_sync = in_sync and not (missing or extra or changed)
    diff["inSync"] = in_sync
    return diff


def _diff_text(d: Mapping[str, Any]) -> str:
    if d["inSync"]:
        return f"published: in sync ({d['slicesPublished']} slice(s) on the API server)"
    lines = ["published: DIFFERS from what this node would publish now"]
    for key, what in (
        ("missingDevices", "devices not published"),
        ("unexpectedDevices", "published devices this node does not have"),
        ("changedDevices", "devices published differently"),
        ("missingCounterSets", "counter sets not published"),
        ("unexpectedCounterSets", "published counter sets this node does not have"),
        ("changedCounterSets", "counter sets published differently"),
    ):
        if d[key]:
            lines.append(f"  {what}: {', '.join(d[key])}")
    lines.append("  the plugin repairs its pool on its own; if this persists see its publisher logs")
    return "\n".join(lines)


def run_slices(args: argparse.Namespace, out: TextIO) -> int:
    from driver.resourceslices import validate_pool

    cfg = _config(args)
    node = _node_name(args)
    inventory = _simulated(args) if args.topology else _local_inventory(args, _checkpoint(args))
    kube = _kube(args) if args.compare else None
    minor = kube.server_version()[1] if kube is not None else SERVER_MINOR
    from driver.debug.taints import published_taints
    from driver.resourceslices import build_slices

    # What the plugin publishes includes its health taints (from its status file on this node).
    taints = {} if args.topology else published_taints(cfg.state_dir)
    slices = build_slices(
        inventory,
        node,
        cfg.driver_name,
        "",
        minor,
        taints=taints,
        taintable=cfg.gate("NVMLDeviceHealthCheck"),
    )
    result: JsonDict = {"slices": slices, "valid": True, "problems": [], "diff": None}
    try:
        validate_pool(slices, minor)
    except DriverError as exc:
        result["valid"] = False
        result["problems"].append(str(exc))
    if kube is not None:
        result["diff"] = slice_diff(slices, kube.list_slices(cfg.driver_name, node))
    rows = [
        (
            s["metadata"]["generateName"],
            len(s["spec"].get("devices", [])),
            len(s["spec"].get("sharedCounters", [])),
            s["spec"]["pool"]["name"],
            s["spec"]["pool"]["generation"],
            s["spec"]["pool"]["resourceSliceCount"],
        )
        for s in slices
    ]
    text = render.table(
        ("SLICE", "DEVICES", "COUNTER SETS", "POOL", "GENERATION", "SLICES IN POOL"), rows, _style(args), 3
    )
    text += f"\nvalid: {'yes' if result['valid'] else 'NO: ' + '; '.join(result['problems'])}"
    if result["diff"] is not None:
        text += "\n" + _diff_text(result["diff"])
    render.emit(result, args.output, text, out)
    in_sync = result["diff"] is None or result["diff"]["inSync"]
    return 0 if result["valid"] and in_sync else 1


def mig_picture(
    inventory: Inventory,
    holders: Mapping[str, str],
    live: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[JsonDict]:
    """Per GPU: its memory slices and which MIG device (and claim) occupies each.

    ``holders`` maps device name -> claim label; ``live`` device name -> the checkpoint's MIG
    record of the instance created for it (adds its MIG UUID and GI/CI ids).
    """
    live = live or {}
    gpus: dict[int, JsonDict] = {}
    for d in inventory.devices:
        entry = gpus.setdefault(
            d.gpu_minor,
            {"gpu": d.gpu_minor, "uuid": d.gpu_uuid, "slices": 0, "instances": [], "freeSlices": []},
        )
        spec = d.mig_spec
        if spec is None:
            continue
        entry["slices"] = max(entry["slices"], spec.placement_start + spec.placement_size)
        holder = holders.get(d.name)
        record = live.get(d.name) or {}
        if d.mig_live is not None or holder:
            mig_uuid = record.get("mig_uuid") or (d.mig_live.mig_uuid if d.mig_live else None)
            entry["instances"].append(
                {
                    "device": d.name,
                    "profile": spec.profile,
                    "start": spec.placement_start,
                    "size": spec.placement_size,
                    "memorySlices": list(
                        range(spec.placement_start, spec.placement_start + spec.placement_size)
                    ),
                    "claim": holder,
                    "migUUID": mig_uuid,
                    "giId": record.get("gi_id", d.mig_live.gi_id if d.mig_live else None),
                    "ciId": record.get("ci_id", d.mig_live.ci_id if d.mig_live else None),
                }
            )
    for entry in gpus.values():
        used = {s for inst in entry["instances"] for s in inst["memorySlices"]}
        entry["freeSlices"] = [s for s in range(entry["slices"]) if s not in used]
    return [gpus[k] for k in sorted(gpus)]


def _mig_text(picture: Sequence[JsonDict]) -> str:
    lines = []
    for gpu in picture:
        cells = ["." for _ in range(gpu["slices"])]
        legend = []
        for n, inst in enumerate(gpu["instances"]):
            mark = chr(ord("A") + n % 26)
            for i in inst["memorySlices"]:
                if i < len(cells):
                    cells[i] = mark
            where = f"slice {inst['start']}" + (
                f"-{inst['start'] + inst['size'] - 1}" if inst["size"] > 1 else ""
            )
            legend.append(
                f"  {mark} = {inst['profile']} {inst['device']} {where} "
                f"{inst['claim'] or '(no claim: created outside this plugin)'}"
                + (f" {inst['migUUID']}" if inst.get("migUUID") else "")
            )
        if cells:
            used = gpu["slices"] - len(gpu["freeSlices"])
            bar = "[" + "|".join(cells) + "]" + f"  {used} of {gpu['slices']} memory slices in use"
        else:
            bar = "(no MIG placements)"
        lines.append(f"gpu {gpu['gpu']} {gpu['uuid']}: {bar}")
        lines.extend(legend)
    return "\n".join(lines) or "no GPUs"


def run_mig(args: argparse.Namespace, out: TextIO) -> int:
    if args.topology:
        inventory, claims = _simulated(args), {}
    else:
        view = _checkpoint(args)
        inventory, claims = _local_inventory(args, view), dict(view.claims)
    labels = {name: _label(c) or "" for name, c in nodestate.holders(claims).items()}
    live = {d.device: d.mig for c in claims.values() for d in c.devices if d.mig is not None}
    picture = mig_picture(inventory, labels, live)
    render.emit({"gpus": picture}, args.output, _mig_text(picture), out)
    return 0


# -- claims / cdi --------------------------------------------------------------------------------


def _claim_data(claim: PreparedClaim) -> JsonDict:
    return {
        "uid": claim.uid,
        "namespace": claim.namespace,
        "name": claim.name,
        "state": str(claim.state),
        "devices": [d.device for d in claim.devices],
        "cdiDeviceIds": [i for d in claim.devices for i in d.cdi_device_ids],
        "sharing": [str(r.get("kind")) for r in claim.sharing],
        "ageSeconds": nodestate.age_seconds(claim),
    }


def _consumers(args: argparse.Namespace, claim: PreparedClaim) -> tuple[list[JsonDict] | None, str | None]:
    """The claim's ``status.reservedFor`` from the API server (None + why when not available)."""
    if not _server_allowed(args):
        return None, "not asked (no --kubeconfig and not in a pod)"
    try:
        obj = _kube(args).get_resource_claim(claim.namespace, claim.name)
    except DriverError as exc:
        return None, str(exc)
    if (obj.get("metadata") or {}).get("uid") != claim.uid:
        return None, f"the API server's {claim.namespace}/{claim.name} is another claim now (uid changed)"
    reserved = (obj.get("status") or {}).get("reservedFor") or []
    return [
        {"resource": r.get("resource"), "name": r.get("name"), "uid": r.get("uid")} for r in reserved
    ], None


def _claim_detail(args: argparse.Namespace, claim: PreparedClaim, view: nodestate.CheckpointView) -> JsonDict:
    spec = next(
        (
            s
            for s in nodestate.cdi_specs(_config(args).cdi_root, {claim.uid: claim})
            if s.claim_uid == claim.uid
        ),
        None,
    )
    consumers, consumers_problem = _consumers(args, claim)
    return {
        **_claim_data(claim),
        "startedAt": claim.started_at,
        "completedAt": claim.completed_at,
        "devices": [
            {
                "device": d.device,
                "pool": d.pool,
                "kind": d.kind,
                "gpuUUID": d.gpu_uuid,
                "requests": list(d.request_names),
                "cdiDeviceIds": list(d.cdi_device_ids),
                "adminAccess": d.admin_access,
                "mig": dict(d.mig) if d.mig is not None else None,
            }
            for d in claim.devices
        ],
        "sharing": [dict(r) for r in claim.sharing],
        "sharingSummary": nodestate.sharing_summary(claim),
        "cdiSpec": None if spec is None else spec.to_dict(),
        "consumers": consumers,
        "consumersProblem": consumers_problem,
        "checkpoint": view.to_dict(),
    }


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _claim_detail_text(d: Mapping[str, Any]) -> str:
    lines = [
        f"claim {d['namespace']}/{d['name']}",
        f"  uid:      {d['uid']}",
        f"  state:    {d['state']}",
        f"  age:      {d['ageSeconds']}s (prepare started {_when(d['startedAt'])})",
        "  devices:",
    ]
    for dev in d["devices"]:
        mig = f" MIG {dev['mig'].get('mig_uuid')}" if dev["mig"] else ""
        lines.append(
            f"    {dev['device']} ({dev['kind']}, GPU {dev['gpuUUID']}{mig}) "
            f"for request(s) {', '.join(dev['requests'])}"
        )
        for cdi_id in dev["cdiDeviceIds"]:
            lines.append(f"      CDI {cdi_id}")
    lines.append("  sharing:")
    lines.extend(f"    {s}" for s in d["sharingSummary"])
    spec = d["cdiSpec"]
    if spec is None:
        lines.append("  CDI spec: none")
    else:
        lines.append(
            f"  CDI spec: {spec['path']} ({spec['status']}"
            + (f": {spec['problem']})" if spec["problem"] else ")")
        )
    if d["consumers"] is not None:
        lines.append(f"  consumers (reservedFor, {len(d['consumers'])}), each given the devices above:")
        lines.extend(f"    {c['resource']} {c['name']} ({c['uid']})" for c in d["consumers"])
    else:
        lines.append(f"  consumers: unknown ({d['consumersProblem']})")
    return "\n".join(lines)


def run_claims(args: argparse.Namespace, out: TextIO) -> int:
    view = _checkpoint(args)
    if args.show:
        claim = nodestate.find_claim(view.claims, args.show)
        if claim is None:
            problem = f" ({view.problem})" if view.problem else ""
            raise DebugError(
                f"no claim {args.show!r} in the checkpoint{problem}; list them with `gpu-dra claims`"
            )
        detail = _claim_detail(args, claim, view)
        render.emit(detail, args.output, _claim_detail_text(detail), out)
        return 0
    data = [_claim_data(c) for _, c in sorted(view.claims.items())]
    rows = [
        (
            d["uid"],
            f"{d['namespace']}/{d['name']}",
            d["state"],
            d["devices"],
            d["sharing"] or "none",
            f"{d['ageSeconds']}s",
        )
        for d in data
    ]
    text = render.table(("UID", "CLAIM", "STATE", "DEVICES", "SHARING", "AGE"), rows, _style(args))
    if args.no_headers:
        pass  # rows only, for scripts
    elif view.problem:
        text += f"\ncheckpoint: PROBLEM: {view.problem}"
    elif view.exists:
        text += (
            f"\ncheckpoint: {view.path} valid (checksum {str(view.checksum)[:12]}... and boot id verified)"
        )
    else:
        text += f"\ncheckpoint: {view.path} not written yet"
    render.emit({"claims": data, "checkpoint": view.to_dict()}, args.output, text, out)
    return 1 if view.problem else 0


def _shown(
    run: Callable[[argparse.Namespace, TextIO], int],
) -> Callable[[argparse.Namespace, TextIO], int]:
    """Accept both ``claims <claim>`` and ``claims show <claim>`` (likewise for ``cdi``)."""

    def wrapped(args: argparse.Namespace, out: TextIO) -> int:
        words = list(args.show or [])
        if words[:1] == ["show"]:
            words = words[1:]
        if len(words) > 1:
            raise SystemExit(f"gpu-dra: name one claim to show, got {words}")
        args.show = words[0] if words else None
        return run(args, out)

    return wrapped


def run_cdi(args: argparse.Namespace, out: TextIO) -> int:
    from cdi.store import CdiStore

    cfg = _config(args)
    view = _checkpoint(args)
    if args.show:
        claim = nodestate.find_claim(view.claims, args.show)
        uid = claim.uid if claim is not None else args.show
        spec = CdiStore(cfg.cdi_root).read_claim_spec(uid)
        if spec is None:
            raise DebugError(
                f"no CDI spec for claim {args.show} under {cfg.cdi_root}; list them with `gpu-dra cdi`"
            )
        shown: JsonDict = json.loads(spec.to_json())
        render.emit(shown, args.output, yaml.safe_dump(shown, sort_keys=False), out)
        return 0
    statuses = nodestate.cdi_specs(cfg.cdi_root, view.claims)
    data = [s.to_dict() for s in statuses]
    owners = {uid: nodestate.claim_ref(c) for uid, c in view.claims.items()}
    rows = [
        (
            s.claim_uid,
            owners.get(s.claim_uid, "-"),
            s.path.name,
            s.status.upper() if s.status != "ok" else "ok",
            s.problem or "",
        )
        for s in statuses
    ]
    render.emit(
        {
            "specs": data,
            "orphans": [str(s.path) for s in statuses if s.status == "orphan"],
            "problems": nodestate.spec_problems(statuses),
        },
        args.output,
        render.table(("CLAIM UID", "CLAIM", "FILE", "STATUS", "PROBLEM"), rows, _style(args))
        + ("" if args.no_headers else f"\nCDI root: {cfg.cdi_root}"),
        out,
    )
    return 1 if any(s.status != "ok" for s in statuses) else 0


# -- doctor / probe ------------------------------------------------------------------------------


def _socket_paths(args: argparse.Namespace) -> Any:
    from driver.kubeletplugin.sockets import SocketPaths

    cfg = _config(args)
    return SocketPaths.for_driver(
        cfg.kubelet_registrar_directory_path, cfg.kubelet_plugins_directory_path, cfg.driver_name, cfg.pod_uid
    )


def doctor_checks(args: argparse.Namespace) -> list[Check]:
    kube: list[Any] = []

    def kube_once() -> Any:
        if not kube:
            kube.append(_kube(args))
        return kube[0]

    return Doctor(_config(args), kube_once, args.timeout).checks()


def run_doctor(args: argparse.Namespace, out: TextIO) -> int:
    checks = doctor_checks(args)
    bad = [c for c in checks if not c.ok]
    skipped = [c for c in checks if c.status == "skipped"]
    verdict = "healthy" if not bad else f"{len(bad)} of {len(checks)} checks failed"
    if skipped:
        verdict += f" ({len(skipped)} skipped)"
    lines = [f"verdict: {verdict}", ""]
    marks = {"ok": "ok  ", "fail": "FAIL", "skipped": "skip"}
    for c in checks:
        lines.append(f"{marks[c.status]}  {c.name}: {c.detail}")
        if c.status == "fail":
            lines.append(f"      what to do: {c.todo}")
    render.emit(
        {"checks": [c.to_dict() for c in checks], "ok": not bad, "verdict": verdict},
        args.output,
        "\n".join(lines),
        out,
    )
    return EXIT_OK if not bad else EXIT_NO


def run_probe(args: argparse.Namespace, out: TextIO) -> int:
    from driver.kubeletplugin.health import probe

    problem = probe(_socket_paths(args), timeout_s=args.timeout)
    render.emit({"ok": problem is None, "problem": problem}, args.output, problem or "ok", out)
    return 0 if problem is None else 1


# -- topologies ----------------------------------------------------------------------------------


def run_topologies(args: argparse.Namespace, out: TextIO) -> int:
    from driver.nvml.topology import available_topologies, load_topology

    data: list[JsonDict] = []
    for name in available_topologies():
        topo = load_topology(name)
        products = sorted({g.product_name for g in topo.gpus})
        data.append(
            {
                "name": name,
                "gpus": len(topo.gpus),
                "products": products,
                "migCapable": any(g.mig_capable for g in topo.gpus),
                "migOn": any(g.mig_mode for g in topo.gpus),
                "driverVersion": topo.driver_version,
            }
        )
    rows = [
        (d["name"], d["gpus"], ", ".join(d["products"]), d["migCapable"], d["migOn"], d["driverVersion"])
        for d in data
    ]
    text = render.table(("NAME", "GPUS", "PRODUCT", "MIG CAPABLE", "MIG ON", "DRIVER"), rows, _style(args), 4)
    render.emit({"topologies": data}, args.output, text, out)
    return EXIT_OK


# -- registration --------------------------------------------------------------------------------


def _wrap(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from driver import log as driver_log

        # Command output owns stdout; logs go to stderr and stay quiet unless asked for: what a
        # warning would say is part of the command's answer already.
        level = args.log_level or "error"
        driver_log.configure(args.log_format or "console", level)
        try:
            return handler(args, sys.stdout)
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # a debug command answers in one line, never with a traceback
            code = exit_code_of(exc)
            if isinstance(exc, DriverError):
                message = str(exc)
            else:
                message = (
                    f"unexpected {type(exc).__name__}: {exc}; rerun with --log-level debug to see where, "
                    "and report it"
                )
            if level == "debug":
                log.exception("command failed")
            print(f"gpu-dra {args.command}: {message}", file=sys.stderr)
            return code

    return run


_PLUGIN_FLAGS_NOTE = (
    "The node's settings (paths, NVML backend, node name) are read from the plugin's environment "
    "variables, as in the plugin's pod, so `kubectl exec -n <ns> ds/<name> -- gpu-dra {cmd}` needs "
    "no flags; the plugin's own flags (`gpu-dra plugin --help`) are accepted too."
)


def _add(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    examples: Sequence[str],
    handler: Handler,
    *,
    node_settings: bool = True,
    kube: bool = False,
    topology: bool = False,
    table: bool = True,
) -> argparse.ArgumentParser:
    """A debug subcommand whose help shows its own flags, examples and the exit codes."""
    from driver.config import add_plugin_flags

    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + EXIT_CODES_HELP
    if node_settings:
        epilog += "\n\n" + textwrap.fill(_PLUGIN_FLAGS_NOTE.format(cmd=name), 96)
    p = subparsers.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    own: list[str] = ["--log-level", "--log-format"]
    if topology:
        p.add_argument(
            "--topology",
            metavar="NAME|FILE",
            help="simulate a node with this GPU topology instead of reading this node "
            "(`gpu-dra topologies` lists the built-in ones)",
        )
        p.add_argument(
            "--mig-mode",
            choices=("dynamic", "static"),
            help="how MIG-capable GPUs are published, as the plugin's --mig-mode "
            "(default: dynamic, the chart's migMode)",
        )
        p.add_argument(
            "--allow-mig-mode-change",
            choices=("true", "false"),
            help="as the plugin's flag: a simulated Hopper+ GPU with MIG off may turn it on (default: false)",
        )
        p.add_argument("--mig", dest="mig_mode", choices=("dynamic", "static"), help=argparse.SUPPRESS)
        own += ["--topology", "--mig-mode", "--allow-mig-mode-change"]
    if topology or kube:
        p.add_argument("--node-name", help="the node to read or to name the simulated node (NODE_NAME)")
        own.append("--node-name")
    if kube:
        p.add_argument(
            "--kubeconfig",
            help="kubeconfig file; default: $KUBECONFIG, then ~/.kube/config, then the pod's service account",
        )
        p.add_argument("--context", help="the kubeconfig context to use (default: its current context)")
        own.append("--kubeconfig")
    formats = render.FORMATS if table else ("table", "json", "yaml")
    p.add_argument(
        "-o", "--output", choices=formats, default="table", help=f"output format: {', '.join(formats)}"
    )
    if table:
        p.add_argument("--no-headers", action="store_true", help="print table rows without the header line")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help=argparse.SUPPRESS)
    p.add_argument("--log-format", choices=("json", "console"), help=argparse.SUPPRESS)
    add_plugin_flags(p, hidden=True, skip=own)
    p.set_defaults(func=_wrap(handler))
    return p


def _common(p: argparse.ArgumentParser) -> None:
    """Output and hidden node flags for a command registered outside :func:`register` (``taints``)."""
    from driver.config import add_plugin_flags

    p.add_argument("-o", "--output", choices=render.FORMATS, default="table", help="output format")
    p.add_argument("--no-headers", action="store_true", help="print table rows without the header line")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help=argparse.SUPPRESS)
    p.add_argument("--log-format", choices=("json", "console"), help=argparse.SUPPRESS)
    add_plugin_flags(p, hidden=True, skip=("--log-level", "--log-format"))


def _claim_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("claim", metavar="CLAIM", help=what)
    p.add_argument(
        "--class-file",
        action="append",
        metavar="FILE",
        help="a DeviceClass YAML to use instead of the server's or the chart's (repeatable)",
    )


def _require_topology(handler: Handler) -> Handler:
    def run(args: argparse.Namespace, out: TextIO) -> int:
        if not args.topology:
            raise DebugError(
                "simulate needs --topology NAME|FILE: the GPUs of the node to simulate "
                "(`gpu-dra topologies` lists the built-in ones)"
            )
        return handler(args, out)

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the debug subcommands to the ``gpu-dra`` parser (each sets ``func``)."""
    p = _add(
        subparsers,
        "explain",
        "why a claim does (not) fit a node, per device and clause",
        (
            "gpu-dra explain team-a/train --node-name gpu-node-1      # a claim on the API server",
            "gpu-dra explain claim.yaml --topology a100-40gb-x8       # a file, on a simulated node",
            "gpu-dra explain claim.yaml --slices-file slices.yaml",
        ),
        run_explain,
        kube=True,
        topology=True,
        table=False,
    )
    _claim_argument(p, "a claim (or claim template) YAML file, or NAMESPACE/NAME on the API server")
    p.add_argument("--slices-file", metavar="FILE", help="ResourceSlice YAML to explain against")

    p = _add(
        subparsers,
        "simulate",
        "would a claim fit on a node of this topology",
        (
            "gpu-dra simulate claim.yaml --topology a100-40gb-x8",
            "gpu-dra simulate claim.yaml --topology h100-80gb-x8 --allow-mig-mode-change true -o json",
        ),
        _require_topology(run_explain),
        node_settings=False,
        topology=True,
        table=False,
    )
    _claim_argument(p, "a claim (or claim template) YAML file")
    p.set_defaults(slices_file=None)

    for name, handler, summary, examples in (
        (
            "devices",
            run_devices,
            "GPUs and MIG devices of this node, who holds each",
            ("gpu-dra devices", "gpu-dra devices --topology a100-40gb-x1-mig -o wide"),
        ),
        (
            "slices",
            run_slices,
            "the ResourceSlices this node would publish now",
            ("gpu-dra slices", "gpu-dra slices --compare", "gpu-dra slices --topology h100-80gb-x8 -o yaml"),
        ),
        (
            "mig",
            run_mig,
            "a picture of each GPU's MIG memory slices",
            ("gpu-dra mig", "gpu-dra mig --topology a100-40gb-x1-mig"),
        ),
    ):
        p = _add(
            subparsers,
            name,
            summary,
            examples,
            handler,
            topology=True,
            kube=name == "slices",
            table=name != "mig",
        )
        if name == "slices":
            p.add_argument("--compare", action="store_true", help="diff against what the API server holds")

    p = _add(
        subparsers,
        "claims",
        "prepared claims in the checkpoint; `claims show <uid|ns/name>`",
        ("gpu-dra claims", "gpu-dra claims show team-a/train", "gpu-dra claims -o json"),
        _shown(run_claims),
        kube=True,
    )
    p.add_argument("show", nargs="*", metavar="[show] CLAIM", help="uid or ns/name to show in detail")

    p = _add(
        subparsers,
        "cdi",
        "CDI specs the plugin owns, orphans; `cdi show <uid|ns/name>`",
        ("gpu-dra cdi", "gpu-dra cdi show team-a/train"),
        _shown(run_cdi),
    )
    p.add_argument("show", nargs="*", metavar="[show] CLAIM", help="claim whose spec to show")

    p = _add(
        subparsers,
        "doctor",
        "checklist of the node plugin's health, with what to do for each problem",
        ("gpu-dra doctor", "kubectl exec -n gpu-dra ds/gpu-dra-kubelet-plugin -- gpu-dra doctor"),
        run_doctor,
        kube=True,
        table=False,
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per socket and API call (default 5)")
    p = _add(
        subparsers,
        "probe",
        "liveness check: GetInfo and an empty NodePrepareResources on the plugin's sockets",
        ("gpu-dra probe",),
        run_probe,
        table=False,
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per socket call (default 5)")

    _add(
        subparsers,
        "topologies",
        "the built-in GPU topologies --topology accepts",
        (
            "gpu-dra topologies",
            "gpu-dra simulate claim.yaml --topology $(gpu-dra topologies --no-headers | head -1)",
        ),
        run_topologies,
        node_settings=False,
    )

    from driver.debug import taints

    taints.register(subparsers, _common, _wrap)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (tests): the ``gpu-dra`` command line, debug commands included."""
    from driver.cli import main as cli_main

    return cli_main(argv)
