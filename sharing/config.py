"""NVIDIA's opaque device config API (``resource.nvidia.com/v1beta1``) and which config applies where.

Users write ``GpuConfig`` / ``MigDeviceConfig`` objects into a claim's or a DeviceClass's
``config[].opaque.parameters``; this module decodes them strictly (unknown fields, wrong kinds,
bad enum values and out-of-range numbers are errors that name the field path and the allowed
values), normalises them the way NVIDIA's driver does (TimeSlicing without an interval means
``Default``, MPS without ``mpsConfig`` means an empty one) and groups a claim's allocation results
by the config that wins for them (defaults < FromClass < FromClaim, later wins).

It does not touch a GPU or start anything: ``sharing.timeslicing`` and ``sharing.mps`` act on
the groups. Limits that need the device (pinned memory larger than the GPU, per-device keys that
name a device outside the group) are checked by :meth:`MpsConfig.pinned_limits_mib`, called at
prepare time before anything is changed.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, Final, Literal

from sharing.errors import ConfigError

API_VERSION = "resource.nvidia.com/v1beta1"
KIND_GPU = "GpuConfig"
KIND_MIG = "MigDeviceConfig"
KINDS = (KIND_GPU, KIND_MIG)
STRATEGY_TIME_SLICING: Final = "TimeSlicing"
STRATEGY_MPS: Final = "MPS"
STRATEGIES = (STRATEGY_TIME_SLICING, STRATEGY_MPS)
# NVIDIA's scale, as `nvidia-smi compute-policy --set-timeslice` takes it.
INTERVALS: Mapping[str, int] = {"Default": 0, "Short": 1, "Medium": 2, "Long": 3}
MIB = 1 << 20

DeviceType = Literal["gpu", "mig"]
Strategy = Literal["TimeSlicing", "MPS"]

# ---------------------------------------------------------------------------------------------
# Kubernetes quantities

_QUANTITY_RE = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_QUANTITY_HELP = "a Kubernetes quantity such as 5Gi, 512Mi, 4G, 1e9 or 1073741824"
#: Kubernetes' own quantity parser refuses long numbers too; no real quantity is this long.
MAX_QUANTITY_CHARS = 64

# Bounds on a whole opaque config, checked before any field (the schema is at most 4 levels deep,
# strings are enum values, UUIDs and quantities): they keep a hostile config from reaching Python's
# own limits, whose messages ("Exceeds the limit (4300 digits)", RecursionError) help nobody.
MAX_DEPTH = 8
MAX_STRING_CHARS = 1024
MAX_FIELDS = 256
MAX_INT_BITS = 64

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlevel = 3
_REPR.maxdict = 4
_REPR.maxlist = 4


def _shown(value: object) -> str:
    """``repr(value)`` cut short: a message must stay readable whatever the user wrote."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        return f"<a number of about {int(value.bit_length() * 0.30103)} digits>"
    return _REPR.repr(value)


def parse_quantity(value: object, path: str = "") -> Fraction:
    """Parse a Kubernetes resource quantity (``5Gi``, ``1.5G``, ``100m``, ``1e9``, ``42``) exactly.

    Raises:
        ConfigError: the value is not a quantity; the message names ``path``.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(path, f"expected {_QUANTITY_HELP}, got {type(value).__name__} {_shown(value)}")
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS * 2:
            raise ConfigError(path, f"{_shown(value)} is far too large for {_QUANTITY_HELP}")
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(path, f"expected {_QUANTITY_HELP}, got {_shown(value)}")
        return Fraction(value)
    if len(value) > MAX_QUANTITY_CHARS:
        raise ConfigError(
            path,
            f"{_shown(value)} is {len(value)} characters long; a quantity has at most "
            f"{MAX_QUANTITY_CHARS} - use {_QUANTITY_HELP}",
        )
    match = _QUANTITY_RE.match(value.strip())
    if match is None or value != value.strip():
        raise ConfigError(path, f"{_shown(value)} is not {_QUANTITY_HELP}")
    sign, number, suffix = match.group(1), match.group(2), match.group(3) or ""
    amount = Fraction(number)
    if suffix in _BINARY:
        amount *= 1024 ** _BINARY[suffix]
    elif suffix in _DECIMAL:
        amount *= Fraction(10) ** _DECIMAL[suffix]
    else:  # decimal exponent: e3, E-2
        exponent = int(suffix[1:])
        if abs(exponent) > 64:
            raise ConfigError(path, f"{_shown(value)} has an exponent out of range; use {_QUANTITY_HELP}")
        amount *= Fraction(10) ** exponent
    return -amount if sign == "-" else amount


def quantity_bytes(value: object, path: str = "") -> int:
    """A quantity as whole bytes, rounded up like Kubernetes' ``Quantity.Value()``."""
    return math.ceil(parse_quantity(value, path))


def format_mps_limit(limit_bytes: int) -> str:
    """Bytes as MPS expects a pinned memory limit: whole MiB, rounded down, with suffix ``M``."""
    return f"{limit_bytes // MIB}M"


# ---------------------------------------------------------------------------------------------
# Config values


@dataclass(frozen=True, slots=True)
class TimeSlicingConfig:
    """``timeSlicingConfig``: the compute time-slice length of a full GPU."""

    interval: str = "Default"

    @property
    def level(self) -> int:
        """The level `nvidia-smi compute-policy --set-timeslice` takes (0..3)."""
        return INTERVALS[self.interval]


@dataclass(frozen=True, slots=True)
class MpsConfig:
    """``mpsConfig``: defaults the MPS control daemon hands to the servers it spawns.

    Memory limits are kept in bytes; per-device keys as written (a UUID or a decimal index into the
    group's sorted UUIDs), resolved by :meth:`pinned_limits_mib` once the group is known.
    """

    default_active_thread_percentage: int | None = None
    default_pinned_device_memory_limit: int | None = None
    default_per_device_pinned_memory_limit: tuple[tuple[str, int], ...] = ()
    multi_user: bool = False

    def pinned_limits_mib(self, uuids: Sequence[str], device_memory: Mapping[str, int]) -> dict[str, int]:
        """Pinned memory limit in whole MiB per device UUID of the group (only devices with a limit).

        The default limit applies to every device; per-device entries override it. An integer key
        indexes the sorted UUIDs of the group (NVIDIA's rule, not the NVML index).

        Raises:
            ConfigError: a key names no device of the group, or a limit exceeds the device's memory.
        """
        ordered = sorted(uuids)
        limits: dict[str, int] = {}
        if self.default_pinned_device_memory_limit is not None:
            for uuid in ordered:
                limits[uuid] = self.default_pinned_device_memory_limit
        base = "sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit"
        for key, value in self.default_per_device_pinned_memory_limit:
            if key in ordered:
                limits[key] = value
            elif key.isdigit() and int(key) < len(ordered):
                limits[ordered[int(key)]] = value
            else:
                raise ConfigError(
                    f"{base}.{key}",
                    f"names no device of this group; use one of the UUIDs {ordered} "
                    f"or an index 0..{len(ordered) - 1} into that sorted list",
                )
        for uuid, value in limits.items():
            memory = device_memory.get(uuid)
            if memory is not None and value > memory:
                path = (
                    "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit"
                    if value == self.default_pinned_device_memory_limit
                    else base
                )
                raise ConfigError(
                    path,
                    f"limit {value // MIB}Mi for device {uuid} exceeds its memory of {memory // MIB}Mi; "
                    "ask for at most the device's memory",
                )
        return {uuid: value // MIB for uuid, value in limits.items()}


@dataclass(frozen=True, slots=True)
class Sharing:
    """``sharing``: how the devices of one config group are shared."""

    strategy: Strategy
    time_slicing_config: TimeSlicingConfig | None = None
    mps_config: MpsConfig | None = None


@dataclass(frozen=True, slots=True)
class GpuConfig:
    """``kind: GpuConfig``: settings for full GPUs."""

    kind: ClassVar[str] = KIND_GPU
    device_type: ClassVar[DeviceType] = "gpu"
    sharing: Sharing | None = None

    def time_slicing(self) -> TimeSlicingConfig | None:
        """The time-slicing settings to apply, or None when this config does not time-slice."""
        if self.sharing is None or self.sharing.strategy != STRATEGY_TIME_SLICING:
            return None
        return self.sharing.time_slicing_config

    def mps(self) -> MpsConfig | None:
        """The MPS settings to apply, or None when this config does not use MPS."""
        if self.sharing is None or self.sharing.strategy != STRATEGY_MPS:
            return None
        return self.sharing.mps_config


@dataclass(frozen=True, slots=True)
class MigDeviceConfig:
    """``kind: MigDeviceConfig``: settings for MIG devices (MPS; TimeSlicing validates but does nothing)."""

    kind: ClassVar[str] = KIND_MIG
    device_type: ClassVar[DeviceType] = "mig"
    sharing: Sharing | None = None

    def time_slicing(self) -> TimeSlicingConfig | None:
        """Always None: a MIG device has no time-slice interval (NVIDIA documents "no effect")."""
        return None

    def mps(self) -> MpsConfig | None:
        """The MPS settings to apply, or None when this config does not use MPS."""
        if self.sharing is None or self.sharing.strategy != STRATEGY_MPS:
            return None
        return self.sharing.mps_config


DeviceConfig = GpuConfig | MigDeviceConfig

# ---------------------------------------------------------------------------------------------
# Strict decoding


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _object(value: object, path: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected an object with fields {', '.join(allowed)}, got {_shown(value)}")
    for key in value:
        if key not in allowed:
            raise ConfigError(
                _join(path, str(key)),
                f"unknown field; allowed fields here: {', '.join(allowed)}",
            )
    return value


def _enum(value: object, path: str, allowed: Sequence[str], what: str) -> str:
    if value is None:
        raise ConfigError(path, f"is missing; set it to one of: {', '.join(allowed)}")
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(
            path, f"{_shown(value)} is not a valid {what}; allowed values: {', '.join(allowed)}"
        )
    return value


def _decode_mps(value: object, path: str) -> MpsConfig:
    fields = (
        "defaultActiveThreadPercentage",
        "defaultPinnedDeviceMemoryLimit",
        "defaultPerDevicePinnedMemoryLimit",
        "multiUser",
    )
    obj = _object(value, path, fields)
    percentage = obj.get("defaultActiveThreadPercentage")
    if percentage is not None:
        p = _join(path, "defaultActiveThreadPercentage")
        if isinstance(percentage, bool) or not isinstance(percentage, int):
            raise ConfigError(p, f"expected an integer 1..100, got {_shown(percentage)}")
        if not 1 <= percentage <= 100:
            raise ConfigError(
                p, f"{_shown(percentage)} is out of range; allowed values: 1..100 (percent of SMs)"
            )
    default_limit = obj.get("defaultPinnedDeviceMemoryLimit")
    if default_limit is not None:
        default_limit = _decode_limit(default_limit, _join(path, "defaultPinnedDeviceMemoryLimit"))
    per_device_raw = obj.get("defaultPerDevicePinnedMemoryLimit")
    per_device: list[tuple[str, int]] = []
    if per_device_raw is not None:
        p = _join(path, "defaultPerDevicePinnedMemoryLimit")
        if not isinstance(per_device_raw, Mapping):
            raise ConfigError(
                p, f"expected a map of device UUID or index to quantity, got {_shown(per_device_raw)}"
            )
        for key, limit in per_device_raw.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(p, f"key {_shown(key)} must be a device UUID or a decimal index")
            if limit is None:
                raise ConfigError(_join(p, key), f"expected {_QUANTITY_HELP}, got null")
            per_device.append((key, _decode_limit(limit, _join(p, key))))
    multi_user = obj.get("multiUser")
    if multi_user is not None and not isinstance(multi_user, bool):
        raise ConfigError(_join(path, "multiUser"), f"expected true or false, got {_shown(multi_user)}")
    return MpsConfig(
        default_active_thread_percentage=percentage,
        default_pinned_device_memory_limit=default_limit,
        default_per_device_pinned_memory_limit=tuple(sorted(per_device)),
        multi_user=bool(multi_user),
    )


def _decode_limit(value: object, path: str) -> int:
    limit = quantity_bytes(value, path)
    if limit < MIB:
        raise ConfigError(path, f"{_shown(value)} is too low; a pinned memory limit must be at least 1Mi")
    return limit


def _decode_sharing(value: object, path: str, kind: str) -> Sharing:
    allowed = (
        ("strategy", "timeSlicingConfig", "mpsConfig") if kind == KIND_GPU else ("strategy", "mpsConfig")
    )
    obj = _object(value, path, allowed)
    strategy = _enum(obj.get("strategy"), _join(path, "strategy"), STRATEGIES, "sharing strategy")
    ts_raw = obj.get("timeSlicingConfig")
    mps_raw = obj.get("mpsConfig")
    if strategy == STRATEGY_TIME_SLICING:
        if mps_raw is not None:
            raise ConfigError(
                _join(path, "mpsConfig"),
                "cannot be used with strategy TimeSlicing; remove it or set strategy: MPS",
            )
        if kind == KIND_MIG:
            return Sharing(strategy=STRATEGY_TIME_SLICING)
        ts = TimeSlicingConfig()
        if ts_raw is not None:
            ts_path = _join(path, "timeSlicingConfig")
            ts_obj = _object(ts_raw, ts_path, ("interval",))
            if ts_obj.get("interval") is not None:
                interval = _enum(ts_obj["interval"], _join(ts_path, "interval"), tuple(INTERVALS), "interval")
                ts = TimeSlicingConfig(interval=interval)
        return Sharing(strategy=STRATEGY_TIME_SLICING, time_slicing_config=ts)
    if ts_raw is not None:
        raise ConfigError(
            _join(path, "timeSlicingConfig"),
            "cannot be used with strategy MPS; remove it or set strategy: TimeSlicing",
        )
    mps = MpsConfig() if mps_raw is None else _decode_mps(mps_raw, _join(path, "mpsConfig"))
    return Sharing(strategy=STRATEGY_MPS, mps_config=mps)


def check_bounds(value: object, root: str = "") -> None:
    """Refuse a config that nests, grows or counts beyond what any valid config could.

    Iterative, so the check itself never recurses; the first offending field is named.

    Raises:
        ConfigError: naming the field path and the bound.
    """
    stack: list[tuple[object, str, int]] = [(value, root, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > MAX_STRING_CHARS:
                what = f"a number of {len(item)} digits" if item.isdigit() else f"{len(item)} characters long"
                raise ConfigError(
                    path, f"is {what}; no field of this config takes more than {MAX_STRING_CHARS}"
                )
            continue
        if isinstance(item, int) and not isinstance(item, bool):
            if item.bit_length() > MAX_INT_BITS:
                raise ConfigError(path, f"{_shown(item)} is far too large; no field of this config takes it")
            continue
        if isinstance(item, Mapping):
            children = [(v, _join(path, str(k)[:60])) for k, v in item.items()]
        elif isinstance(item, list | tuple):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(item)]
        else:
            continue
        if depth >= MAX_DEPTH:
            raise ConfigError(
                path,
                f"nests deeper than {MAX_DEPTH} levels; GpuConfig and MigDeviceConfig are at most 4 deep "
                "- remove the extra nesting",
            )
        if len(children) > MAX_FIELDS:
            raise ConfigError(path, f"has {len(children)} entries; at most {MAX_FIELDS} are allowed here")
        stack.extend((child, child_path, depth + 1) for child, child_path in children)


def decode_config(parameters: Mapping[str, Any] | str | bytes) -> DeviceConfig:
    """Decode one opaque ``parameters`` object strictly and normalise it.

    Raises:
        ConfigError: anything is wrong; the message names the field path and the allowed values.
    """
    if isinstance(parameters, str | bytes):
        try:
            # Over-long integers stay text, for check_bounds to refuse by name.
            parameters = json.loads(
                parameters, parse_int=lambda t: t if len(t) > MAX_STRING_CHARS else int(t)
            )
        except RecursionError:
            raise ConfigError(
                "", f"opaque parameters nest far deeper than {MAX_DEPTH} levels; remove the extra nesting"
            ) from None
        except ValueError as exc:
            raise ConfigError(
                "", f"opaque parameters are not valid JSON ({str(exc)[:200]}); write a JSON object"
            ) from exc
    check_bounds(parameters)
    obj = _object(parameters, "", ("apiVersion", "kind", "sharing"))
    api_version = obj.get("apiVersion")
    if api_version is None:
        raise ConfigError("apiVersion", f"is missing; add apiVersion: {API_VERSION}")
    if api_version != API_VERSION:
        raise ConfigError("apiVersion", f"{_shown(api_version)} is not supported; use {API_VERSION}")
    kind = _enum(obj.get("kind"), "kind", KINDS, "kind")
    sharing_raw = obj.get("sharing")
    sharing = None if sharing_raw is None else _decode_sharing(sharing_raw, "sharing", kind)
    if kind == KIND_GPU:
        return GpuConfig(sharing=sharing)
    return MigDeviceConfig(sharing=sharing)


def encode_config(config: DeviceConfig) -> dict[str, Any]:
    """The normalised config in its wire form (decodes back to an equal value); for checkpoints and logs."""
    out: dict[str, Any] = {"apiVersion": API_VERSION, "kind": config.kind}
    sharing = config.sharing
    if sharing is None:
        return out
    wire: dict[str, Any] = {"strategy": sharing.strategy}
    if sharing.time_slicing_config is not None:
        wire["timeSlicingConfig"] = {"interval": sharing.time_slicing_config.interval}
    if sharing.mps_config is not None:
        mps = sharing.mps_config
        mps_wire: dict[str, Any] = {}
        if mps.default_active_thread_percentage is not None:
            mps_wire["defaultActiveThreadPercentage"] = mps.default_active_thread_percentage
        if mps.default_pinned_device_memory_limit is not None:
            mps_wire["defaultPinnedDeviceMemoryLimit"] = str(mps.default_pinned_device_memory_limit)
        if mps.default_per_device_pinned_memory_limit:
            mps_wire["defaultPerDevicePinnedMemoryLimit"] = {
                k: str(v) for k, v in mps.default_per_device_pinned_memory_limit
            }
        if mps.multi_user:
            mps_wire["multiUser"] = True
        wire["mpsConfig"] = mps_wire
    out["sharing"] = wire
    return out


# ---------------------------------------------------------------------------------------------
# Precedence and grouping


@dataclass(frozen=True, slots=True)
class ConfigGroup:
    """Allocation results that one config object won; sharing is applied per group.

    ``config`` is None only for results no config kind fits (neither a GPU nor a MIG device).
    """

    config: DeviceConfig | None
    results: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    @property
    def sharing(self) -> Sharing | None:
        """The group's sharing settings; None means the devices are used as they are."""
        return None if self.config is None else self.config.sharing


@dataclass(frozen=True, slots=True)
class _Candidate:
    config: DeviceConfig
    requests: tuple[str, ...]


def _request_matches(requests: Sequence[str], request: str) -> bool:
    # A config naming "req" also covers the subrequests "req/sub" chosen from it.
    return request in requests or request.split("/", 1)[0] in requests


def _choose(ordered: Sequence[_Candidate], device: str, request: str, dtype: str) -> _Candidate | None:
    """The highest-precedence candidate for one result (``ordered`` is lowest first)."""
    for candidate in reversed(ordered):
        if candidate.requests:
            if not _request_matches(candidate.requests, request):
                continue
            if candidate.config.device_type != dtype:
                wanted = KIND_GPU if dtype == "gpu" else KIND_MIG if dtype == "mig" else "no kind"
                raise ConfigError(
                    "kind",
                    f"cannot apply {candidate.config.kind} to device {device} of type {dtype} "
                    f"(request {request}); use {wanted} for this request",
                )
            return candidate
        if candidate.config.device_type == dtype:
            return candidate
    return None


def resolve_groups(
    results: Sequence[Mapping[str, Any]],
    configs: Sequence[Mapping[str, Any]],
    driver: str,
    device_type: Callable[[str], str],
) -> list[ConfigGroup]:
    """Group a claim's allocation results (``status.allocation.devices.results``) by winning config.

    ``configs`` is ``status.allocation.devices.config``. Precedence, lowest first: built-in defaults
    (``GpuConfig{}``, ``MigDeviceConfig{}``), FromClass entries, FromClaim entries; later entries win
    within a source. For each result of ``driver`` the highest config whose ``requests`` names the
    result's request (or its parent request) wins; one whose kind does not fit the device type is an
    error. A config with empty ``requests`` applies only where its kind fits. Every opaque config of
    ``driver`` is decoded, so an invalid one fails the claim even if it matches no result.

    Raises:
        ConfigError: a config is invalid or cannot apply to the device it names.
    """
    defaults: list[_Candidate] = [_Candidate(GpuConfig(), ()), _Candidate(MigDeviceConfig(), ())]
    by_source: dict[str, list[_Candidate]] = {"FromClass": [], "FromClaim": []}
    for index, entry in enumerate(configs):
        source = entry.get("source", "FromClaim")
        requests = tuple(entry.get("requests") or ())
        context = f"config[{index}] ({source}, requests {list(requests)})"
        opaque = entry.get("opaque")
        if opaque is None:
            raise ConfigError("", "only opaque device configs are supported; use config[].opaque", context)
        if opaque.get("driver") != driver:
            continue
        if source not in by_source:
            raise ConfigError("source", f"{_shown(source)} is not one of FromClass, FromClaim", context)
        try:
            decoded = decode_config(opaque.get("parameters", {}))
        except ConfigError as exc:
            raise ConfigError(exc.path, exc.reason, f"{context} of driver {driver}") from exc
        by_source[source].append(_Candidate(decoded, requests))
    ordered = defaults + by_source["FromClass"] + by_source["FromClaim"]

    groups: dict[int, tuple[DeviceConfig | None, list[Mapping[str, Any]]]] = {}
    for result in results:
        if result.get("driver") != driver:
            continue
        device = str(result.get("device", ""))
        request = str(result.get("request", ""))
        dtype = device_type(device)
        chosen = _choose(ordered, device, request, dtype)
        key = id(chosen) if chosen is not None else 0
        if key not in groups:
            groups[key] = (chosen.config if chosen is not None else None, [])
        groups[key][1].append(result)
    return [ConfigGroup(config=cfg, results=tuple(members)) for cfg, members in groups.values()]
