"""Checking real responses against docs/openapi.yaml (status, headers and body)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proxy.http import openapi

_URI = "urn:tenant-proxy:openapi"


@cache
def document() -> dict[str, Any]:
    return openapi.load()


def _registry() -> Registry:
    return Registry().with_resource(_URI, Resource.from_contents(document(), default_specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _deref(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a response/parameter/header object's ``$ref`` inside the document."""
    while "$ref" in node:
        target: Any = document()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def check_response(path: str, method: str, status: int, headers: Mapping[str, str], body: Any,
                   content_type: str | None = None) -> None:
    """Assert that the response is one the document describes for this operation."""
    operation = document()["paths"][path][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path}: status {status} is not documented"
    response = _deref(operation["responses"][str(status)])
    for name, header in response.get("headers", {}).items():
        header = _deref(header)
        value = headers.get(name)
        if value is None:
            assert not header.get("required"), f"{method} {path} {status}: header {name} is missing"
            continue
        jsonschema.validate(value, header["schema"])
    media = response.get("content", {})
    if content_type is not None:
        assert content_type.split(";")[0].strip() in media, f"{method} {path} {status}: {content_type} undocumented"
    if "application/json" not in media:
        return
    ref = _pointer("paths", path, method.lower(), "responses", str(status), "content", "application/json", "schema")
    if "$ref" in operation["responses"][str(status)]:
        name = operation["responses"][str(status)]["$ref"].rsplit("/", 1)[-1]
        ref = _pointer("components", "responses", name, "content", "application/json", "schema")
    validator = jsonschema.Draft202012Validator({"$ref": _URI + ref}, registry=_registry())
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {path} {status}: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def operations() -> set[tuple[str, str]]:
    """(METHOD, aiohttp path) for every operation in the document."""
    out = set()
    for path, item in document()["paths"].items():
        for method in item:
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                out.add((method.upper(), path))
    return out


def schema_properties(name: str) -> set[str]:
    return set(document()["components"]["schemas"][name]["properties"])

