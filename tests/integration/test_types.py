"""Every promised type round-trips through parameters and results."""

from __future__ import annotations

from typing import Any

from ..fix_gateway import KEY_B, Api

ROW: dict[str, Any] = {
    "u": "5f0c9b1e-7d2a-4c1b-9e3f-0a1b2c3d4e5f",
    "t": "héllo \"world\" \n ✓",
    "i2": -32768,
    "i4": 2147483647,
    "i8": 9007199254740993,          # beyond a double's exact range: must stay exact
    "b": True,
    "n": "12345678901234567890.123456789012345678",
    "f8": 1.25,
    "ts": "2026-11-25T10:20:30.123456+00:00",
    "tsn": "2026-11-25T10:20:30",
    "d": "2026-02-28",
    "j": {"nested": [1, "two", None, {"x": 1.5}]},
    "jb": {"a": {"b": [True, False]}},
    "by": "AAEC/f7/",
    "ai": [1, None, 3],
    "at": ["a", "b,c", ""],
    "au": ["5f0c9b1e-7d2a-4c1b-9e3f-0a1b2c3d4e5f"],
    "iv": "1 mon 2 days 03:04:05",
    "m": "happy",
}
COLUMNS = list(ROW)


async def test_every_type_round_trips(api: Api) -> None:
    placeholders = ", ".join(f"${i + 1}" for i in range(len(COLUMNS)))
    r = await api.query(f"INSERT INTO typed ({', '.join(COLUMNS)}) VALUES ({placeholders}) RETURNING id",
                        *ROW.values(), key=KEY_B)
    assert r.status == 200, r.body
    row_id = r.body["rows"][0]["id"]
    r = await api.query(f"SELECT {', '.join(COLUMNS)} FROM typed WHERE id = $1", row_id, key=KEY_B)
    assert r.status == 200, r.body
    assert r.body["rows"] == [ROW]
    types = {c["name"]: c["type"] for c in r.body["columns"]}
    assert types["ai"] == "int4[]" and types["jb"] == "jsonb" and types["m"] == "mood"
    assert types["n"] == "numeric" and types["ts"] == "timestamptz"


async def test_nulls_and_special_values(api: Api) -> None:
    r = await api.query("SELECT NULL::int AS a, $1::text AS b, 'NaN'::numeric AS c, '{}'::int[] AS d,"
                        " 'null'::jsonb AS e, '\"s\"'::json AS f", None, key=KEY_B)
    assert r.body["rows"] == [{"a": None, "b": None, "c": "NaN", "d": [], "e": None, "f": "s"}]


async def test_enum_results_in_array_format(api: Api) -> None:
    r = await api.query("SELECT 'sad'::mood AS m, ARRAY['happy'::mood] AS ms", key=KEY_B, row_format="array")
    assert r.status == 200, r.body
    assert r.body["rows"] == [["sad", ["happy"]]]


async def test_a_row_of_types_the_driver_cannot_decode_is_a_clear_error(api: Api, admin_db: Any) -> None:
    # asyncpg decodes an anonymous ROW(...) only from element types it has a decoder for
    for sql in ("SELECT ROW('1 2'::int2vector) AS r", "SELECT ROW(1, '26 27'::oidvector) AS r"):
        r = await api.query(sql, key=KEY_B)
        assert r.status == 422 and r.code == "sql_error", r.body
        assert "cast it to text" in r.body["error"]["message"]
        r = await api.query(sql.replace(" AS r", "::text AS r"), key=KEY_B)
        assert r.status == 200 and r.body["rows"][0]["r"].startswith("("), r.body
    # in a read-write transaction: nothing is written
    marker = "undecodable-row"
    r = await api.transaction([{"sql": "INSERT INTO typed (t) VALUES ($1)", "params": [marker]},
                               {"sql": "SELECT ROW('1 2'::int2vector) AS r"}], key=KEY_B)
    assert r.status == 422, r.body
    assert await admin_db.fetchval("SELECT count(*) FROM typed WHERE t = $1", marker) == 0
