"""DRA device selectors evaluated the way the Kubernetes scheduler evaluates them.

Why it exists: ``explain`` and ``simulate`` must give the scheduler's verdict for a CEL selector
before (or without) asking the scheduler. Evaluation is done by the maintained ``celpy``
(cel-python) interpreter; this module supplies what Kubernetes adds on top of plain CEL:

* the ``device`` variable: ``driver``, ``attributes[domain].name``, ``capacity[domain].name``;
  bare attribute names live in the driver's domain; an unknown domain gives an empty map, an
  unknown name inside a domain is an evaluation *error* (the scheduler then aborts allocation
  on that node and reports the error);
* Kubernetes quantities (``quantity("20Gi")``, ``isGreaterThan``, ``compareTo``, ``add`` ...)
  and semantic versions (``semver("1.2.3")``, ``major()`` ...); version attributes are semver
  values, capacities are quantities;
* heterogeneous ``==`` (a string attribute compared to an int is false, not an error);
* the string extension functions of the Kubernetes base environment;
* :func:`check`, a typed pre-check over celpy's parse tree that flags what the API server's
  type checker rejects (``quantity >= quantity``, quantity vs string, an attribute looked up
  without its domain, unknown variables/fields/functions, a non-bool result), with the fix.

It does not allocate devices or read claims (``explain``), and it does not estimate CEL cost
beyond the API's expression length limit.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import total_ordering
from typing import Any

import celpy
import celpy.celtypes as ct
import lark
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

from driver.inventory import Version
from driver.resourceslices import parse_quantity

#: resource.k8s.io CELSelectorExpressionMaxLength.
MAX_EXPRESSION_LENGTH = 10 * 1024

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


# -- value types ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quantity:
    """A Kubernetes resource.Quantity inside CEL (exact value, original text for messages)."""

    value: Fraction
    text: str

    @classmethod
    def parse(cls, text: str) -> Quantity:
        return cls(parse_quantity(str(text)), str(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Quantity) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __str__(self) -> str:
        return self.text


@total_ordering
@dataclass(frozen=True, slots=True, eq=False)
class Semver:
    """A semantic version inside CEL (semver 2.0 precedence; build metadata ignored)."""

    major: int
    minor: int
    patch: int
    pre: tuple[str, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str, normalize: bool = False) -> Semver:
        """Strict semver; ``normalize`` accepts a ``v`` prefix and missing minor/patch like Kubernetes."""
        raw = str(text)
        candidate = raw
        if normalize:
            candidate = candidate.removeprefix("v")
            core, sep, rest = _split_core(candidate)
            parts = core.split(".")
            while len(parts) < 3:
                parts.append("0")
            parts = [p.lstrip("0") or "0" for p in parts]
            candidate = ".".join(parts) + sep + rest
        match = _SEMVER.match(candidate)
        if match is None:
            raise ValueError(f"{raw!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.2.3)")
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre, raw)

    def _key(self) -> tuple[Any, ...]:
        # A release sorts after its pre-releases; numeric identifiers sort before alphanumeric ones.
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.pre)
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre_key)

    def compare(self, other: Semver) -> int:
        a, b = self._key(), other._key()
        return (a > b) - (a < b)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Semver) and self.compare(other) == 0

    def __lt__(self, other: Semver) -> bool:
        return self.compare(other) < 0

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text or f"{self.major}.{self.minor}.{self.patch}"


def _split_core(text: str) -> tuple[str, str, str]:
    for i, ch in enumerate(text):
        if ch in "-+":
            return text[:i], ch, text[i + 1 :]
    return text, "", ""


# -- functions -----------------------------------------------------------------------------------


class _DefaultMap(ct.MapType):
    """``device.attributes`` / ``device.capacity``: an unknown domain reads as an empty map."""

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(key)
        except KeyError:
            return ct.MapType({})


def _err(message: str) -> CELEvalError:
    return CELEvalError(message)


def _is_number(v: Any) -> bool:
    return isinstance(v, (ct.IntType, ct.UintType, ct.DoubleType, int, float)) and not isinstance(
        v, (bool, ct.BoolType)
    )


def _cel_equal(a: Any, b: Any) -> Any:  # noqa: PLR0911 - one return per CEL type rule
    """CEL heterogeneous equality as cel-go implements it: different types are simply unequal."""
    if isinstance(a, CELEvalError):
        return a
    if isinstance(b, CELEvalError):
        return b
    if _is_number(a) and _is_number(b):
        return ct.BoolType(float(a) == float(b) if isinstance(a, float) or isinstance(b, float) else a == b)
    if isinstance(a, (ct.BoolType, bool)) != isinstance(b, (ct.BoolType, bool)):
        return ct.BoolType(False)
    if type(a) is not type(b) and not (isinstance(a, type(b)) or isinstance(b, type(a))):
        return ct.BoolType(False)
    if isinstance(a, ct.ListType):
        if len(a) != len(b):
            return ct.BoolType(False)
        return ct.BoolType(
            all(
                _cel_equal(x, y) is True or _cel_equal(x, y) == ct.BoolType(True)
                for x, y in zip(a, b, strict=True)
            )
        )
    return ct.BoolType(a == b)


def _cel_not_equal(a: Any, b: Any) -> Any:
    result = _cel_equal(a, b)
    if isinstance(result, CELEvalError):
        return result
    return ct.BoolType(not result)


def _ordered(a: Any, b: Any, what: str) -> tuple[Any, Any]:
    if isinstance(a, Quantity) and isinstance(b, Quantity):
        return a.value, b.value
    if isinstance(a, Semver) and isinstance(b, Semver):
        return a, b
    raise TypeError(f"no such overload: {what}({_type_name(a)}, {_type_name(b)})")


def _compare_to(a: Any, b: Any) -> Any:
    x, y = _ordered(a, b, "compareTo")
    return ct.IntType((x > y) - (x < y))


def _greater(a: Any, b: Any) -> Any:
    x, y = _ordered(a, b, "isGreaterThan")
    return ct.BoolType(x > y)


def _less(a: Any, b: Any) -> Any:
    x, y = _ordered(a, b, "isLessThan")
    return ct.BoolType(x < y)


def _quantity(text: Any) -> Any:
    if not isinstance(text, str):
        raise TypeError(f"no such overload: quantity({_type_name(text)})")
    try:
        return Quantity.parse(text)
    except (ValueError, TypeError) as exc:
        return _err(f"quantity({text!r}): {exc}")


def _is_quantity(text: Any) -> Any:
    try:
        Quantity.parse(str(text))
    except (ValueError, TypeError):
        return ct.BoolType(False)
    return ct.BoolType(True)


def _semver(text: Any, normalize: Any = False) -> Any:
    try:
        return Semver.parse(str(text), bool(normalize))
    except ValueError as exc:
        return _err(f"semver({text!r}): {exc}")


def _is_semver(text: Any, normalize: Any = False) -> Any:
    try:
        Semver.parse(str(text), bool(normalize))
    except ValueError:
        return ct.BoolType(False)
    return ct.BoolType(True)


def _q_arith(a: Any, b: Any, sign: int) -> Any:
    if not isinstance(a, Quantity):
        raise TypeError("add/sub need a quantity target")
    if isinstance(b, Quantity):
        other = b.value
    elif _is_number(b) and not isinstance(b, ct.DoubleType):
        other = Fraction(int(b))
    else:
        raise TypeError(f"no such overload: add/sub(quantity, {_type_name(b)})")
    value = a.value + sign * other
    return Quantity(value, _format_fraction(value))


def _format_fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _as_integer(q: Any) -> Any:
    if not isinstance(q, Quantity):
        raise TypeError("asInteger needs a quantity")
    if q.value.denominator != 1 or not -(2**63) <= q.value.numerator < 2**63:
        return _err(f"cannot convert value {q.text} to integer")
    return ct.IntType(q.value.numerator)


def _method(attr: str, wrap: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def fn(target: Any) -> Any:
        if isinstance(target, (Semver, Quantity)) or hasattr(target, attr):
            return wrap(getattr(target, attr))
        raise TypeError(f"no such overload: {attr}({_type_name(target)})")

    return fn


def _str_fn(fn: Callable[..., Any], result: Callable[[Any], Any]) -> Callable[..., Any]:
    def wrapped(target: Any, *args: Any) -> Any:
        if not isinstance(target, str):
            raise TypeError(f"no such overload for {_type_name(target)}")
        return result(fn(str(target), *args))

    return wrapped


def _sign(q: Any) -> Any:
    if not isinstance(q, Quantity):
        raise TypeError("sign needs a quantity")
    return ct.IntType((q.value > 0) - (q.value < 0))


def _join(items: Any, sep: Any = "") -> Any:
    if not isinstance(items, list):
        raise TypeError("join needs a list of strings")
    return ct.StringType(str(sep).join(str(i) for i in items))


def _substring(s: str, start: Any, end: Any = None) -> str:
    return s[int(start) :] if end is None else s[int(start) : int(end)]


FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "_==_": _cel_equal,
    "_!=_": _cel_not_equal,
    "quantity": _quantity,
    "isQuantity": _is_quantity,
    "semver": _semver,
    "isSemver": _is_semver,
    "compareTo": _compare_to,
    "isGreaterThan": _greater,
    "isLessThan": _less,
    "add": lambda a, b: _q_arith(a, b, 1),
    "sub": lambda a, b: _q_arith(a, b, -1),
    "asInteger": _as_integer,
    "asApproximateFloat": _method("value", lambda v: ct.DoubleType(float(v))),
    "sign": _sign,
    "isInteger": _method("value", lambda v: ct.BoolType(v.denominator == 1)),
    "major": _method("major", ct.IntType),
    "minor": _method("minor", ct.IntType),
    "patch": _method("patch", ct.IntType),
    "lowerAscii": _str_fn(
        lambda s: s.lower() if s.isascii() else "".join(c.lower() if c.isascii() else c for c in s),
        ct.StringType,
    ),
    "upperAscii": _str_fn(lambda s: "".join(c.upper() if c.isascii() else c for c in s), ct.StringType),
    "trim": _str_fn(str.strip, ct.StringType),
    "charAt": _str_fn(lambda s, i: s[int(i)] if int(i) < len(s) else "", ct.StringType),
    "indexOf": _str_fn(lambda s, sub, *start: s.find(str(sub), *(int(x) for x in start)), ct.IntType),
    "lastIndexOf": _str_fn(lambda s, sub: s.rfind(str(sub)), ct.IntType),
    "replace": _str_fn(
        lambda s, old, new, *n: s.replace(str(old), str(new), *(int(x) for x in n)), ct.StringType
    ),
    "split": _str_fn(lambda s, sep: [ct.StringType(x) for x in s.split(str(sep))], ct.ListType),
    "substring": _str_fn(_substring, ct.StringType),
    "join": _join,
}


def _type_name(value: Any) -> str:  # noqa: PLR0911 - a lookup by type
    if isinstance(value, Quantity):
        return "Quantity"
    if isinstance(value, Semver):
        return "Semver"
    if isinstance(value, (ct.BoolType, bool)):
        return "bool"
    if isinstance(value, ct.StringType):
        return "string"
    if isinstance(value, ct.UintType):
        return "uint"
    if isinstance(value, ct.IntType):
        return "int"
    if isinstance(value, ct.DoubleType):
        return "double"
    if isinstance(value, ct.ListType):
        return "list"
    if isinstance(value, ct.MapType):
        return "map"
    return type(value).__name__


# -- the device variable -------------------------------------------------------------------------


AttributeInput = bool | int | str | Version | Sequence[Any]


def split_qualified(name: str, driver: str) -> tuple[str, str]:
    """``domain/id`` -> (domain, id); a bare name belongs to ``driver``."""
    domain, sep, ident = name.partition("/")
    return (domain, ident) if sep else (driver, name)


def _cel_value(value: Any) -> Any:
    if isinstance(value, bool):
        return ct.BoolType(value)
    if isinstance(value, int):
        return ct.IntType(value)
    if isinstance(value, str):
        return ct.StringType(value)
    if isinstance(value, Version):
        return Semver.parse(value.value)
    if isinstance(value, Semver | Quantity):
        return value
    if isinstance(value, Sequence):
        return ct.ListType([_cel_value(v) for v in value])
    raise TypeError(f"unsupported attribute value {value!r}")


def device_activation(
    driver: str, attributes: Mapping[str, Any], capacity: Mapping[str, Fraction | int]
) -> dict[str, Any]:
    """The ``device`` variable for one device, grouped by domain as Kubernetes groups it.

    Raises:
        ValueError: a version attribute is not a semantic version (the scheduler fails the same way).
    """
    attrs: dict[str, dict[Any, Any]] = {}
    for name, value in attributes.items():
        domain, ident = split_qualified(name, driver)
        attrs.setdefault(domain, {})[ct.StringType(ident)] = _cel_value(value)
    caps: dict[str, dict[Any, Any]] = {}
    for name, value in capacity.items():
        domain, ident = split_qualified(name, driver)
        frac = Fraction(value)
        caps.setdefault(domain, {})[ct.StringType(ident)] = Quantity(frac, _format_fraction(frac))
    device = ct.MapType(
        {
            ct.StringType("driver"): ct.StringType(driver),
            ct.StringType("attributes"): _DefaultMap(
                {ct.StringType(d): ct.MapType(v) for d, v in attrs.items()}
            ),
            ct.StringType("capacity"): _DefaultMap(
                {ct.StringType(d): ct.MapType(v) for d, v in caps.items()}
            ),
        }
    )
    return {"device": device}


# -- the static check ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issue:
    """Why the API server would reject an expression, and what to write instead."""

    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.message}; fix: {self.fix}" if self.fix else self.message


class _RejectError(Exception):
    def __init__(self, issue: Issue) -> None:
        super().__init__(issue.message)
        self.issue = issue


_NUMERIC = {"int", "uint", "double"}
_PRIMITIVE = {"int", "uint", "double", "string", "bool", "bytes", "null", "quantity", "semver"}
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_FUNCTIONS_GLOBAL: Mapping[str, str] = {
    "quantity": "quantity",
    "isQuantity": "bool",
    "semver": "semver",
    "isSemver": "bool",
    "size": "int",
    "int": "int",
    "uint": "uint",
    "double": "double",
    "string": "string",
    "bool": "bool",
    "bytes": "bytes",
    "dyn": "dyn",
    "type": "dyn",
    "matches": "bool",
    "sign": "int",  # a global function in Kubernetes' quantity library, not a method
    "duration": "duration",
    "timestamp": "timestamp",
}
_QUANTITY_METHODS: Mapping[str, str] = {
    "isGreaterThan": "bool",
    "isLessThan": "bool",
    "compareTo": "int",
    "add": "quantity",
    "sub": "quantity",
    "asInteger": "int",
    "asApproximateFloat": "double",
    "isInteger": "bool",
}
_SEMVER_METHODS: Mapping[str, str] = {
    "isGreaterThan": "bool",
    "isLessThan": "bool",
    "compareTo": "int",
    "major": "int",
    "minor": "int",
    "patch": "int",
}
_STRING_METHODS: Mapping[str, str] = {
    "startsWith": "bool",
    "endsWith": "bool",
    "contains": "bool",
    "matches": "bool",
    "lowerAscii": "string",
    "upperAscii": "string",
    "trim": "string",
    "charAt": "string",
    "indexOf": "int",
    "lastIndexOf": "int",
    "replace": "string",
    "split": "list",
    "substring": "string",
    "size": "int",
}
_LIST_METHODS: Mapping[str, str] = {
    "join": "string",
    "size": "int",
    "isSorted": "bool",
    "sum": "dyn",
    "min": "dyn",
    "max": "dyn",
    "indexOf": "int",
    "lastIndexOf": "int",
}


#: gpu.nvidia.com's attribute and capacity names (NVIDIA's, see driver/discovery.py) for did-you-mean.
KNOWN_NAMES = (
    "type",
    "uuid",
    "productName",
    "brand",
    "architecture",
    "cudaComputeCapability",
    "driverVersion",
    "cudaDriverVersion",
    "index",
    "minor",
    "profile",
    "parentUUID",
    "parentIndex",
    "parentMinor",
    "memory",
    "multiprocessors",
    "copyEngines",
    "decoders",
    "encoders",
    "jpegEngines",
    "ofaEngines",
    "pcieRoot",
)
DEVICE_FIELDS = ("driver", "attributes", "capacity")


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to a misspelt ``name`` (case-insensitive), or None."""
    options = list(dict.fromkeys(choices))
    lowered = {c.lower(): c for c in options}
    if name.lower() in lowered:
        return lowered[name.lower()]
    found = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    if found:
        return lowered[found[0]]
    prefixed = [c for c in options if c.lower().startswith(name.lower()[:4])] if len(name) >= 4 else []
    return prefixed[0] if len(prefixed) == 1 else None


def _children(tree: lark.Tree[Any]) -> list[Any]:
    return list(tree.children)


class _Checker:
    """Infers a coarse static type per node the way cel-go's checker would see it."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.scope: list[str] = []

    def text(self, tree: lark.Tree[Any]) -> str:
        meta = getattr(tree, "meta", None)
        if meta is None or getattr(meta, "empty", True):
            return "<expression>"
        return self.expression[meta.start_pos : meta.end_pos].strip()

    def type_of(self, tree: Any) -> str:  # noqa: PLR0911, PLR0912
        if isinstance(tree, lark.Token):
            return "dyn"
        kind = tree.data
        kids = _children(tree)
        if kind in ("expr",):
            if len(kids) == 1 or kids[1] is None:
                return self.type_of(kids[0])
            self.bool_operand(kids[0], "?:")
            a, b = self.type_of(kids[1]), self.type_of(kids[2])
            return a if a == b else "dyn"
        if kind in ("conditionalor", "conditionaland"):
            if len(kids) == 1 or kids[0] is None:
                return self.type_of(kids[-1])
            op = "||" if kind == "conditionalor" else "&&"
            self.bool_operand(kids[0], op)
            self.bool_operand(kids[1], op)
            return "bool"
        if kind == "relation":
            if len(kids) == 1 or kids[0] is None:
                return self.type_of(kids[-1])
            return self.relation(kids[0], kids[1])
        if kind in ("addition", "multiplication"):
            if len(kids) == 1 or kids[0] is None:
                return self.type_of(kids[-1])
            return self.arith(kids[0], kids[1])
        if kind == "unary":
            if len(kids) == 1:
                return self.type_of(kids[0])
            t = self.type_of(kids[1])
            if kids[0].data == "unary_not":
                self.require(t in ("bool", "dyn"), f"'!' applied to {t} in {self.text(tree)}")
                return "bool"
            self.require(t in _NUMERIC | {"dyn"}, f"'-' applied to {t} in {self.text(tree)}")
            return t
        if kind in ("member", "primary"):
            return self.type_of(kids[0])
        if kind == "member_dot":
            return self.member_dot(tree, kids[0], str(kids[1]))
        if kind == "member_index":
            return self.member_index(tree, kids[0], kids[1])
        if kind == "member_dot_arg":
            args = _children(kids[2]) if len(kids) > 2 and kids[2] is not None else []
            return self.method(tree, kids[0], str(kids[1]), args)
        if kind == "ident_arg":
            args = _children(kids[1]) if len(kids) > 1 and kids[1] is not None else []
            return self.function(tree, str(kids[0]), args)
        if kind == "ident":
            return self.ident(str(kids[0]))
        if kind == "literal":
            return self.literal(kids[0])
        if kind == "paren_expr":
            return self.type_of(kids[0])
        if kind == "list_lit":
            for k in _children(kids[0]) if kids and kids[0] is not None else []:
                self.type_of(k)
            return "list"
        if kind == "map_lit":
            for k in _children(kids[0]) if kids and kids[0] is not None else []:
                self.type_of(k)
            return "map"
        raise _RejectError(Issue(f"unsupported syntax {kind} in {self.text(tree)}"))

    def require(self, ok: bool, message: str, fix: str = "") -> None:
        if not ok:
            raise _RejectError(Issue(message, fix))

    def bool_operand(self, tree: Any, op: str) -> None:
        t = self.type_of(tree)
        if t in ("attrdomain", "capdomain"):
            self.domainless(tree)
        self.require(
            t in ("bool", "dyn"),
            f"operand of '{op}' must be bool, but {self.text(tree)} is {_show(t)}",
        )

    def domainless(self, tree: Any) -> None:
        text = self.text(tree)
        self.domain_index(text)
        match = re.search(r"device\.(attributes|capacity)\.(\w+)", text)
        if match:
            raise _RejectError(
                Issue(
                    f"{match.group(0)} looks up {match.group(2)!r} without its domain "
                    f"(device.{match.group(1)} is grouped by domain)",
                    f'device.{match.group(1)}["gpu.nvidia.com"].{match.group(2)}',
                )
            )

    def relation(self, op_tree: lark.Tree[Any], right: Any) -> str:
        op = op_tree.data.removeprefix("relation_")
        left = _children(op_tree)[0]
        lt, rt = self.type_of(left), self.type_of(right)
        symbol = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "in": "in"}[op]
        for t, node in ((lt, left), (rt, right)):
            if t in ("attrdomain", "capdomain"):
                self.domainless(node)
        whole = f"{self.text(left)} {symbol} {self.text(right)}"
        if op == "in":
            self.require(
                rt in ("list", "map", "dyn", "attrs", "caps", "attrdomain", "capdomain"),
                f"'in' needs a list or map on the right: {whole}",
            )
            return "bool"
        if op in ("lt", "le", "gt", "ge"):
            if "quantity" in (lt, rt) or "semver" in (lt, rt):
                what = "quantities" if "quantity" in (lt, rt) else "semantic versions"
                method = {"lt": "isLessThan", "gt": "isGreaterThan"}.get(op)
                fix = f"{self.text(left)}.compareTo({self.text(right)}) {symbol} 0"
                if method:
                    fix += f" (or {self.text(left)}.{method}({self.text(right)}))"
                raise _RejectError(Issue(f"'{symbol}' is not defined for {what}: {whole}", fix))
            self.require(
                "dyn" in (lt, rt) or lt == rt or (lt in _NUMERIC and rt in _NUMERIC),
                f"no matching overload for '{symbol}' applied to ({_show(lt)}, {_show(rt)}): {whole}",
            )
            self.require(
                lt not in ("bool", "list", "map", "null") and rt not in ("list", "map", "null"),
                f"'{symbol}' is not defined for {_show(lt)}: {whole}",
            )
            return "bool"
        if "dyn" not in (lt, rt) and lt != rt and not (lt in _NUMERIC and rt in _NUMERIC):
            fix = ""
            if "quantity" in (lt, rt):
                other = self.text(right) if lt == "quantity" else self.text(left)
                fix = f"compare quantities with quantities: ... .compareTo(quantity({other})) == 0"
            elif "semver" in (lt, rt):
                fix = 'compare versions with semver("x.y.z") and compareTo(...) == 0'
            raise _RejectError(
                Issue(
                    f"no matching overload for '{symbol}' applied to ({_show(lt)}, {_show(rt)}): {whole}", fix
                )
            )
        return "bool"

    def arith(self, op_tree: lark.Tree[Any], right: Any) -> str:
        left = _children(op_tree)[0]
        lt, rt = self.type_of(left), self.type_of(right)
        symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/", "mod": "%"}[op_tree.data.split("_")[-1]]
        whole = f"{self.text(left)} {symbol} {self.text(right)}"
        if "quantity" in (lt, rt):
            method = {"+": "add", "-": "sub"}.get(symbol)
            fix = f"{self.text(left)}.{method}({self.text(right)})" if method else "use asInteger() first"
            raise _RejectError(Issue(f"'{symbol}' is not defined for quantities: {whole}", fix))
        self.require(
            "dyn" in (lt, rt) or lt == rt,
            f"no matching overload for '{symbol}' applied to ({_show(lt)}, {_show(rt)}): {whole}",
        )
        return lt if lt != "dyn" else rt

    def member_dot(self, tree: lark.Tree[Any], base: Any, name: str) -> str:
        bt = self.type_of(base)
        if bt == "device":
            fields = {"driver": "string", "attributes": "attrs", "capacity": "caps"}
            if name not in fields:
                field = did_you_mean(name, DEVICE_FIELDS)
                attribute = did_you_mean(name, KNOWN_NAMES)
                if field is not None:
                    fix = self.expression.replace(f"device.{name}", f"device.{field}")
                elif attribute is not None:
                    group = "capacity" if attribute in ("memory", "multiprocessors") else "attributes"
                    fix = self.expression.replace(
                        f"device.{name}", f'device.{group}["gpu.nvidia.com"].{attribute}'
                    )
                else:
                    fix = (
                        'device.attributes["<domain>"].<name>, e.g. device.attributes["gpu.nvidia.com"].type'
                    )
                raise _RejectError(
                    Issue(f"undefined field {name!r} of device (it has driver, attributes, capacity)", fix)
                )
            return fields[name]
        if bt in ("attrs", "caps"):
            return "attrdomain" if bt == "attrs" else "capdomain"
        if bt == "attrdomain":
            return "dyn"
        if bt == "capdomain":
            return "quantity"
        self.require(bt in ("dyn", "map"), f"type {_show(bt)} has no field {name!r}: {self.text(tree)}")
        return "dyn"

    def member_index(self, tree: lark.Tree[Any], base: Any, index: Any) -> str:
        bt, it = self.type_of(base), self.type_of(index)
        if bt in ("attrs", "caps"):
            self.require(it in ("string", "dyn"), f"domain index must be a string: {self.text(tree)}")
            return "attrdomain" if bt == "attrs" else "capdomain"
        if bt == "attrdomain":
            return "dyn"
        if bt == "capdomain":
            return "quantity"
        self.require(bt in ("dyn", "map", "list"), f"type {_show(bt)} cannot be indexed: {self.text(tree)}")
        return "dyn"

    def domain_index(self, text: str) -> None:
        """``device.attributes["profile"]``: an attribute name where its domain belongs."""
        literal = re.search(r"""device\.(attributes|capacity)\[\s*(["'])([^"']*)\2\s*\]""", text)
        if literal is None:
            return
        group, key = literal.group(1), literal.group(3)
        domain, sep, name = key.rpartition("/")
        if sep and domain:
            raise _RejectError(
                Issue(
                    f'device.{group}["{key}"]: a qualified name is looked up as domain, then name',
                    self.expression.replace(literal.group(0), f'device.{group}["{domain}"].{name}'),
                )
            )
        if "." not in key:
            raise _RejectError(
                Issue(
                    f'device.{group}["{key}"] looks up {key!r} as a domain: the {group} are grouped by '
                    f"domain, so {key!r} needs its domain first",
                    self.expression.replace(literal.group(0), f'device.{group}["gpu.nvidia.com"].{key}'),
                )
            )

    def method(  # noqa: PLR0912 - one branch per receiver type, as the checker has
        self, tree: lark.Tree[Any], target: Any, name: str, args: list[Any]
    ) -> str:
        if name in _MACROS:
            self.type_of(target)
            var = self.ident_name(args[0]) if args else None
            self.require(
                var is not None and len(args) in (2, 3), f"malformed macro {name}: {self.text(tree)}"
            )
            self.scope.append(str(var))
            try:
                for arg in args[1:]:
                    self.type_of(arg)
            finally:
                self.scope.pop()
            return "list" if name in ("map", "filter") else "bool"
        if isinstance(target, lark.Tree) and self.text(target) == "cel":
            raise _RejectError(
                Issue(f"cel.{name}() is not evaluated by gpu-dra explain", "write the bound expression out")
            )
        tt = self.type_of(target)
        arg_types = [self.type_of(a) for a in args]
        table: Mapping[str, str]
        if tt == "quantity":
            table = _QUANTITY_METHODS
        elif tt == "semver":
            table = _SEMVER_METHODS
        elif tt == "string":
            table = _STRING_METHODS
        elif tt == "list":
            table = _LIST_METHODS
        elif tt == "dyn":
            table = {**_STRING_METHODS, **_LIST_METHODS, **_SEMVER_METHODS, **_QUANTITY_METHODS}
        else:
            if tt in ("attrdomain", "capdomain"):
                self.domainless(target)
            raise _RejectError(Issue(f"no method {name}() on {_show(tt)}: {self.text(tree)}"))
        if name == "sign" and tt in ("quantity", "dyn"):
            raise _RejectError(
                Issue(
                    f"sign is a function, not a method: {self.text(tree)}",
                    f"sign({self.text(target)})",
                )
            )
        if name not in table:
            raise _RejectError(Issue(f"undeclared reference to {name!r} on {_show(tt)}: {self.text(tree)}"))
        if tt in ("quantity", "semver") and name in (
            "isGreaterThan",
            "isLessThan",
            "compareTo",
            "add",
            "sub",
        ):
            allowed = {tt, "dyn"} | ({"int"} if name in ("add", "sub") and tt == "quantity" else set())
            self.require(len(args) == 1, f"{name}() takes one argument: {self.text(tree)}")
            if arg_types[0] not in allowed:
                ctor = "quantity" if tt == "quantity" else "semver"
                raise _RejectError(
                    Issue(
                        f"{name}() on a {_show(tt)} needs a {_show(tt)} argument, got {_show(arg_types[0])}: "
                        f"{self.text(tree)}",
                        f"{self.text(target)}.{name}({ctor}({self.text(args[0])}))",
                    )
                )
        if tt == "string" and name in ("startsWith", "endsWith", "contains", "matches"):
            self.require(
                len(args) == 1 and arg_types[0] in ("string", "dyn"),
                f"{name}() needs one string argument: {self.text(tree)}",
            )
        return table[name]

    def function(self, tree: lark.Tree[Any], name: str, args: list[Any]) -> str:
        if name == "has":
            self.require(
                len(args) == 1 and self.is_field_selection(args[0]),
                f'has() needs a field selection like has(device.attributes["gpu.nvidia.com"].x): '
                f"{self.text(tree)}",
            )
            self.type_of(args[0])
            return "bool"
        self.require(
            name in _FUNCTIONS_GLOBAL, f"undeclared reference to function {name!r}: {self.text(tree)}"
        )
        types = [self.type_of(a) for a in args]
        if name == "sign":
            self.require(
                len(types) == 1 and types[0] in ("quantity", "dyn"),
                f"sign() takes one quantity: {self.text(tree)}",
            )
        if name in ("quantity", "semver", "isQuantity", "isSemver"):
            self.require(
                len(types) >= 1 and types[0] in ("string", "dyn"),
                f"{name}() needs a string argument: {self.text(tree)}",
                f'{name}("{self.text(args[0]) if args else ""}")',
            )
        return _FUNCTIONS_GLOBAL[name]

    def is_field_selection(self, tree: Any) -> bool:
        while isinstance(tree, lark.Tree) and tree.data in (
            "expr",
            "conditionalor",
            "conditionaland",
            "relation",
            "addition",
            "multiplication",
            "unary",
            "member",
        ):
            kids = _children(tree)
            if len(kids) != 1:
                return False
            tree = kids[0]
        return isinstance(tree, lark.Tree) and tree.data == "member_dot"

    def ident_name(self, tree: Any) -> str | None:
        while isinstance(tree, lark.Tree):
            kids = [k for k in _children(tree) if k is not None]
            if tree.data == "ident":
                return str(kids[0])
            if len(kids) != 1:
                return None
            tree = kids[0]
        return None

    def ident(self, name: str) -> str:
        if name == "device":
            return "device"
        if name in self.scope:
            return "dyn"
        raise _RejectError(
            Issue(
                f"undeclared reference to {name!r} (the only variable is device)",
                'read attributes as device.attributes["<domain>"].<name>',
            )
        )

    def literal(self, token: lark.Token) -> str:
        return {
            "INT_LIT": "int",
            "UINT_LIT": "uint",
            "FLOAT_LIT": "double",
            "STRING_LIT": "string",
            "MLSTRING_LIT": "string",
            "BYTES_LIT": "bytes",
            "BOOL_LIT": "bool",
            "NULL_LIT": "null",
        }.get(token.type, "dyn")


def _show(t: str) -> str:
    return {
        "attrdomain": "map(string, dyn)",
        "capdomain": "map(string, Quantity)",
        "attrs": "map(string, map(string, dyn))",
        "caps": "map(string, map(string, Quantity))",
        "quantity": "Quantity",
        "semver": "Semver",
        "device": "kubernetes.DRADevice",
    }.get(t, t)


# -- compile + evaluate --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One selector on one device: matched (True/False) or an evaluation error."""

    matched: bool
    error: str | None = None


_ENV = celpy.Environment()


@dataclass(frozen=True, slots=True)
class Selector:
    """A compiled selector: the API server's verdict (``issues``) and a celpy program."""

    expression: str
    issues: tuple[Issue, ...]
    program: Any = None

    @property
    def valid(self) -> bool:
        return not self.issues

    def evaluate(self, activation: Mapping[str, Any]) -> Outcome:
        """Evaluate on one device; an invalid selector never matches."""
        if self.program is None:
            return Outcome(False, str(self.issues[0]) if self.issues else "not compiled")
        try:
            result = self.program.evaluate(dict(activation))
        except CELEvalError as exc:
            return Outcome(False, _with_suggestion(_describe(exc), activation))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            return Outcome(False, f"evaluation failed: {exc}")
        if isinstance(result, CELEvalError):
            return Outcome(False, _with_suggestion(_describe(result), activation))
        if not isinstance(result, (ct.BoolType, bool)):
            return Outcome(False, f"expression returned {_type_name(result)} {result!r}, not bool")
        return Outcome(bool(result))


def _with_suggestion(message: str, activation: Mapping[str, Any]) -> str:
    """``no such key: prodName`` plus the device's closest name: ``did you mean productName?``."""
    missing = re.fullmatch(r"no such key: (.+)", message)
    device = activation.get("device")
    if missing is None or not isinstance(device, Mapping):
        return message
    names: list[str] = []
    for group in ("attributes", "capacity"):
        for domain_map in (device.get(ct.StringType(group)) or {}).values():
            names.extend(str(k) for k in domain_map)
    suggestion = did_you_mean(missing.group(1), names)
    return f"{message} (did you mean {suggestion}?)" if suggestion else message


def _describe(exc: CELEvalError) -> str:
    args = exc.args
    message = str(args[0]) if args else "evaluation error"
    if message == "no such key" and len(args) > 2 and args[2]:
        return f"no such key: {args[2][0]}"
    member = re.match(r"no such member in mapping: '(.*)'", message)
    if member:
        return f"no such key: {member.group(1)}"
    if message.startswith("found no matching overload") or message == "no such overload":
        return "no such overload: " + message.removeprefix("found no matching overload").strip()
    return message


def check(expression: str) -> tuple[Issue, ...]:
    """Why the API server would reject ``expression`` (empty when it would accept it)."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        return (
            Issue(
                f"expression is {len(expression)} characters, more than {MAX_EXPRESSION_LENGTH}",
                "split it into several selectors",
            ),
        )
    try:
        tree = _ENV.compile(expression)
    except CELParseError as exc:
        return (Issue(syntax_error(expression, getattr(exc, "line", None), getattr(exc, "column", None))),)
    checker = _Checker(expression)
    try:
        result = checker.type_of(tree)
    except _RejectError as rej:
        return (rej.issue,)
    if result in ("attrdomain", "capdomain"):
        try:
            checker.domainless(tree)
        except _RejectError as rej:
            return (rej.issue,)
    if result not in ("bool", "dyn"):
        return (Issue(f"must evaluate to bool, not {_show(result)}", f"({expression}) == <value>"),)
    return ()


def syntax_error(expression: str, line: int | None, column: int | None) -> str:
    """A syntax error as the API server shows it: where, the line, and a caret under the column."""
    lines = expression.splitlines() or [expression]
    if not line or not column or line > len(lines):
        return "syntax error in the expression; check brackets, quotes and operators"
    text = lines[line - 1]
    where = f"line {line}, column {column}" if len(lines) > 1 else f"column {column}"
    return f"syntax error at {where}:\n  | {text}\n  | {' ' * (column - 1)}^"


_CACHE: dict[str, Selector] = {}


def compile_selector(expression: str) -> Selector:
    """Check and compile (cached: claims repeat their class's selectors on every device)."""
    cached = _CACHE.get(expression)
    if cached is not None:
        return cached
    issues = check(expression)
    program = None
    if not issues:
        program = _ENV.program(_ENV.compile(expression), functions=dict(FUNCTIONS))
    selector = Selector(expression, issues, program)
    if len(_CACHE) < 4096:
        _CACHE[expression] = selector
    return selector
