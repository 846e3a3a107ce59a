"""explain / simulate answer capacity requests: consumable shares of full GPUs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.debug.commands import main


def claim(*requests: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": {"devices": {"requests": list(requests)}},
    }


def request(name: str, memory: str | None = None, **extra: Any) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": "gpu.nvidia.com", **extra}
    if memory is not None:
        exactly["capacity"] = {"requests": {"memory": memory}}
    return {"name": name, "exactly": exactly}


def simulate(tmp_path: Path, obj: dict[str, Any], topology: str, *flags: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "claim.yaml"
    path.write_text(yaml.safe_dump(obj))
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["simulate", str(path), "--topology", topology, "-o", "json", *flags])
    return rc, json.loads(out.getvalue())


def test_four_10gi_requests_share_one_gpu_and_a_fifth_takes_the_next(tmp_path: Path) -> None:
    obj = claim(*(request(f"r{i}", "10Gi") for i in range(5)))
    rc, data = simulate(tmp_path, obj, "a100-40gb-x2")
    assert rc == 0, data
    assert data["verdict"] == "fits"
    assert [data["allocation"][f"r{i}"] for i in range(5)] == [["gpu-0"]] * 4 + [["gpu-1"]]
    assert data["consumedCapacity"]["r0"]["gpu-0"]["memory"] == "10Gi"
    assert data["consumedCapacity"]["r0"]["gpu-0"]["computePercent"] == "0"


def test_a_request_is_rounded_up_by_the_policy_and_too_much_does_not_fit(tmp_path: Path) -> None:
    rc, data = simulate(tmp_path, claim(request("small", "100Mi")), "a100-40gb-x2")
    assert rc == 0
    assert data["consumedCapacity"]["small"]["gpu-0"]["memory"] == "1Gi", "rounded up to the 1Gi minimum"
    rc, data = simulate(tmp_path, claim(request("huge", "50Gi")), "a100-40gb-x2")
    assert rc == 1
    assert data["verdict"] == "unschedulable"


def test_a_whole_gpu_request_leaves_no_room_for_a_share_on_it(tmp_path: Path) -> None:
    obj = claim(request("whole"), request("share", "10Gi"))
    rc, data = simulate(tmp_path, obj, "a100-40gb-x2")
    assert rc == 0
    assert data["allocation"] == {"whole": ["gpu-0"], "share": ["gpu-1"]}
    assert data["consumedCapacity"]["whole"]["gpu-0"]["memory"] == "40Gi"
    rc, data = simulate(tmp_path, claim(request("a"), request("b"), request("c", "1Gi")), "a100-40gb-x2")
    assert rc == 1, "two whole GPUs taken, no room for a share"


@pytest.mark.parametrize(("mode", "fits"), [("unlimited", 3), ("4", 4)])
def test_the_other_modes(tmp_path: Path, mode: str, fits: int) -> None:
    one_gpu = 'device.attributes["resource.kubernetes.io"].pciBusID == "0000:07:00.0"'
    sel = [{"cel": {"expression": one_gpu}}]
    rc, data = simulate(
        tmp_path,
        claim(*(request(f"r{i}", selectors=sel) for i in range(fits))),
        "a100-40gb-x2",
        "--consumable-shares",
        mode,
    )
    assert rc == 0, data
    assert all(v == ["gpu-0"] for v in data["allocation"].values())
    if mode == "4":
        assert data["consumedCapacity"]["r0"]["gpu-0"]["shares"] == "1"
        rc, data = simulate(
            tmp_path,
            claim(*(request(f"r{i}", selectors=sel) for i in range(5))),
            "a100-40gb-x2",
            "--consumable-shares",
            mode,
        )
        assert rc == 1, "a fifth share of four does not fit"
