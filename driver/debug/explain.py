"""Why a ResourceClaim would (not) be allocated on a node: per request, per device, per clause.

Why it exists: a Pending pod's scheduler event says "cannot allocate all claims" and nothing
about which selector failed on which device. :func:`explain` replays the scheduler's decision
over the ResourceSlices of one node: it evaluates each DeviceClass and request selector on each
device (in the scheduler's order, stopping at the first false clause like the scheduler), then
runs a small first-fit search honouring counts (ExactCount / All), firstAvailable subrequests,
``matchAttribute`` / ``distinctAttribute`` constraints, shared counters (two MIG placements
that overlap, or a full GPU and a MIG slice of it, cannot both be chosen) and consumable capacity
(``capacity.requests`` filter devices, are rounded by the device's ``requestPolicy`` and are
summed per multi-allocatable device; such a device charges its counters once). A CEL runtime
error met during the search aborts it, as it aborts the scheduler's allocation on that node.

It does not read files, talk to the API server or print (``commands`` and ``render`` do), and it
does not model devices already allocated to other claims unless told (``allocated``; a shared
device named there counts as full), admin access or device taints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from driver.errors import DriverError
from driver.inventory import Version
from driver.resourceslices import parse_quantity

if TYPE_CHECKING:
    from driver.debug.cel import Outcome

JsonDict = dict[str, Any]


class CelMissingError(DriverError):
    """cel-python, the ``[cel]`` extra, is not installed, so selectors cannot be evaluated."""


@cache
def load_cel() -> ModuleType:
    """The CEL evaluator (:mod:`driver.debug.cel`), imported on first use.

    cel-python is the optional ``[cel]`` extra: the plugin's image installs the wheel without it,
    and ``gpu-dra plugin`` / ``probe`` / ``doctor`` must start there, so only explain and simulate
    may need it.
    """
    try:
        from driver.debug import cel as module
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "celpy":
            raise
        raise CelMissingError(
            "explain and simulate evaluate CEL with cel-python, which is not installed here: "
            "pip install 'gpu-dra[cel]'"
        ) from exc
    return module


#: The DeviceClasses the Helm chart installs (same names and selectors as NVIDIA's chart).
BUILTIN_CLASSES: Mapping[str, tuple[str, ...]] = {
    "gpu.nvidia.com": (
        "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'",
    ),
    "mig.nvidia.com": (
        "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'mig'",
    ),
}

#: Upper bound on search steps, so a pathological claim cannot hang the CLI.
MAX_SEARCH_STEPS = 200_000


# -- the node's devices --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """One published device, as the scheduler sees it."""

    driver: str
    pool: str
    name: str
    attributes: Mapping[str, Any]
    capacity: Mapping[str, Fraction]
    consumes: tuple[tuple[str, Mapping[str, Fraction]], ...] = ()
    multi: bool = False  # allowMultipleAllocations
    policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # requestPolicy, as Fractions

    @property
    def key(self) -> str:
        return f"{self.driver}/{self.pool}/{self.name}"

    def attribute(self, qualified: str) -> Any:
        """Look an attribute up by its qualified name, as matchAttribute does (None when absent)."""
        if qualified in self.attributes:
            return self.attributes[qualified]
        domain, _, ident = qualified.partition("/")
        if domain == self.driver and ident in self.attributes:
            return self.attributes[ident]
        return None


@dataclass(frozen=True, slots=True)
class NodeDevices:
    """Every device of one node in scheduler order, plus the shared counter sets."""

    devices: tuple[Device, ...]
    counters: Mapping[tuple[str, str, str], Mapping[str, Fraction]] = field(default_factory=dict)


def _decode_attribute(value: Mapping[str, Any]) -> Any:
    for kind, convert in (("bool", bool), ("int", int), ("string", str)):
        if kind in value:
            return convert(value[kind])
    if "version" in value:
        return Version(str(value["version"]))
    for kind, convert in (("bools", bool), ("ints", int), ("strings", str)):
        if kind in value:
            return [convert(v) for v in value[kind]]
    if "versions" in value:
        return [Version(str(v)) for v in value["versions"]]
    raise ValueError(f"attribute value {dict(value)!r} has none of bool/int/string/version")


def _policy(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if raw.get("default") is not None:
        out["default"] = parse_quantity(raw["default"])
    if raw.get("validValues"):
        out["validValues"] = sorted(parse_quantity(v) for v in raw["validValues"])
    valid = raw.get("validRange") or {}
    for key in ("min", "max", "step"):
        if valid.get(key) is not None:
            out[key] = parse_quantity(valid[key])
    return out


def consumed_amount(device: Device, name: str, requested: Fraction | None) -> Fraction | None:
    """What a request takes of ``device``'s capacity ``name`` (None: the policy refuses it).

    As the scheduler's allocator: not requested -> the policy's default, or all of it without a
    policy; requested -> rounded up to the policy's min / next step / next valid value.
    """
    value = device.capacity.get(name, Fraction(0))
    policy = device.policies.get(name) or {}
    if requested is None:
        default: Fraction = policy.get("default", value)
        return default
    amount = requested
    if "validValues" in policy:
        above = [v for v in policy["validValues"] if v >= amount]
        return above[0] if above else None
    if "min" in policy:
        amount = max(amount, policy["min"])
        step = policy.get("step")
        if step:
            steps = -((policy["min"] - amount) // step)
            amount = policy["min"] + steps * step
        if "max" in policy and amount > policy["max"]:
            return None
    return amount


def _counter_values(counters: Mapping[str, Any]) -> dict[str, Fraction]:
    return {name: parse_quantity(c.get("value", "0")) for name, c in (counters or {}).items()}


def node_from_slices(slices: Iterable[Mapping[str, Any]]) -> NodeDevices:
    """Devices of ResourceSlice dicts (v1, or v1beta1 with ``basic``) in the scheduler's order.

    Pools are visited by (driver, pool name), slices in the order given, devices in slice order.
    """
    by_pool: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in slices:
        spec = s.get("spec", {})
        by_pool.setdefault((spec.get("driver", ""), spec.get("pool", {}).get("name", "")), []).append(spec)
    devices: list[Device] = []
    counters: dict[tuple[str, str, str], Mapping[str, Fraction]] = {}
    for driver, pool in sorted(by_pool):
        for spec in by_pool[(driver, pool)]:
            for cs in spec.get("sharedCounters") or []:
                counters[(driver, pool, cs["name"])] = _counter_values(cs.get("counters", {}))
            for raw in spec.get("devices") or []:
                body = raw.get("basic", raw)
                devices.append(
                    Device(
                        driver=driver,
                        pool=pool,
                        name=raw["name"],
                        attributes={
                            k: _decode_attribute(v) for k, v in (body.get("attributes") or {}).items()
                        },
                        capacity={
                            k: parse_quantity(v["value"]) for k, v in (body.get("capacity") or {}).items()
                        },
                        consumes=tuple(
                            (c["counterSet"], _counter_values(c.get("counters", {})))
                            for c in body.get("consumesCounters") or []
                        ),
                        multi=bool(body.get("allowMultipleAllocations")),
                        policies={
                            k: _policy(v["requestPolicy"])
                            for k, v in (body.get("capacity") or {}).items()
                            if v.get("requestPolicy")
                        },
                    )
                )
    return NodeDevices(tuple(devices), counters)


# -- the claim -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alternative:
    """What one request (or one firstAvailable subrequest) asks for."""

    name: str  # "req" or "req/sub"
    class_name: str
    selectors: tuple[str, ...]
    mode: str  # ExactCount | All
    count: int
    capacity: Mapping[str, Fraction] = field(default_factory=dict)  # capacity.requests


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True, slots=True)
class Constraint:
    requests: tuple[str, ...]  # empty: all requests
    match_attribute: str | None = None
    distinct_attribute: str | None = None

    def covers(self, alternative: str) -> bool:
        return (
            not self.requests
            or alternative in self.requests
            or alternative.split("/", maxsplit=1)[0] in self.requests
        )


@dataclass(frozen=True, slots=True)
class ClaimSpec:
    kind: str
    name: str
    requests: tuple[Request, ...]
    constraints: tuple[Constraint, ...]


def _alternative(name: str, body: Mapping[str, Any]) -> Alternative:
    selectors = tuple(s["cel"]["expression"] for s in body.get("selectors") or [] if "cel" in s)
    mode = body.get("allocationMode") or "ExactCount"
    capacity = {k: parse_quantity(v) for k, v in ((body.get("capacity") or {}).get("requests") or {}).items()}
    return Alternative(
        name, body.get("deviceClassName", ""), selectors, mode, int(body.get("count") or 1), capacity
    )


def parse_claim(obj: Mapping[str, Any]) -> ClaimSpec:
    """A ResourceClaim or ResourceClaimTemplate (v1, v1beta2 or v1beta1 shape).

    Raises:
        ValueError: the object is neither, or has no device requests.
    """
    kind = obj.get("kind", "ResourceClaim")
    if kind not in ("ResourceClaim", "ResourceClaimTemplate"):
        raise ValueError(f"{kind} is not a ResourceClaim or ResourceClaimTemplate; pass the claim's YAML")
    spec = obj.get("spec", {})
    if kind == "ResourceClaimTemplate":
        spec = spec.get("spec", {})
    devices = spec.get("devices") or {}
    requests = []
    for raw in devices.get("requests") or []:
        name = raw["name"]
        if raw.get("firstAvailable"):
            alts = tuple(_alternative(f"{name}/{sub['name']}", sub) for sub in raw["firstAvailable"])
        else:
            alts = (_alternative(name, raw.get("exactly", raw)),)
        requests.append(Request(name, alts))
    if not requests:
        raise ValueError("the claim has no spec.devices.requests; nothing to explain")
    constraints = tuple(
        Constraint(tuple(c.get("requests") or ()), c.get("matchAttribute"), c.get("distinctAttribute"))
        for c in devices.get("constraints") or []
    )
    meta = obj.get("metadata", {})
    name = f"{meta.get('namespace', 'default')}/{meta.get('name', meta.get('generateName', '?'))}"
    return ClaimSpec(kind, name, tuple(requests), constraints)


def classes_from_objects(objects: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, ...]]:
    """DeviceClass dicts -> {name: selector expressions}."""
    out: dict[str, tuple[str, ...]] = {}
    for obj in objects:
        if obj.get("kind") == "DeviceClass":
            sels = obj.get("spec", {}).get("selectors") or []
            out[obj["metadata"]["name"]] = tuple(s["cel"]["expression"] for s in sels if "cel" in s)
    return out


# -- the verdict ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Clause:
    source: str  # "class gpu.nvidia.com #0" | "request #1"
    expression: str
    outcome: Outcome | None  # None: not evaluated (an earlier clause already failed)


@dataclass(frozen=True, slots=True)
class DeviceResult:
    device: str
    matched: bool
    error: str | None
    clauses: tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class AlternativeResult:
    alternative: Alternative
    devices: tuple[DeviceResult, ...]
    problem: str | None  # class not found, ...


@dataclass(frozen=True, slots=True)
class Rejection:
    where: str
    expression: str
    message: str
    fix: str


@dataclass(frozen=True, slots=True)
class Explanation:
    claim: ClaimSpec
    alternatives: tuple[AlternativeResult, ...]
    rejections: tuple[Rejection, ...]
    fits: bool
    allocation: Mapping[str, tuple[str, ...]]
    reason: str
    consumed: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """``rejected`` (the API server refuses it), ``fits`` or ``unschedulable``."""
        if self.rejections:
            return "rejected"
        return "fits" if self.fits else "unschedulable"

    def to_dict(self) -> JsonDict:
        return {
            "claim": self.claim.name,
            "kind": self.claim.kind,
            "verdict": self.verdict,
            "fits": self.fits,
            "reason": self.reason,
            "allocation": {k: list(v) for k, v in self.allocation.items()},
            "consumedCapacity": {k: {d: dict(c) for d, c in v.items()} for k, v in self.consumed.items()},
            "rejections": [
                {"where": r.where, "expression": r.expression, "message": r.message, "fix": r.fix}
                for r in self.rejections
            ],
            "requests": [
                {
                    "request": a.alternative.name,
                    "deviceClassName": a.alternative.class_name,
                    "allocationMode": a.alternative.mode,
                    "count": a.alternative.count,
                    "problem": a.problem,
                    "matching": [d.device for d in a.devices if d.matched],
                    "devices": [
                        {
                            "device": d.device,
                            "matched": d.matched,
                            "error": d.error,
                            "clauses": [
                                {
                                    "source": c.source,
                                    "expression": c.expression,
                                    "result": _clause_result(c),
                                }
                                for c in d.clauses
                            ],
                        }
                        for d in a.devices
                    ],
                }
                for a in self.alternatives
            ],
        }


def _clause_result(clause: Clause) -> str:
    if clause.outcome is None:
        return "not evaluated"
    if clause.outcome.error:
        return f"error: {clause.outcome.error}"
    return "true" if clause.outcome.matched else "false"


class _AbortError(Exception):
    pass


class _Evaluator:
    """Evaluates an alternative's clauses on a device on first use (the scheduler is lazy too)."""

    def __init__(self, classes: Mapping[str, Sequence[str]]) -> None:
        self.classes = classes
        self.cache: dict[tuple[str, str], DeviceResult] = {}
        self.activations: dict[str, dict[str, Any]] = {}

    def clauses(self, alt: Alternative) -> list[tuple[str, str]]:
        out = [
            (f"class {alt.class_name} #{i}", e) for i, e in enumerate(self.classes.get(alt.class_name, ()))
        ]
        out += [(f"request #{i}", e) for i, e in enumerate(alt.selectors)]
        return out

    def result(self, alt: Alternative, device: Device) -> DeviceResult:
        key = (alt.name, device.key)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        act = self.activations.get(device.key)
        clauses: list[Clause] = []
        matched, error = True, None
        for source, expr in self.clauses(alt):
            if not matched:
                clauses.append(Clause(source, expr, None))
                continue
            if act is None:
                try:
                    act = load_cel().device_activation(device.driver, device.attributes, device.capacity)
                except (ValueError, TypeError) as exc:
                    outcome = load_cel().Outcome(False, f"device attributes unusable: {exc}")
                    clauses.append(Clause(source, expr, outcome))
                    matched, error = False, outcome.error
                    continue
                self.activations[device.key] = act
            outcome = load_cel().compile_selector(expr).evaluate(act)
            clauses.append(Clause(source, expr, outcome))
            if outcome.error:
                matched, error = False, f"{source}: {outcome.error}"
            elif not outcome.matched:
                matched = False
        result = DeviceResult(device.name, matched, error, tuple(clauses))
        self.cache[key] = result
        return result


class _Search:
    def __init__(
        self,
        claim: ClaimSpec,
        node: NodeDevices,
        evaluator: _Evaluator,
        allocated: frozenset[str],
    ) -> None:
        self.claim = claim
        self.node = node
        self.ev = evaluator
        self.allocated = allocated
        self.steps = 0
        self.chosen: dict[str, list[Device]] = {}
        self.used: set[str] = set()
        # Multi-allocatable devices: what each choice took, per device and per (request, device).
        self.shared: dict[str, dict[str, Fraction]] = {}
        self.takes: list[tuple[str, str, dict[str, Fraction]]] = []
        self.usage: dict[tuple[str, str, str], dict[str, Fraction]] = {}
        # Devices of other claims use their shared counters, as in the scheduler's allocator.
        for device in node.devices:
            if device.key in allocated:
                self._charge(device, 1)

    def candidates(self, alt: Alternative) -> _Candidates:
        return _Candidates(self, alt)

    def matches(self, alt: Alternative, device: Device) -> bool:
        if device.key in self.allocated:
            return False
        result = self.ev.result(alt, device)
        if result.error:
            raise _AbortError(
                f"CEL runtime error on device {device.name}, request {alt.name}: {result.error}"
            )
        return result.matched

    def fits_counters(self, device: Device) -> bool:
        for set_name, counters in device.consumes:
            key = (device.driver, device.pool, set_name)
            available = self.node.counters.get(key)
            if available is None:
                return False
            used = self.usage.get(key, {})
            for name, amount in counters.items():
                if used.get(name, Fraction(0)) + amount > available.get(name, Fraction(0)):
                    return False
        return True

    def free(self, alt: Alternative, device: Device) -> bool:
        """The device can take this request: unused, or shared with room for what it asks."""
        if any(device.capacity.get(n, Fraction(-1)) < amount for n, amount in alt.capacity.items()):
            return False  # capacity requests filter like a selector ``capacity >= request``
        if not device.multi:
            return device.key not in self.used
        if self.take_of(alt, device) is None:
            return False
        return device.key in self.shared or self.fits_counters(device)

    def take_of(self, alt: Alternative, device: Device) -> dict[str, Fraction] | None:
        taken = self.shared.get(device.key, {})
        out: dict[str, Fraction] = {}
        for name, value in device.capacity.items():
            amount = consumed_amount(device, name, alt.capacity.get(name))
            if amount is None or taken.get(name, Fraction(0)) + amount > value:
                return None
            out[name] = amount
        return out

    def fits_constraints(self, alt: Alternative, device: Device) -> bool:
        for constraint in self.claim.constraints:
            if not constraint.covers(alt.name):
                continue
            others = [d for name, ds in self.chosen.items() if constraint.covers(name) for d in ds]
            if constraint.match_attribute:
                value = device.attribute(constraint.match_attribute)
                if value is None:
                    return False
                if any(o.attribute(constraint.match_attribute) != value for o in others):
                    return False
            if constraint.distinct_attribute:
                value = device.attribute(constraint.distinct_attribute)
                if value is None:
                    return False
                if any(o.attribute(constraint.distinct_attribute) == value for o in others):
                    return False
        return True

    def _charge(self, device: Device, sign: int) -> None:
        for set_name, counters in device.consumes:
            usage = self.usage.setdefault((device.driver, device.pool, set_name), {})
            for name, amount in counters.items():
                usage[name] = usage.get(name, Fraction(0)) + sign * amount

    def take(self, alt: Alternative, device: Device) -> None:
        self.chosen.setdefault(alt.name, []).append(device)
        if device.multi:
            amounts = self.take_of(alt, device) or {}
            if device.key not in self.shared:
                self.shared[device.key] = {}
                self._charge(device, 1)  # a shared device's counters are charged once
            for name, amount in amounts.items():
                self.shared[device.key][name] = self.shared[device.key].get(name, Fraction(0)) + amount
            self.takes.append((alt.name, device.key, amounts))
            return
        self.used.add(device.key)
        self._charge(device, 1)

    def give_back(self, alt: Alternative, device: Device) -> None:
        self.chosen[alt.name].pop()
        if not self.chosen[alt.name]:
            del self.chosen[alt.name]
        if device.multi:
            _, _, amounts = self.takes.pop()
            for name, amount in amounts.items():
                self.shared[device.key][name] -= amount
            if not any(t[1] == device.key for t in self.takes):
                del self.shared[device.key]
                self._charge(device, -1)
            return
        self.used.discard(device.key)
        self._charge(device, -1)

    def _counters_ok(self, device: Device) -> bool:
        # A shared device already chosen has its counters charged; only a first use needs room.
        return (device.multi and device.key in self.shared) or self.fits_counters(device)

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_SEARCH_STEPS:
            raise _AbortError(f"search gave up after {MAX_SEARCH_STEPS} steps; simplify the claim")

    def request(self, index: int) -> bool:
        if index == len(self.claim.requests):
            return True
        for alt in self.claim.requests[index].alternatives:
            if alt.class_name not in self.ev.classes:
                continue
            cands = self.candidates(alt)
            if alt.mode == "All":
                if cands.get(0) is not None and self.pick_all(alt, cands, 0, index):
                    return True
                continue
            if self.pick(alt, cands, 0, alt.count, index):
                return True
        return False

    def pick_all(self, alt: Alternative, cands: _Candidates, at: int, index: int) -> bool:
        device = cands.get(at)
        if device is None:
            return self.request(index + 1)
        self.tick()
        if (
            not self.free(alt, device)
            or not self._counters_ok(device)
            or not self.fits_constraints(alt, device)
        ):
            return False
        self.take(alt, device)
        if self.pick_all(alt, cands, at + 1, index):
            return True
        self.give_back(alt, device)
        return False

    def pick(self, alt: Alternative, cands: _Candidates, start: int, left: int, index: int) -> bool:
        if left == 0:
            return self.request(index + 1)
        i = start - 1
        while True:
            i += 1
            device = cands.get(i)
            if device is None:
                return False
            self.tick()
            if (
                not self.free(alt, device)
                or not self._counters_ok(device)
                or not self.fits_constraints(alt, device)
            ):
                continue
            self.take(alt, device)
            if self.pick(alt, cands, i + 1, left - 1, index):
                return True
            self.give_back(alt, device)


class _Candidates:
    """The devices matching one alternative, found on demand in scheduler order."""

    def __init__(self, search: _Search, alt: Alternative) -> None:
        self.search = search
        self.alt = alt
        self.found: list[Device] = []
        self.next = 0

    def get(self, i: int) -> Device | None:
        devices = self.search.node.devices
        while len(self.found) <= i and self.next < len(devices):
            device = devices[self.next]
            self.next += 1
            if self.search.matches(self.alt, device):
                self.found.append(device)
        return self.found[i] if i < len(self.found) else None


def explain(
    claim: ClaimSpec,
    node: NodeDevices,
    classes: Mapping[str, Sequence[str]] | None = None,
    allocated: Iterable[str] = (),
) -> Explanation:
    """Replay the scheduler's allocation of ``claim`` on ``node``.

    Args:
        claim: from :func:`parse_claim`.
        node: from :func:`node_from_slices`.
        classes: DeviceClass name -> selectors; None means :data:`BUILTIN_CLASSES`.
        allocated: ``driver/pool/device`` keys already allocated to other claims.
    """
    classes = dict(BUILTIN_CLASSES if classes is None else classes)
    rejections: list[Rejection] = []
    for request in claim.requests:
        for alt in request.alternatives:
            for i, expr in enumerate(alt.selectors):
                rejections.extend(
                    Rejection(f"request {alt.name} selector #{i}", expr, issue.message, issue.fix)
                    for issue in load_cel().compile_selector(expr).issues
                )
    for name in sorted({a.class_name for r in claim.requests for a in r.alternatives}):
        for i, expr in enumerate(classes.get(name, ())):
            rejections.extend(
                Rejection(f"DeviceClass {name} selector #{i}", expr, issue.message, issue.fix)
                for issue in load_cel().compile_selector(expr).issues
            )
    evaluator = _Evaluator(classes)
    results = []
    for request in claim.requests:
        for alt in request.alternatives:
            if alt.class_name not in classes:
                problem = f"DeviceClass {alt.class_name!r} does not exist; create it or fix deviceClassName"
                results.append(AlternativeResult(alt, (), problem))
                continue
            devices = tuple(evaluator.result(alt, d) for d in node.devices)
            results.append(AlternativeResult(alt, devices, None))
    if rejections:
        return Explanation(
            claim, tuple(results), tuple(rejections), False, {}, "the API server rejects this claim"
        )
    search = _Search(claim, node, evaluator, frozenset(allocated))
    try:
        fits = search.request(0)
    except _AbortError as exc:
        return Explanation(claim, tuple(results), (), False, {}, str(exc))
    if fits:
        allocation = {name: tuple(d.name for d in ds) for name, ds in search.chosen.items()}
        consumed: dict[str, dict[str, dict[str, str]]] = {}
        for name, key, amounts in search.takes:
            device_name = key.rsplit("/", 1)[-1]
            consumed.setdefault(name, {})[device_name] = {k: _quantity_text(v) for k, v in amounts.items()}
        return Explanation(claim, tuple(results), (), True, allocation, "fits", consumed)
    return Explanation(claim, tuple(results), (), False, {}, _why_not(claim, results))


def _quantity_text(value: Fraction) -> str:
    if value.denominator == 1:
        from driver.resourceslices import canonical_quantity

        return canonical_quantity(int(value), binary=int(value) >= 1 << 20)
    return str(float(value))


def _why_not(claim: ClaimSpec, results: Sequence[AlternativeResult]) -> str:
    reasons = []
    for r in results:
        if r.problem:
            reasons.append(f"{r.alternative.name}: {r.problem}")
            continue
        matching = sum(1 for d in r.devices if d.matched)
        want = "all (at least one)" if r.alternative.mode == "All" else str(r.alternative.count)
        reasons.append(f"{r.alternative.name}: {matching} matching device(s), needs {want}")
    if claim.constraints:
        reasons.append("constraints and shared counters were applied across requests")
    return "no allocation: " + "; ".join(reasons)
