"""The debug CLI as a user meets it, through the installed ``gpu-dra`` console script.

No tracebacks, documented exit codes (0 ok, 1 a negative answer, 2 bad usage or input, 3 the
environment), help with each command's own flags and examples, ``--version``, a list of the
built-in topologies, kubeconfig resolution as kubectl does it, one simulated node across
commands, and kubectl's output conventions (``No resources found.``, ``-o wide``,
``--no-headers``, logs never on stdout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

GPU_DRA = Path(sys.executable).parent / "gpu-dra"
NODE_ENV = (
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "NODE_NAME",
    "FAKE_TOPOLOGY",
    "NVML_BACKEND",
    "STATE_DIR",
)

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty home directory: no ~/.kube/config unless a test writes one."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def gpu_dra(*argv: str, home: Path, env: dict[str, str] | None = None) -> Run:
    environ = {k: v for k, v in os.environ.items() if k not in NODE_ENV}
    environ["HOME"] = str(home)
    environ.update(env or {})
    proc = subprocess.run(
        [str(GPU_DRA), *argv], env=environ, capture_output=True, text=True, timeout=90, check=False
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def one_line_error(run: Run, rc: int) -> str:
    """The run failed with ``rc`` and said why in one line on stderr, without a traceback."""
    assert run.rc == rc, run
    assert "Traceback" not in run.err and "Traceback" not in run.out, run.err
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    return lines[0]


CLAIM = {
    "apiVersion": "resource.k8s.io/v1",
    "kind": "ResourceClaim",
    "metadata": {"name": "one-gpu", "namespace": "default"},
    "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}},
}


def local(tmp_path: Path) -> list[str]:
    """Node flags for a node without NVML (the real backend finds no library under tmp_path)."""
    return ["--node-name", "n1", "--driver-root", str(tmp_path), "--state-dir", str(tmp_path)]


# -- no tracebacks, exit codes -------------------------------------------------------------------


def test_malformed_yaml_is_one_line_naming_line_and_column(tmp_path: Path, home: Path) -> None:
    bad = tmp_path / "malformed.yaml"
    bad.write_text("kind: ResourceClaim\nspec: [\n  - a\n  b: c\n")
    line = one_line_error(gpu_dra("explain", str(bad), "--topology", "a100-40gb-x8", home=home), 2)
    assert f"{bad} is not valid YAML at line" in line and "fix the file" in line


def test_topology_without_gpus_names_the_missing_field(tmp_path: Path, home: Path) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text("name: custom\ndriverVersion: 580.1\n")
    line = one_line_error(gpu_dra("devices", "--topology", str(topo), home=home), 2)
    assert "lacks the field 'gpus'" in line and "KeyError" not in line


def test_dynamic_mig_on_an_ampere_topology_answers_as_the_plugin_would(home: Path) -> None:
    """Once a MigBackendError traceback; now the full GPUs the plugin publishes there (an Ampere
    GPU's MIG mode is the admin's decision)."""
    for flag in ("--mig-mode", "--mig"):
        run = gpu_dra("devices", "--topology", "a100-40gb-x8", flag, "dynamic", "-o", "json", home=home)
        assert run.rc == 0, run.err
        assert [d["kind"] for d in run.json()["devices"]] == ["gpu"] * 8


def test_no_nvml_is_an_environment_problem(tmp_path: Path, home: Path) -> None:
    assert "NVML" in one_line_error(gpu_dra("devices", *local(tmp_path), home=home), 3)


def test_a_claim_that_does_not_fit_is_a_negative_answer(tmp_path: Path, home: Path) -> None:
    claim = tmp_path / "claim.yaml"
    big = json.loads(json.dumps(CLAIM))
    big["spec"]["devices"]["requests"][0]["exactly"].update({"allocationMode": "ExactCount", "count": 9})
    claim.write_text(yaml.safe_dump(big))
    run = gpu_dra("simulate", str(claim), "--topology", "a100-40gb-x8", home=home)
    assert run.rc == 1, run.err
    assert "would fit: no" in run.out


# -- help and flags ------------------------------------------------------------------------------

COMMANDS = [
    "explain",
    "simulate",
    "devices",
    "slices",
    "mig",
    "claims",
    "cdi",
    "doctor",
    "probe",
    "topologies",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_help_shows_its_own_flags_examples_and_exit_codes(command: str, home: Path) -> None:
    run = gpu_dra(command, "--help", home=home)
    assert run.rc == 0, run.err
    text = run.out
    for daemon_only in (
        "--kubelet-registrar-directory-path",
        "--fake-topology",
        "--fake-claims-dir",
        "--pod-uid",
    ):
        assert daemon_only not in text, (command, daemon_only)
    assert "examples:\n  gpu-dra " in text
    assert "exit codes:" in text and "3  the environment" in text
    assert len(text.splitlines()) < 60, len(text.splitlines())


def test_top_level_help_and_version(home: Path) -> None:
    run = gpu_dra("--help", home=home)
    assert run.rc == 0 and "exit codes" in run.out and "~/.kube/config" in run.out
    version = gpu_dra("--version", home=home)
    assert version.rc == 0 and version.out.strip().startswith("gpu-dra 0."), version


def test_simulate_without_topology_says_what_is_missing_in_one_line(tmp_path: Path, home: Path) -> None:
    claim = tmp_path / "claim.yaml"
    claim.write_text(yaml.safe_dump(CLAIM))
    line = one_line_error(gpu_dra("simulate", str(claim), home=home), 2)
    assert "--topology" in line and "gpu-dra topologies" in line
    usage = one_line_error(gpu_dra("simulate", home=home), 2)  # not even the claim: one line too
    assert "CLAIM" in usage and "--help" in usage


def test_topologies_are_listed(home: Path) -> None:
    run = gpu_dra("topologies", "-o", "json", home=home)
    assert run.rc == 0
    names = [t["name"] for t in run.json()["topologies"]]
    assert {"a100-40gb-x8", "h100-80gb-x8", "a100-40gb-x1-mig"} <= set(names)
    plain = gpu_dra("topologies", "--no-headers", home=home)
    assert [line.split()[0] for line in plain.out.splitlines()] == names


# -- kubeconfig like kubectl ---------------------------------------------------------------------


def kubeconfig(path: Path, contexts: dict[str, int], current: str) -> Path:
    """A kubeconfig whose contexts point at closed loopback ports (nothing answers there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clusters = [
        {"name": n, "cluster": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}}
        for n, port in contexts.items()
    ]
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": clusters,
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": n, "context": {"cluster": n, "user": "u"}} for n in contexts],
        "current-context": current,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_no_credentials_anywhere_is_an_environment_problem(home: Path) -> None:
    line = one_line_error(gpu_dra("explain", "default/foo", "--node-name", "n1", home=home), 3)
    assert "no Kubernetes credentials" in line
    for where in ("--kubeconfig", "$KUBECONFIG", "~/.kube/config", "pod"):
        assert where in line
    assert "Service host/port is not set" not in line


def _port(line: str, port: int) -> bool:
    return f"port={port}" in line or f"127.0.0.1:{port}" in line


@pytest.mark.parametrize("source", ["home", "env", "flag"])
def test_kubeconfig_is_found_as_kubectl_finds_it(tmp_path: Path, home: Path, source: str) -> None:
    """~/.kube/config, then $KUBECONFIG over it, then --kubeconfig over both; --context picks one."""
    kubeconfig(home / ".kube" / "config", {"home": 9}, "home")
    env_file = kubeconfig(tmp_path / "env.yaml", {"env": 8}, "env")
    flag_file = kubeconfig(tmp_path / "flag.yaml", {"flag": 7, "other": 6}, "flag")
    argv = ["explain", "default/foo", "--node-name", "n1"]
    env: dict[str, str] = {}
    if source in ("env", "flag"):
        env["KUBECONFIG"] = str(env_file)
    if source == "flag":
        argv += ["--kubeconfig", str(flag_file)]
    expected = {"home": 9, "env": 8, "flag": 7}[source]
    line = one_line_error(gpu_dra(*argv, home=home, env=env), 3)
    assert _port(line, expected), line
    if source == "flag":
        other = one_line_error(gpu_dra(*argv, "--context", "other", home=home, env=env), 3)
        assert _port(other, 6), other
        missing = one_line_error(gpu_dra(*argv, "--context", "nope", home=home, env=env), 3)
        assert "context 'nope'" in missing


# -- one simulated node --------------------------------------------------------------------------


def uuids(run: Run) -> set[str]:
    assert run.rc == 0, run.err
    return {d["uuid"] for d in run.json()["devices"]}


def slice_uuids(run: Run) -> set[str]:
    assert run.rc == 0, run.err
    return {
        d["attributes"]["uuid"]["string"]
        for s in run.json()["slices"]
        for d in s["spec"].get("devices", [])
        if "uuid" in d.get("attributes", {})
    }


def test_devices_and_slices_show_the_same_simulated_node(home: Path) -> None:
    topo = ["--topology", "a100-40gb-x8", "-o", "json"]
    devices = uuids(gpu_dra("devices", *topo, home=home))
    slices = gpu_dra("slices", *topo, home=home)
    assert devices == slice_uuids(slices) and len(devices) == 8
    assert {s["spec"]["nodeName"] for s in slices.json()["slices"]} == {"simulated-node"}
    named = uuids(gpu_dra("devices", *topo, "--node-name", "n7", home=home))
    assert named.isdisjoint(devices)  # --node-name is the node's identity; the UUIDs follow it
    assert named == slice_uuids(gpu_dra("slices", *topo, "--node-name", "n7", home=home))


def test_mig_on_topology_publishes_dynamic_mig_by_default(home: Path) -> None:
    """The chart's default is migMode: dynamic; so is the simulated node's."""
    run = gpu_dra("devices", "--topology", "a100-40gb-x1-mig", "-o", "json", home=home)
    assert run.rc == 0, run.err
    assert {d["kind"] for d in run.json()["devices"]} == {"mig-dynamic"}


# -- output conventions --------------------------------------------------------------------------


def test_empty_table_says_no_resources_found(tmp_path: Path, home: Path) -> None:
    for command in ("claims", "cdi"):
        run = gpu_dra(command, "--state-dir", str(tmp_path), "--cdi-root", str(tmp_path), home=home)
        assert run.rc == 0, run.err
        assert run.out.splitlines()[0] == "No resources found.", run.out


def test_wide_and_no_headers(home: Path) -> None:
    topo = ["devices", "--topology", "a100-40gb-x8"]
    plain = gpu_dra(*topo, home=home).out.splitlines()
    wide = gpu_dra(*topo, "-o", "wide", home=home).out.splitlines()
    bare = gpu_dra(*topo, "--no-headers", home=home).out.splitlines()
    assert plain[0].split() == ["DEVICE", "KIND", "PRODUCT", "PROFILE", "HELD", "BY", "HEALTH", "TAINTS"]
    assert wide[0].split()[8:11] == ["UUID", "GPU", "MEMORY"]
    assert "40Gi" in wide[1]
    assert bare[0].startswith("gpu-0 ") and len(bare) == 8


def test_json_keeps_attribute_types(home: Path) -> None:
    topo = ["--topology", "a100-40gb-x8", "-o", "json"]
    devices = gpu_dra("devices", *topo, home=home).json()["devices"]
    slices = gpu_dra("slices", *topo, home=home).json()["slices"]
    numa = devices[0]["attributes"]["resource.kubernetes.io/numaNode"]
    published = slices[0]["spec"]["devices"][0]["attributes"]["resource.kubernetes.io/numaNode"]
    assert isinstance(numa, int) and published == {"int": numa}


def test_doctor_reports_skipped_checks_as_skipped_and_keeps_logs_off_stdout(
    tmp_path: Path, home: Path
) -> None:
    run = gpu_dra("doctor", *local(tmp_path), "-o", "json", home=home)
    assert run.rc == 1  # checks fail here: no NVML, no plugin, no API server
    data = run.json()  # stdout is the JSON document and nothing else
    checks = {c["check"]: c for c in data["checks"]}
    nodes = checks["device nodes exist"]
    assert (nodes["status"], nodes["ok"]) == ("skipped", None)
    assert checks["NVML loads and sees GPUs"]["status"] == "fail"
    assert checks["slices published and valid"]["status"] == "skipped"
    assert "nvml library not under driver root" not in run.err  # once printed twice, as log lines
    table = gpu_dra("doctor", *local(tmp_path), home=home)
    assert table.out.startswith("verdict: ")  # the verdict first
    assert table.out.count("skip  device nodes exist") == 1


# -- explain's fixes -----------------------------------------------------------------------------


def explain(tmp_path: Path, home: Path, expression: str, topology: str, cls: str = "gpu.nvidia.com") -> Run:
    claim = json.loads(json.dumps(CLAIM))
    exactly = claim["spec"]["devices"]["requests"][0]["exactly"]
    exactly.update({"deviceClassName": cls, "selectors": [{"cel": {"expression": expression}}]})
    path = tmp_path / "claim.yaml"
    path.write_text(yaml.safe_dump(claim))
    return gpu_dra("explain", str(path), "--topology", topology, home=home)


def test_an_attribute_without_its_domain_gets_the_domain_qualified_fix(tmp_path: Path, home: Path) -> None:
    run = explain(
        tmp_path, home, 'device.attributes["profile"] == "1g.5gb"', "a100-40gb-x1-mig", "mig.nvidia.com"
    )
    assert run.rc == 1, run.err
    assert run.out.startswith("would fit: no (the API server rejects")  # the verdict first
    assert 'fix: device.attributes["gpu.nvidia.com"].profile == "1g.5gb"' in run.out
    assert run.out.count("needs its domain first") == 1  # about the claim: said once, not per device
    assert "no matching overload" not in run.out


def test_misspelt_names_get_a_did_you_mean(tmp_path: Path, home: Path) -> None:
    field = explain(tmp_path, home, 'device.atributes["gpu.nvidia.com"].type == "gpu"', "t4-x4")
    assert 'fix: device.attributes["gpu.nvidia.com"].type == "gpu"' in field.out
    assert '["gpu.nvidia.com"].atributes' not in field.out
    key = explain(tmp_path, home, 'device.attributes["gpu.nvidia.com"].prodName == "x"', "t4-x4")
    assert "no such key: prodName (did you mean productName?)" in key.out


def test_a_syntax_error_shows_the_column_and_a_caret(tmp_path: Path, home: Path) -> None:
    run = explain(
        tmp_path, home, 'device.driver == && device.attributes["gpu.nvidia.com"].type == "gpu"', "t4-x4"
    )
    lines = run.out.splitlines()
    at = next(i for i, line in enumerate(lines) if "syntax error at column 18" in line)
    assert lines[at + 1].strip() == '| device.driver == && device.attributes["gpu.nvidia.com"].type == "gpu"'
    assert lines[at + 2].index("^") - lines[at + 2].index("|") == lines[at + 1].index("&&") - lines[
        at + 1
    ].index("|")


def test_a_failing_row_shows_the_devices_actual_values(tmp_path: Path, home: Path) -> None:
    expression = (
        'device.attributes["gpu.nvidia.com"].productName == "NVIDIA H100" && '
        'device.capacity["gpu.nvidia.com"].memory.isGreaterThan(quantity("10Gi"))'
    )
    run = explain(tmp_path, home, expression, "a100-40gb-x8")
    assert run.rc == 1
    assert '(device has productName="NVIDIA A100-SXM4-40GB", memory=40Gi)' in run.out
    assert "all 8 devices" in run.out  # identical answers, one row


def test_simulate_on_a_big_mig_node_is_verdict_first_and_grouped(tmp_path: Path, home: Path) -> None:
    claim = json.loads(json.dumps(CLAIM))
    claim["spec"]["devices"]["requests"][0]["exactly"] = {
        "deviceClassName": "mig.nvidia.com",
        "selectors": [{"cel": {"expression": 'device.attributes["gpu.nvidia.com"].profile == "7g.80gb"'}}],
    }
    path = tmp_path / "claim.yaml"
    path.write_text(yaml.safe_dump(claim))
    run = gpu_dra(
        "simulate", str(path), "--topology", "h100-80gb-x8", "--allow-mig-mode-change", "true", home=home
    )
    assert run.rc == 0, run.err
    assert run.out.startswith("would fit: yes")
    assert len(run.out.splitlines()) < 30, run.out  # was 200+ rows before the verdict
