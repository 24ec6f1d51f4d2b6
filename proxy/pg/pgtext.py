"""PostgreSQL's text representation of values, out: from a value as asyncpg decoded it
(the way in is text_params.py).  Pure: no I/O.

:func:`to_text` turns a value as asyncpg decoded it back into the text PostgreSQL's
output function prints for it (``t``/``f``, ``\\x0102``, ``{a,"b c",NULL}``,
``2024-01-02 03:04:05.5+00``), so a client that parses PostgreSQL text (node-postgres'
type parsers, behind Neon's serverless driver) sees what a real server would send.
Timestamps with a time zone are printed in UTC (``+00``): the same instant, whatever
the session's TimeZone.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import struct
from decimal import Decimal
from typing import Any

import orjson

_ARRAY_SPECIAL = re.compile(r'[{}",\\\s]')
_BOX_ARRAY_SPECIAL = re.compile(r'[{}";\\\s]')  # box arrays are delimited by ';'
_COMPOSITE_SPECIAL = re.compile(r'[()",\\\s]')
_RANGE_SPECIAL = re.compile(r'[()\[\]",\\\s]')
# Decimal exponents printed in fixed notation (PostgreSQL 12+, shortest round-trip digits).
_FIXED_BELOW = {"float4": 6, "float8": 15}
_INFINITY_DATE = {dt.date.max: "infinity", dt.date.min: "-infinity"}
_INFINITY_TIMESTAMP = {dt.datetime.max: "infinity", dt.datetime.min: "-infinity"}


def base_type(label: str) -> str:
    """``int4[]`` -> ``int4``: the element type of an array column label, else the label."""
    return label[:-2] if label.endswith("[]") else label


# -- out -------------------------------------------------------------------------------------

def to_text(value: Any, typename: str = "") -> str | None:
    """The text PostgreSQL prints for ``value``; ``typename`` (an element type name for
    arrays) only matters for floats, whose shortest digits depend on float4 or float8."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value, "float4" if typename == "float4" else "float8")
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return value.to_eng_string() if not value.is_finite() else format(value, "f")
    if isinstance(value, orjson.Fragment):
        return orjson.dumps(value).decode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        if typename == "char":  # PostgreSQL's one-byte "char", which asyncpg reads as bytes
            return "".join(chr(b) if b < 128 else f"\\{b:03o}" for b in bytes(value)[:1] if b)
        return "\\x" + bytes(value).hex()
    if isinstance(value, dt.datetime):
        return _timestamp_text(value)
    if isinstance(value, dt.date):
        return _INFINITY_DATE.get(value) or value.isoformat()
    if isinstance(value, dt.time):
        return _time_text(value)
    if isinstance(value, list):
        if _is_multirange(value, typename):
            return "{" + ",".join(_range_text(r, typename) for r in value) + "}"
        if _is_vector(value, typename):
            return " ".join(str(v) for v in value)
        return _array_text(value, typename)
    # asyncpg's own value types, recognised by shape (this module does not import asyncpg)
    geometric = _geometric_text(value)
    if geometric is not None:
        return geometric
    if hasattr(value, "isempty") and hasattr(value, "lower_inc"):
        return _range_text(value, typename)
    if hasattr(value, "as_string"):  # a bit string; as_string() groups the bits by four
        return str(value.as_string()).replace(" ", "")
    if isinstance(value, tuple) or (hasattr(value, "items") and not isinstance(value, dict)):
        # a composite: a Record for a named type, a tuple for an anonymous record
        fields = value.values() if hasattr(value, "values") else value
        return "(" + ",".join(_quoted(to_text(v), _COMPOSITE_SPECIAL, double=True) for v in fields) + ")"
    return str(value)  # uuid, inet/cidr (ipaddress), macaddr, money, ...


def _float_text(v: float, kind: str) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    shortest = repr(v) if kind == "float8" else float4_shortest(v)
    d = Decimal(shortest).normalize()
    _, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    leading = exponent + len(digits) - 1  # decimal exponent of the first digit
    if -4 <= leading < _FIXED_BELOW[kind]:
        return format(d, "f")
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return f"{'-' if v < 0 else ''}{mantissa}e{'-' if leading < 0 else '+'}{abs(leading):02d}"


def _point(p: Any) -> str:
    return f"({_float_text(float(p[0]), 'float8')},{_float_text(float(p[1]), 'float8')})"


def _geometric_text(value: Any) -> str | None:
    """PostgreSQL's geometric types, which asyncpg decodes to classes of its own (by name here)."""
    kind = type(value).__name__ if type(value).__module__.startswith("asyncpg") else ""
    if kind == "Point":
        return _point(value)
    if kind == "Box":
        return f"{_point(value.high)},{_point(value.low)}"
    if kind == "LineSegment":
        return f"[{_point(value.p1)},{_point(value.p2)}]"
    if kind == "Line":
        return "{" + ",".join(_float_text(float(c), "float8") for c in value) + "}"
    if kind == "Circle":
        return f"<{_point(value.center)},{_float_text(float(value.radius), 'float8')}>"
    if kind == "Polygon":
        return "(" + ",".join(_point(p) for p in value.points) + ")"
    if kind == "Path":
        points = ",".join(_point(p) for p in value.points)
        return f"({points})" if value.is_closed else f"[{points}]"
    return None


_FLOAT4_MIN_NORMAL = 1.1754943508222875e-38


def float4_shortest(v: float) -> str:
    """The fewest significant digits that read back as the same float4 (as PostgreSQL prints)."""
    exact = struct.pack("<f", v)
    # Six digits first: a float4 carries more than seven, so a value whose shortest form
    # has six or fewer rounds to exactly that form at six (%g drops the trailing zeros).
    # Not so a subnormal, which carries fewer.
    for precision in range(6 if abs(v) >= _FLOAT4_MIN_NORMAL else 1, 10):
        text = f"{v:.{precision}g}"
        try:
            if struct.pack("<f", float(text)) == exact:
                return text
        except OverflowError:  # near float4's maximum, fewer digits round past it
            continue
    return repr(v)


def _fraction(microseconds: int) -> str:
    return f".{microseconds:06d}".rstrip("0") if microseconds else ""


def _offset(value: dt.timedelta) -> str:
    total = int(value.total_seconds())
    sign = "-" if total < 0 else "+"
    hours, rest = divmod(abs(total), 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{sign}{hours:02d}"
    if minutes or seconds:
        text += f":{minutes:02d}"
    if seconds:
        text += f":{seconds:02d}"
    return text


def _timestamp_text(value: dt.datetime) -> str:
    infinite = _INFINITY_TIMESTAMP.get(value.replace(tzinfo=None))
    if infinite is not None:
        return infinite
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    text = f"{value.year:04d}-{value.month:02d}-{value.day:02d} {value.hour:02d}:{value.minute:02d}:" \
           f"{value.second:02d}{_fraction(value.microsecond)}"
    return text + "+00" if value.tzinfo is not None else text


def _time_text(value: dt.time) -> str:
    text = f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}{_fraction(value.microsecond)}"
    offset = value.utcoffset()
    return text if offset is None else text + _offset(offset)


def _quoted(text: str | None, special: re.Pattern[str], *, double: bool = False) -> str:
    """An element as PostgreSQL's array/record/range output writes it."""
    if text is None:
        return ""
    if text and not special.search(text):
        return text
    if double:  # record_out and range_out double quotes and backslashes
        return '"' + text.replace("\\", "\\\\").replace('"', '""') + '"'
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Arrays to asyncpg, space-separated numbers to PostgreSQL.
_VECTORS = frozenset({"int2vector", "oidvector"})


def _is_multirange(value: list[Any], typename: str) -> bool:
    """asyncpg decodes a multirange, like an array, to a list: of ranges."""
    return typename.endswith("multirange") and not any(isinstance(v, list) for v in value)


def _is_vector(value: list[Any], typename: str) -> bool:
    return typename in _VECTORS and not any(isinstance(v, list) for v in value)


def _array_text(values: list[Any], element: str) -> str:
    parts = []
    for v in values:
        if v is None:
            parts.append("NULL")
        elif isinstance(v, list) and not _is_multirange(v, element) and not _is_vector(v, element):
            parts.append(_array_text(v, element))
        else:
            text = to_text(v, element)
            special = _BOX_ARRAY_SPECIAL if element == "box" else _ARRAY_SPECIAL
            parts.append(_quoted(text, special) if text and text.upper() != "NULL"
                         else '"' + (text or "") + '"')
    # box is the one built-in type whose array delimiter is not a comma (its text has commas)
    return "{" + (";" if element == "box" else ",").join(parts) + "}"


def _range_text(value: Any, element: str) -> str:
    if value.isempty:
        return "empty"
    lower = "" if value.lower_inf else _quoted(to_text(value.lower, element), _RANGE_SPECIAL, double=True)
    upper = "" if value.upper_inf else _quoted(to_text(value.upper, element), _RANGE_SPECIAL, double=True)
    return f"{'[' if value.lower_inc else '('}{lower},{upper}{']' if value.upper_inc else ')'}"


def to_json(value: Any, typename: str) -> Any:
    """A value as Neon's endpoint returns it without raw text output: booleans, int2/int4
    and finite floats as JSON natives, json/jsonb embedded, arrays as arrays, and every
    other value (int8 and numeric included) as its PostgreSQL text."""
    if value is None:
        return None
    if isinstance(value, list):
        element = base_type(typename)
        return [to_json(v, element) for v in value]
    if typename in ("bool", "int2", "int4", "json", "jsonb"):
        return value
    if typename in ("float4", "float8") and isinstance(value, float):
        return float(to_text(value, typename) or "0") if math.isfinite(value) else to_text(value, typename)
    return to_text(value, typename)


# -- in --------------------------------------------------------------------------------------
