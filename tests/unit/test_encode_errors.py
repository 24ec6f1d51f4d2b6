"""Value encoding both ways, and the SQLSTATE -> error table."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest

from proxy.errors import ALL_KINDS, ApiError, from_sqlstate
from proxy.pg.encode import convert_param, convert_params, dumps


def test_dumps_values() -> None:
    value = {
        "n": Decimal("12345678901234567890.000000001"),
        "b": b"\x00\xff",
        "ts": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "u": uuid.UUID("11111111-1111-4111-8111-111111111111"),
        "j": orjson.Fragment('{"a": [1, 2]}'),
        "td": dt.timedelta(days=1, seconds=3.5),
    }
    assert orjson.loads(dumps(value)) == {
        "n": "12345678901234567890.000000001", "b": "AP8=", "ts": "2026-01-02T03:04:05+00:00",
        "u": "11111111-1111-4111-8111-111111111111", "j": {"a": [1, 2]}, "td": "P1DT3.5S",
    }


@pytest.mark.parametrize(("value", "typename", "expected"), [
    ("42", "int4", 42), (42, "int8", 42), (1.5, "float8", 1.5), (2, "float8", 2.0),
    ("1.10", "numeric", Decimal("1.10")), (0.1, "numeric", Decimal("0.1")),
    ("t", "bool", True), (False, "bool", False), (5, "text", "5"),
    ("2026-01-02T03:04:05Z", "timestamptz", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)),
    ("2026-01-02", "date", dt.date(2026, 1, 2)), ("AP8=", "bytea", b"\x00\xff"),
    ({"a": 1}, "jsonb", {"a": 1}), ("x", "jsonb", "x"), (None, "int4", None),
    ("happy", "mood", "happy"),
])
def test_convert_param(value: Any, typename: str, expected: Any) -> None:
    assert convert_param(1, value, typename, "scalar", None) == expected


@pytest.mark.parametrize(("value", "typename"), [
    ("abc", "int4"), (True, "int4"), (1.5, "int4"), ([1], "int4"), ("x", "numeric"), (True, "numeric"),
    ("maybe", "bool"), (1, "bool"), ({"a": 1}, "text"), ("not-uuid", "uuid"), (5, "timestamptz"),
    ("yesterday", "date"), ("***", "bytea"), ({"a": 1}, "mood"),
])
def test_convert_param_refuses_wrong_types(value: Any, typename: str) -> None:
    with pytest.raises(ApiError) as info:
        convert_param(3, value, typename, "scalar", None)
    assert info.value.kind.code == "invalid_request"
    assert info.value.message.startswith(f"parameter $3 ({typename}): expected")


def test_convert_array_params() -> None:
    assert convert_param(1, ["1", 2], "int4[]", "array", "int4") == [1, 2]
    with pytest.raises(ApiError):
        convert_param(1, "1,2", "int4[]", "array", "int4")
    with pytest.raises(ApiError, match="expects 2 parameter"):
        convert_params([1], [("int4", "scalar", None), ("int4", "scalar", None)])


def test_sqlstate_table() -> None:
    cases = {
        "42501": ("rls_violation", 403), "23505": ("conflict", 409), "23503": ("conflict", 409),
        "57014": ("statement_timeout", 504), "40001": ("serialization_failure", 409),
        "40P01": ("deadlock_detected", 409), "42P01": ("sql_invalid", 400), "22012": ("sql_error", 422),
        "23502": ("sql_error", 422), "08006": ("database_unavailable", 503), "57P01": ("database_unavailable", 503),
        "XX000": ("sql_error", 422), "58030": ("internal", 500), "ZZ999": ("sql_error", 422),
        "53400": ("sql_error", 422), "53300": ("database_unavailable", 503),
    }
    for state, (code, status) in cases.items():
        err = from_sqlstate(state, "msg")
        assert (err.kind.code, err.kind.status, err.sqlstate) == (code, status, state)
    assert from_sqlstate("XX000", "secret detail").message == "the database reported an internal error"
    assert from_sqlstate("40001", "x").kind.retryable and from_sqlstate("40001", "x").retry_after_s == 1
    assert len({(k.code, k.status) for k in ALL_KINDS}) == len(ALL_KINDS)


def test_an_idempotency_row_the_snapshot_cannot_see_is_in_progress_not_a_new_run() -> None:
    """The claim's insert met a row (not claimed) that its statement's snapshot cannot
    see (no stored hash): the first request committed meanwhile.  Running would run twice."""
    from proxy.policy import idempotency

    claim = idempotency.Claim(key="k", request_hash="h", retention_s=60)
    with pytest.raises(ApiError) as err:
        idempotency.decide(claim, False, None, None, None, None)
    assert err.value.kind.code == "idempotency_in_progress"
    assert idempotency.decide(claim, True, None, None, None, None) is None  # claimed: run
    replay = idempotency.decide(claim, False, "h", 200, b"{}", False)
    assert replay is not None and replay.body == b"{}"
    assert idempotency.decide(claim, False, "h", 200, b"{}", True) is None  # expired: run again
