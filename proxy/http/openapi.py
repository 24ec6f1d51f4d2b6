"""The HTTP API's OpenAPI 3.1 document, served as ``GET /openapi.json`` on both ports.

The document is written by hand in docs/openapi.yaml (``proxy/openapi.yaml`` links to it,
so the wheel carries it); it is read and serialised once, when the applications are made.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
import yaml
from aiohttp import web

from .. import __version__
from .appkeys import OPENAPI

RESOURCE = "openapi.yaml"


def load() -> dict[str, Any]:
    """The document as data, with this build's version."""
    doc = yaml.safe_load(resources.files("proxy").joinpath(RESOURCE).read_text())
    if not isinstance(doc, dict) or not str(doc.get("openapi", "")).startswith("3.1"):
        raise ValueError(f"proxy/{RESOURCE} is not an OpenAPI 3.1 document")
    doc["info"]["version"] = __version__
    return doc


def serialise(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the API's OpenAPI 3.1 document."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def add_route(app: web.Application, document: bytes) -> None:
    app[OPENAPI] = document
    app.router.add_get("/openapi.json", openapi_json)
