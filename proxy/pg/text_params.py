"""PostgreSQL's text representation of values, in: a parameter given as PostgreSQL text
turned into the value asyncpg needs to send for the parameter's type, as PostgreSQL's
input function would read it (:func:`param_from_text`); :func:`json_to_text` first turns
a JSON parameter into that text the way Neon's SQL-over-HTTP endpoint does.  Pure: no
I/O.  (The way out is pgtext.py.)"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import orjson

from ..errors import INVALID_REQUEST, ApiError
from .encode import ARRAY_MAX_DIMENSIONS, convert_param, dumps

_TRUE = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "off", "0"})


def json_to_text(value: Any) -> str | None:
    """A JSON parameter as PostgreSQL text, as Neon's endpoint passes it: strings as they
    are, numbers, booleans and objects as JSON text, arrays as array literals.

    Recursive: the caller bounds the value's nesting (neon.py, ``encode.check_nesting``)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _json_array_literal(value)
    return dumps(value).decode()  # dumps: an integer past 64 bits too


def _json_array_literal(values: list[Any]) -> str:
    parts = []
    for v in values:
        if v is None:
            parts.append("NULL")
        elif isinstance(v, list):
            parts.append(_json_array_literal(v))
        else:
            text = v if isinstance(v, str) else dumps(v).decode()
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"


def parse_array(text: str) -> list[Any]:
    """A PostgreSQL array literal -> nested lists of element texts (None for NULL).

    Dimension decorations (``[1:2]={...}``) are accepted and dropped."""
    text = text.strip()
    if text.startswith("["):
        _, eq, text = text.partition("=")
        if not eq:
            raise ValueError("malformed array literal")
        text = text.strip()
    values, rest = _parse_array_at(text, 0, 1)
    if text[rest:].strip():
        raise ValueError("junk after the closing brace")
    return values


class TooManyDimensions(ValueError):
    """An array literal nested deeper than PostgreSQL's arrays can be."""


def _parse_array_at(text: str, i: int, dimension: int) -> tuple[list[Any], int]:
    if i >= len(text) or text[i] != "{":
        raise ValueError("an array literal starts with {")
    if dimension > ARRAY_MAX_DIMENSIONS:
        raise TooManyDimensions
    i += 1
    out: list[Any] = []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            raise ValueError("unterminated array literal")
        if text[i] == "}" and not out:
            return out, i + 1
        if text[i] == "{":
            item, i = _parse_array_at(text, i, dimension + 1)
            out.append(item)
        elif text[i] == '"':
            chars, i = [], i + 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                if i < len(text):
                    chars.append(text[i])
                i += 1
            if i >= len(text):
                raise ValueError("unterminated quoted element")
            out.append("".join(chars))
            i += 1
        else:
            start = i
            while i < len(text) and text[i] not in ",}":
                i += 1
            raw = text[start:i].strip()
            if not raw:
                raise ValueError("empty unquoted element")
            out.append(None if raw.upper() == "NULL" else raw.replace("\\", ""))
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            raise ValueError("unterminated array literal")
        if text[i] == ",":
            i += 1
        elif text[i] == "}":
            return out, i + 1
        else:
            raise ValueError(f"unexpected {text[i]!r} in array literal")


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] != "\\":
            out += text[i].encode()
            i += 1
        elif text[i + 1:i + 2] == "\\":
            out.append(0x5C)
            i += 2
        elif re.fullmatch(r"[0-3][0-7]{2}", text[i + 1:i + 4]):
            out.append(int(text[i + 1:i + 4], 8))
            i += 4
        else:
            raise ValueError("invalid escape in bytea")
    return bytes(out)


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not a boolean")


def _timestamp(text: str, with_zone: bool) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(text.strip())
    # PostgreSQL ignores an offset given for a timestamp without time zone.
    return parsed if with_zone else parsed.replace(tzinfo=None)


def _time(text: str) -> dt.time:
    text = text.strip()
    # PostgreSQL prints whole-hour offsets as +HH, which fromisoformat reads only as +HH:MM.
    return dt.time.fromisoformat(re.sub(r"([+-]\d\d)$", r"\1:00", text))


_PARSERS: dict[str, tuple[Any, str]] = {
    "bytea": (_bytea, "a bytea value (\\x followed by hex digits)"),
    "bool": (_bool, "a boolean"),
    "json": (lambda t: orjson.Fragment(t.encode()), "JSON text"),
    "jsonb": (lambda t: orjson.Fragment(t.encode()), "JSON text"),
    "timestamptz": (lambda t: _timestamp(t, True), "an ISO 8601 timestamp"),
    "timestamp": (lambda t: _timestamp(t, False), "an ISO 8601 timestamp"),
    "time": (_time, "a time of day"),
    "timetz": (_time, "a time of day"),
}


def param_from_text(index: int, text: str | None, typename: str, kind: str, element: str | None) -> Any:
    """One parameter given as PostgreSQL text -> the driver value for its type.

    A value the type cannot take is refused with SQLSTATE 22P02, as PostgreSQL's input
    function would refuse it."""
    if text is None:
        return None
    label = f"{element}[]" if kind == "array" and element else typename
    try:
        if kind == "array":
            return _array_values(index, parse_array(text), element or "")
        parser = _PARSERS.get(typename)
        if parser is not None:
            return parser[0](text)
        return convert_param(index, text, typename, kind, element)
    except TooManyDimensions:
        # as PostgreSQL's array_in words it, with its SQLSTATE (program_limit_exceeded)
        raise ApiError(INVALID_REQUEST, f"parameter ${index} ({label}): number of array dimensions "
                       f"({ARRAY_MAX_DIMENSIONS + 1}) exceeds the maximum allowed ({ARRAY_MAX_DIMENSIONS})",
                       sqlstate="54000") from None
    except (ValueError, TypeError, OverflowError, IndexError):
        expected = _PARSERS[typename][1] if typename in _PARSERS else "a valid array literal"
        raise ApiError(INVALID_REQUEST, f"parameter ${index} ({label}): expected {expected}",
                       sqlstate="22P02") from None
    except ApiError as err:
        raise ApiError(INVALID_REQUEST, err.message, sqlstate="22P02") from None


def _array_values(index: int, items: list[Any], element: str) -> list[Any]:
    return [_array_values(index, v, element) if isinstance(v, list)
            else param_from_text(index, v, element, "scalar", None) for v in items]
