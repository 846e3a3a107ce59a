"""driver.config: flags, environment twins and the cross-flag rules."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from driver.config import Config, add_plugin_flags, from_args, load, parse, parse_feature_gates, validate
from driver.errors import ConfigError

TEST_ENV = {
    "NO_PUBLISH": "true",
    "FAKE_CLAIMS_DIR": "/claims",
    "NVML_BACKEND": "fake",
    "FAKE_TOPOLOGY": "t4-x4",
}


def _ns(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plugin_flags(parser)
    return parser.parse_args(list(argv))


def test_defaults_match_the_go_driver_layout() -> None:
    """Defaults are NVIDIA's paths; the state dir is <plugins dir>/<driver name>."""
    cfg = from_args(_ns("--node-name", "n1"), env={})
    assert cfg.driver_name == "gpu.nvidia.com"
    assert cfg.kubelet_registrar_directory_path == Path("/var/lib/kubelet/plugins_registry")
    assert cfg.kubelet_plugins_directory_path == Path("/var/lib/kubelet/plugins")
    assert cfg.cdi_root == Path("/var/run/cdi")
    assert cfg.state_dir == Path("/var/lib/kubelet/plugins/gpu.nvidia.com")
    assert cfg.container_driver_root == cfg.driver_root == Path("/")
    assert cfg.publish is True
    assert cfg.healthcheck_port == -1


def test_environment_twins_are_read() -> None:
    """Every flag can come from its environment variable."""
    env = {
        "NODE_NAME": "n2",
        "DRIVER_NAME": "gpu.example.com",
        "CDI_ROOT": "/etc/cdi",
        "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver",
        "DRIVER_ROOT_CTR_PATH": "/driver-root",
        "KUBELET_PLUGINS_DIRECTORY_PATH": "/k/plugins",
        "POD_UID": "0b7f0a4c-5c1e-4d59-9b7a-8a1d2f3e4c5d",
        "POD_NAMESPACE": "gpu-system",
        "HEALTHCHECK_PORT": "51515",
        "FEATURE_GATES": "MPSSupport=false",
        "MIG_MODE": "static",
        "ALLOW_MIG_MODE_CHANGE": "true",
    }
    cfg = from_args(_ns(), env=env)
    assert cfg.node_name == "n2"
    assert cfg.driver_name == "gpu.example.com"
    assert cfg.cdi_root == Path("/etc/cdi")
    assert cfg.driver_root == Path("/run/nvidia/driver")
    assert cfg.container_driver_root == Path("/driver-root")
    assert cfg.state_dir == Path("/k/plugins/gpu.example.com")
    assert cfg.pod_uid == "0b7f0a4c-5c1e-4d59-9b7a-8a1d2f3e4c5d"
    assert cfg.namespace == "gpu-system"
    assert cfg.healthcheck_port == 51515
    assert cfg.gate("MPSSupport") is False
    assert cfg.gate("DynamicMIG") is True  # on by default: NVIDIA's manifests work unchanged
    assert cfg.mig_mode == "static"
    assert cfg.allow_mig_mode_change is True


def test_flag_wins_over_environment() -> None:
    """A flag on the command line overrides its variable."""
    cfg = from_args(_ns("--node-name", "flag-node"), env={"NODE_NAME": "env-node"})
    assert cfg.node_name == "flag-node"


def test_no_publish_from_flag_or_env() -> None:
    """--no-publish and NO_PUBLISH=true both switch publishing off."""
    assert from_args(_ns("--no-publish"), env={}).publish is False
    assert from_args(_ns(), env={"NO_PUBLISH": "true"}).publish is False


def test_a_test_setup_without_api_server_validates() -> None:
    """Fake backend + --no-publish + --fake-claims-dir needs no kubeconfig."""
    cfg = parse(["--node-name", "n1"], env=TEST_ENV)
    assert cfg.fake_claims_dir == Path("/claims")


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        pytest.param([], TEST_ENV, "--node-name / NODE_NAME is required", id="node-name-missing"),
        pytest.param(
            ["--driver-name", "GPU_Nvidia"], TEST_ENV, "--driver-name / DRIVER_NAME", id="bad-driver"
        ),
        pytest.param(
            ["--cdi-root", "relative/cdi"], TEST_ENV, "--cdi-root / CDI_ROOT must be an absolute", id="rel"
        ),
        pytest.param(["--pod-uid", "Not A UID"], TEST_ENV, "--pod-uid / POD_UID", id="pod-uid"),
        pytest.param(["--healthcheck-port", "70000"], TEST_ENV, "HEALTHCHECK_PORT 70000", id="port"),
        pytest.param(
            [],
            {**TEST_ENV, "FAKE_TOPOLOGY": ""},
            "--nvml-backend=fake needs --fake-topology",
            id="no-topology",
        ),
        pytest.param(
            ["--nvml-backend", "real", "--fake-topology", "t4-x4"],
            {"NO_PUBLISH": "1", "FAKE_CLAIMS_DIR": ""},
            "--fake-topology / FAKE_TOPOLOGY only applies",
            id="fake-flag-with-real",
        ),
        pytest.param(
            [], {"NVML_BACKEND": "fake", "FAKE_TOPOLOGY": "t4-x4"}, "no API server configured", id="no-api"
        ),
        pytest.param(
            ["--feature-gates", "DynamicMIG=true,PassthroughSupport=true"],
            TEST_ENV,
            "PassthroughSupport=true is not implemented by gpu-dra",
            id="gate-not-implemented",
        ),
    ],
)
def test_validate_names_the_flag_and_variable_to_fix(
    argv: list[str], env: dict[str, str], needle: str
) -> None:
    """Each cross-flag rule yields a message naming what to change."""
    cfg = from_args(_ns("--node-name", "n1", *argv) if "node-name" not in needle else _ns(*argv), env=env)
    problems = validate(cfg)
    assert any(needle in p for p in problems), problems


def test_load_reports_every_problem_at_once() -> None:
    """load() raises one ConfigError listing all problems, not just the first."""
    with pytest.raises(ConfigError) as info:
        load(_ns("--cdi-root", "cdi", "--driver-name", "BAD"), env=TEST_ENV)
    text = str(info.value)
    assert "--node-name" in text
    assert "--cdi-root" in text
    assert "--driver-name" in text


def test_in_cluster_counts_as_api_access() -> None:
    """In a pod (KUBERNETES_SERVICE_HOST set) no kubeconfig is needed."""
    cfg = from_args(_ns("--node-name", "n1"), env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert cfg.in_cluster
    assert validate(cfg) == []


def test_kubeconfig_must_exist(tmp_path: Path) -> None:
    """A kubeconfig path that is not a file is reported."""
    missing = tmp_path / "nope"
    cfg = from_args(_ns("--node-name", "n1", "--kubeconfig", str(missing)), env={})
    assert any("--kubeconfig / KUBECONFIG" in p for p in validate(cfg))
    existing = tmp_path / "kubeconfig"
    existing.write_text("apiVersion: v1\n")
    assert validate(from_args(_ns("--node-name", "n1", "--kubeconfig", str(existing)), env={})) == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("MPSSupport", "is not NAME=true|false", id="no-value"),
        pytest.param("MPSSupport=yes", "is not NAME=true|false", id="bad-value"),
        pytest.param("NoSuchGate=true", "unknown gate 'NoSuchGate'", id="unknown"),
    ],
)
def test_feature_gate_errors(text: str, needle: str) -> None:
    """Malformed or unknown gates are refused, not ignored."""
    with pytest.raises(ConfigError, match=needle):
        parse_feature_gates(text)


def test_config_is_frozen() -> None:
    """Config values cannot change after start-up."""
    cfg = Config(node_name="n1")
    with pytest.raises(AttributeError):
        cfg.node_name = "n2"  # type: ignore[misc]


def test_shutdown_grace_defaults_to_5s_and_bad_values_name_the_flag() -> None:
    assert from_args(_ns("--node-name", "n1"), env={}).shutdown_grace_s == 5.0
    assert from_args(_ns("--node-name", "n1"), env={"SHUTDOWN_GRACE": "0.5"}).shutdown_grace_s == 0.5
    with pytest.raises(ConfigError, match=r"--shutdown-grace / SHUTDOWN_GRACE must be a number"):
        from_args(_ns("--node-name", "n1", "--shutdown-grace", "soon"), env={})
    with pytest.raises(ConfigError, match=r"--shutdown-grace / SHUTDOWN_GRACE -1 is out of range"):
        parse(["--node-name", "n1", "--shutdown-grace", "-1"], env=TEST_ENV)
