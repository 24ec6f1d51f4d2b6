"""The wheel carries what an installed gateway needs: every subpackage and the migrations.

Checked on pyproject.toml's setuptools configuration (building a wheel needs a newer
setuptools than the dev venv's, fetched from the network): a plain `packages = ["proxy"]`
once left proxy/control and proxy/tools out of the wheel, so `tenant-proxy` failed on import.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "proxy"


def _setuptools() -> dict[str, object]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"])


def test_every_subpackage_is_in_the_wheel() -> None:
    find = _setuptools()["packages"]["find"]  # type: ignore[index]
    patterns = list(find["include"])
    subpackages = ["proxy"] + [".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")]
    missing = [name for name in subpackages if not any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
    assert not missing, missing
    assert find.get("namespaces", True), "proxy/sql has no __init__.py: it is found as a namespace package"


def test_the_migrations_are_package_data_and_deploy_sql_links_to_them() -> None:
    data = _setuptools()["package-data"]["proxy.sql"]  # type: ignore[index]
    files = sorted(p.name for p in (PACKAGE / "sql").iterdir())
    assert files and all(f.endswith(".sql") for f in files)
    assert all(any(fnmatch.fnmatchcase(f, pat) for pat in data) for f in files)
    link = REPO / "deploy" / "sql"
    assert link.is_symlink() and link.resolve() == (PACKAGE / "sql").resolve(), \
        "deploy/sql (compose mounts it, docs name it) is the package's directory"
