"""driver.kube's transport set-up: the kubernetes package's configuration without the rest of it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from driver.errors import ApiError
from driver.kube import Kube, RestTransport, load_configuration

REPO = Path(__file__).resolve().parents[3]


def _run(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter (sys.modules untouched by pytest) and return its JSON line."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _kubeconfig(path: Path, server: str = "https://127.0.0.1:6443") -> Path:
    path.write_text(
        textwrap.dedent(f"""\
            apiVersion: v1
            kind: Config
            clusters: [{{name: c, cluster: {{server: "{server}", insecure-skip-tls-verify: true}}}}]
            users: [{{name: u, user: {{token: t0ken}}}}]
            contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
            current-context: x
            """)
    )
    return path


def test_the_transport_loads_neither_the_generated_client_nor_the_package_init():
    got = _run("""
        import json, sys
        from driver.kube import RestTransport, _client_modules
        configuration, _ = _client_modules()
        RestTransport(configuration.Configuration())
        heavy = sorted(m for m in ("pydantic", "kubernetes.client.api_client", "kubernetes.dynamic",
                                   "kubernetes.watch", "kubernetes.stream", "yaml", "requests",
                                   "oauthlib") if m in sys.modules)
        placeholders = [m for m in ("kubernetes", "kubernetes.client", "kubernetes.utils")
                        if m in sys.modules]
        # A later import of the whole package still works and sees the same modules.
        import kubernetes
        from kubernetes import client, config
        same = client.Configuration is configuration.Configuration
        print(json.dumps({"heavy": heavy, "placeholders": placeholders, "same": same,
                          "full": callable(config.load_kube_config) and hasattr(client, "ApiClient")}))
        """)
    assert got == {"heavy": [], "placeholders": [], "same": True, "full": True}


def test_a_kubeconfig_gives_host_and_token(tmp_path: Path):
    configuration = load_configuration(_kubeconfig(tmp_path / "kc", "https://10.1.2.3:6443"))
    assert configuration.host == "https://10.1.2.3:6443"
    assert configuration.auth_settings()["BearerToken"]["value"] == "Bearer t0ken"
    assert configuration.verify_ssl is False


def test_unloadable_credentials_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bad = tmp_path / "kc"
    bad.write_text("current-context: nowhere\n")
    with pytest.raises(ApiError, match=r"kubeconfig .*kc.*pass --kubeconfig") as caught:
        load_configuration(bad)
    assert caught.value.reason == "ConfigInvalid"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ApiError, match="in-cluster service account"):
        load_configuration(None)


def test_an_unreachable_server_is_an_unavailable_api_error(tmp_path: Path):
    # Port 1 on loopback refuses at once; the error names the request and what to check.
    kube = Kube(RestTransport(load_configuration(_kubeconfig(tmp_path / "kc", "https://127.0.0.1:1"))), 2.0)
    with pytest.raises(ApiError, match=r"GET /version could not reach the API server") as caught:
        kube.server_version()
    assert caught.value.reason == "Unavailable"
