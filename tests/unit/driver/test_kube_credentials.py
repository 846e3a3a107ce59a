"""Where the API client finds credentials (kubectl's order) and how its requests name themselves."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from driver import version
from driver.kube import CredentialsError, Kube, resolve_credentials


def test_resolution_order_is_kubectls(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    in_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert resolve_credentials(None, env=in_pod, home=home).source == "in-cluster"
    (home / ".kube" / "config").write_text("{}")
    assert resolve_credentials(None, env=in_pod, home=home).kubeconfig == str(home / ".kube" / "config")
    env = {**in_pod, "KUBECONFIG": "/a:/b"}
    assert resolve_credentials(None, env=env, home=home).kubeconfig == "/a:/b"  # merged like kubectl
    flag = resolve_credentials("/flag", "ctx", env=env, home=home)
    assert (flag.kubeconfig, flag.source, flag.context) == ("/flag", "--kubeconfig", "ctx")


def test_nothing_found_names_every_place_looked(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as info:
        resolve_credentials(None, env={}, home=tmp_path)
    text = str(info.value)
    assert all(w in text for w in ("--kubeconfig", "$KUBECONFIG", str(tmp_path / ".kube" / "config"), "pod"))
    with pytest.raises(CredentialsError, match="--context 'x' needs a kubeconfig"):
        resolve_credentials(None, "x", env={"KUBERNETES_SERVICE_HOST": "h"}, home=tmp_path)


@pytest.fixture
def version_server() -> Iterator[tuple[str, list[str]]]:
    agents: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            agents.append(self.headers.get("User-Agent", ""))
            body = json.dumps({"major": "1", "minor": "36"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", agents
    finally:
        server.shutdown()
        server.server_close()


def test_requests_carry_the_gpu_dra_user_agent_and_context_is_honoured(
    tmp_path: Path, version_server: tuple[str, list[str]]
) -> None:
    url, agents = version_server
    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "live", "cluster": {"server": url}},
                    {"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}},
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [
                    {"name": "live", "context": {"cluster": "live", "user": "u"}},
                    {"name": "dead", "context": {"cluster": "dead", "user": "u"}},
                ],
                "current-context": "dead",
            }
        )
    )
    assert Kube.from_config(config, context="live").server_version() == (1, 36)
    assert agents == [f"gpu-dra/{version()}"]
