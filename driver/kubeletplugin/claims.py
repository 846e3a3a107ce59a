"""Where prepare gets the ResourceClaim from: the kubelet sends only namespace, name and UID.

:class:`ClaimSource` is the seam. The daemon uses :class:`KubeClaimSource` (a GET through
``driver.kube``); tests, benchmarks and demos without an API server use :class:`StaticClaimSource`
or :class:`DirectoryClaimSource`. :func:`fetch_allocated` adds the checks the Go helper makes
(allocated, same UID) and turns every failure into a per-claim error.

Claims are plain dicts in the ``resource.k8s.io/v1`` JSON shape (``status.allocation.devices.
results[]`` ...). This module does not interpret results; that is ``driver.state``'s job.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from driver import boundedjson
from driver.errors import ApiBodyError, ApiError, ApiNotFoundError, PermanentClaimError, TemporaryClaimError

if TYPE_CHECKING:
    from driver.kube import Kube

Claim = dict[str, Any]

#: Deepest nesting a claim may have. Kubernetes' own fields stay under 15 levels; the rest is
#: opaque parameters, whose known schemas are a few levels deep.
MAX_CLAIM_DEPTH = 64


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """What the kubelet sends for one claim."""

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.uid}"


# Kubernetes' own rules (apimachinery validation): a namespace is a DNS-1123 label, an object
# name a DNS-1123 subdomain. Checked before the name reaches a URL, a log key or a file name.
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# API server UIDs are RFC 4122 UUIDs; the looser rule (letters, digits, '.', '_', '-') keeps
# test UIDs working and is the one CDI names and spec files accept.
_UID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")
MAX_LABEL = 63
MAX_SUBDOMAIN = 253
MAX_UID = 128


def _shown(value: str) -> str:
    """``value`` for an error message: quoted, and cut short so a huge name cannot flood a log."""
    return repr(value) if len(value) <= 80 else repr(value[:80]) + f"... ({len(value)} characters)"


def check_claim_ref(ref: ClaimRef) -> None:
    """Refuse a claim reference Kubernetes itself could never have produced.

    Raises:
        PermanentClaimError: the namespace, name or UID breaks Kubernetes' naming rules; nothing
            was fetched or changed.
    """
    problems = []
    if len(ref.namespace) > MAX_LABEL or not _DNS1123_LABEL.fullmatch(ref.namespace):
        problems.append(
            f"namespace {_shown(ref.namespace)} is not a DNS-1123 label (at most {MAX_LABEL} lowercase "
            "letters, digits and '-', starting and ending with a letter or digit)"
        )
    if len(ref.name) > MAX_SUBDOMAIN or not _DNS1123_SUBDOMAIN.fullmatch(ref.name):
        problems.append(
            f"name {_shown(ref.name)} is not a DNS-1123 subdomain (at most {MAX_SUBDOMAIN} lowercase "
            "letters, digits, '-' and '.', starting and ending with a letter or digit)"
        )
    if len(ref.uid) > MAX_UID or not _UID.fullmatch(ref.uid):
        problems.append(
            f"UID {_shown(ref.uid)} is not a Kubernetes UID "
            f"(letters, digits, '-', '.', '_', at most {MAX_UID})"
        )
    if problems:
        raise PermanentClaimError(
            "refused claim reference: "
            + "; ".join(problems)
            + "; the kubelet only sends names the API server accepted - check what is calling the plugin"
        )


class ClaimSource(Protocol):
    """Fetches one ResourceClaim (v1 JSON shape) by namespace and name."""

    def get(self, namespace: str, name: str) -> Claim:
        """Return the claim.

        Raises:
            ApiNotFoundError: the claim does not exist.
            ApiError: any other refusal or transport failure.
        """
        ...


class KubeClaimSource:
    """The real source: a GET on the API server (v1, falling back to v1beta2/v1beta1 in ``Kube``)."""

    def __init__(self, kube: Kube) -> None:
        self._kube = kube

    def get(self, namespace: str, name: str) -> Claim:
        """GET ``resourceclaims/<name>`` in ``namespace``."""
        return self._kube.get_resource_claim(namespace, name)


class StaticClaimSource:
    """An in-memory source keyed by ``(namespace, name)``; thread-safe; for tests and benchmarks."""

    def __init__(self, claims: Mapping[tuple[str, str], Claim] | None = None) -> None:
        self._claims: dict[tuple[str, str], Claim] = dict(claims or {})
        self._lock = threading.Lock()
        self.gets = 0

    def put(self, claim: Claim) -> None:
        """Add or replace ``claim`` (keyed by its metadata namespace and name)."""
        meta = claim["metadata"]
        with self._lock:
            self._claims[(meta["namespace"], meta["name"])] = claim

    def delete(self, namespace: str, name: str) -> None:
        """Forget a claim (a later get raises ApiNotFoundError)."""
        with self._lock:
            self._claims.pop((namespace, name), None)

    def get(self, namespace: str, name: str) -> Claim:
        """Return the stored claim or raise ApiNotFoundError."""
        with self._lock:
            self.gets += 1
            claim = self._claims.get((namespace, name))
        if claim is None:
            raise ApiNotFoundError(f"resourceclaims {namespace}/{name} not found", 404, "NotFound")
        return claim


class DirectoryClaimSource:
    """Reads ``<root>/<namespace>/<name>.json``: claims for a plugin run without an API server."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def get(self, namespace: str, name: str) -> Claim:
        """Load the claim file, or raise ApiNotFoundError naming the expected path."""
        path = self._root / namespace / f"{name}.json"
        try:
            data = boundedjson.loads(path.read_text())
        except FileNotFoundError:
            raise ApiNotFoundError(
                f"resourceclaims {namespace}/{name} not found (no {path})", 404, "NotFound"
            ) from None
        except (OSError, ValueError) as exc:
            raise ApiError(f"cannot read claim file {path}: {exc}; fix or remove the file") from exc
        if not isinstance(data, dict):
            raise ApiError(f"claim file {path} does not hold a JSON object; fix or remove the file")
        return data


def fetch_allocated(source: ClaimSource, ref: ClaimRef) -> Claim:
    """Fetch ``ref`` and check it is the allocated claim the kubelet meant.

    Raises:
        PermanentClaimError: the reference breaks Kubernetes' naming rules (nothing is fetched),
            the claim is gone, was replaced (other UID) or is not allocated.
        TemporaryClaimError: the API server could not be asked; the kubelet's retry may succeed.
    """
    check_claim_ref(ref)
    try:
        claim = source.get(ref.namespace, ref.name)
    except ApiNotFoundError as exc:
        raise PermanentClaimError(
            f"ResourceClaim {ref.namespace}/{ref.name} not found: it was deleted before the pod started; "
            "recreate the pod or its claim"
        ) from exc
    except ApiBodyError as exc:
        raise PermanentClaimError(
            f"ResourceClaim {ref.namespace}/{ref.name} cannot be decoded: {exc}; an opaque config's "
            "parameters are nested far too deep - fix the claim's (or DeviceClass's) config"
        ) from exc
    except ApiError as exc:
        raise TemporaryClaimError(
            f"could not fetch ResourceClaim {ref.namespace}/{ref.name}: {exc}; "
            "check the API server and the plugin's RBAC (resourceclaims get)"
        ) from exc
    try:
        boundedjson.check_depth(claim, MAX_CLAIM_DEPTH)
    except boundedjson.JsonTooDeepError as exc:
        raise PermanentClaimError(
            f"ResourceClaim {ref.namespace}/{ref.name} refused: {exc}; opaque device configs are a few "
            "levels deep - fix the claim's (or DeviceClass's) config"
        ) from exc
    uid = claim.get("metadata", {}).get("uid", "")
    if uid != ref.uid:
        raise PermanentClaimError(
            f"ResourceClaim {ref.namespace}/{ref.name} got replaced: the kubelet asked for UID {ref.uid}, "
            f"the API server has UID {uid}; the pod must be recreated to use the new claim"
        )
    if not (claim.get("status") or {}).get("allocation"):
        raise PermanentClaimError(
            f"ResourceClaim {ref.namespace}/{ref.name} is not allocated (no status.allocation); "
            "the scheduler must allocate it before the pod starts"
        )
    return claim
