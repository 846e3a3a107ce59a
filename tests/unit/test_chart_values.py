"""The Helm chart's values and their schema, checked without helm.

Why: values.schema.json is the chart's user interface (helm refuses values it rejects), and the
DaemonSet hands values to the plugin through environment variables; both drift silently when
someone edits one side. These tests pin: the defaults are valid, every value is documented, bad
values are rejected, and every variable the DaemonSet sets is one ``gpu-dra plugin`` reads.

What it does not do: render templates or run helm (tests/e2e/test_chart.py does, against a real
API server).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from driver import config as plugin_config

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "gpu-dra"

# Set by the chart but not (yet) read by driver/config.py; a variable added to the chart before
# the plugin reads it goes here, and the test fails once the plugin does: empty it then.
PENDING_PLUGIN_ENV: frozenset[str] = frozenset()
# Set for the chart's own use: POD_IP only feeds HEALTHCHECK_ADDRESS=$(POD_IP).
CHART_ONLY_ENV: frozenset[str] = frozenset({"POD_IP"})
#: The schema's mark on keys taken over from NVIDIA's chart (mapped, or accepted and ignored).
NVIDIA_COMPAT = "nvidia-chart-compat"


def _schema() -> dict[str, Any]:
    import json

    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def _values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def _validator() -> Any:
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _properties(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (dotted path, sub-schema) below ``properties``, through arrays' ``items`` too."""
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        yield here, sub
        yield from _properties(sub, here)
        items = sub.get("items")
        if isinstance(items, dict):
            yield from _properties(items, f"{here}[]")


def test_default_values_validate_against_schema() -> None:
    errors = [e.message for e in _validator().iter_errors(_values())]
    assert errors == []


def test_every_schema_property_has_a_description() -> None:
    undocumented = [
        path for path, sub in _properties(_schema()) if not str(sub.get("description", "")).strip()
    ]
    assert undocumented == [], f"values without a description in values.schema.json: {undocumented}"


def test_every_schema_object_is_closed_and_listed_in_values_yaml() -> None:
    # A value the schema knows but values.yaml omits is invisible to users reading the defaults.
    values = _values()
    missing: list[str] = []

    def walk(schema: dict[str, Any], given: dict[str, Any], path: str) -> None:
        for name, sub in (schema.get("properties") or {}).items():
            here = f"{path}.{name}" if path else name
            if sub.get("$comment") == NVIDIA_COMPAT:
                continue  # keys of NVIDIA's chart, accepted for users' existing values files
            if name not in given:
                missing.append(here)
            elif isinstance(given[name], dict) and "properties" in sub:
                assert sub.get("additionalProperties") is False, f"{here}: object accepts unknown keys"
                walk(sub, given[name], here)

    assert _schema().get("additionalProperties") is False
    walk(_schema(), values, "")
    assert missing == [], f"schema properties absent from values.yaml: {missing}"


def _with(path: str, value: Any) -> dict[str, Any]:
    values = copy.deepcopy(_values())
    *parents, last = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return values


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        ("plugin.migMode", "dynamc", "is not one of"),
        ("nvidiaDriverRoot", "run/nvidia/driver", "does not match"),
        ("kubeletDirs.plugins", "var/lib/kubelet/plugins", "does not match"),
        ("stateDir", "state", "does not match"),
        ("plugin.logLevel", "verbose", "is not one of"),
        ("plugin.allowMigModeChange", "yes", "is not of type 'boolean'"),
        ("plugin.featureGates", {"MPSSuport": True}, "is not one of"),
        ("plugin.featureGates", {"MPSSupport": "true"}, "is not of type 'boolean'"),
        ("deviceClasses.gpuExtendedResource", "sometimes", "is not valid under any of the given schemas"),
        ("image.pullPolicy", "always", "is not one of"),
        ("plugin.unknownKey", 1, "Additional properties are not allowed"),
        ("unknownTopLevel", 1, "Additional properties are not allowed"),
    ],
)
def test_schema_rejects_bad_values(path: str, value: Any, complaint: str) -> None:
    messages = [e.message for e in _validator().iter_errors(_with(path, value))]
    assert any(complaint in m for m in messages), messages


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("stateDir", "/var/lib/gpu-dra"),
        ("nvidiaDriverRoot", "/run/nvidia/driver"),
        ("plugin.migMode", "static"),
        ("plugin.featureGates", {"MPSSupport": True, "TimeSlicingSettings": True}),
        ("deviceClasses.gpuExtendedResource", True),
        ("deviceClasses.gpuExtendedResource", False),
        ("serviceAccount.name", "gpu-plugin"),
    ],
)
def test_schema_accepts_documented_alternatives(path: str, value: Any) -> None:
    assert [e.message for e in _validator().iter_errors(_with(path, value))] == []


def test_feature_gate_names_match_the_plugin() -> None:
    names = _schema()["properties"]["plugin"]["properties"]["featureGates"]["propertyNames"]["enum"]
    assert sorted(names) == sorted(plugin_config.KNOWN_FEATURE_GATES)


def _plugin_env_names() -> set[str]:
    # Every environment twin of a `gpu-dra plugin` flag, plus the flag-less NO_PUBLISH.
    names = {"NO_PUBLISH"}
    for spec in plugin_config._FLAGS:
        names.update(spec.env)
    return names


def test_daemonset_sets_only_variables_the_plugin_reads() -> None:
    template = (CHART / "templates" / "daemonset.yaml").read_text()
    env_block = template.split("        env:\n", 1)[1].split("        securityContext:", 1)[0]
    set_by_chart = set(re.findall(r"^\s*- name: ([A-Z][A-Z0-9_]*)\s*$", env_block, re.MULTILINE))
    assert {"NODE_NAME", "POD_UID", "POD_NAMESPACE", "DRIVER_ROOT_CTR_PATH"} <= set_by_chart
    unread = set_by_chart - _plugin_env_names() - CHART_ONLY_ENV
    assert unread == PENDING_PLUGIN_ENV, (
        f"the DaemonSet sets {sorted(unread)} but driver/config.py reads only {sorted(_plugin_env_names())}"
    )


@pytest.mark.parametrize(
    ("value", "variable"),
    [("logFormat", "LOG_FORMAT"), ("logLevel", "LOG_LEVEL"), ("migMode", "MIG_MODE")],
)
def test_enum_values_are_the_plugin_choices(value: str, variable: str) -> None:
    spec = next(f for f in plugin_config._FLAGS if variable in f.env)
    assert spec.choices is not None
    assert _schema()["properties"]["plugin"]["properties"][value]["enum"] == list(spec.choices)
    assert _values()["plugin"][value] == spec.default


NVIDIA_VALUES = Path(__file__).resolve().parents[1] / "data" / "chart" / "nvidia-values.yaml"


def test_a_values_file_written_for_nvidias_chart_validates() -> None:
    """NVIDIA's keys are accepted (mapped or ignored), not "'kubeletPlugin' was unexpected"."""
    theirs = yaml.safe_load(NVIDIA_VALUES.read_text())
    merged = {**_values(), **theirs, "image": theirs["image"]}
    assert [e.message for e in _validator().iter_errors(merged)] == []
    # A typo is still refused: only NVIDIA's own keys are let in.
    assert any(
        "Additional properties are not allowed" in e.message
        for e in _validator().iter_errors({**merged, "kubletPlugin": {}})
    )


def test_every_nvidia_key_is_marked_mapped_or_ignored() -> None:
    compat = {k: v for k, v in _schema()["properties"].items() if v.get("$comment") == NVIDIA_COMPAT}
    for key, sub in compat.items():
        text = sub["description"]
        assert "ignored" in text or "Mapped" in text or "mapped" in text or "merged" in text, key
    theirs = yaml.safe_load(NVIDIA_VALUES.read_text())
    ours = set(_values())
    assert set(theirs) - ours <= set(compat), set(theirs) - ours - set(compat)
