"""JSON <-> PostgreSQL values.  Pure: works on type names, never on a connection.

Out: uuid, text, integers, booleans as JSON natives; numeric as a string (no
precision lost); timestamps ISO 8601; json/jsonb embedded as JSON (the database's own
text is passed through untouched); bytea base64; arrays as arrays; NULL as null.

In: each parameter is converted to what the driver expects for the type PostgreSQL
inferred for it, so a JSON string works for a timestamptz or numeric parameter.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import math
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from ..errors import INVALID_REQUEST, ApiError
from .pgtext import to_text


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):  # as PostgreSQL prints it: never in exponent notation
        return format(obj, "f") if obj.is_finite() else str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode()
    if isinstance(obj, dt.timedelta):
        return _iso_duration(obj)
    if hasattr(obj, "isempty") and hasattr(obj, "lower_inc"):  # a range
        if obj.isempty:
            return {"empty": True}
        return {"lower": obj.lower, "upper": obj.upper, "lower_inc": obj.lower_inc, "upper_inc": obj.upper_inc}
    if hasattr(obj, "items"):  # a composite value (record)
        return dict(obj.items())
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if type(obj).__module__.startswith("asyncpg"):
        # asyncpg's geometric types and bit strings, whose str() is a Python repr
        # (a Path's even carries a memory address): PostgreSQL's own text instead.

        return to_text(obj)
    return str(obj)


def _iso_duration(td: dt.timedelta) -> str:
    sign = "-" if td < dt.timedelta(0) else ""
    td = abs(td)
    seconds = td.seconds + td.microseconds / 1e6
    return f"{sign}P{td.days}DT{seconds:g}S"


def dumps(value: Any) -> bytes:
    """Serialise a response body.  Never fails on a value the database returned: the
    transaction may have committed already, and an answer of 500 would invite a retry."""
    try:
        return orjson.dumps(value, default=_default)
    except (TypeError, ValueError, OverflowError):  # orjson.JSONEncodeError is a TypeError
        return orjson.dumps(_plain(value), default=_default)


def _plain(value: Any) -> Any:
    """The slow path of ``dumps``: what orjson refuses, made into something it takes (a
    ``time`` with a UTC offset, from timetz, as ISO 8601 text; an integer past 64 bits as
    a JSON number; anything else as its text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dt.time) and value.tzinfo is not None:
        return value.isoformat()
    if isinstance(value, int) and not isinstance(value, bool):
        return orjson.Fragment(str(value).encode())
    try:
        orjson.dumps(value, default=_default)
    except (TypeError, ValueError, OverflowError):
        if hasattr(value, "items"):  # a composite value (record)
            return _plain(dict(value.items()))
        return str(value)
    return value


def type_label(name: str, kind: str, element: str | None) -> str:
    """Column/parameter type as shown to callers: ``int4``, ``text[]``, ``my_enum``."""
    if kind == "array" and element:
        return f"{element}[]"
    return name


# PostgreSQL's own limit (MAXDIM): an array parameter nested deeper cannot be sent.
ARRAY_MAX_DIMENSIONS = 6
# A JSON value's nesting, for a json/jsonb parameter and for any parameter of /sql.  Real
# documents nest a few levels, rarely a few dozen; 128 is far above that, below orjson's
# own limit for serialising a value (254 levels, the parameter's encoder), and keeps every
# walk over a value far from Python's recursion limit.  PostgreSQL reads deeper JSON (to
# its max_stack_depth), and a deeper jsonb the database returns is passed through as its
# own text: the limit is on what a caller sends.
JSON_MAX_DEPTH = 128


def nested_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays/objects more than ``limit`` levels (a scalar is 0
    levels, ``[1]`` one).  Iterative, a level at a time, keeping only the containers."""
    level = [value] if isinstance(value, (list, dict)) else []
    for _ in range(limit):
        deeper: list[Any] = []
        for item in level:
            deeper += [c for c in (item.values() if isinstance(item, dict) else item) if isinstance(c, (list, dict))]
        if not deeper:
            return False
        level = deeper
    return bool(level)


def check_nesting(params: Sequence[Any], where: str = "") -> None:
    """Refuse a request whose parameters nest deeper than ``JSON_MAX_DEPTH`` (``where``
    prefixes the position in the message: ``queries[1].``)."""
    for i, value in enumerate(params):
        if isinstance(value, (list, dict)) and nested_deeper(value, JSON_MAX_DEPTH):
            raise ApiError(INVALID_REQUEST, f"{where}params[{i}] is nested deeper than {JSON_MAX_DEPTH} levels")


def _fail(index: int, typename: str, expected: str) -> ApiError:
    return ApiError(INVALID_REQUEST, f"parameter ${index} ({typename}): expected {expected}")


class _OutOfRange(ValueError):
    """A value of the right kind that the type cannot hold (the message says why)."""


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v.strip())
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise ValueError


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        f = float(v)
        if math.isinf(f) and v.strip().lstrip("+-").lower() not in ("inf", "infinity"):
            raise _OutOfRange("out of range for type double precision")  # 1e400, which PostgreSQL refuses
        return f
    raise ValueError


# PostgreSQL's numeric holds up to 131072 digits before the decimal point.  The binary
# format's weight (a 16-bit count of base-10000 digits) would wrap past that, and the
# value arrive as another number (0): refuse it here instead.
_NUMERIC_MAX_ADJUSTED = 131071


def _numeric(v: Any) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError
    try:
        d = Decimal(str(v).strip())
    except InvalidOperation:
        raise ValueError from None
    if d.is_finite() and d and d.adjusted() > _NUMERIC_MAX_ADJUSTED:
        raise _OutOfRange("value overflows numeric format (at most 131072 digits before the decimal point)")
    return d


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "t", "f"):
        return v.lower() in ("true", "t")
    raise ValueError


def _str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise ValueError


def _uuid(v: Any) -> uuid.UUID:
    if not isinstance(v, str):
        raise ValueError
    return uuid.UUID(v)


def _bytea(v: Any) -> bytes:
    if not isinstance(v, str):
        raise ValueError
    try:
        return base64.b64decode(v, validate=True)
    except binascii.Error:
        raise ValueError from None


def _iso(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def conv(v: Any) -> Any:
        if not isinstance(v, str):
            raise ValueError
        return parse(v)
    return conv


def _naive(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    """timestamp and time ignore a UTC offset in their input, as PostgreSQL does."""
    iso = _iso(parse)

    def conv(v: Any) -> Any:
        return iso(v).replace(tzinfo=None)
    return conv


def _char(v: Any) -> bytes:
    """PostgreSQL's one-byte "char" (asyncpg sends it as bytes)."""
    return _str(v).encode()


def _json(v: Any) -> Any:
    if isinstance(v, (list, dict)) and nested_deeper(v, JSON_MAX_DEPTH):
        raise _OutOfRange(f"nested deeper than {JSON_MAX_DEPTH} levels")
    return v


def _inet(v: Any) -> Any:
    if not isinstance(v, str):
        raise ValueError
    return ipaddress.ip_interface(v) if "/" in v else ipaddress.ip_address(v)


_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "int2": (_int, "an integer"), "int4": (_int, "an integer"), "int8": (_int, "an integer"),
    "oid": (_int, "an integer"),
    "float4": (_float, "a number"), "float8": (_float, "a number"),
    "numeric": (_numeric, "a number or a numeric string"),
    "bool": (_bool, "true or false"),
    "text": (_str, "a string"), "varchar": (_str, "a string"), "bpchar": (_str, "a string"),
    "name": (_str, "a string"), "char": (_char, "a string"), "citext": (_str, "a string"),
    "interval": (_str, "a string such as '1 day 02:00'"),
    "uuid": (_uuid, "a UUID string"),
    "bytea": (_bytea, "a base64 string"),
    "timestamptz": (_iso(dt.datetime.fromisoformat), "an ISO 8601 timestamp string"),
    "timestamp": (_naive(dt.datetime.fromisoformat), "an ISO 8601 timestamp string"),
    "date": (_iso(dt.date.fromisoformat), "an ISO 8601 date string"),
    "time": (_naive(dt.time.fromisoformat), "an ISO 8601 time string"),
    "timetz": (_iso(dt.time.fromisoformat), "an ISO 8601 time string"),
    "json": (_json, "any JSON value"), "jsonb": (_json, "any JSON value"),
    "inet": (_inet, "an IP address string"), "cidr": (_inet, "an IP network string"),
}


def convert_param(index: int, value: Any, typename: str, kind: str, element: str | None) -> Any:
    """Turn one JSON parameter into the driver value for a parameter of the given type.

    ``element`` names the element type of an array parameter.  Enums and other types
    without a converter take a string and are parsed by PostgreSQL.
    """
    if value is None:
        return None
    if kind == "array":
        label = type_label(typename, kind, element)
        if not isinstance(value, list):
            raise _fail(index, label, "a JSON array")
        return _array(index, value, element or "", label, 1)
    conv = _CONVERTERS.get(typename)
    if conv is None:
        if isinstance(value, (dict, list)):
            raise _fail(index, typename, "a scalar value")
        return value
    fn, expected = conv
    try:
        return fn(value)
    except _OutOfRange as exc:
        raise ApiError(INVALID_REQUEST, f"parameter ${index} ({typename}): {exc}") from None
    except (ValueError, TypeError, OverflowError):
        raise _fail(index, typename, expected) from None


def _array(index: int, values: list[Any], element: str, label: str, dimension: int) -> list[Any]:
    """An array parameter's elements; a nested list is a dimension more."""
    if dimension > ARRAY_MAX_DIMENSIONS:
        raise ApiError(INVALID_REQUEST, f"parameter ${index} ({label}): nested deeper than {ARRAY_MAX_DIMENSIONS} "
                       f"levels (a PostgreSQL array has at most {ARRAY_MAX_DIMENSIONS} dimensions)")
    return [_array(index, v, element, label, dimension + 1) if isinstance(v, list)
            else convert_param(index, v, element, "scalar", None) for v in values]


def convert_params(values: Sequence[Any], types: Sequence[tuple[str, str, str | None]]) -> list[Any]:
    """Convert all parameters; the counts must match what the statement expects."""
    if len(values) != len(types):
        raise ApiError(INVALID_REQUEST,
                       f"the statement expects {len(types)} parameter(s), {len(values)} given")
    return [convert_param(i + 1, v, *t) for i, (v, t) in enumerate(zip(values, types, strict=True))]
