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


async def test_an_anonymous_row_is_postgresqls_own_text(api: Api, admin_db: Any) -> None:
    """asyncpg decodes a ROW(...) element by element in binary, and had no decoder for
    some element types (500s) and fed the binary bytes of others to text decoders
    (garbage with a 200): a ROW comes back as PostgreSQL prints it instead."""
    exprs = ["ROW(1, 'a b', NULL, '', 'x\"y')", "ROW('1 2'::int2vector)", "ROW(1, '26 27'::oidvector)",
             "ROW('1 day'::interval, 12.5::money)", "ROW('a b'::tsvector, 'int4'::regtype)",
             "ROW('08:00:2b:01:02:03'::macaddr, '16/0'::pg_lsn)", "ROW('sad'::mood, ROW(2, 'x'))"]
    columns = ", ".join(f"{e} AS c{i}" for i, e in enumerate(exprs))
    r = await api.query(f"SELECT {columns}, ARRAY[ROW(1, '1 day'::interval)] AS arr", key=KEY_B,
                        row_format="array")
    assert r.status == 200, r.body
    want = await admin_db.fetchrow(f"SELECT {', '.join(f'c{i}::text' for i in range(len(exprs)))}, "
                                   f"arr::text[] FROM (SELECT {columns}, ARRAY[ROW(1, '1 day'::interval)] AS arr) s")
    assert r.body["rows"] == [list(want)]
    assert r.body["columns"][0] == {"name": "c0", "type": "record"}
    # in a read-write transaction too (the value decoded before the COMMIT)
    marker = "row-as-text"
    r = await api.transaction([{"sql": "INSERT INTO typed (t) VALUES ($1)", "params": [marker]},
                               {"sql": "SELECT ROW('1 2'::int2vector) AS r"}], key=KEY_B)
    assert r.status == 200 and r.body["results"][1]["rows"] == [{"r": '("1 2")'}], r.body
    assert await admin_db.fetchval("SELECT count(*) FROM typed WHERE t = $1", marker) == 1


async def test_a_timetz_result_is_returned_and_a_write_with_it_is_not_reported_failed(api: Api,
                                                                                       admin_db: Any) -> None:
    r = await api.query("SELECT '12:34:56.789+05:30'::timetz AS t, ARRAY['00:00-15:59'::timetz] AS ts", key=KEY_B)
    assert r.status == 200, r.body
    assert r.body["rows"] == [{"t": "12:34:56.789000+05:30", "ts": ["00:00:00-15:59"]}]
    # the response is encoded after the COMMIT: it must not turn a committed write into a 500
    marker = "timetz-returning"
    r = await api.query("INSERT INTO typed (t) VALUES ($1) RETURNING '12:00+05'::timetz AS v", marker, key=KEY_B)
    assert r.status == 200 and r.body["rows"] == [{"v": "12:00:00+05:00"}], r.body
    assert await admin_db.fetchval("SELECT count(*) FROM typed WHERE t = $1", marker) == 1


async def test_values_the_driver_cannot_decode_are_a_clear_error_and_write_nothing(api: Api,
                                                                                   admin_db: Any) -> None:
    for expr in ("'5874897-12-31'::date", "'4713-01-01 BC'::date", "'294276-12-31 23:59:59'::timestamptz",
                 "'24:00:00'::time", "ARRAY['10000-01-01'::date]", "ARRAY['24:00'::time]"):
        r = await api.query(f"SELECT {expr} AS v", key=KEY_B)
        assert r.status == 422 and r.code == "sql_error", (expr, r.body)
        assert "cast it to text" in r.body["error"]["message"], r.body
        r = await api.query(f"SELECT ({expr})::text AS v", key=KEY_B)
        assert r.status == 200, r.body
    marker = "undecodable-date"
    r = await api.query("INSERT INTO typed (t) VALUES ($1) RETURNING '5874897-12-31'::date AS d", marker, key=KEY_B)
    assert r.status == 422, r.body
    assert await admin_db.fetchval("SELECT count(*) FROM typed WHERE t = $1", marker) == 0


async def test_numeric_parameters_beyond_postgresqls_range_are_refused_not_wrapped(api: Api) -> None:
    for value in ("1e131072", "-5e131075", "123e131070"):
        r = await api.query("SELECT $1::numeric = 0 AS zero", value, key=KEY_B)
        assert r.status == 400 and "overflows numeric" in r.body["error"]["message"], (value, r.body)
    r = await api.query("SELECT $1::numeric AS n", "9e131071", key=KEY_B)
    assert r.status == 200 and r.body["rows"][0]["n"] == "9" + "0" * 131071
    r = await api.query("SELECT $1::numeric[] AS n", [["1", "2e131072"]], key=KEY_B)
    assert r.status == 400, r.body


async def test_integers_past_64_bits_in_the_body_arrive_exactly(api: Api) -> None:
    big = 123456789012345678901234567890
    r = await api.query("SELECT $1::jsonb AS j, $2::numeric AS n, $3::text AS t", {"a": big, "s": "x"}, big, big,
                        key=KEY_B)
    assert r.status == 200, r.body
    assert r.body["rows"] == [{"j": {"a": big, "s": "x"}, "n": str(big), "t": str(big)}]
    r = await api.query("SELECT $1::int8 AS i", big, key=KEY_B)
    assert r.status == 400 and r.code == "invalid_request", r.body


async def test_multidimensional_array_parameters(api: Api) -> None:
    r = await api.query("SELECT $1::int[] AS a, array_ndims($1::int[]) AS n", [[1, 2], [3, None]], key=KEY_B)
    assert r.status == 200 and r.body["rows"] == [{"a": [[1, 2], [3, None]], "n": 2}], r.body


async def test_numeric_is_spelled_as_postgresql_prints_it(api: Api) -> None:
    r = await api.query("SELECT 0.0000001 AS a, 0.00000000 AS b, 1e20::numeric AS c, 'NaN'::numeric AS d, "
                        "'-Infinity'::numeric AS e", key=KEY_B, row_format="array")
    assert r.body["rows"] == [["0.0000001", "0.00000000", "100000000000000000000", "NaN", "-Infinity"]], r.body


async def test_types_asyncpg_spells_its_own_way_come_out_as_postgresql_prints_them(api: Api, admin_db: Any) -> None:
    """Geometric types and bit strings had a Python repr (a path's with a memory address),
    an LSN was an integer, a snapshot a list, a float4 its double."""
    exprs = ["'(1.5,2)'::point", "'((3,4),(1,2))'::box", "'[(1,2),(3,4)]'::lseg", "'{1,-1,0}'::line",
             "'<(1,2),3>'::circle", "'((1,2),(3,4),(5,6))'::polygon", "'[(1,2),(3,4)]'::path",
             "B'1010'::bit(4)", "B'10101010101'::varbit", "'16/B374D848'::pg_lsn",
             "'10:20:10,14,15'::txid_snapshot", "'10:20:10,14,15'::pg_snapshot"]
    columns = ", ".join(f"{e} AS c{i}" for i, e in enumerate(exprs))
    r = await api.query(f"SELECT {columns}", key=KEY_B, row_format="array")
    assert r.status == 200, r.body
    want = await admin_db.fetchrow(f"SELECT {', '.join(f'c{i}::text' for i in range(len(exprs)))} "
                                   f"FROM (SELECT {columns}) s")
    assert r.body["rows"] == [list(want)]
    r = await api.query("SELECT 0.1::float4 AS a, ARRAY[1.5::float4, 3.4028235e38::float4] AS b, "
                        "$1::float4 AS c", 0.2, key=KEY_B)
    assert r.body["rows"] == [{"a": 0.1, "b": [1.5, 3.4028235e38], "c": 0.2}], r.body
    r = await api.query("SELECT $1::pg_lsn AS l", "0/16", key=KEY_B)
    assert r.status == 200 and r.body["rows"] == [{"l": "0/16"}], r.body


async def test_parameters_as_postgresql_reads_them(api: Api) -> None:
    """A UTC offset given for a timestamp or time is ignored, as PostgreSQL's input does;
    a "char" parameter is one character."""
    r = await api.query("SELECT $1::timestamp AS ts, $2::time AS t, $3::\"char\"::text AS c",
                        "2026-01-01T10:00:00+02:00", "12:00:00+05:00", "z", key=KEY_B)
    assert r.status == 200, r.body
    assert r.body["rows"] == [{"ts": "2026-01-01T10:00:00", "t": "12:00:00", "c": "z"}]


async def test_vector_types_are_labelled_as_themselves(api: Api) -> None:
    r = await api.query("SELECT '1 2'::int2vector AS v, ARRAY['1 2'::int2vector] AS a", key=KEY_B)
    assert r.status == 200, r.body
    assert r.body["columns"] == [{"name": "v", "type": "int2vector"}, {"name": "a", "type": "int2vector[]"}]
    assert r.body["rows"] == [{"v": [1, 2], "a": [[1, 2]]}]


async def test_a_float_text_past_double_range_is_refused(api: Api) -> None:
    r = await api.query("SELECT $1::float8 AS f", "1e400", key=KEY_B)
    assert r.status == 400 and "out of range" in r.body["error"]["message"], r.body
    r = await api.query("SELECT $1::float8 AS f", "-Infinity", key=KEY_B)
    assert r.status == 200, r.body


async def test_geometric_and_range_parameters_pass_as_text_with_a_cast(api: Api) -> None:
    """Geometric, range and bit-string parameters as text, with or without a cast."""
    r = await api.query("SELECT $1::text::point AS p, $2::text::int4range AS r, $3::text::varbit AS b",
                        "(1.5,2)", "[1,5)", "1010", key=KEY_B, row_format="array")
    assert r.status == 200, r.body
    assert r.body["rows"] == [["(1.5,2)", {"lower": 1, "upper": 5, "lower_inc": True, "upper_inc": False}, "1010"]]
    # geometric types and bit strings now travel as PostgreSQL's text both ways: no cast needed
    r = await api.query("SELECT $1::point AS p, $2::varbit AS b, $3::polygon AS g", "(1.5,2)", "1010",
                        "((0,0),(1,1),(1,0))", key=KEY_B, row_format="array")
    assert r.status == 200 and r.body["rows"] == [["(1.5,2)", "1010", "((0,0),(1,1),(1,0))"]], r.body
    r = await api.query("SELECT $1::point AS p", "not a point", key=KEY_B)
    assert r.status == 422 and r.code == "sql_error", r.body


async def test_a_parameter_type_the_driver_cannot_send_is_a_clear_error_not_an_outage(api: Api) -> None:
    """asyncpg has no encoder for some types: a 422 for the caller, not a 503 that would
    take a replica out of rotation and get retried."""
    for sql in ("SELECT $1::gtsvector IS NULL AS x", "SELECT $1::pg_brin_bloom_summary IS NULL AS x"):
        r = await api.query(sql, None, key=KEY_B, read_only=True)
        assert r.status == 422 and r.code == "sql_error", r.body
        assert "$1::text::" in r.body["error"]["message"]
    r = await api.query("SELECT 1 AS ok", key=KEY_B)
    assert r.status == 200


async def test_a_deeply_nested_body_with_a_huge_integer_is_a_400(api: Api) -> None:
    depth = 980
    raw = (b'{"sql": "SELECT $1::jsonb AS j", "params": [' + b"[" * depth + b"123456789012345678901234567890"
           + b"]" * depth + b"]}")
    r = await api.request("POST", "/v1/query", data=raw, headers={"Content-Type": "application/json"}, key=KEY_B)
    assert r.status in (200, 400), r.body  # exact, or refused: never a 500
    if r.status == 400:
        assert r.code == "invalid_request"
