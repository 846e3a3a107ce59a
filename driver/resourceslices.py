"""Inventory -> ResourceSlices: building them, checking them against the API's limits, publishing them.

Why it exists: the scheduler only sees what this node publishes, and the API server rejects (or,
for fields behind a disabled gate, silently drops) what breaks its rules. So slices are laid out
the way the server version needs (one pool per node; for partitionable MIG a counters slice plus
one slice per GPU on >= 1.35, one combined slice per GPU before), every slice is validated here
with the limits named in the message before it is sent (never trimmed), and the
:class:`SlicePublisher` keeps the pool in step with the pool-generation rules of the Go helper:
write only on change, repair deletions behind our back within seconds, back off on failures,
notice fields the server dropped and stop re-sending them.

What it does not do: discover devices (``discovery``), decide fallbacks when the server drops
partitionable fields (the daemon, told through ``on_dropped_fields``), or talk to the kubernetes
client directly (``kube``; the publisher takes anything shaped like :class:`SliceApi`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import structlog

from driver.errors import ApiNotFoundError, DriverError, SliceValidationError
from driver.inventory import AllocatableDevice, AttributeValue, CounterSet, Inventory, Version

log = structlog.get_logger(__name__)

JsonDict = dict[str, Any]

API_VERSION = "resource.k8s.io/v1"
#: How long a watch event waits for our own write's response to tell an echo from a change.
ECHO_WAIT_S = 15.0

# Limits of resource.k8s.io/v1 (Kubernetes 1.36 types.go), see kubelet-dra-protocol.md 4.
MAX_DEVICES_PER_SLICE = 128
MAX_DEVICES_PER_SLICE_WITH_COUNTERS = 64  # when any device has taints, consumesCounters or list values
MAX_COUNTER_SETS_PER_SLICE = 8
MAX_COUNTERS_PER_SET = 32
MAX_CONSUMES_COUNTERS = 2
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_ATTRIBUTE_VALUES = 48
MAX_ID_LENGTH = 32
MAX_DOMAIN_LENGTH = 63
MAX_DRIVER_NAME_LENGTH = 63
MAX_POOL_NAME_LENGTH = 253
MAX_STRING_LENGTH = 64
MAX_TAINTS = 16
# The API server keeps at most this much of generateName before its 5 random characters.
MAX_GENERATE_NAME_BASE = 63 - 5
# From this server minor on, a slice holds sharedCounters or devices, never both.
SPLIT_LAYOUT_MIN_MINOR = 35
NEWEST_KNOWN_MINOR = 36

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_QUANTITY = re.compile(r"^([+-]?)(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_BINARY_SUFFIX = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL_SUFFIX = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_INDEX_PREFIX = re.compile(r"^([0-9a-f]+)-")
_ATTRIBUTE_TYPES = ("int", "bool", "string", "version")
_LIST_ATTRIBUTE_TYPES = ("ints", "bools", "strings", "versions")
_NODE_SELECTION_FIELDS = ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection")


class EmptyInventoryError(SliceValidationError):
    """The inventory has no devices: publishing it would silently empty this node's pool."""


# -- names ---------------------------------------------------------------------------------------


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key ordering embedded numbers by value: ``gpu-2`` before ``gpu-10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", name))


def generate_name(index: int, count: int, driver: str, node: str) -> str:
    """``<index hex>-<driver>-<node>-``, cut as the API server cuts generateName before adding 5 chars.

    The index is zero-padded to ``max(5, hex digits of count-1)`` so that names sort in slice
    order (the allocator is first-fit over slice names).
    """
    width = max(5, len(f"{max(count - 1, 0):x}"))
    return f"{index:0{width}x}-{driver}-{node}-"[:MAX_GENERATE_NAME_BASE]


def slice_index(name: str) -> int | None:
    """The index prefix of a slice name we generated, or None when the name has none."""
    match = _INDEX_PREFIX.match(name)
    return int(match.group(1), 16) if match else None


# -- encoding ------------------------------------------------------------------------------------


def encode_attribute(value: AttributeValue) -> JsonDict:
    """An attribute value in its wire form: exactly one of int/bool/string/version."""
    if isinstance(value, bool):  # before int: bool is an int in Python
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, Version):
        return {"version": value.value}
    return {"string": value}


_BINARY_STEPS = (
    ("Ei", 1024**6),
    ("Pi", 1024**5),
    ("Ti", 1024**4),
    ("Gi", 1024**3),
    ("Mi", 1024**2),
    ("Ki", 1024),
)
_DECIMAL_STEPS = (("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3))


def canonical_quantity(value: int, binary: bool = True) -> str:
    """``value`` as the API server writes a quantity of that format: ``40Gi``, ``4864Mi``, ``1k``.

    Bytes are binary quantities (``resource.BinarySI``, what NVIDIA's driver publishes), counts
    decimal ones; the largest suffix that divides the value exactly wins, as in Kubernetes'
    canonical form, so ``kubectl get resourceslices -o yaml`` shows what people expect.
    """
    if value == 0:
        return "0"
    for suffix, step in _BINARY_STEPS if binary else _DECIMAL_STEPS:
        if value % step == 0:
            return f"{value // step}{suffix}"
    return str(value)


def _quantity(name: str, value: int) -> JsonDict:
    return {"value": canonical_quantity(value, binary=name == "memory")}


def _counters(values: Mapping[str, int]) -> JsonDict:
    return {name: _quantity(name, values[name]) for name in sorted(values, key=natural_key)}


def _capacity(device: AllocatableDevice, name: str) -> JsonDict:
    out = _quantity(name, device.capacity[name])
    policy = device.request_policies.get(name)
    if policy is not None:
        valid: JsonDict = {"min": _quantity(name, policy.min)["value"]}
        if policy.max is not None:
            valid["max"] = _quantity(name, policy.max)["value"]
        if policy.step is not None:
            valid["step"] = _quantity(name, policy.step)["value"]
        out["requestPolicy"] = {"default": _quantity(name, policy.default)["value"], "validRange": valid}
    return out


def encode_device(device: AllocatableDevice, taints: Sequence[Any] = ()) -> JsonDict:
    """One ``spec.devices[]`` entry; empty maps are left out as the server would leave them out.

    ``taints`` are :class:`driver.taints.DeviceTaint` values (anything with ``to_dict``).
    """
    out: JsonDict = {"name": device.name}
    if device.attributes:
        out["attributes"] = {k: encode_attribute(device.attributes[k]) for k in sorted(device.attributes)}
    if device.allow_multiple_allocations:
        out["allowMultipleAllocations"] = True
    if device.capacity:
        out["capacity"] = {k: _capacity(device, k) for k in sorted(device.capacity)}
    if device.consumes_counters:
        out["consumesCounters"] = [
            {"counterSet": c.counter_set, "counters": _counters(c.counters)} for c in device.consumes_counters
        ]
    if taints:
        out["taints"] = [t.to_dict() for t in taints]
    return out


def encode_counter_set(counter_set: CounterSet) -> JsonDict:
    """One ``spec.sharedCounters[]`` entry."""
    return {"name": counter_set.name, "counters": _counters(counter_set.counters)}


# -- layout --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SliceContent:
    devices: tuple[AllocatableDevice, ...] = ()
    counter_sets: tuple[CounterSet, ...] = ()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _gpu_order(devices: Iterable[AllocatableDevice]) -> list[str]:
    """GPU UUIDs by PCI bus id (then minor), as NVIDIA's driver orders its per-GPU slices."""
    keys: dict[str, tuple[bool, str, int]] = {}
    for device in devices:
        bus = device.attributes.get("resource.kubernetes.io/pciBusID")
        key = (not isinstance(bus, str), bus.lower() if isinstance(bus, str) else "", device.gpu_minor)
        if device.gpu_uuid not in keys or key < keys[device.gpu_uuid]:
            keys[device.gpu_uuid] = key
    return sorted(keys, key=lambda uuid: keys[uuid])


def _layout(inventory: Inventory, server_minor: int, taintable: bool = False) -> list[_SliceContent]:
    # Taints may come and go with health; with taintable the layout uses the lower device limit
    # from the start, so a taint never reshuffles the pool (>= 1.35 counts taints in that rule).
    small = taintable and server_minor >= SPLIT_LAYOUT_MIN_MINOR
    by_name = sorted(inventory.devices, key=lambda d: natural_key(d.name))
    if not inventory.counter_sets:
        limit = MAX_DEVICES_PER_SLICE_WITH_COUNTERS if small else MAX_DEVICES_PER_SLICE
        return [_SliceContent(devices=tuple(chunk)) for chunk in _chunks(by_name, limit)]

    per_gpu: dict[str, list[AllocatableDevice]] = {}
    for device in by_name:
        per_gpu.setdefault(device.gpu_uuid, []).append(device)
    gpus = _gpu_order(inventory.devices)

    if server_minor >= SPLIT_LAYOUT_MIN_MINOR:
        contents = [
            _SliceContent(counter_sets=tuple(chunk))
            for chunk in _chunks(inventory.counter_sets, MAX_COUNTER_SETS_PER_SLICE)
        ]
        for uuid in gpus:
            devices = per_gpu[uuid]
            limit = (
                MAX_DEVICES_PER_SLICE_WITH_COUNTERS
                if small or any(d.consumes_counters for d in devices)
                else MAX_DEVICES_PER_SLICE
            )
            contents.extend(_SliceContent(devices=tuple(chunk)) for chunk in _chunks(devices, limit))
        return contents

    # Before 1.35 a device may only consume counters of its own slice: one slice per GPU holding
    # its counter set(s) and all its devices (validation reports a GPU with more than 64).
    sets_by_name = {cs.name: cs for cs in inventory.counter_sets}
    placed: set[str] = set()
    contents = []
    for uuid in gpus:
        wanted: list[CounterSet] = []
        for device in per_gpu[uuid]:
            for consumption in device.consumes_counters:
                cs = sets_by_name.get(consumption.counter_set)
                if cs is not None and cs.name not in placed:
                    placed.add(cs.name)
                    wanted.append(cs)
        contents.append(_SliceContent(devices=tuple(per_gpu[uuid]), counter_sets=tuple(wanted)))
    orphans = [cs for cs in inventory.counter_sets if cs.name not in placed]
    contents.extend(
        _SliceContent(counter_sets=tuple(chunk)) for chunk in _chunks(orphans, MAX_COUNTER_SETS_PER_SLICE)
    )
    return contents


def build_slices(
    inventory: Inventory,
    node_name: str,
    driver: str,
    node_uid: str,
    server_minor: int,
    *,
    pool_generation: int = 0,
    taints: Mapping[str, Sequence[Any]] | None = None,
    taintable: bool = False,
) -> list[JsonDict]:
    """The ResourceSlice objects (resource.k8s.io/v1, dicts) that publish ``inventory`` for one node.

    One pool named after the node. Without counter sets: all devices in natural name order, 128
    per slice. With counter sets: on ``server_minor`` >= 35 counters-only slice(s) (8 sets each)
    and then each GPU's devices (PCI bus order, 64 per slice); before 1.35 one slice per GPU with
    its counter set and devices. ``node_uid`` "" leaves the owner reference out (for checks
    before the Node is known). ``taints`` maps device names to their taints; ``taintable`` says
    taints may appear (the layout then keeps to the taint limit from the start). Slices are not
    validated here: see :func:`validate_pool`.
    """
    contents = _layout(inventory, server_minor, taintable or bool(taints))
    taints = taints or {}
    count = len(contents)
    slices = []
    for index, content in enumerate(contents):
        spec: JsonDict = {
            "driver": driver,
            "pool": {"name": node_name, "generation": pool_generation, "resourceSliceCount": count},
            "nodeName": node_name,
        }
        if content.counter_sets:
            spec["sharedCounters"] = [encode_counter_set(cs) for cs in content.counter_sets]
        if content.devices:
            spec["devices"] = [encode_device(d, taints.get(d.name, ())) for d in content.devices]
        metadata: JsonDict = {"generateName": generate_name(index, count, driver, node_name)}
        if node_uid:
            metadata["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid, "controller": True}
            ]
        slices.append(
            {"apiVersion": API_VERSION, "kind": "ResourceSlice", "metadata": metadata, "spec": spec}
        )
    return slices


# -- quantities ----------------------------------------------------------------------------------


def parse_quantity(text: object) -> Fraction:
    """A Kubernetes resource.Quantity string as an exact number (``"40Gi"``, ``"1k"``, ``"42949672960"``)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise TypeError(f"quantity must be a string, got {text!r}")
    match = _QUANTITY.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 42949672960, 40Gi, 1k)")
    sign, number, suffix = match.group(1), match.group(2), match.group(3) or ""
    value = Fraction(number)
    if suffix in _BINARY_SUFFIX:
        value *= 1024 ** _BINARY_SUFFIX[suffix]
    elif suffix in _DECIMAL_SUFFIX:
        value *= Fraction(10) ** _DECIMAL_SUFFIX[suffix]
    else:
        value *= Fraction(10) ** int(suffix[1:])
    return -value if sign == "-" else value


# -- validation ----------------------------------------------------------------------------------


def _fail(where: str, rule: str) -> SliceValidationError:
    return SliceValidationError(
        f"ResourceSlice {where}: {rule}; the API server would reject it - fix the inventory "
        "(discovery) rather than trimming the slice"
    )


def _slice_label(resource_slice: Mapping[str, Any]) -> str:
    metadata = resource_slice.get("metadata") or {}
    return str(metadata.get("name") or metadata.get("generateName") or "<unnamed>")


def _check_dns_label(where: str, what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"{what} is required (a DNS-1123 label)")
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise _fail(
            where, f"{what} {value!r} must be a DNS-1123 label (lower-case a-z0-9 and '-', <= 63 chars)"
        )


def _check_dns_subdomain(where: str, what: str, value: object, max_length: int = 253) -> None:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"{what} is required (a DNS-1123 subdomain)")
    if len(value) > max_length or not _DNS_SUBDOMAIN.match(value):
        raise _fail(
            where,
            f"{what} {value!r} must be a DNS-1123 subdomain (lower-case a-z0-9, '-' and '.', "
            f"<= {max_length} chars)",
        )


def _check_qualified_name(where: str, what: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise _fail(where, f"{what} must be a non-empty qualified name")
    parts = name.split("/")
    if len(parts) > 2:
        raise _fail(where, f"{what} {name!r} has more than one '/' (qualified name: [domain/]identifier)")
    identifier = parts[-1]
    if len(parts) == 2:
        domain = parts[0]
        if not domain:
            raise _fail(where, f"{what} {name!r} has an empty domain before '/'")
        if len(domain) > MAX_DOMAIN_LENGTH or not _DNS_SUBDOMAIN.match(domain):
            raise _fail(
                where,
                f"{what} {name!r}: domain {domain!r} must be a DNS subdomain of <= {MAX_DOMAIN_LENGTH} chars",
            )
    if not identifier:
        raise _fail(where, f"{what} {name!r} has an empty identifier")
    if len(identifier) > MAX_ID_LENGTH:
        raise _fail(where, f"{what} {name!r}: identifier longer than {MAX_ID_LENGTH} chars")
    if not _C_IDENTIFIER.match(identifier):
        raise _fail(where, f"{what} {name!r}: identifier must be a C identifier ([A-Za-z_][A-Za-z0-9_]*)")


def _check_quantity(where: str, what: str, holder: object) -> None:
    if not isinstance(holder, Mapping) or "value" not in holder:
        raise _fail(where, f"{what} needs a 'value' (a Kubernetes quantity)")
    try:
        parse_quantity(holder["value"])
    except (ValueError, TypeError) as exc:
        raise _fail(where, f"{what}: {exc}") from exc


def _check_string(where: str, what: str, value: object) -> None:
    if not isinstance(value, str):
        raise _fail(where, f"{what} must be a string")
    if len(value.encode()) > MAX_STRING_LENGTH:
        raise _fail(
            where, f"{what} is {len(value.encode())} bytes, more than the {MAX_STRING_LENGTH} allowed"
        )


def _check_version(where: str, what: str, value: object) -> None:
    if not isinstance(value, str) or len(value) > MAX_STRING_LENGTH or not _SEMVER.match(value):
        raise _fail(
            where, f"{what} {value!r} must be a semantic version 2.0.0 of <= {MAX_STRING_LENGTH} chars"
        )


def _check_attribute(where: str, name: str, value: object) -> int:
    """Validate one attribute value; returns how many values it counts for."""
    what = f"attribute {name!r}"
    if not isinstance(value, Mapping):
        raise _fail(where, f"{what} must be an object with one of {_ATTRIBUTE_TYPES}")
    kinds = [k for k in (*_ATTRIBUTE_TYPES, *_LIST_ATTRIBUTE_TYPES) if value.get(k) is not None]
    if len(kinds) != 1:
        raise _fail(where, f"{what} must set exactly one of {_ATTRIBUTE_TYPES}, has {kinds or 'none'}")
    kind = kinds[0]
    raw = value[kind]
    items = raw if kind in _LIST_ATTRIBUTE_TYPES else [raw]
    if kind in _LIST_ATTRIBUTE_TYPES and (not isinstance(raw, list) or not raw):
        raise _fail(where, f"{what}: list value {kind!r} must be a non-empty list")
    for item in items:
        if kind in ("int", "ints") and (isinstance(item, bool) or not isinstance(item, int)):
            raise _fail(where, f"{what} must be an int64")
        if kind in ("int", "ints") and not -(2**63) <= item < 2**63:
            raise _fail(where, f"{what} {item} does not fit an int64")
        if kind in ("bool", "bools") and not isinstance(item, bool):
            raise _fail(where, f"{what} must be a bool")
        if kind in ("string", "strings"):
            _check_string(where, what, item)
        if kind in ("version", "versions"):
            _check_version(where, what, item)
    return len(items)


def _check_counters(where: str, what: str, counters: object) -> None:
    if not isinstance(counters, Mapping) or not counters:
        raise _fail(where, f"{what} must have at least 1 counter")
    if len(counters) > MAX_COUNTERS_PER_SET:
        raise _fail(
            where, f"{what} has {len(counters)} counters, more than the {MAX_COUNTERS_PER_SET} allowed"
        )
    for counter, holder in counters.items():
        _check_dns_label(where, f"{what} counter name", counter)
        _check_quantity(where, f"{what} counter {counter!r}", holder)


def _uses_extended_device_limit(device: Mapping[str, Any], server_minor: int = NEWEST_KNOWN_MINOR) -> bool:
    # Taints joined the 64-device rule in 1.35; counters (and list values) count on 1.34 already.
    if device.get("consumesCounters") or (device.get("taints") and server_minor >= SPLIT_LAYOUT_MIN_MINOR):
        return True
    attributes = device.get("attributes") or {}
    return any(
        isinstance(v, Mapping) and any(v.get(k) is not None for k in _LIST_ATTRIBUTE_TYPES)
        for v in attributes.values()
    )


def _check_device(where: str, device: object, per_device_node_selection: bool) -> None:
    if not isinstance(device, Mapping):
        raise _fail(where, "every device must be an object")
    name = device.get("name")
    _check_dns_label(where, "device name", name)
    at = f"{where} device {name!r}"
    attributes = device.get("attributes") or {}
    capacity = device.get("capacity") or {}
    if len(attributes) + len(capacity) > MAX_ATTRIBUTES_AND_CAPACITIES:
        raise _fail(
            at,
            f"has {len(attributes)} attributes + {len(capacity)} capacities, more than the "
            f"{MAX_ATTRIBUTES_AND_CAPACITIES} allowed per device",
        )
    _check_device_values(at, device, attributes, capacity)
    _check_device_consumption(at, device.get("consumesCounters") or [])
    _check_device_taints(at, device.get("taints") or [])
    _check_device_node_selection(at, device, per_device_node_selection)


def _check_device_values(
    at: str, device: Mapping[str, Any], attributes: Mapping[str, Any], capacity: Mapping[str, Any]
) -> None:
    values = 0
    for key, value in attributes.items():
        _check_qualified_name(at, "attribute name", key)
        values += _check_attribute(at, key, value)
    if values > MAX_ATTRIBUTE_VALUES:
        raise _fail(at, f"has {values} attribute values, more than the {MAX_ATTRIBUTE_VALUES} allowed")
    for key, holder in capacity.items():
        _check_qualified_name(at, "capacity name", key)
        _check_quantity(at, f"capacity {key!r}", holder)
        if (
            isinstance(holder, Mapping)
            and holder.get("requestPolicy")
            and not device.get("allowMultipleAllocations")
        ):
            raise _fail(
                at, f"capacity {key!r} has a requestPolicy, allowed only with allowMultipleAllocations"
            )
        if isinstance(holder, Mapping) and holder.get("requestPolicy"):
            _check_request_policy(at, key, holder)


def _check_request_policy(at: str, key: str, holder: Mapping[str, Any]) -> None:
    """The API server's validRange rules (resource/validation ``validateRequestPolicyRange``)."""
    what = f"capacity {key!r} requestPolicy"
    policy = holder["requestPolicy"]
    valid = policy.get("validRange") if isinstance(policy, Mapping) else None
    if not isinstance(valid, Mapping) or "default" not in policy or "min" not in valid:
        raise _fail(at, f"{what} needs default and validRange.min (the only policy form this driver writes)")
    try:
        value = parse_quantity(holder["value"])
        default = parse_quantity(policy["default"])
        low = parse_quantity(valid["min"])
        high = parse_quantity(valid["max"]) if "max" in valid else None
        step = parse_quantity(valid["step"]) if "step" in valid else None
    except (ValueError, TypeError) as exc:
        raise _fail(at, f"{what}: {exc}") from exc
    if not 0 <= low <= value:
        raise _fail(at, f"{what}: min {low} must be between 0 and the capacity {value}")
    if default < low or (high is not None and not low <= default <= high <= value):
        raise _fail(
            at, f"{what}: need min <= default <= max <= capacity, have {low}, {default}, {high}, {value}"
        )
    if step is not None:
        if step <= 0 or low + step > value:
            raise _fail(at, f"{what}: step {step} must be > 0 and min + step <= capacity {value}")
        for name, amount in (("default", default), ("max", high)):
            if amount is not None and (amount - low) % step:
                raise _fail(at, f"{what}: {name} {amount} is not min {low} plus a multiple of step {step}")


def _check_device_consumption(at: str, consumes: Sequence[Any]) -> None:
    if len(consumes) > MAX_CONSUMES_COUNTERS:
        raise _fail(
            at, f"consumesCounters has {len(consumes)} entries, more than the {MAX_CONSUMES_COUNTERS} allowed"
        )
    seen_sets: set[str] = set()
    for consumption in consumes:
        counter_set = consumption.get("counterSet") if isinstance(consumption, Mapping) else None
        _check_dns_label(at, "consumesCounters counterSet", counter_set)
        if counter_set in seen_sets:
            raise _fail(at, f"consumesCounters names counter set {counter_set!r} twice (must be unique)")
        seen_sets.add(str(counter_set))
        _check_counters(at, f"consumesCounters[{counter_set}]", consumption.get("counters"))


def _check_device_taints(at: str, taints: Sequence[Any]) -> None:
    if len(taints) > MAX_TAINTS:
        raise _fail(at, f"has {len(taints)} taints, more than the {MAX_TAINTS} allowed")
    for taint in taints:
        if not isinstance(taint, Mapping) or not taint.get("key"):
            raise _fail(at, "every taint needs a key")
        if taint.get("effect") not in ("NoSchedule", "NoExecute", "None"):
            raise _fail(at, f"taint effect {taint.get('effect')!r} must be NoSchedule, NoExecute or None")


def _check_device_node_selection(at: str, device: Mapping[str, Any], per_device_node_selection: bool) -> None:
    selection = [
        f for f in ("nodeName", "nodeSelector", "allNodes") if device.get(f) not in (None, False, "")
    ]
    if per_device_node_selection and len(selection) != 1:
        raise _fail(
            at,
            f"with perDeviceNodeSelection each device sets exactly one of nodeName/nodeSelector/"
            f"allNodes, has {selection or 'none'}",
        )
    if not per_device_node_selection and selection:
        raise _fail(at, f"sets {selection} but the slice has no perDeviceNodeSelection")


def _check_node_selection(where: str, spec: Mapping[str, Any]) -> None:
    chosen = [f for f in _NODE_SELECTION_FIELDS if spec.get(f) is not None]
    if len(chosen) != 1:
        raise _fail(
            where,
            f"exactly one of {', '.join(_NODE_SELECTION_FIELDS)} must be set, found {chosen or 'none'}",
        )
    field = chosen[0]
    value = spec[field]
    if field == "nodeName":
        _check_dns_subdomain(where, "spec.nodeName", value)
    elif field == "nodeSelector":
        terms = value.get("nodeSelectorTerms") if isinstance(value, Mapping) else None
        if not isinstance(terms, list) or len(terms) != 1:
            raise _fail(where, "spec.nodeSelector must have exactly one nodeSelectorTerms entry")
    elif value is not True:
        raise _fail(where, f"spec.{field} may only be true (or unset), got {value!r}")


def validate_slice(resource_slice: Mapping[str, Any], server_minor: int = NEWEST_KNOWN_MINOR) -> None:
    """Raise :class:`SliceValidationError` naming the field and limit if the API server would reject this.

    Checks the rules of resource.k8s.io/v1 ResourceSlice validation (kubelet-dra-protocol.md
    4.1-4.3). ``server_minor`` < 35 allows counters and devices in one slice (the older layout).
    """
    where = _slice_label(resource_slice)
    _check_metadata(where, resource_slice.get("metadata") or {})
    spec = resource_slice.get("spec")
    if not isinstance(spec, Mapping):
        raise _fail(where, "spec is required")
    driver = spec.get("driver")
    # The server checks the driver name case-insensitively (lower-case is still what drivers use).
    _check_dns_subdomain(
        where, "spec.driver", driver.lower() if isinstance(driver, str) else driver, MAX_DRIVER_NAME_LENGTH
    )
    _check_pool_field(where, spec.get("pool"))
    _check_node_selection(where, spec)
    devices = spec.get("devices") or []
    counter_sets = spec.get("sharedCounters") or []
    if devices and counter_sets and server_minor >= SPLIT_LAYOUT_MIN_MINOR:
        raise _fail(where, "only one of spec.devices and spec.sharedCounters may be set (Kubernetes >= 1.35)")
    _check_devices(where, devices, spec.get("perDeviceNodeSelection") is True, server_minor)
    _check_shared_counters(where, counter_sets, server_minor)
    if server_minor < SPLIT_LAYOUT_MIN_MINOR:
        _check_alpha_counter_totals(where, devices, counter_sets)


# Kubernetes 1.34 (partitionable devices alpha) limits counters per slice in total, not per set.
ALPHA_MAX_SHARED_COUNTERS_PER_SLICE = 32
ALPHA_MAX_COUNTERS_PER_DEVICE = 32
ALPHA_MAX_DEVICE_COUNTERS_PER_SLICE = 1024


def _check_alpha_counter_totals(where: str, devices: Sequence[Any], counter_sets: Sequence[Any]) -> None:
    """The pre-1.35 totals: shared counters summed over all sets, and counters consumed by devices."""
    shared = sum(len((c or {}).get("counters") or {}) for c in counter_sets if isinstance(c, Mapping))
    if shared > ALPHA_MAX_SHARED_COUNTERS_PER_SLICE:
        raise _fail(
            where,
            f"has {shared} shared counters in all its sets, more than the "
            f"{ALPHA_MAX_SHARED_COUNTERS_PER_SLICE} a Kubernetes < 1.35 API server allows per slice",
        )
    in_slice = 0
    for device in devices:
        if not isinstance(device, Mapping):
            continue
        used = sum(
            len((c or {}).get("counters") or {})
            for c in device.get("consumesCounters") or []
            if isinstance(c, Mapping)
        )
        if used > ALPHA_MAX_COUNTERS_PER_DEVICE:
            raise _fail(
                where,
                f"device {device.get('name')!r} consumes {used} counters, more than the "
                f"{ALPHA_MAX_COUNTERS_PER_DEVICE} a Kubernetes < 1.35 API server allows",
            )
        in_slice += used
    if in_slice > ALPHA_MAX_DEVICE_COUNTERS_PER_SLICE:
        raise _fail(
            where,
            f"devices consume {in_slice} counters in total, more than the "
            f"{ALPHA_MAX_DEVICE_COUNTERS_PER_SLICE} a Kubernetes < 1.35 API server allows per slice",
        )


def _check_metadata(where: str, metadata: Mapping[str, Any]) -> None:
    if metadata.get("name"):
        _check_dns_subdomain(where, "metadata.name", metadata["name"])
    elif metadata.get("generateName"):
        # The server appends 5 characters from [a-z0-9] to at most 58 of these.
        _check_dns_subdomain(
            where, "metadata.generateName", str(metadata["generateName"])[:MAX_GENERATE_NAME_BASE] + "x"
        )
    else:
        raise _fail(where, "metadata.name or metadata.generateName is required")


def _check_pool_field(where: str, pool: object) -> None:
    if not isinstance(pool, Mapping):
        raise _fail(where, "spec.pool is required")
    pool_name = pool.get("name")
    if not isinstance(pool_name, str) or not pool_name:
        raise _fail(where, "spec.pool.name is required")
    if len(pool_name) > MAX_POOL_NAME_LENGTH:
        raise _fail(where, f"spec.pool.name is longer than {MAX_POOL_NAME_LENGTH} chars")
    for part in pool_name.split("/"):
        _check_dns_subdomain(where, f"spec.pool.name segment of {pool_name!r}", part)
    generation = pool.get("generation")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise _fail(where, f"spec.pool.generation must be an integer >= 0, got {generation!r}")
    count = pool.get("resourceSliceCount")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise _fail(where, f"spec.pool.resourceSliceCount must be an integer > 0, got {count!r}")


def _check_devices(where: str, devices: Sequence[Any], per_device: bool, server_minor: int) -> None:
    limit = (
        MAX_DEVICES_PER_SLICE_WITH_COUNTERS
        if any(isinstance(d, Mapping) and _uses_extended_device_limit(d, server_minor) for d in devices)
        else MAX_DEVICES_PER_SLICE
    )
    if len(devices) > limit:
        why = (
            " (devices with taints, consumesCounters or list attributes)"
            if limit < MAX_DEVICES_PER_SLICE
            else ""
        )
        raise _fail(where, f"has {len(devices)} devices, more than the {limit} allowed per slice{why}")
    names: set[str] = set()
    for device in devices:
        _check_device(where, device, per_device)
        if device["name"] in names:
            raise _fail(where, f"device name {device['name']!r} appears twice (names must be unique)")
        names.add(device["name"])


def _check_shared_counters(where: str, counter_sets: Sequence[Any], server_minor: int) -> None:
    if len(counter_sets) > MAX_COUNTER_SETS_PER_SLICE and server_minor >= SPLIT_LAYOUT_MIN_MINOR:
        raise _fail(
            where,
            f"has {len(counter_sets)} sharedCounters sets, more than the "
            f"{MAX_COUNTER_SETS_PER_SLICE} allowed",
        )
    set_names: set[str] = set()
    for counter_set in counter_sets:
        name = counter_set.get("name") if isinstance(counter_set, Mapping) else None
        _check_dns_label(where, "sharedCounters name", name)
        if name in set_names:
            raise _fail(where, f"sharedCounters name {name!r} appears twice (names must be unique)")
        set_names.add(str(name))
        _check_counters(where, f"sharedCounters {name!r}", counter_set.get("counters"))


def validate_pool(slices: Sequence[Mapping[str, Any]], server_minor: int = NEWEST_KNOWN_MINOR) -> None:
    """Validate every slice, then the pool-wide rules the allocator relies on.

    Device and counter-set names unique across the pool; every consumed counter set and counter
    exists (in the same slice before 1.35); all slices agree on pool name, generation and count.
    """
    for resource_slice in slices:
        validate_slice(resource_slice, server_minor)
    if not slices:
        return
    pools = {
        (s["spec"]["pool"]["name"], s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"])
        for s in slices
    }
    if len(pools) != 1:
        raise _fail("pool", f"slices disagree on pool name/generation/resourceSliceCount: {sorted(pools)}")
    (pool_name, _, count) = next(iter(pools))
    if count != len(slices):
        raise _fail(
            f"pool {pool_name!r}", f"resourceSliceCount is {count} but the pool has {len(slices)} slices"
        )
    device_owner: dict[str, str] = {}
    counter_sets: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for resource_slice in slices:
        label = _slice_label(resource_slice)
        for counter_set in resource_slice["spec"].get("sharedCounters") or []:
            if counter_set["name"] in counter_sets:
                raise _fail(
                    label,
                    f"counter set {counter_set['name']!r} is also in another slice (unique in the pool)",
                )
            counter_sets[counter_set["name"]] = (label, counter_set["counters"])
    for resource_slice in slices:
        label = _slice_label(resource_slice)
        for device in resource_slice["spec"].get("devices") or []:
            if device["name"] in device_owner:
                raise _fail(
                    label, f"device name {device['name']!r} is also in another slice (unique in the pool)"
                )
            device_owner[device["name"]] = label
            _check_counter_references(label, device, counter_sets, server_minor)


def _check_counter_references(
    label: str,
    device: Mapping[str, Any],
    counter_sets: Mapping[str, tuple[str, Mapping[str, Any]]],
    server_minor: int,
) -> None:
    for consumption in device.get("consumesCounters") or []:
        found = counter_sets.get(consumption["counterSet"])
        if found is None:
            raise _fail(
                label,
                f"device {device['name']!r} consumes counter set {consumption['counterSet']!r} "
                "which no slice of the pool defines",
            )
        if server_minor < SPLIT_LAYOUT_MIN_MINOR and found[0] != label:
            raise _fail(
                label,
                f"device {device['name']!r} consumes counter set {consumption['counterSet']!r} from "
                "another slice; before Kubernetes 1.35 it must be in the same slice",
            )
        missing = sorted(set(consumption["counters"]) - set(found[1]))
        if missing:
            raise _fail(
                label,
                f"device {device['name']!r} consumes counters {missing} that counter set "
                f"{consumption['counterSet']!r} does not define",
            )


# -- comparison ----------------------------------------------------------------------------------


def _prune(value: Any) -> Any:
    """Drop None, empty maps/lists and false node-selection flags: the server omits them."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            pruned = _prune(item)
            if pruned is None or pruned in ({}, []):
                continue
            if key in ("allNodes", "perDeviceNodeSelection") and pruned is False:
                continue
            out[key] = pruned
        return out
    if isinstance(value, list):
        return [_prune(item) for item in value]
    return value


def _canonical_quantity(text: Any) -> Any:
    try:
        return str(parse_quantity(text))
    except (ValueError, TypeError):
        return text


def _canonical_quantities(holders: Any) -> Any:
    if not isinstance(holders, Mapping):
        return holders
    out = {}
    for key, holder in holders.items():
        out[key] = holder
        if isinstance(holder, Mapping) and "value" in holder:
            out[key] = {**holder, "value": _canonical_quantity(holder["value"])}
            policy = holder.get("requestPolicy")
            if isinstance(policy, Mapping):
                canonical = {k: _canonical_quantity(v) for k, v in policy.items() if k != "validRange"}
                valid = policy.get("validRange")
                if isinstance(valid, Mapping):
                    canonical["validRange"] = {k: _canonical_quantity(v) for k, v in valid.items()}
                if isinstance(policy.get("validValues"), list):
                    canonical["validValues"] = [_canonical_quantity(v) for v in policy["validValues"]]
                out[key]["requestPolicy"] = canonical
    return out


def comparable_spec(resource_slice: Mapping[str, Any]) -> JsonDict:
    """The slice's spec without ``pool``, in a form where equal meaning gives equal JSON.

    Quantities compare by value (the server may store ``1000`` as ``1k``); empty fields vanish.
    """
    spec = copy.deepcopy(dict(resource_slice.get("spec") or {}))
    spec.pop("pool", None)
    for device in spec.get("devices") or []:
        if "capacity" in device:
            device["capacity"] = _canonical_quantities(device["capacity"])
        for consumption in device.get("consumesCounters") or []:
            consumption["counters"] = _canonical_quantities(consumption.get("counters"))
        for taint in device.get("taints") or []:
            taint.pop("timeAdded", None)
    for counter_set in spec.get("sharedCounters") or []:
        counter_set["counters"] = _canonical_quantities(counter_set.get("counters"))
    pruned: JsonDict = _prune(spec)
    return pruned


def _fingerprint(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def dropped_fields(sent: Mapping[str, Any], stored: Mapping[str, Any]) -> tuple[str, ...]:
    """Field paths in ``sent`` but missing from ``stored``, e.g. ``spec.devices[].consumesCounters``."""
    found: set[str] = set()

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, Mapping):
            b_map = b if isinstance(b, Mapping) else {}
            for key, item in a.items():
                if key not in b_map:
                    found.add(f"{path}.{key}")
                else:
                    walk(item, b_map[key], f"{path}.{key}")
        elif isinstance(a, list) and isinstance(b, list):
            for item_a, item_b in zip(a, b, strict=False):
                walk(item_a, item_b, f"{path}[]")

    walk(comparable_spec(sent), comparable_spec(stored), "spec")
    return tuple(sorted(found))


def _pool(resource_slice: Mapping[str, Any]) -> Mapping[str, Any]:
    pool = (resource_slice.get("spec") or {}).get("pool") or {}
    return pool if isinstance(pool, Mapping) else {}


def _node_owners(resource_slice: Mapping[str, Any]) -> list[str]:
    refs = (resource_slice.get("metadata") or {}).get("ownerReferences") or []
    return sorted(str(r.get("uid")) for r in refs if isinstance(r, Mapping) and r.get("kind") == "Node")


def _with_generation(resource_slice: JsonDict, generation: int) -> JsonDict:
    out = copy.deepcopy(resource_slice)
    out["spec"]["pool"]["generation"] = generation
    return out


def keep_time_added(stored: Mapping[str, Any], body: JsonDict) -> None:
    """Copy ``timeAdded`` of taints that stay (same device, key, value, effect) into ``body``.

    The API server stamps a taint sent without it; re-sending a slice must not make an old taint
    look new (tolerationSeconds count from it), as the Go helper preserves it too.
    """
    times: dict[tuple[str, str, str, str], str] = {}
    for device in (stored.get("spec") or {}).get("devices") or []:
        for taint in device.get("taints") or []:
            if taint.get("timeAdded"):
                key = (device["name"], taint.get("key", ""), taint.get("value", ""), taint.get("effect", ""))
                times[key] = taint["timeAdded"]
    for device in body["spec"].get("devices") or []:
        for taint in device.get("taints") or []:
            key = (device["name"], taint.get("key", ""), taint.get("value", ""), taint.get("effect", ""))
            if key in times and not taint.get("timeAdded"):
                taint["timeAdded"] = times[key]


# -- pool sync plan ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """The writes that bring the stored pool to the desired one, in the order they must happen."""

    generation: int
    deletes: tuple[JsonDict, ...]
    updates: tuple[tuple[JsonDict, JsonDict], ...]  # (stored, desired)
    creates: tuple[JsonDict, ...]

    @property
    def writes(self) -> int:
        """How many API writes the plan makes (0: the pool is as desired)."""
        return len(self.deletes) + len(self.updates) + len(self.creates)


def plan_sync(
    stored: Sequence[JsonDict],
    desired: Sequence[JsonDict],
    pool_name: str,
    same: Callable[[JsonDict, JsonDict], bool] | None = None,
    driver_generation: int = 0,
) -> SyncPlan:
    """Apply the Go helper's pool rules (kubelet-dra-protocol.md 7.2) to ``stored`` vs ``desired``.

    Slices of other pools, of an older generation, or whose index prefix is unparsable,
    duplicated or beyond the desired count are obsolete. The generation stays when nothing is
    created and at most one slice changes; else it is bumped (or set to ``driver_generation``
    when that is higher) and every kept slice is rewritten with it. ``same(stored, desired)``
    decides whether a slice changed (default: equal pool and :func:`comparable_spec`).
    """
    equal = same or (lambda a, b: _pool(a) == _pool(b) and comparable_spec(a) == comparable_spec(b))
    ours = [s for s in stored if _pool(s).get("name") == pool_name]
    deletes = [s for s in stored if _pool(s).get("name") != pool_name]
    current = max((int(_pool(s).get("generation") or 0) for s in ours), default=0)

    candidates: dict[int, list[JsonDict]] = {}
    for resource_slice in sorted(ours, key=lambda s: str(s["metadata"].get("name", ""))):
        index = slice_index(str(resource_slice["metadata"].get("name", "")))
        if (
            int(_pool(resource_slice).get("generation") or 0) < current
            or index is None
            or index >= len(desired)
        ):
            deletes.append(resource_slice)
        else:
            candidates.setdefault(index, []).append(resource_slice)

    def at(index: int, generation: int) -> JsonDict:
        return _with_generation(desired[index], generation)

    matched: dict[int, JsonDict] = {}
    for index, group in candidates.items():
        keep = next((s for s in group if equal(s, at(index, current))), group[0])
        matched[index] = keep
        deletes.extend(s for s in group if s is not keep)

    missing = [i for i in range(len(desired)) if i not in matched]
    changed = [i for i, s in sorted(matched.items()) if not equal(s, at(i, current))]
    if driver_generation > current:
        generation = driver_generation
    elif not missing and len(changed) <= 1:
        generation = current
    else:
        generation = current + 1
    rewrite = sorted(matched) if generation != current else changed
    return SyncPlan(
        generation=generation,
        deletes=tuple(deletes),
        updates=tuple((matched[i], at(i, generation)) for i in rewrite),
        creates=tuple(at(i, generation) for i in missing),
    )


# -- publisher -----------------------------------------------------------------------------------


class SliceWatchHandle(Protocol):
    """A running watch: iterate for ``{"type", "object"}`` events; ``close()`` from any thread."""

    def __iter__(self) -> Iterator[JsonDict]: ...

    def close(self) -> None: ...


class SliceApi(Protocol):
    """The calls the publisher makes (``driver.kube.Kube`` provides them)."""

    def server_version(self) -> tuple[int, int]: ...

    def get_node(self, name: str) -> JsonDict: ...

    def list_slices_at(self, driver: str, node: str) -> tuple[list[JsonDict], str]: ...

    def create_slice(self, resource_slice: JsonDict, *, dry_run: bool = False) -> JsonDict: ...

    def update_slice(self, resource_slice: JsonDict) -> JsonDict: ...

    def delete_slice(self, name: str, uid: str, resource_version: str) -> None: ...

    def watch_slices(
        self, driver: str, node: str, resource_version: str = "", timeout_s: int = 300
    ) -> SliceWatchHandle: ...


#: Longest wait between two attempts of a failing sync or watch. Short on purpose: after an API
#: server outage the node's slices (deleted meanwhile by whoever cleans up) come back within a few
#: seconds of the server; the client-side rate limit keeps the retries gentle.
BACKOFF_MAX_S = 5.0


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """The wait before retry number ``failures`` (1 = after the first failure), without jitter."""
    return min(max_s, initial_s * float(2 ** min(failures - 1, 62)))


class SlicePublisher:
    """Keeps this node's pool of ResourceSlices equal to the inventory, in a background thread.

    Args:
        kube: the API facade.
        node_name, driver_name: whose pool (pool name = node name).
        resync_delay_s: how long after a change behind our back (a watch event we did not cause)
            the pool is re-synced; events within that window are coalesced.
        on_dropped_fields: called once per newly seen set of fields the server dropped from what
            we wrote (partitionable fields on a server without the gate), with the field paths.
        backoff_initial_s, backoff_max_s: retry spacing after a failed sync (doubling, jittered).
        taintable: device taints may be published (:meth:`set_taints`); the layout keeps to the
            taint limit of 64 devices per slice from the start.
        on_sync: called after every sync attempt that wrote or tried to write, with its error
            (None on success); for metrics.
    """

    def __init__(
        self,
        kube: SliceApi,
        node_name: str,
        driver_name: str,
        *,
        resync_delay_s: float = 1.0,
        on_dropped_fields: Callable[[tuple[str, ...]], None] | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = BACKOFF_MAX_S,
        watch_timeout_s: int = 300,
        taintable: bool = False,
        on_sync: Callable[[Exception | None], None] | None = None,
    ) -> None:
        self._kube = kube
        self._taintable = taintable
        self._taints: Mapping[str, Sequence[Any]] = {}
        self._on_sync = on_sync
        #: Sync attempts and failed ones by error type, since start (read by the metrics).
        self.sync_attempts = 0
        self.sync_errors: dict[str, int] = {}
        self._node = node_name
        self._driver = driver_name
        self._resync_delay = resync_delay_s
        self._on_dropped = on_dropped_fields
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._watch_timeout = watch_timeout_s

        self._cond = threading.Condition()
        self._stopping = False
        self._inventory: Inventory | None = None
        self._inventory_version = 0
        self._synced_version = -1
        self._due: float | None = None
        self._not_before = 0.0
        self._running = False
        self._failures = 0
        self._last_error: Exception | None = None
        self._api_writes = 0

        self._node_uid = ""
        self._server_minor: int | None = None
        self._adopted: dict[str, str] = {}  # fingerprint sent -> fingerprint the server stored
        self._reported_dropped: set[str] = set()
        self._partitionable_probed = False
        self._own_versions: set[str] = set()  # resourceVersions our writes produced
        # Writes sent and not yet answered: the watch may deliver a write's event before its
        # response arrives, and must then wait for the response to tell an echo from a change.
        self._writes_in_flight = 0
        self._own_deletes: set[str] = set()  # uids we deleted
        self._watch: SliceWatchHandle | None = None
        self._threads: list[threading.Thread] = []

    # -- public API ---------------------------------------------------------------------------

    def start(self, inventory: Inventory) -> None:
        """Validate ``inventory`` now (raising on a broken one) and start publishing it in the background."""
        self._check(inventory)
        with self._cond:
            if self._threads:
                raise DriverError(
                    "SlicePublisher.start() called twice; call update() to publish a new inventory"
                )
            self._inventory = inventory
            self._inventory_version += 1
            self._due = time.monotonic()
            self._threads = [
                threading.Thread(target=self._sync_loop, name="slice-publisher", daemon=True),
                threading.Thread(target=self._watch_loop, name="slice-watch", daemon=True),
            ]
        for thread in self._threads:
            thread.start()

    def update(self, inventory: Inventory) -> None:
        """Publish a new inventory; nothing happens when it equals the current one."""
        self._check(inventory)
        with self._cond:
            if inventory == self._inventory:
                return
            self._inventory = inventory
            self._inventory_version += 1
            self._due = time.monotonic()
            self._not_before = 0.0
            self._cond.notify_all()

    def set_taints(self, taints: Mapping[str, Sequence[Any]]) -> None:
        """Publish these device taints (device name -> taints; all of them, not a delta).

        A failed write is retried with backoff like any other sync; taints of devices that are
        not (or no longer) published are ignored.
        """
        with self._cond:
            if dict(taints) == dict(self._taints):
                return
            self._taints = dict(taints)
            self._inventory_version += 1
            self._due = time.monotonic()
            self._not_before = 0.0
            self._cond.notify_all()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the background threads. Published slices stay (the kubelet wipes them if we stay away)."""
        with self._cond:
            self._stopping = True
            watch = self._watch
            self._cond.notify_all()
        if watch is not None:
            watch.close()
        for thread in self._threads:
            thread.join(timeout_s)

    def wait_synced(self, timeout_s: float) -> bool:
        """True once the current inventory is published and no re-sync is pending (False on timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not (
                self._synced_version == self._inventory_version and self._due is None and not self._running
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    @property
    def api_writes(self) -> int:
        """How many create/update/delete calls this publisher has made."""
        return self._api_writes

    @property
    def last_error(self) -> Exception | None:
        """The error of the last failed sync, None after a successful one."""
        return self._last_error

    # -- validation ---------------------------------------------------------------------------

    def _check(self, inventory: Inventory) -> None:
        if not inventory.devices:
            raise EmptyInventoryError(
                f"refusing to publish an empty inventory for node {self._node}: that would empty the "
                "pool and hide every GPU from the scheduler; retry discovery (is NVML ready?)"
            )
        minor = self._server_minor if self._server_minor is not None else NEWEST_KNOWN_MINOR
        validate_pool(
            build_slices(inventory, self._node, self._driver, "", minor, taintable=self._taintable), minor
        )

    # -- sync thread --------------------------------------------------------------------------

    def _request_sync(self, delay_s: float) -> None:
        with self._cond:
            due = max(time.monotonic() + delay_s, self._not_before)
            self._due = due if self._due is None else min(self._due, due)
            self._cond.notify_all()

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._due is None or time.monotonic() < self._due):
                    self._cond.wait(None if self._due is None else max(0.0, self._due - time.monotonic()))
                if self._stopping:
                    return
                self._due = None
                self._running = True
                inventory = self._inventory
                version = self._inventory_version
                taints = self._taints
            ok = False
            error: Exception | None = None
            try:
                self._sync(inventory, taints)
                ok = True
            except SliceValidationError as exc:
                # Retrying cannot fix a broken inventory: wait for update().
                self._last_error = error = exc
                log.error(  # noqa: TRY400 - the message says it all; no traceback needed
                    "resource slices not published: inventory breaks an API limit",
                    node=self._node,
                    error=str(exc),
                )
            except Exception as exc:  # noqa: BLE001 - every failure is retried with backoff
                self._last_error = error = exc
                self._failures += 1
                delay = backoff_delay(self._failures, self._backoff_initial, self._backoff_max)
                delay *= 1 + random.uniform(0, 0.2)  # noqa: S311 - jitter, not security
                log.warning(
                    "resource slice sync failed",
                    node=self._node,
                    error=str(exc),
                    error_type=type(exc).__name__,
                    attempt=self._failures,
                    retry_in_s=round(delay, 2),
                )
                with self._cond:
                    self._not_before = time.monotonic() + delay
                self._request_sync(delay)
            with self._cond:
                self.sync_attempts += 1
                if error is not None:
                    kind = type(error).__name__
                    self.sync_errors[kind] = self.sync_errors.get(kind, 0) + 1
                self._running = False
                if ok:
                    self._failures = 0
                    self._last_error = None
                    self._not_before = 0.0
                    self._synced_version = version
                self._cond.notify_all()
            if self._on_sync is not None:
                try:
                    self._on_sync(error)
                except Exception:  # an observer must not stop publishing
                    log.exception("on_sync callback failed")

    def _sync(self, inventory: Inventory | None, taints: Mapping[str, Sequence[Any]] | None = None) -> None:
        if inventory is None:
            raise DriverError("SlicePublisher has no inventory; call start(inventory) first")
        if self._server_minor is None:
            major, minor = self._kube.server_version()
            self._server_minor = minor if major == 1 else NEWEST_KNOWN_MINOR
            log.info("api server version", major=major, minor=minor)
        # Looked up on every sync (syncs happen only on change): a re-created Node has a new UID,
        # and slices owned by the old one would be garbage-collected as soon as we wrote them.
        try:
            node_uid = str(self._kube.get_node(self._node)["metadata"]["uid"])
        except ApiNotFoundError as exc:
            raise ApiNotFoundError(
                f"node {self._node} does not exist in the API server; check --node-name "
                "(it must be the Node object's name)",
                status=exc.status,
                reason=exc.reason,
            ) from exc
        if node_uid != self._node_uid:
            log.info("node uid", node=self._node, uid=node_uid)
            self._node_uid = node_uid
        minor = self._server_minor
        desired = build_slices(
            inventory,
            self._node,
            self._driver,
            self._node_uid,
            minor,
            taints=taints,
            taintable=self._taintable,
        )
        validate_pool(desired, minor)
        probe = inventory.counter_sets or any(d.allow_multiple_allocations for d in inventory.devices)
        if probe and self._drops_partitionable_fields(desired):
            return  # the owner was told (on_dropped_fields) and publishes another inventory
        stored, _ = self._kube.list_slices_at(self._driver, self._node)
        plan = plan_sync(stored, desired, self._node, same=self._same)
        if plan.writes == 0:
            log.debug("resource slices up to date", node=self._node, slices=len(desired))
            return
        log.info(
            "syncing resource slices",
            node=self._node,
            generation=plan.generation,
            delete=len(plan.deletes),
            update=len(plan.updates),
            create=len(plan.creates),
        )
        for obsolete in plan.deletes:
            self._delete(obsolete)
        for existing, wanted in plan.updates:
            body = copy.deepcopy(existing)
            body["spec"] = copy.deepcopy(wanted["spec"])
            body["metadata"]["ownerReferences"] = wanted["metadata"].get("ownerReferences", [])
            body["metadata"].pop("managedFields", None)
            keep_time_added(existing, body)
            self._api_writes += 1
            with self._writing():
                result = self._kube.update_slice(body)
                self._remember_write(wanted, result)
            log.info(
                "resource slice updated", slice=result["metadata"].get("name"), generation=plan.generation
            )
        for wanted in plan.creates:
            self._api_writes += 1
            with self._writing():
                result = self._kube.create_slice(wanted)
                self._remember_write(wanted, result)
            log.info(
                "resource slice created",
                slice=result["metadata"].get("name"),
                generation=plan.generation,
                devices=len(wanted["spec"].get("devices") or []),
                counter_sets=len(wanted["spec"].get("sharedCounters") or []),
            )

    def _drops_partitionable_fields(self, desired: Sequence[JsonDict]) -> bool:
        """Ask the server (dry run, once) whether it keeps counters and consumable-capacity fields.

        A server without DRAPartitionableDevices (DRAConsumableCapacity) drops them silently.
        Finding that out from a real write would publish MIG placements without the counters that
        keep them apart, and the scheduler could hand out overlapping slices before the owner
        switches to static MIG (or shares that the scheduler would hand out whole).
        """
        if self._partitionable_probed:
            return False
        self._partitionable_probed = True
        probe_fields: set[str] = set()
        for wanted in desired:
            spec = wanted.get("spec") or {}
            uses_counters = spec.get("sharedCounters") or any(
                d.get("consumesCounters") or d.get("allowMultipleAllocations")
                for d in spec.get("devices") or []
            )
            if not uses_counters:
                continue
            stored = self._kube.create_slice(wanted, dry_run=True)
            probe_fields.update(dropped_fields(wanted, stored))
        new = tuple(sorted(f for f in probe_fields if f not in self._reported_dropped))
        if not new:
            return False
        self._reported_dropped.update(new)
        log.error(
            "api server drops partitionable-device fields or consumable-capacity fields (is "
            "DRAPartitionableDevices or DRAConsumableCapacity off?); nothing with them is published",
            fields=list(new),
        )
        if self._on_dropped is None:
            return False
        try:
            self._on_dropped(new)
        except Exception:  # a faulty callback must not stop publishing
            log.exception("on_dropped_fields callback failed", fields=list(new))
            return False
        return True

    def _delete(self, obsolete: JsonDict) -> None:
        metadata = obsolete["metadata"]
        self._api_writes += 1
        with self._cond:
            self._own_deletes.add(str(metadata.get("uid", "")))
        try:
            self._kube.delete_slice(
                str(metadata["name"]), str(metadata.get("uid", "")), str(metadata.get("resourceVersion", ""))
            )
        except ApiNotFoundError:
            log.debug("obsolete resource slice already gone", slice=metadata.get("name"))
            return
        log.info("obsolete resource slice deleted", slice=metadata.get("name"))

    def _same(self, stored: JsonDict, desired: JsonDict) -> bool:
        if _pool(stored) != _pool(desired) or _node_owners(stored) != _node_owners(desired):
            return False
        have = _fingerprint(comparable_spec(stored))
        want = _fingerprint(comparable_spec(desired))
        return have in (want, self._adopted.get(want))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._cond:
            self._writes_in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._writes_in_flight -= 1
                self._cond.notify_all()

    def _remember_write(self, sent: JsonDict, stored: JsonDict) -> None:
        with self._cond:
            if len(self._own_versions) > 1000:
                self._own_versions.clear()
            self._own_versions.add(str(stored["metadata"].get("resourceVersion", "")))
        want = _fingerprint(comparable_spec(sent))
        have = _fingerprint(comparable_spec(stored))
        if have == want:
            return
        # Adopt what the server kept, so the next sync does not re-send the same slice forever.
        self._adopted[want] = have
        fields = dropped_fields(sent, stored)
        new = tuple(f for f in fields if f not in self._reported_dropped)
        if not new:
            return
        self._reported_dropped.update(new)
        log.error(
            "api server dropped fields from our resource slice; is a feature gate "
            "(DRAPartitionableDevices) off on the server?",
            slice=stored["metadata"].get("name"),
            fields=list(new),
        )
        if self._on_dropped is not None:
            try:
                self._on_dropped(new)
            except Exception:  # a faulty callback must not stop publishing
                log.exception("on_dropped_fields callback failed", fields=list(new))

    # -- watch thread -------------------------------------------------------------------------

    def _is_echo(self, event: Mapping[str, Any]) -> bool:
        metadata = (event.get("object") or {}).get("metadata") or {}
        with self._cond:
            if event.get("type") == "DELETED":
                uid = str(metadata.get("uid", ""))
                if uid in self._own_deletes:
                    self._own_deletes.discard(uid)
                    return True
                return False
            version = str(metadata.get("resourceVersion", ""))
            # Our own create/update may still be waiting for its response (the watch is faster);
            # once no write is in flight, the versions we caused are all known.
            self._cond.wait_for(
                lambda: version in self._own_versions or self._writes_in_flight == 0 or self._stopping,
                timeout=ECHO_WAIT_S,
            )
            if version in self._own_versions:
                self._own_versions.discard(version)
                return True
            return False

    def _watch_loop(self) -> None:
        failures = 0
        first = True
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                _, version = self._kube.list_slices_at(self._driver, self._node)
                watch = self._kube.watch_slices(self._driver, self._node, version, self._watch_timeout)
                with self._cond:
                    if self._stopping:
                        watch.close()
                        return
                    self._watch = watch
                if not first:
                    # Events between the old watch's end and this list were not seen.
                    self._request_sync(self._resync_delay)
                first = False
                failures = 0
                for event in watch:
                    if self._is_echo(event):
                        continue
                    meta = (event.get("object") or {}).get("metadata") or {}
                    log.info(
                        "resource slice changed behind our back; re-syncing",
                        change=event.get("type"),
                        slice=meta.get("name"),
                        resync_in_s=self._resync_delay,
                    )
                    self._request_sync(self._resync_delay)
            except Exception as exc:  # noqa: BLE001 - the watch is re-established with backoff
                with self._cond:
                    if self._stopping:
                        return
                failures += 1
                delay = backoff_delay(failures, self._backoff_initial, self._backoff_max)
                log.warning(
                    "resource slice watch failed",
                    node=self._node,
                    error=str(exc),
                    attempt=failures,
                    retry_in_s=delay,
                )
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=delay)
