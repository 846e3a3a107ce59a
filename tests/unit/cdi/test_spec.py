"""The CDI spec model: exact JSON field names, minimum version, validation, strict reading."""

from __future__ import annotations

import json

import pytest

from cdi.errors import SpecInvalidError
from cdi.spec import (
    ContainerEdits,
    Device,
    DeviceNode,
    Hook,
    Mount,
    Spec,
    minimum_version,
    new_spec,
    validate,
)

KIND = "k8s.gpu.nvidia.com/claim"


def node_edits(path: str = "/dev/nvidia0", host: str | None = None) -> ContainerEdits:
    return ContainerEdits(device_nodes=(DeviceNode(path=path, host_path=host),))


def full_spec() -> Spec:
    common = ContainerEdits(
        env=("NVIDIA_VISIBLE_DEVICES=void",),
        device_nodes=(DeviceNode("/dev/nvidiactl", host_path="/dev/nvidiactl"),),
        mounts=(Mount("/usr/lib/libcuda.so.1", "/usr/lib/libcuda.so.1", ("ro", "bind")),),
        hooks=(Hook("createContainer", "/usr/bin/nvidia-cdi-hook", ("nvidia-cdi-hook", "update-ldcache")),),
    )
    cap = DeviceNode("/dev/nvidia-caps/nvidia-cap102", type="c", major=239, minor=102, file_mode=0o444)
    dev = Device("abc-gpu-0", ContainerEdits(device_nodes=(DeviceNode("/dev/nvidia0", "/dev/nvidia0"), cap)))
    return new_spec(KIND, [dev], common)


def test_to_dict_uses_cdi_field_names() -> None:
    d = full_spec().to_dict()
    assert list(d) == ["cdiVersion", "kind", "devices", "containerEdits"]
    assert d["kind"] == KIND
    dev = d["devices"][0]
    assert set(dev) == {"name", "containerEdits"}
    assert dev["containerEdits"]["deviceNodes"][0] == {"path": "/dev/nvidia0", "hostPath": "/dev/nvidia0"}
    assert dev["containerEdits"]["deviceNodes"][1] == {
        "path": "/dev/nvidia-caps/nvidia-cap102",
        "type": "c",
        "major": 239,
        "minor": 102,
        "fileMode": 292,
    }
    edits = d["containerEdits"]
    assert edits["mounts"][0] == {
        "hostPath": "/usr/lib/libcuda.so.1",
        "containerPath": "/usr/lib/libcuda.so.1",
        "options": ["ro", "bind"],
    }
    assert edits["hooks"][0] == {
        "hookName": "createContainer",
        "path": "/usr/bin/nvidia-cdi-hook",
        "args": ["nvidia-cdi-hook", "update-ldcache"],
    }
    assert edits["env"] == ["NVIDIA_VISIBLE_DEVICES=void"]


def test_empty_spec_level_edits_are_left_out_but_device_edits_never() -> None:
    spec = new_spec(KIND, [Device("a-gpu-0", node_edits())])
    d = spec.to_dict()
    assert "containerEdits" not in d
    assert "containerEdits" in d["devices"][0]


def test_json_round_trip() -> None:
    spec = full_spec()
    text = spec.to_json()
    assert text.endswith("\n")
    assert Spec.from_json(text) == spec


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        (Spec("1.1.0", KIND, (Device("abc-gpu-0", node_edits()),)), "0.3.0"),
        (Spec("1.1.0", KIND, (Device("0abc-gpu-0", node_edits()),)), "0.5.0"),
        (Spec("1.1.0", KIND, (Device("abc-gpu-0", node_edits(host="/h/dev/nvidia0")),)), "0.5.0"),
        (
            Spec(
                "1.1.0",
                KIND,
                (Device("abc", ContainerEdits(mounts=(Mount("/a", "/b", type="bind"),))),),
            ),
            "0.4.0",
        ),
        (Spec("1.1.0", "vendor.com/a.b", (Device("abc", node_edits()),)), "0.6.0"),
        (
            Spec(
                "1.1.0",
                KIND,
                (Device("abc", node_edits()),),
                ContainerEdits(device_nodes=(DeviceNode("/dev/x", host_path="/dev/x"),)),
            ),
            "0.5.0",
        ),
    ],
)
def test_minimum_version_follows_cdi_rules(spec: Spec, want: str) -> None:
    assert minimum_version(spec) == want


def test_new_spec_fills_minimum_version() -> None:
    assert full_spec().version == "0.5.0"


def test_validate_accepts_good_spec() -> None:
    validate(full_spec())


def _with_device_edits(edits: ContainerEdits, name: str = "abc-gpu-0") -> Spec:
    return Spec("1.1.0", KIND, (Device(name, edits),))


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (Spec("0.3.0", KIND, (Device("0abc", node_edits()),)), "needs at least 0.5.0"),
        (Spec("9.9.9", KIND, (Device("abc", node_edits()),)), "not a released CDI version"),
        (Spec("1.1.0", "nokind", (Device("abc", node_edits()),)), "vendor/class"),
        (Spec("1.1.0", "1vendor/claim", (Device("abc", node_edits()),)), "vendor/class"),
        (Spec("1.1.0", KIND, ()), "no devices"),
        (_with_device_edits(node_edits(), name="abc-"), "invalid"),
        (_with_device_edits(node_edits(), name="a/b"), "invalid"),
        (Spec("1.1.0", KIND, (Device("a", node_edits()), Device("a", node_edits()))), "twice"),
        (_with_device_edits(ContainerEdits()), "no container edits"),
        (_with_device_edits(node_edits("dev/nvidia0")), "absolute"),
        (_with_device_edits(node_edits(host="relative/x")), "absolute"),
        (_with_device_edits(ContainerEdits(device_nodes=(DeviceNode("/dev/x", type="z"),))), "type"),
        (_with_device_edits(ContainerEdits(device_nodes=(DeviceNode("/dev/x", type="c"),))), "major/minor"),
        (
            _with_device_edits(ContainerEdits(device_nodes=(DeviceNode("/dev/x", permissions="rx"),))),
            "r, w, m",
        ),
        (_with_device_edits(ContainerEdits(env=("=x",))), "KEY=VALUE"),
        (_with_device_edits(ContainerEdits(env=("NOEQUALS",))), "KEY=VALUE"),
        (_with_device_edits(ContainerEdits(mounts=(Mount("/a", "b"),))), "containerPath"),
        (_with_device_edits(ContainerEdits(hooks=(Hook("onStart", "/bin/h"),))), "hookName"),
        (_with_device_edits(ContainerEdits(hooks=(Hook("createContainer", "h"),))), "absolute"),
    ],
)
def test_validate_refuses_with_actionable_message(spec: Spec, needle: str) -> None:
    with pytest.raises(SpecInvalidError, match=needle):
        validate(spec)


def test_validate_checks_spec_level_edits_too() -> None:
    spec = Spec("1.1.0", KIND, (Device("abc", node_edits()),), ContainerEdits(env=("BAD",)))
    with pytest.raises(SpecInvalidError, match="spec containerEdits"):
        validate(spec)


def test_from_dict_refuses_unknown_fields_like_the_cdi_loader() -> None:
    d = full_spec().to_dict()
    d["devices"][0]["containerEdits"]["deviceNodes"][0]["colour"] = "red"
    with pytest.raises(SpecInvalidError, match="colour"):
        Spec.from_dict(d)
    d = full_spec().to_dict()
    d["annotations"] = {"a": "b"}
    with pytest.raises(SpecInvalidError, match="annotations"):
        Spec.from_dict(d)


def test_from_json_refuses_garbage_and_wrong_types() -> None:
    with pytest.raises(SpecInvalidError, match="not valid JSON"):
        Spec.from_json("{not json")
    d = full_spec().to_dict()
    d["devices"][0]["containerEdits"]["deviceNodes"][1]["major"] = "239"
    with pytest.raises(SpecInvalidError, match="major must be an integer"):
        Spec.from_json(json.dumps(d))
    with pytest.raises(SpecInvalidError, match="lacks required"):
        Spec.from_dict({"cdiVersion": "0.5.0", "kind": KIND})


def test_merged_keeps_order_and_drops_exact_duplicates() -> None:
    a = ContainerEdits(env=("A=1",), device_nodes=(DeviceNode("/dev/nvidia0"),))
    b = ContainerEdits(
        env=("B=2", "A=1"), device_nodes=(DeviceNode("/dev/nvidia0"), DeviceNode("/dev/nvidia1"))
    )
    m = a.merged(b)
    assert m.env == ("A=1", "B=2")
    assert [n.path for n in m.device_nodes] == ["/dev/nvidia0", "/dev/nvidia1"]
    assert ContainerEdits().is_empty()
    assert not m.is_empty()
