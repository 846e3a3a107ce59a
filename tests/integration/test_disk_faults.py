"""Disk faults: a full state directory, a read-only CDI root (issue 17).

Each plugin runs in a private mount namespace (``unshare --mount --propagation private``) where a
tiny tmpfs is mounted over its state directory or CDI root; nothing is mounted on the host. The
test reaches files inside that namespace through ``/proc/<pid>/root`` and changes its mounts with
``nsenter --mount``, so the host never sees either.

Once, a full state dir plus a corrupt checkpoint made the plugin exit 1 with a raw traceback on
every start (moving the file aside worked, writing the empty replacement failed with ENOSPC).
Now it starts, says why it refuses claims (naming the full directory), and recovers by itself
once there is space again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_crash_recovery import (
    REPO,
    TIMESLICE_CONFIG,
    Node,
    Plugin,
    claim_for,
    make_node,
    poll,
)

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("nsenter") is None or os.geteuid() != 0,
    reason="needs root and util-linux unshare/nsenter for a private mount namespace",
)

# Inside the namespace: mount the tmpfs, seed it, optionally fill it, then become the plugin.
SCRIPT = r"""
set -e
mount -t tmpfs -o "size=$SIZE,mode=0700" gpu-dra-test "$TARGET"
if [ -n "$SEED" ]; then cp "$SEED" "$TARGET/checkpoint.json"; fi
if [ -n "$FILL" ]; then dd if=/dev/zero of="$TARGET/filler" bs=4096 2>/dev/null || true; fi
if [ -n "$READONLY" ]; then mount -o remount,ro "$TARGET"; fi
exec "$@"
"""


def start_in_namespace(
    node: Node,
    target: Path,
    *,
    seed: Path | None = None,
    fill: bool = False,
    readonly: bool = False,
    extra: tuple[str, ...] = (),
) -> Plugin:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env.update(
        PYTHONPATH=str(REPO),
        SIZE="256k",
        TARGET=str(target),
        SEED=str(seed or ""),
        FILL="1" if fill else "",
        READONLY="1" if readonly else "",
    )
    target.mkdir(parents=True, exist_ok=True)
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        SCRIPT,
        "sh",
        *node.argv(),
        *extra,
    ]
    log_path = node.base / f"plugin-{len(node.runs)}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    plugin = Plugin(proc, log_path, node.state_dir / "dra.sock")
    node.runs.append(plugin)
    return plugin


def inside(plugin: Plugin, path: Path) -> Path:
    """``path`` as the plugin's mount namespace sees it."""
    return Path(f"/proc/{plugin.proc.pid}/root") / path.relative_to("/")


def prepare_error(plugin: Plugin, claim: dict[str, object]) -> str:
    uid = str(claim["metadata"]["uid"])  # type: ignore[index]
    return str(plugin._call("prepare", [claim]).claims[uid].error)


@pytest.fixture
def node() -> Iterator[Node]:
    made = make_node("a100-40gb-x8", mps=True)
    yield made
    made.cleanup()
    shutil.rmtree(made.base, ignore_errors=True)


@pytest.mark.slow
def test_full_state_dir_with_a_corrupt_checkpoint_starts_refuses_and_recovers(node: Node) -> None:
    seed = node.base / "corrupt-checkpoint.json"
    seed.write_bytes(b'{"checksum": "0", "data": {"claims": {}, "nod')  # truncated
    state = node.base / "state"  # apart from the plugin dir, so the DRA socket stays reachable
    plugin = start_in_namespace(
        node, state, seed=seed, fill=True, extra=("--state-dir", str(state))
    ).wait_ready()
    assert plugin.proc.poll() is None  # no crash loop: it serves
    claim = node.put(claim_for("uid-full", "gpu-3", [TIMESLICE_CONFIG]))

    error = prepare_error(plugin, claim)
    assert "the plugin cannot serve claims yet" in error
    assert f"directory {state} is full" in error
    assert "Traceback" not in plugin.output()
    events = {e.get("event") for e in plugin.events()}
    assert "checkpoint cannot be written" in events
    assert {g.get("timeslice", 0) for g in node.gpus().values()} == {0}  # nothing was done

    assert list(inside(plugin, state).glob("checkpoint.json.corrupt-*"))  # moved aside as designed
    inside(plugin, state / "filler").unlink()  # the admin frees space

    def prepared() -> bool:
        return prepare_error(plugin, claim) == ""

    poll(prepared, "recovery once the state dir has space again")
    assert "checkpoint usable again; serving claims" in {e.get("event") for e in plugin.events()}
    assert 3 in {g.get("timeslice") for g in node.gpus().values()}
    plugin.unprepare(claim)
    assert {g.get("timeslice", 0) for g in node.gpus().values()} == {0}
    plugin.stop()


@pytest.mark.slow
def test_read_only_cdi_root_fails_the_claim_naming_the_directory_and_leaves_nothing(node: Node) -> None:
    plugin = start_in_namespace(node, node.cdi, readonly=True).wait_ready()
    claim = node.put(claim_for("uid-ro", "gpu-2", [TIMESLICE_CONFIG]))
    error = prepare_error(plugin, claim)
    assert f"directory {node.cdi} is on a read-only file system" in error
    assert node.claims() == {}
    assert {g.get("timeslice", 0) for g in node.gpus().values()} == {0}  # rolled back

    subprocess.run(
        [
            "nsenter",
            "--target",
            str(plugin.proc.pid),
            "--mount",
            "--",
            "mount",
            "-o",
            "remount,rw",
            str(node.cdi),
        ],
        check=True,
    )
    plugin.prepare(claim)
    assert (inside(plugin, node.cdi) / "k8s.gpu.nvidia.com-claim_uid-ro.json").exists()
    plugin.unprepare(claim)
    plugin.stop()


def test_unshare_mount_stays_private(node: Node) -> None:
    """The fixture's own promise: the tmpfs is invisible on the host."""
    target = node.base / "private"
    target.mkdir()
    probe = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=64k t "{target}" && touch "{target}/inside" && ls "{target}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "inside" in probe.stdout
    assert list(target.iterdir()) == []
    assert str(target) not in Path("/proc/self/mountinfo").read_text()
