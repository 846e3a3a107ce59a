"""The driver's one door to the Kubernetes API: a thin, typed facade over the kubernetes client.

Why it exists: the rest of the driver must not depend on the python client's generated models,
which lag behind the API (resource.k8s.io v1 / v1beta2 / v1beta1 differ by server version).
Every call here goes over the raw REST paths and returns plain dicts in the API's JSON shape
(camelCase), so ``resourceslices`` and the claim source work on any server from 1.32 on.
Errors come out as :class:`driver.errors.ApiError` subclasses with the HTTP status and the API's
reason kept, the client's exception chained.

What it does not do: retry. Callers own their retry policy (the slice publisher backs off, the
DRA service reports a temporary claim error); this module only spaces requests out with
client-side token buckets and puts a timeout on each one.

Two buckets, because the two kinds of traffic differ: slice writes, lists and watches are
background work that must stay gentle (client-go's 5 qps, burst 10); claim GETs sit on the
kubelet's critical path - a kubelet syncing 64 pods sends 64 prepare calls at once, and each
needs its claim - so they get their own, larger budget (50 qps, burst 100) instead of queueing
behind each other for seconds.

The transport keeps only what the ``kubernetes`` package does best: its ``Configuration`` (from a
kubeconfig or the pod's service account, with the token refresh hooks) and the TLS connection
pool its REST client builds from it (CA, client certificates, proxy, SNI). Requests go straight
to that urllib3 pool over one keep-alive connection per concurrent caller, with JSON bodies
encoded and decoded here. The generated ``ApiClient`` - with its pydantic models and the
per-request serialisation passes - is not used: the daemon never needed it, and the package's
``__init__`` pulls in the dynamic client, watch, stream, OAuth and YAML helpers, about 23 MiB
resident and 0.3-0.8 s of import, so :func:`_import_lean` loads just the modules named above.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import structlog

from driver import boundedjson
from driver.errors import ApiBodyError, ApiConflictError, ApiError, ApiNotFoundError

log = structlog.get_logger(__name__)

RESOURCE_GROUP = "resource.k8s.io"
# Newest first: the order in which a served version is chosen (matches the Go helper's client).
RESOURCE_VERSIONS = ("v1", "v1beta2", "v1beta1")

JsonDict = dict[str, Any]

#: The most a claim GET may take in all (discovery, version fallback and each attempt together):
#: the kubelet gives NodePrepareResources 45 s, and the prepare itself needs time after the GET.
CLAIM_FETCH_BUDGET_S = 15.0


def segment(value: str) -> str:
    """One API path segment (namespace, name), escaped so it can never add a segment or a query.

    Callers validate names first (``driver.kubeletplugin.claims.check_claim_ref``); this is the
    second wall: ``../x`` or ``a?b`` stays inside its own segment, and an empty or dot-only value
    is refused outright.

    Raises:
        ValueError: ``value`` is empty, ``.`` or ``..``.
    """
    if value in ("", ".", ".."):
        raise ValueError(f"{value!r} cannot be an API path segment (an object name or namespace)")
    return urllib.parse.quote(value, safe="")


class ResourceNotServedError(ApiNotFoundError):
    """A 404 that names no object: the server does not serve this path (API version) at all."""


class RateLimiter:
    """A token bucket: ``qps`` requests per second on average, bursts up to ``burst``.

    client-go's defaults (5 qps, burst 10) keep one node's plugin from flooding the API server
    when it loops on an error.
    """

    def __init__(self, qps: float = 5.0, burst: int = 10) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"rate limiter needs qps > 0 and burst >= 1, got qps={qps} burst={burst}")
        self._qps = qps
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Block until one request may go out."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._qps)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self._qps if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class SliceWatch:
    """A running watch on ResourceSlices: iterate for ``{"type", "object"}`` events; ``close()`` ends it.

    ``close()`` may be called from another thread to unblock a reader waiting on the socket.
    """

    def __init__(self, response: Any, path: str) -> None:
        self._response = response
        self._path = path
        self._closed = False

    def __iter__(self) -> Iterator[JsonDict]:
        buffer = b""
        try:
            for chunk in self._response.stream(amt=None, decode_content=False):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield _watch_event(line, self._path)
        except Exception as exc:
            if self._closed:
                return
            raise ApiError(
                f"watch {self._path} broke: {exc}; the caller re-lists and watches again",
                reason="WatchBroken",
            ) from exc
        finally:
            self.close()

    def close(self) -> None:
        """Stop the watch and release its connection (idempotent, thread-safe enough)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._response.shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort: the socket may already be gone
            log.debug("watch shutdown failed", path=self._path, error=repr(exc))
        try:
            self._response.release_conn()
        except Exception as exc:  # noqa: BLE001
            log.debug("watch release failed", path=self._path, error=repr(exc))


def _watch_event(line: bytes, path: str) -> JsonDict:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise ApiError(f"watch {path} sent a line that is not JSON: {line[:200]!r}") from exc
    if not isinstance(event, dict):
        raise ApiError(f"watch {path} sent a non-object event: {line[:200]!r}")
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        code = int(status.get("code") or 0)
        reason = str(status.get("reason") or "")
        message = f"watch {path} ended with {code} {reason}: {status.get('message', '')}"
        if code == 410:
            raise ApiError(message + "; re-list and watch again", status=410, reason=reason or "Expired")
        raise ApiError(message, status=code, reason=reason)
    return event


# -- transport -----------------------------------------------------------------------------------

_LEAN_IMPORT_LOCK = threading.Lock()


def _import_lean(
    names: Sequence[str], skip_init: Sequence[str], provide: Mapping[str, Mapping[str, str]] | None = None
) -> list[ModuleType]:
    """Import the modules ``names`` without running the ``__init__`` of the packages ``skip_init``.

    Why: ``kubernetes/__init__.py`` imports every subpackage (and ``kubernetes.config``'s and
    ``kubernetes.utils``' do the same for theirs), so importing one module of the package costs
    all of it. Each package in ``skip_init`` is registered, empty, for the duration of the import
    only; afterwards it is dropped from ``sys.modules`` again, so a later ``import kubernetes``
    anywhere in the process runs the real ``__init__`` and finds these modules already loaded.
    ``provide`` sets names on a skipped package that its modules import from it
    (``{"kubernetes.client": {"Configuration": "kubernetes.client.configuration"}}``).

    Raises:
        ImportError: the package layout is not the one expected (the caller falls back to a
            plain import).
    """
    with _LEAN_IMPORT_LOCK:
        placed: list[str] = []
        try:
            for package in skip_init:
                if package in sys.modules:
                    continue
                spec = importlib.util.find_spec(package)
                if spec is None or spec.submodule_search_locations is None:
                    raise ImportError(f"{package} is not an importable package")
                sys.modules[package] = importlib.util.module_from_spec(spec)
                placed.append(package)
            for package, attrs in (provide or {}).items():
                if package in placed:
                    for attr, module in attrs.items():
                        setattr(sys.modules[package], attr, getattr(importlib.import_module(module), attr))
            return [importlib.import_module(name) for name in names]
        finally:
            for package in placed:
                sys.modules.pop(package, None)


def _client_modules() -> tuple[Any, Any]:
    """``kubernetes.client.configuration`` and ``kubernetes.client.rest``, without the rest of the package."""
    try:
        configuration, rest = _import_lean(
            ["kubernetes.client.configuration", "kubernetes.client.rest"],
            skip_init=["kubernetes", "kubernetes.client", "kubernetes.utils"],
        )
    except ImportError as exc:
        log.debug("lean import of the kubernetes client failed, importing all of it", error=str(exc))
        from kubernetes.client import configuration, rest
    return configuration, rest


class CredentialsError(ApiError):
    """No usable Kubernetes credentials: no kubeconfig found, unreadable, or no such context."""


def user_agent() -> str:
    """``gpu-dra/<version>``: what our requests call themselves in API server logs and audit."""
    from driver import version

    return f"gpu-dra/{version()}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where a command's Kubernetes credentials come from (see :func:`resolve_credentials`)."""

    kubeconfig: str | None
    """A kubeconfig path or a ``:``-separated list; None means the in-cluster service account."""

    source: str
    """How it was found: ``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config`` or ``in-cluster``."""

    context: str | None = None


def resolve_credentials(
    flag: str | None,
    context: str | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Credentials:
    """kubectl's and helm's order: ``--kubeconfig``, then ``$KUBECONFIG``, then
    ``~/.kube/config``, then the pod's service account (in-cluster).

    Raises:
        CredentialsError: none of them is there; the message lists what was tried.
    """
    environ = os.environ if env is None else env
    if flag:
        return Credentials(flag, "--kubeconfig", context)
    listed = environ.get("KUBECONFIG", "")
    if any(p for p in listed.split(os.pathsep)):
        return Credentials(listed, "$KUBECONFIG", context)
    default = (home if home is not None else Path(environ.get("HOME") or Path.home())) / ".kube" / "config"
    if default.is_file():
        return Credentials(str(default), "~/.kube/config", context)
    if environ.get("KUBERNETES_SERVICE_HOST"):
        if context:
            raise CredentialsError(
                f"--context {context!r} needs a kubeconfig, and none was found (in a pod the service "
                "account is used); pass --kubeconfig or drop --context",
                reason="ConfigInvalid",
            )
        return Credentials(None, "in-cluster", None)
    raise CredentialsError(
        "no Kubernetes credentials: pass --kubeconfig, set $KUBECONFIG, create ~/.kube/config "
        f"(looked at {default}), or run this in the plugin's pod",
        reason="ConfigInvalid",
    )


def load_configuration(kubeconfig: Path | str | None, context: str | None = None) -> Any:
    """A ``kubernetes.client.Configuration`` from ``kubeconfig`` (a file, or a ``:``-separated
    list merged as kubectl does), or the pod's service account when None; ``context`` picks a
    context other than the kubeconfig's current one.

    Raises:
        CredentialsError: the credentials cannot be loaded; the message says what to fix.
    """
    configuration_module, _ = _client_modules()
    configuration = configuration_module.Configuration()
    try:
        if kubeconfig is None:
            try:
                (incluster,) = _import_lean(
                    ["kubernetes.config.incluster_config"],
                    skip_init=["kubernetes", "kubernetes.client", "kubernetes.config"],
                    provide={"kubernetes.client": {"Configuration": "kubernetes.client.configuration"}},
                )
            except ImportError:
                from kubernetes.config import incluster_config as incluster
            incluster.load_incluster_config(client_configuration=configuration)
        else:
            # The kubeconfig loader needs the YAML, OAuth and exec-plugin code; only the
            # package-wide __init__ imports (dynamic client, watch, stream, ...) are skipped.
            try:
                (kube_config,) = _import_lean(
                    ["kubernetes.config.kube_config"], skip_init=["kubernetes", "kubernetes.config"]
                )
            except ImportError:
                from kubernetes.config import kube_config
            kube_config.load_kube_config(
                config_file=str(kubeconfig), context=context, client_configuration=configuration
            )
    except Exception as exc:
        where = "the in-cluster service account" if kubeconfig is None else f"kubeconfig {kubeconfig}"
        what = f" (context {context!r})" if context else ""
        raise CredentialsError(
            f"cannot load Kubernetes credentials from {where}{what}: {str(exc).rstrip('.')}; "
            "pass --kubeconfig with a readable file, or run in a pod with a service account",
            reason="ConfigInvalid",
        ) from exc
    # urllib3 would otherwise retry a timed-out GET three more times on its own (four 10 s
    # attempts against a hung server): callers own the retry policy (see the module docstring).
    configuration.retries = 0
    return configuration


class Transport(Protocol):
    """Sends one HTTP request to the API server and returns the urllib3-style response."""

    def send(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] | None,
        body: bytes | None,
        timeout: float | tuple[float, float],
        stream: bool,
    ) -> Any:
        """Return a response with ``status`` and ``data`` (the body, read on first access); a
        ``stream`` one also has ``stream()``, ``shutdown()`` and ``release_conn()``.

        Raises on transport failures (no connection, TLS).
        """
        ...


class RestTransport:
    """Requests over the TLS connection pool the kubernetes client builds from a ``Configuration``.

    The pool keeps connections alive, so sequential claim GETs reuse one TLS session; parallel
    ones open at most ``configuration.connection_pool_maxsize`` connections, kept for reuse.
    The bearer token is read through ``Configuration.auth_settings()`` on every request, which
    runs the refresh hook of rotating service-account tokens and exec-plugin credentials.
    """

    def __init__(self, configuration: Any, user_agent: str = "gpu-dra") -> None:
        _, rest = _client_modules()
        import urllib3

        self._urllib3 = urllib3
        self._configuration = configuration
        self._pool = rest.RESTClientObject(configuration).pool_manager
        self._host = str(configuration.host).rstrip("/")
        self._user_agent = user_agent
        # One server: requests go straight to its connection pool, skipping the manager's URL
        # parsing and pool lookup on every request; through a proxy the manager addresses it.
        self._direct: Any = None
        if not isinstance(self._pool, urllib3.ProxyManager):
            with contextlib.suppress(urllib3.exceptions.LocationValueError):  # no server: send() says so
                self._direct = self._pool.connection_from_url(self._host)
        self._prefix = urllib3.util.parse_url(self._host).path or ""

    def send(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] | None,
        body: bytes | None,
        timeout: float | tuple[float, float],
        stream: bool,
    ) -> Any:
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        for auth in self._configuration.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[str(auth["key"])] = str(auth["value"])
        if body is not None:
            headers["Content-Type"] = "application/json"
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        limit = (
            self._urllib3.Timeout(connect=timeout[0], read=timeout[1])
            if isinstance(timeout, tuple)
            else self._urllib3.Timeout(total=timeout)
        )
        pool, url = (
            (self._direct, self._prefix + target)
            if self._direct is not None
            else (self._pool, self._host + target)
        )
        return pool.urlopen(
            method, url, body=body, headers=headers, timeout=limit, preload_content=not stream, redirect=False
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.clear()


class Kube:
    """Typed calls the driver makes, over one :class:`Transport` (normally :class:`RestTransport`).

    Args:
        transport: sends the requests (``RestTransport(load_configuration(...))``).
        request_timeout_s: total timeout of each non-watch request.
        qps, burst: client-side rate limit of every call except claim GETs.
        claim_qps, claim_burst: the separate rate limit of :meth:`get_resource_claim`.
    """

    def __init__(
        self,
        transport: Transport,
        request_timeout_s: float = 10.0,
        qps: float = 5.0,
        burst: int = 10,
        *,
        claim_qps: float = 50.0,
        claim_burst: int = 100,
    ) -> None:
        self._transport = transport
        self._timeout = request_timeout_s
        self._limiter = RateLimiter(qps, burst)
        self._claim_limiter = RateLimiter(claim_qps, claim_burst)
        self._resource_version: str | None = None
        self._version_lock = threading.Lock()

    @classmethod
    def from_config(
        cls, kubeconfig: Path | str | None, request_timeout_s: float = 10.0, *, context: str | None = None
    ) -> Kube:
        """A client from a kubeconfig, or the pod's service account when ``kubeconfig`` is None.

        Every request carries the user agent ``gpu-dra/<version>``, so API server logs and audit
        name us.
        """
        transport = RestTransport(load_configuration(kubeconfig, context), user_agent())
        return cls(transport, request_timeout_s=request_timeout_s)

    # -- raw requests ---------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        body: JsonDict | None = None,
        limiter: RateLimiter | None = None,
        *,
        deadline: float | None = None,
    ) -> JsonDict:
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise ApiError(
                    f"{method} {path} not sent: the call's time budget is spent; the API server is slow "
                    "or unreachable",
                    reason="Timeout",
                )
        response = self._send(
            method, path, query=query, body=body, timeout=timeout, stream=False, limiter=limiter
        )
        data = response.data
        try:
            decoded = boundedjson.loads(data) if data else {}
        except boundedjson.JsonTooDeepError as exc:
            raise ApiBodyError(f"{method} {path} returned {exc}", reason="TooDeep") from exc
        except ValueError as exc:
            raise ApiError(f"{method} {path} returned a body that is not JSON: {data[:200]!r}") from exc
        if not isinstance(decoded, dict):
            raise ApiError(f"{method} {path} returned JSON that is not an object")
        return decoded

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None,
        body: JsonDict | None,
        timeout: float | tuple[float, float],
        stream: bool,
        limiter: RateLimiter | None = None,
    ) -> Any:
        (limiter or self._limiter).acquire()
        payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        try:
            response = self._transport.send(
                method, path, query=query, body=payload, timeout=timeout, stream=stream
            )
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(
                f"{method} {path} could not reach the API server: {exc}; check the server address and "
                "that the API server is up",
                reason="Unavailable",
            ) from exc
        if not 200 <= response.status <= 299:
            raise _status_error(method, path, response.status, response.data)
        return response

    # -- discovery ------------------------------------------------------------------------------

    def server_version(self) -> tuple[int, int]:
        """The API server's (major, minor), e.g. (1, 36); vendor suffixes like ``36+`` are ignored."""
        info = self._request("GET", "/version")
        try:
            major = int("".join(ch for ch in str(info["major"]) if ch.isdigit()))
            minor = int("".join(ch for ch in str(info["minor"]) if ch.isdigit()))
        except (KeyError, ValueError) as exc:
            raise ApiError(
                f"GET /version returned no usable major/minor: {info}", reason="BadVersion"
            ) from exc
        return major, minor

    def resource_api_version(self, deadline: float | None = None) -> str:
        """The newest resource.k8s.io version the server serves (v1, v1beta2 or v1beta1); cached."""
        with self._version_lock:
            if self._resource_version is None:
                self._resource_version = self._discover_resource_version(deadline)
            return self._resource_version

    def _discover_resource_version(self, deadline: float | None = None) -> str:
        try:
            group = self._request("GET", f"/apis/{RESOURCE_GROUP}", deadline=deadline)
        except ApiNotFoundError as exc:
            raise ApiNotFoundError(
                f"the API server does not serve {RESOURCE_GROUP}; enable Dynamic Resource Allocation "
                "(Kubernetes >= 1.32 with the resource.k8s.io API group)",
                status=exc.status,
                reason=exc.reason,
            ) from exc
        served = {str(v.get("version")) for v in group.get("versions", []) if isinstance(v, dict)}
        for version in RESOURCE_VERSIONS:
            if version in served:
                return version
        raise ApiNotFoundError(
            f"the API server serves {RESOURCE_GROUP} only at {sorted(served)}, none of "
            f"{list(RESOURCE_VERSIONS)}; upgrade the cluster to Kubernetes >= 1.32",
            status=404,
            reason="NotFound",
        )

    def _forget_resource_version(self) -> None:
        with self._version_lock:
            self._resource_version = None

    def _resource_call(
        self,
        method: str,
        subpath: str,
        query: list[tuple[str, str]] | None = None,
        body_for: Any = None,
        limiter: RateLimiter | None = None,
        *,
        deadline: float | None = None,
    ) -> tuple[str, JsonDict]:
        """Call ``/apis/resource.k8s.io/<version>/<subpath>`` on the served version.

        When the server stops serving the cached version (upgrade/downgrade behind our back), the
        404 says "could not find the requested resource" without naming an object: re-discover
        once and retry on the version the server serves now.
        """
        for attempt in range(2):
            version = self.resource_api_version(deadline)
            body = body_for(version) if body_for is not None else None
            path = f"/apis/{RESOURCE_GROUP}/{version}/{subpath}"
            try:
                return version, self._request(method, path, query, body, limiter, deadline=deadline)
            except ApiNotFoundError as exc:
                if attempt == 0 and isinstance(exc, ResourceNotServedError):
                    self._forget_resource_version()
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- claims and nodes -----------------------------------------------------------------------

    def get_resource_claim(
        self, namespace: str, name: str, budget_s: float = CLAIM_FETCH_BUDGET_S
    ) -> JsonDict:
        """The ResourceClaim, normalised to the resource.k8s.io/v1 shape whatever version served it.

        Everything this takes (version discovery, the fallback, each attempt) fits in ``budget_s``:
        each attempt's timeout is what is left of it, so a hung API server yields an
        :class:`ApiError` in time for the caller to answer the kubelet with a temporary error
        instead of running into the kubelet's deadline.
        """
        version, claim = self._resource_call(
            "GET",
            f"namespaces/{segment(namespace)}/resourceclaims/{segment(name)}",
            limiter=self._claim_limiter,
            deadline=time.monotonic() + budget_s,
        )
        return normalise_claim(claim, version, in_place=True)

    def list_resource_claims(self) -> list[JsonDict]:
        """Every ResourceClaim in every namespace, in the v1 shape (debug tools: who holds what).

        The plugin's own RBAC does not grant this (it only gets claims by name); callers treat a
        403 as "unknown", not as "none".
        """
        version, listed = self._resource_call("GET", "resourceclaims")
        return [normalise_claim(item, version, in_place=True) for item in listed.get("items") or []]

    def get_device_class(self, name: str) -> JsonDict:
        """The DeviceClass ``name`` (its ``spec.selectors`` read the same in v1, v1beta2, v1beta1)."""
        version, device_class = self._resource_call("GET", f"deviceclasses/{segment(name)}")
        device_class["apiVersion"] = f"{RESOURCE_GROUP}/v1"
        device_class.setdefault("kind", "DeviceClass")
        log.debug("device class read", name=name, served_as=version)
        return device_class

    def get_node(self, name: str) -> JsonDict:
        """The Node object (``metadata.uid`` is what slice owner references need)."""
        return self._request("GET", f"/api/v1/nodes/{segment(name)}")

    def create_event(self, namespace: str, event: JsonDict) -> JsonDict:
        """Create an events.k8s.io/v1 Event (``driver.events`` rate-limits what it sends)."""
        return self._request(
            "POST", f"/apis/events.k8s.io/v1/namespaces/{segment(namespace)}/events", body=event
        )

    # -- resource slices ------------------------------------------------------------------------

    @staticmethod
    def _slice_selector(driver: str, node: str) -> list[tuple[str, str]]:
        return [("fieldSelector", f"spec.driver={driver},spec.nodeName={node}")]

    def list_slices(self, driver: str, node: str) -> list[JsonDict]:
        """This driver's ResourceSlices for ``node`` (v1 shape)."""
        return self.list_slices_at(driver, node)[0]

    def list_slices_at(self, driver: str, node: str) -> tuple[list[JsonDict], str]:
        """Like :meth:`list_slices`, plus the list's resourceVersion to start a watch from."""
        version, listed = self._resource_call("GET", "resourceslices", self._slice_selector(driver, node))
        items = [slice_from_version(item, version, in_place=True) for item in listed.get("items") or []]
        return items, str((listed.get("metadata") or {}).get("resourceVersion") or "")

    def create_slice(self, resource_slice: JsonDict, *, dry_run: bool = False) -> JsonDict:
        """Create a slice (v1 shape in and out); ``metadata.generateName`` is honoured.

        ``dry_run`` asks the server what it would store (admission, defaulting, dropped fields)
        without storing anything.
        """
        version, stored = self._resource_call(
            "POST",
            "resourceslices",
            [("dryRun", "All")] if dry_run else None,
            body_for=lambda v: slice_to_version(resource_slice, v),
        )
        return slice_from_version(stored, version, in_place=True)

    def update_slice(self, resource_slice: JsonDict) -> JsonDict:
        """Replace a slice; its ``metadata.resourceVersion`` makes it a compare-and-swap (409 on races)."""
        name = str(resource_slice["metadata"]["name"])
        version, stored = self._resource_call(
            "PUT", f"resourceslices/{segment(name)}", body_for=lambda v: slice_to_version(resource_slice, v)
        )
        return slice_from_version(stored, version, in_place=True)

    def delete_slice(self, name: str, uid: str, resource_version: str) -> None:
        """Delete a slice only if it is still the object we saw (uid + resourceVersion preconditions)."""
        preconditions: JsonDict = {"uid": uid}
        if resource_version:
            preconditions["resourceVersion"] = resource_version
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": preconditions}
        self._resource_call("DELETE", f"resourceslices/{segment(name)}", body_for=lambda _v: body)

    def watch_slices(
        self, driver: str, node: str, resource_version: str = "", timeout_s: int = 300
    ) -> SliceWatch:
        """Watch this driver's slices for ``node`` from ``resource_version`` (empty: current state first).

        The server ends the watch after ``timeout_s``; the caller watches again.
        """
        version = self.resource_api_version()
        path = f"/apis/{RESOURCE_GROUP}/{version}/resourceslices"
        query = [*self._slice_selector(driver, node), ("watch", "true"), ("timeoutSeconds", str(timeout_s))]
        query.append(("allowWatchBookmarks", "false"))
        if resource_version:
            query.append(("resourceVersion", resource_version))
        # No total timeout on a stream: connect quickly, and allow the server's own end of the watch
        # plus slack between two events.
        response = self._send(
            "GET", path, query=query, body=None, timeout=(self._timeout, timeout_s + 30.0), stream=True
        )
        return SliceWatch(response, path)


# -- errors --------------------------------------------------------------------------------------


def _status_error(method: str, path: str, status: int, data: bytes | None) -> ApiError:
    reason = ""
    message = ""
    object_name = ""
    try:
        body = json.loads(data) if data else {}
        if isinstance(body, dict):
            reason = str(body.get("reason") or "")
            message = str(body.get("message") or "")
            object_name = str((body.get("details") or {}).get("name") or "")
    except ValueError:
        message = (data or b"")[:200].decode(errors="replace")
    text = f"{method} {path} failed with HTTP {status} {reason}: {message}".rstrip(": ")
    error: ApiError
    if status == 404 and not object_name:
        error = ResourceNotServedError(
            text + "; the server does not serve this API path", status=status, reason=reason or "NotFound"
        )
    elif status == 404:
        error = ApiNotFoundError(text, status=status, reason=reason or "NotFound")
    elif status == 409:
        error = ApiConflictError(
            text + "; the object changed or exists already: re-read it and retry",
            status=status,
            reason=reason or "Conflict",
        )
    elif status in (401, 403):
        error = ApiError(
            text + "; check the driver's RBAC (resourceslices, nodes, resourceclaims) and credentials",
            status=status,
            reason=reason,
        )
    else:
        error = ApiError(text, status=status, reason=reason)
    return error


# -- version shapes ------------------------------------------------------------------------------

# Device fields v1beta1 keeps inside ``devices[].basic``.
_BASIC_FIELDS = (
    "attributes",
    "capacity",
    "consumesCounters",
    "nodeName",
    "nodeSelector",
    "allNodes",
    "taints",
    "bindsToNode",
    "bindingConditions",
    "bindingFailureConditions",
    "allowMultipleAllocations",
)


def slice_to_version(resource_slice: JsonDict, version: str) -> JsonDict:
    """A v1-shaped slice as ``version`` wants it on the wire (v1beta1 nests device fields in ``basic``)."""
    out = copy.deepcopy(resource_slice)
    out["apiVersion"] = f"{RESOURCE_GROUP}/{version}"
    if version == "v1beta1":
        devices = []
        for device in (out.get("spec") or {}).get("devices") or []:
            basic = {k: device.pop(k) for k in _BASIC_FIELDS if k in device}
            devices.append({**device, "basic": basic} if basic else device)
        if devices:
            out["spec"]["devices"] = devices
    return out


def slice_from_version(resource_slice: JsonDict, version: str, *, in_place: bool = False) -> JsonDict:
    """A slice read at ``version``, in the v1 shape (``in_place``: reshape the given dict itself)."""
    out = resource_slice if in_place else copy.deepcopy(resource_slice)
    out["apiVersion"] = f"{RESOURCE_GROUP}/v1"
    out.setdefault("kind", "ResourceSlice")
    if version == "v1beta1":
        devices = []
        for device in (out.get("spec") or {}).get("devices") or []:
            basic = device.pop("basic", None) or {}
            devices.append({**device, **basic})
        if devices:
            out["spec"]["devices"] = devices
    return out


def normalise_claim(claim: JsonDict, version: str, *, in_place: bool = False) -> JsonDict:
    """A ResourceClaim read at ``version``, in the v1 shape.

    The fields the driver reads (``metadata.uid``, ``status.allocation.devices.results`` and
    ``.config``) are the same in all three versions; v1beta1 requests carry the exact-request
    fields flat instead of under ``exactly``, which is rewrapped here. ``in_place`` reshapes the
    given dict itself (a response just decoded: copying it would be the GET's costliest step).
    """
    # Otherwise shallow copies of what is rewritten: a deep copy would recurse through
    # user-written opaque parameters of any depth.
    out = claim if in_place else dict(claim)
    out["apiVersion"] = f"{RESOURCE_GROUP}/v1"
    out.setdefault("kind", "ResourceClaim")
    if version == "v1beta1":
        spec = dict(out.get("spec") or {})
        devices = dict(spec.get("devices") or {})
        if "spec" in out:
            spec["devices"] = devices
            out["spec"] = spec
        requests = []
        for request in devices.get("requests") or []:
            if "firstAvailable" in request or "exactly" in request:
                requests.append(request)
                continue
            exact = {k: v for k, v in request.items() if k != "name"}
            requests.append({"name": request.get("name", ""), "exactly": exact})
        if requests:
            devices["requests"] = requests
    return out
