"""The codebase keeps the shape docs/architecture.md describes: layers you can see in
`ls proxy`, modules and functions of a readable size, one closed set of errors, and a
client SDK that stands alone.  (The import contracts between the layers are
import-linter's, in pyproject.toml, run by `make test`.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from proxy import errors

PROXY = Path(__file__).resolve().parents[2] / "proxy"
DOCS = Path(__file__).resolve().parents[2] / "docs"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LAYERS = {"config", "control", "http", "observe", "pg", "policy", "tools"}  # and cli/, the top


def _modules() -> list[Path]:
    return sorted(PROXY.rglob("*.py"))


def test_ls_proxy_is_the_architecture() -> None:
    packages = {p.name for p in PROXY.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == LAYERS | {"cli"}, packages
    top = {p.name for p in PROXY.glob("*.py")} - {"__init__.py"}
    assert top == {"__main__.py", "client.py", "errors.py"}, top
    described = (DOCS / "architecture.md").read_text()
    for name in sorted(packages | top):
        entry = f"  {name}/" if name in packages else f"  {name}"
        assert entry in described, f"docs/architecture.md does not describe proxy/{name}"


def test_no_module_over_400_lines_and_no_function_over_60() -> None:
    too_long = []
    for path in _modules():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PROXY)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PROXY)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


def test_the_error_set_is_closed_and_each_code_has_one_status() -> None:
    statuses: dict[str, set[int]] = {}
    for kind in (*errors.ALL_KINDS, errors.CLIENT_CLOSED):
        statuses.setdefault(kind.code, set()).add(kind.status)
    assert {code: s for code, s in statuses.items() if len(s) > 1} == {}
    # No kind is made anywhere else, at run time or otherwise.
    made = [f"{p.relative_to(PROXY)}" for p in _modules()
            if p != PROXY / "errors.py" and re.search(r"\bErrorKind\(", p.read_text())]
    assert made == []


def test_only_the_door_touches_asyncpg_internals() -> None:
    """Private asyncpg names (protocol, holder, queue, state internals) appear only in
    proxy/pg/_asyncpg.py, whose contract test is tests/integration/test_asyncpg_door.py."""
    private = re.compile(r"(?<!self)\.(_protocol|_con|_holder|_queue|_top_xact|_server_caps|_get_unique_id|"
                         r"_init_types|_init_codecs|_get_parameters|_get_attributes|_is_cancelling|_on_release)\b|"
                         r"asyncpg\.protocol|(?<!_asyncpg)\.bind_execute\(|get_record_class")
    users = [f"{p.relative_to(PROXY)}" for p in _modules()
             if p.name != "_asyncpg.py" and private.search(p.read_text())]
    assert users == []


def test_the_client_imports_with_only_its_own_dependencies() -> None:
    code = ("import sys; from proxy.client import AsyncClient, Client; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('proxy', 'asyncpg', 'pglast', 'yaml', 'prometheus_client', 'jwt', 'redis', 'uvloop'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["proxy", "proxy.client"], out
