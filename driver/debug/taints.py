"""``gpu-dra taints``: each device's health and taints as the plugin last published them; ``clear``.

Why: the rules in ``driver.recovery`` take most taints off by themselves, but an XID on a GPU
whose driver never asks for a recovery (or does not report it) stays until a person says the GPU
is fine. ``gpu-dra taints clear gpu-0`` drops a request file the running plugin applies on its
next health poll; the command then waits until the plugin's status file shows the taint gone.

It reads the status file the plugin writes (``<state dir>/health.json``) and never talks to the
API server: the plugin is the only writer of its slices.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from driver.debug import render
from driver.errors import DriverError
from driver.health import FaultKind
from driver.recovery import ClearRequests, parse_kinds
from driver.taints import KEY_PREFIX, STATUS_FILE, DeviceTaint, read_status

Handler = Callable[[argparse.Namespace, TextIO], int]


def status_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATUS_FILE


def device_status(state_dir: Path) -> Mapping[str, Any] | None:
    """Device name -> {health, message, taints} from the plugin's status file (None: no file)."""
    doc = read_status(status_path(state_dir))
    if doc is None:
        return None
    devices: Mapping[str, Any] = doc.get("devices") or {}
    return devices


def published_taints(state_dir: Path) -> dict[str, tuple[DeviceTaint, ...]]:
    """Device name -> the taints the plugin last published, from its status file."""
    out = {}
    for name, d in (device_status(state_dir) or {}).items():
        taints = tuple(
            DeviceTaint(str(t["key"]), str(t.get("value", "")), str(t["effect"]))
            for t in d.get("taints") or []
        )
        if taints:
            out[name] = taints
    return out


def taint_text(taints: Any) -> str:
    parts = []
    for t in taints or []:
        value = f"={t['value']}" if t.get("value") else ""
        parts.append(f"{t['key']}{value}:{t['effect']}")
    return ", ".join(parts) or "-"


def _state_dir(args: argparse.Namespace) -> Path:
    from driver import config

    cfg = config.from_args(args)
    return Path(cfg.state_dir)


def run_taints(args: argparse.Namespace, out: TextIO) -> int:
    state_dir = _state_dir(args)
    if args.action == "clear":
        return _clear(args, state_dir, out)
    devices = device_status(state_dir)
    if devices is None:
        raise DriverError(
            f"no health status file at {status_path(state_dir)}: is the plugin running with this "
            "--state-dir? (it writes the file at start and on every health change)"
        )
    shown = {n: d for n, d in devices.items() if args.all or d.get("taints") or d.get("health") != "HEALTHY"}
    rows = [(n, d.get("health"), taint_text(d.get("taints")), d.get("message")) for n, d in shown.items()]
    text = render.table(("DEVICE", "HEALTH", "TAINTS", "MESSAGE"), rows) if rows else "no device has taints"
    render.emit({"devices": shown}, args.output, text, out)
    return 0


def _remaining(state_dir: Path, target: str, kinds: frozenset[FaultKind]) -> list[str]:
    """``target`` if that device still carries one of those taints (any device, for a GPU UUID)."""
    keys = {KEY_PREFIX + k.value for k in kinds}
    devices = device_status(state_dir) or {}
    return [
        name
        for name, d in devices.items()
        if (name == target or target not in devices)
        and any(t.get("key") in keys for t in d.get("taints") or [])
    ]


def _clear(args: argparse.Namespace, state_dir: Path, out: TextIO) -> int:
    if not args.device:
        raise DriverError("name the device whose taints to clear, e.g. `gpu-dra taints clear gpu-0`")
    kinds = parse_kinds(args.key or [])
    path = ClearRequests(state_dir).add(args.device, kinds)
    deadline = time.monotonic() + args.wait
    # Applied when the plugin removes the file; its status file follows a moment later.
    while time.monotonic() < deadline and (path.exists() or _remaining(state_dir, args.device, kinds)):
        time.sleep(0.2)
    left = _remaining(state_dir, args.device, kinds)
    taken = not path.exists()
    data = {
        "device": args.device,
        "kinds": sorted(k.value for k in kinds),
        "applied": taken,
        "stillTainted": left,
    }
    if not taken:
        text = (
            f"clear request {path} is not applied yet: the plugin takes it on its next health poll; "
            "is the plugin running with this --state-dir?"
        )
    elif left:
        text = f"request applied, but {', '.join(left)} still carry the taint (a new fault since?)"
    else:
        text = f"taints {', '.join(data['kinds'])} cleared on {args.device}'s GPU"
    render.emit(data, args.output, text, out)
    return 0 if taken and not left else 1


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
    wrap: Callable[[Handler], Callable[[argparse.Namespace], int]],
) -> None:
    p = subparsers.add_parser(
        "taints", help="devices with health faults and their taints; `taints clear DEVICE` takes them off"
    )
    p.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    p.add_argument("device", nargs="?", help="with clear: device name (gpu-0) or GPU UUID")
    p.add_argument(
        "--key",
        action="append",
        help="with clear: taint to clear (xid, gpu-lost, unmonitored or all; repeatable; default all)",
    )
    p.add_argument("--wait", type=float, default=15.0, help="with clear: seconds to wait for the plugin")
    p.add_argument("--all", action="store_true", help="list every device, healthy ones too")
    common(p)
    p.set_defaults(func=wrap(run_taints))
