"""The CDI spec as frozen values, their exact JSON form, the minimum-version rule and validation.

A CDI spec tells the container runtime (containerd, CRI-O) what to add to a container for a
device id such as ``k8s.gpu.nvidia.com/claim=<uid>-gpu-0``: device nodes, mounts, hooks, env.
Field names follow the CDI specification (``cdiVersion``, ``containerEdits``, ``hostPath``...);
runtimes load specs strictly, so :meth:`Spec.to_dict` emits nothing else and
:func:`Spec.from_dict` refuses unknown fields the same way.

:func:`validate` checks what the CDI library checks when a runtime loads the spec, plus a few
rules of ours (absolute paths, device nodes with a type carry their numbers), so a broken spec is
refused before it is written rather than when a pod starts. It does not know which devices a
claim holds - that is :mod:`cdi.store` and the caller.

This module does not support the CDI features the driver never writes (annotations, intelRdt,
additionalGids, netDevices); :func:`Spec.from_dict` refuses them with a clear message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cdi.errors import SpecInvalidError

# Released spec versions, oldest first; "0.3.0" is the oldest the CDI library still loads.
KNOWN_VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
EARLIEST_VERSION = "0.3.0"

_T = TypeVar("_T")

# Hook points the OCI runtime spec defines; the CDI library refuses any other name.
HOOK_NAMES = frozenset(
    {"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"}
)
DEVICE_TYPES = frozenset({"b", "c", "u", "p"})

_VENDOR_CLASS_RE = re.compile(r"^[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?$")


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecInvalidError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _check_keys(obj: Any, where: str, required: Iterable[str], optional: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise SpecInvalidError(f"{where} must be a JSON object, got {type(obj).__name__}")
    allowed = set(required) | set(optional)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SpecInvalidError(
            f"{where} has fields this driver does not write or read: {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed))}); remove them or regenerate the spec"
        )
    missing = [k for k in required if k not in obj]
    if missing:
        raise SpecInvalidError(f"{where} lacks required field(s) {', '.join(missing)}")
    return obj


def _opt_int(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecInvalidError(f"{where}.{key} must be an integer, got {value!r}")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecInvalidError(f"{where}.{key} must be a string, got {value!r}")
    return value


def _req_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise SpecInvalidError(f"{where}.{key} must be a string, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A device node to create in the container.

    ``path`` is where the container sees it; ``host_path`` where it is on the host (defaults to
    ``path``). ``type``/``major``/``minor`` may be left out when the node exists on the host - the
    runtime reads them from it; nodes that exist only in the container (MIG capability nodes) must
    carry them. ``file_mode`` is the numeric mode (e.g. 0o400 = 256).
    """

    path: str
    host_path: str | None = None
    type: str | None = None
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None
    permissions: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        for key, value in (
            ("hostPath", self.host_path),
            ("type", self.type),
            ("major", self.major),
            ("minor", self.minor),
            ("fileMode", self.file_mode),
            ("permissions", self.permissions),
        ):
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "deviceNode") -> DeviceNode:
        d = _check_keys(
            obj, where, ["path"], ["hostPath", "type", "major", "minor", "fileMode", "permissions"]
        )
        return cls(
            path=_req_str(d, "path", where),
            host_path=_opt_str(d, "hostPath", where),
            type=_opt_str(d, "type", where),
            major=_opt_int(d, "major", where),
            minor=_opt_int(d, "minor", where),
            file_mode=_opt_int(d, "fileMode", where),
            permissions=_opt_str(d, "permissions", where),
        )


@dataclass(frozen=True, slots=True)
class Mount:
    """A bind (or other) mount from ``host_path`` on the host to ``container_path``."""

    host_path: str
    container_path: str
    options: tuple[str, ...] = ()
    type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hostPath": self.host_path, "containerPath": self.container_path}
        if self.options:
            out["options"] = list(self.options)
        if self.type is not None:
            out["type"] = self.type
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "mount") -> Mount:
        d = _check_keys(obj, where, ["hostPath", "containerPath"], ["options", "type"])
        return cls(
            host_path=_req_str(d, "hostPath", where),
            container_path=_req_str(d, "containerPath", where),
            options=_strs(d.get("options", []), f"{where}.options"),
            type=_opt_str(d, "type", where),
        )


@dataclass(frozen=True, slots=True)
class Hook:
    """An OCI hook the runtime runs at ``hook_name`` (e.g. ``createContainer``)."""

    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hookName": self.hook_name, "path": self.path}
        if self.args:
            out["args"] = list(self.args)
        if self.env:
            out["env"] = list(self.env)
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "hook") -> Hook:
        d = _check_keys(obj, where, ["hookName", "path"], ["args", "env"])
        return cls(
            hook_name=_req_str(d, "hookName", where),
            path=_req_str(d, "path", where),
            args=_strs(d.get("args", []), f"{where}.args"),
            env=_strs(d.get("env", []), f"{where}.env"),
        )


@dataclass(frozen=True, slots=True)
class ContainerEdits:
    """What to add to a container: env entries (``KEY=VALUE``), device nodes, mounts, hooks."""

    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    hooks: tuple[Hook, ...] = ()

    def is_empty(self) -> bool:
        return not (self.env or self.device_nodes or self.mounts or self.hooks)

    def merged(self, *others: ContainerEdits) -> ContainerEdits:
        """These edits followed by ``others``; exact duplicates are kept once, order is kept.

        Duplicates arise when two builders add the same node (a MIG device's parent node and the
        full GPU's); a runtime would apply both, harmlessly, but the spec reads better without.
        """
        parts = (self, *others)
        return ContainerEdits(
            env=_dedup(e for p in parts for e in p.env),
            device_nodes=_dedup(d for p in parts for d in p.device_nodes),
            mounts=_dedup(m for p in parts for m in p.mounts),
            hooks=_dedup(h for p in parts for h in p.hooks),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.env:
            out["env"] = list(self.env)
        if self.device_nodes:
            out["deviceNodes"] = [d.to_dict() for d in self.device_nodes]
        if self.mounts:
            out["mounts"] = [m.to_dict() for m in self.mounts]
        if self.hooks:
            out["hooks"] = [h.to_dict() for h in self.hooks]
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "containerEdits") -> ContainerEdits:
        d = _check_keys(obj, where, [], ["env", "deviceNodes", "mounts", "hooks"])
        return cls(
            env=_strs(d.get("env", []), f"{where}.env"),
            device_nodes=tuple(
                DeviceNode.from_dict(x, f"{where}.deviceNodes[{i}]")
                for i, x in enumerate(_list(d, "deviceNodes", where))
            ),
            mounts=tuple(
                Mount.from_dict(x, f"{where}.mounts[{i}]") for i, x in enumerate(_list(d, "mounts", where))
            ),
            hooks=tuple(
                Hook.from_dict(x, f"{where}.hooks[{i}]") for i, x in enumerate(_list(d, "hooks", where))
            ),
        )


def _list(d: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise SpecInvalidError(f"{where}.{key} must be a list, got {type(value).__name__}")
    return value


def _dedup(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True, slots=True)
class Device:
    """One CDI device: its name (the part after ``=`` in a CDI id) and its own edits."""

    name: str
    container_edits: ContainerEdits

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "containerEdits": self.container_edits.to_dict()}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "device") -> Device:
        d = _check_keys(obj, where, ["name", "containerEdits"], [])
        return cls(
            name=_req_str(d, "name", where),
            container_edits=ContainerEdits.from_dict(d["containerEdits"], f"{where}.containerEdits"),
        )


@dataclass(frozen=True, slots=True)
class Spec:
    """A CDI spec file: version, kind (``vendor/class``), devices, and edits shared by all devices.

    Build one with :func:`new_spec` to get the minimum version filled in.
    """

    version: str
    kind: str
    devices: tuple[Device, ...]
    container_edits: ContainerEdits = field(default_factory=ContainerEdits)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cdiVersion": self.version,
            "kind": self.kind,
            "devices": [d.to_dict() for d in self.devices],
        }
        if not self.container_edits.is_empty():
            out["containerEdits"] = self.container_edits.to_dict()
        return out

    def to_json(self) -> str:
        """The spec as the file's text: compact JSON (written on every prepare; ``gpu-dra cdi show``
        pretty-prints it for people), newline-terminated."""
        return json.dumps(self.to_dict(), separators=(",", ":")) + "\n"

    @classmethod
    def from_dict(cls, obj: Any) -> Spec:
        d = _check_keys(obj, "spec", ["cdiVersion", "kind", "devices"], ["containerEdits"])
        return cls(
            version=_req_str(d, "cdiVersion", "spec"),
            kind=_req_str(d, "kind", "spec"),
            devices=tuple(
                Device.from_dict(x, f"devices[{i}]") for i, x in enumerate(_list(d, "devices", "spec"))
            ),
            container_edits=ContainerEdits.from_dict(d.get("containerEdits", {}), "spec.containerEdits"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Spec:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise SpecInvalidError(
                f"CDI spec is not valid JSON ({exc}); delete the file and prepare again"
            ) from exc
        return cls.from_dict(obj)


def new_spec(kind: str, devices: Sequence[Device], container_edits: ContainerEdits | None = None) -> Spec:
    """A spec whose ``cdiVersion`` is the lowest one its content needs (as NVIDIA's tools write)."""
    draft = Spec(EARLIEST_VERSION, kind, tuple(devices), container_edits or ContainerEdits())
    return Spec(minimum_version(draft), draft.kind, draft.devices, draft.container_edits)


def _version_key(version: str) -> int:
    return KNOWN_VERSIONS.index(version.removeprefix("v"))


def minimum_version(spec: Spec) -> str:
    """The lowest ``cdiVersion`` a runtime accepts for this content.

    Rules of the CDI specification for the fields this model has: a class part with a dot needs
    0.6.0; a device node ``hostPath`` or a device name starting with a digit needs 0.5.0; a mount
    ``type`` needs 0.4.0; anything else loads as 0.3.0.
    """
    _, _, cls = spec.kind.partition("/")
    if "." in cls:
        return "0.6.0"
    all_edits = (spec.container_edits, *(d.container_edits for d in spec.devices))
    if any(d.name[:1].isdigit() for d in spec.devices) or any(
        n.host_path for e in all_edits for n in e.device_nodes
    ):
        return "0.5.0"
    if any(m.type for e in all_edits for m in e.mounts):
        return "0.4.0"
    return EARLIEST_VERSION


def valid_vendor_or_class(name: str) -> bool:
    """CDI's rule for the vendor and class parts of a kind: letter first, alnum last, ``[A-Za-z0-9_.-]``."""
    return bool(_VENDOR_CLASS_RE.match(name))


def valid_device_name(name: str) -> bool:
    """CDI's rule for device names: alnum first and last, ``[A-Za-z0-9_.:-]`` between."""
    return bool(_DEVICE_NAME_RE.match(name))


def _check_abs(value: str, what: str) -> None:
    if not value.startswith("/"):
        raise SpecInvalidError(f"{what} {value!r} is not an absolute path; CDI paths must start with '/'")


def _check_env(env: Iterable[str], where: str) -> None:
    for entry in env:
        if entry.find("=") <= 0:
            raise SpecInvalidError(f"{where}: env entry {entry!r} is not KEY=VALUE with a non-empty KEY")


def validate_edits(edits: ContainerEdits, where: str) -> None:
    """Check one ``containerEdits`` block; raise :class:`SpecInvalidError` naming the bad field."""
    _check_env(edits.env, where)
    for node in edits.device_nodes:
        _check_abs(node.path, f"{where}: device node path")
        if node.host_path is not None:
            _check_abs(node.host_path, f"{where}: device node {node.path} hostPath")
        if node.type is not None and node.type not in DEVICE_TYPES:
            raise SpecInvalidError(
                f"{where}: device node {node.path} has type {node.type!r}; use one of b, c, u, p"
            )
        if node.type in ("b", "c") and (node.major is None or node.minor is None):
            raise SpecInvalidError(
                f"{where}: device node {node.path} has type {node.type} but no major/minor; give both "
                "or leave type out so the runtime reads them from the host node"
            )
        if node.permissions is not None and node.permissions.strip("rwm"):
            raise SpecInvalidError(
                f"{where}: device node {node.path} permissions {node.permissions!r} may only use r, w, m"
            )
    for mount in edits.mounts:
        _check_abs(mount.host_path, f"{where}: mount hostPath")
        _check_abs(mount.container_path, f"{where}: mount containerPath")
    for hook in edits.hooks:
        if hook.hook_name not in HOOK_NAMES:
            raise SpecInvalidError(
                f"{where}: hook {hook.path} has hookName {hook.hook_name!r}; use one of "
                f"{', '.join(sorted(HOOK_NAMES))}"
            )
        _check_abs(hook.path, f"{where}: hook path")
        _check_env(hook.env, f"{where}: hook {hook.path}")


def validate(spec: Spec) -> None:
    """Refuse a spec a runtime would refuse (or that breaks our path rules); return None if fine."""
    vendor, sep, cls = spec.kind.partition("/")
    if not sep or not valid_vendor_or_class(vendor) or not valid_vendor_or_class(cls):
        raise SpecInvalidError(
            f"kind {spec.kind!r} is not 'vendor/class' with letter-first, alphanumeric-last parts "
            "(e.g. k8s.gpu.nvidia.com/claim)"
        )
    if spec.version.removeprefix("v") not in KNOWN_VERSIONS:
        raise SpecInvalidError(
            f"cdiVersion {spec.version!r} is not a released CDI version ({', '.join(KNOWN_VERSIONS)})"
        )
    needed = minimum_version(spec)
    if _version_key(spec.version) < _version_key(needed):
        raise SpecInvalidError(
            f"cdiVersion {spec.version} is too old for this content, which needs at least {needed}; "
            "build the spec with cdi.spec.new_spec()"
        )
    if not spec.devices:
        raise SpecInvalidError("spec has no devices; a CDI spec needs at least one device")
    seen: set[str] = set()
    for dev in spec.devices:
        if not valid_device_name(dev.name):
            raise SpecInvalidError(
                f"device name {dev.name!r} is invalid: it must start and end with a letter or digit "
                "and use only letters, digits, '_', '.', ':', '-'"
            )
        if dev.name in seen:
            raise SpecInvalidError(
                f"device name {dev.name!r} appears twice in the spec; names must be unique"
            )
        seen.add(dev.name)
        if dev.container_edits.is_empty():
            raise SpecInvalidError(
                f"device {dev.name!r} has no container edits; a CDI device must add at least one "
                "env entry, device node, mount or hook"
            )
        validate_edits(dev.container_edits, f"device {dev.name}")
    validate_edits(spec.container_edits, "spec containerEdits")
