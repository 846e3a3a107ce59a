"""Start-up time, memory and API traffic of an idle plugin against the real API server.

Prints figures, asserts nothing. The daemon runs as a DaemonSet would run it on a simulated
8x A100-40GB node (``--kubeconfig`` to the tests/ground control plane, ResourceSlices published):

* spawn to registration socket ready (the kubelet can call from then on);
* VmRSS of the daemon process after the idle period (and its peak while idle);
* API writes while idle: the resourceVersion of each of our ResourceSlices before and after, and
  the API server's own ``apiserver_request_total`` counters for resourceslices, by verb.

Run: .venv/bin/python benchmarks/bench_idle.py [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import re
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    control_plane,
    fake_node,
    host_line,
    rss_mib,
    start_plugin,
)

NODE = "idle-node"
NAMESPACE = "idle"
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION")
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def slice_versions(cp: Any) -> dict[str, str]:
    """Our node's ResourceSlices: name -> resourceVersion."""
    from kubernetes import client as kclient

    api = cp.api_client()
    try:
        objects: Any = kclient.CustomObjectsApi(api)
        listed = objects.list_cluster_custom_object(
            "resource.k8s.io", "v1", "resourceslices", field_selector=f"spec.nodeName={NODE}"
        )
        return {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in listed["items"]}
    finally:
        api.close()


def slice_requests(cp: Any) -> dict[str, float]:
    """The API server's request counters for resourceslices, summed by verb."""
    ctx = ssl.create_default_context(cafile=str(cp.pki.ca_crt))
    ctx.load_cert_chain(str(cp.pki.admin_crt), str(cp.pki.admin_key))
    with urllib.request.urlopen(f"{cp.server}/metrics", context=ctx, timeout=30) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, float] = {}
    for raw in text.splitlines():
        m = _SAMPLE.match(raw)
        if m is None or 'resource="resourceslices"' not in m["labels"]:
            continue
        verb = re.search(r'verb="([^"]*)"', m["labels"])
        key = verb.group(1) if verb else "?"
        out[key] = out.get(key, 0.0) + float(m["value"])
    return out


def wait_published(cp: Any, timeout_s: float = 60.0, settle_s: float = 3.0) -> dict[str, str]:
    """Slices exist and have not changed for ``settle_s`` (start-up re-syncs are over)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = slice_versions(cp)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif now and time.monotonic() - stable_since >= settle_s:
            return now
        time.sleep(0.5)
    raise RuntimeError(f"ResourceSlices of {NODE} did not settle within {timeout_s}s (last seen: {last})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="how long the plugin idles")
    args = parser.parse_args()
    print(host_line())
    with control_plane(NODE, NAMESPACE) as cp, fake_node(NODE) as node:
        plugin = start_plugin(node, "--kubeconfig", str(cp.kubeconfig), "--log-level", "info")
        try:
            ready = plugin.wait_socket()
            published = wait_published(cp)
            before = slice_versions(cp)
            before_requests = slice_requests(cp)  # our own LISTs stay outside the counted window
            rss_start = rss_mib(plugin.pid)
            peak = rss_start
            end = time.monotonic() + args.idle_seconds
            while time.monotonic() < end:
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                peak = max(peak, rss_mib(plugin.pid))
            rss_end = rss_mib(plugin.pid)
            after_requests = slice_requests(cp)
            after = slice_versions(cp)
            alive = plugin.proc.poll() is None
        finally:
            plugin.stop()
    delta = {v: after_requests.get(v, 0.0) - before_requests.get(v, 0.0) for v in after_requests}
    writes = sum(n for v, n in delta.items() if v in WRITE_VERBS)
    reads = {v: int(n) for v, n in sorted(delta.items()) if v not in WRITE_VERBS and n}
    print(f"plugin on a simulated 8x A100-40GB node, real API server, {len(published)} ResourceSlice(s):")
    print(f"  spawn to registration socket ready      {ready * 1000:8.0f} ms")
    print(f"  VmRSS after {args.idle_seconds:.0f} s idle                {rss_end:8.1f} MiB")
    print(f"  VmRSS at idle start / peak while idle   {rss_start:8.1f} / {peak:.1f} MiB")
    print(f"  still running after the idle period     {'yes' if alive else 'NO'}")
    print(f"  ResourceSlice resourceVersions unchanged {'yes' if before == after else 'NO'}")
    print(f"  API writes to resourceslices while idle {writes:8.0f}   (apiserver_request_total, all clients)")
    print(f"  API reads of resourceslices while idle  {reads}   (none by this benchmark)")


if __name__ == "__main__":
    main()
