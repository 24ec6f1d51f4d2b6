"""Pure parts of the tenant lifecycle tools: COPY text decoding, foreign-key order, the
manifest's shape checks, progress output, and what makes a partition weaker than its parent."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.tools.partitions import weaknesses
from proxy.tools.restore import decode_copy_line, read_rows
from proxy.tools.tenant_data import FORMAT, MANIFEST, LifecycleError, Progress, foreign_key_order, read_manifest


def test_copy_text_lines_decode_to_the_values() -> None:
    assert decode_copy_line(b"1\t\\N\tplain") == ["1", None, "plain"]
    assert decode_copy_line(b"a\\tb\\nc\\\\d\\re") == ["a\tb\nc\\d\re"]
    assert decode_copy_line(b"\\b\\f\\v\\101\\x42\\q") == ["\b\f\vABq"]
    assert decode_copy_line("é✓".encode()) == ["é✓"]
    assert decode_copy_line(b"") == [""]
    assert decode_copy_line(b"\\\\N") == ["\\N"]  # the text \N, not NULL


def test_a_file_cut_mid_row_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.copy"
    path.write_bytes(b"1\ta\n2\tb")
    with pytest.raises(LifecycleError, match="ends in the middle of a row"):
        list(read_rows(path))
    path.write_bytes(b"1\ta\n2\tb\n")
    assert list(read_rows(path)) == [["1", "a"], ["2", "b"]]


def test_foreign_key_order_puts_referenced_tables_first() -> None:
    # 3 references 2 references 1; 4 stands alone; 5 references itself
    assert foreign_key_order([3, 4, 2, 1, 5], [(2, 3), (1, 2), (5, 5)]) == [4, 1, 2, 3, 5]
    # a cycle keeps the given order among its members, after what it depends on
    assert foreign_key_order([7, 6, 8], [(6, 7), (7, 6), (8, 6)]) == [8, 7, 6]


def _manifest(directory: Path, **changes: Any) -> Path:
    raw = {"format": FORMAT, "format_version": 1, "data_format": "postgresql-copy-text", "tenant": "t",
           "tenant_column": "tenant_id", "source": {}, "created_at": "", "tables": [
               {"schema": "public", "name": "events", "file": "001_public.events.copy", "rows": 0,
                "sha256": "", "columns": [{"name": "id", "type": "uuid", "base_type": "uuid"}]}]}
    raw.update(changes)
    (directory / MANIFEST).write_text(json.dumps(raw))
    return directory


def test_manifest_shape_is_checked(tmp_path: Path) -> None:
    manifest = read_manifest(_manifest(tmp_path))
    assert manifest.tables[0].qualified == "public.events" and manifest.tables[0].columns[0].base_type == "uuid"
    for changes, message in [
        ({"format": "other"}, "not a pg-tenant-proxy-export manifest"),
        ({"format_version": 7}, "format version 7"),
        ({"data_format": "csv"}, "data format 'csv'"),
        ({"tables": [{"schema": "public", "name": "e", "file": "../../etc/passwd", "rows": 0, "sha256": "",
                      "columns": []}]}, "bad file name"),
        ({"tables": [{"schema": "public", "name": "e", "file": MANIFEST, "rows": 0, "sha256": "",
                      "columns": []}]}, "bad file name"),
        ({"tables": [{"schema": "public"}]}, "malformed manifest"),
        ({"tables": None}, "malformed manifest"),
    ]:
        with pytest.raises(LifecycleError, match=message):
            read_manifest(_manifest(tmp_path, **changes))


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    out = io.StringIO()
    p = Progress(out, tty=True)
    p.start("public.events", 200)
    p.advance(100)
    p.done(200)
    text = out.getvalue()
    assert "\r" in text and "[" + "#" * 30 + "]" in text and "100%" in text and "200/200 rows" in text
    assert text.endswith("\n")
    out = io.StringIO()
    p = Progress(out, tty=False, prefix="export: ")
    p.start("public.events", 200)
    p.advance(100)
    p.done(200)
    lines = out.getvalue().splitlines()
    assert lines[0] == "export: public.events: 200 rows ..."
    assert lines[1].startswith("export: public.events: 200 rows in ") and len(lines) == 2


def _table(rls: bool = True, force: bool = True) -> dict[str, Any]:
    return {"nspname": "public", "relname": "events_p1", "relrowsecurity": rls, "relforcerowsecurity": force}


def _policy(name: str, qual: str = "(tenant_id = current_tenant_id())", *, permissive: bool = True,
            cmd: str = "*", roles: tuple[int, ...] = (0,)) -> dict[str, Any]:
    return {"polname": name, "polcmd": cmd, "polpermissive": permissive, "roles": list(roles),
            "role_list": "PUBLIC" if roles == (0,) else "app", "qual": qual, "withcheck": qual}


def test_an_identical_or_stricter_partition_is_not_weak() -> None:
    parent_policies = [_policy("tenant_isolation"), _policy("ro", permissive=False, cmd="r")]
    assert weaknesses(_table(), _table(), parent_policies, parent_policies) is None
    # a missing permissive policy only hides rows; an extra restrictive one only narrows
    assert weaknesses(_table(), _table(), [parent_policies[1], _policy("mine", "(x > 1)", permissive=False)],
                      parent_policies) is None
    # a parent that is itself weak holds its partitions to nothing more
    assert weaknesses(_table(rls=False, force=False), _table(rls=False, force=False), [], []) is None


def test_what_makes_a_partition_weaker_and_the_fix() -> None:
    parent = [_policy("tenant_isolation"), _policy("no_x", "(kind <> 'x')", permissive=False)]
    part = [_policy("tenant_isolation", "true"), _policy("extra", "true")]
    weak = weaknesses(_table(rls=False, force=False), _table(), part, parent)
    assert weak is not None
    assert weak.problems == ("row-level security is not enabled", "row-level security is not forced",
                             "permissive policy extra is not one of its parent's",
                             "permissive policy tenant_isolation is not one of its parent's",
                             "restrictive policy no_x of its parent is missing")
    table = '"public"."events_p1"'
    assert weak.fix == (
        f'DROP POLICY "extra" ON {table}; DROP POLICY "tenant_isolation" ON {table}; '
        f"CREATE POLICY \"no_x\" ON {table} AS RESTRICTIVE FOR ALL TO PUBLIC USING ((kind <> 'x')) "
        f"WITH CHECK ((kind <> 'x')); "
        f'CREATE POLICY "tenant_isolation" ON {table} AS PERMISSIVE FOR ALL TO PUBLIC '
        f"USING ((tenant_id = current_tenant_id())) WITH CHECK ((tenant_id = current_tenant_id())); "
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;")
    # same expression, other roles or command: not the parent's policy
    for other in (_policy("tenant_isolation", roles=(16384,)), _policy("tenant_isolation", cmd="r")):
        weak = weaknesses(_table(), _table(), [other], [_policy("tenant_isolation")])
        assert weak is not None and weak.problems == ("permissive policy tenant_isolation is not one of its parent's",)
