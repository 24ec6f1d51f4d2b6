"""Walking the raw YAML: typed reads with defaults and bounds, ``${ENV}`` expansion, and
every problem collected by key path instead of stopping at the first."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from .model import ENV_RE


class Reader:
    """Walks the raw YAML, collecting problems by key path instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def section(self, raw: Mapping[str, Any], key: str, allowed: AbstractSet[str]) -> dict[str, Any]:
        value = raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping")
            return {}
        self.unknown(value, allowed, key)
        return value

    def unknown(self, raw: Mapping[str, Any], allowed: AbstractSet[str], path: str) -> None:
        for k in raw:
            if k not in allowed:
                self.fail(f"{path}.{k}" if path else str(k), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def expand(self, value: Any, path: str) -> Any:
        """``value`` with every ``${VAR}`` in its strings replaced, in mappings' values and
        lists' items at any depth (not in mapping keys), each expanded once: a variable's
        value is never read for more variables.  Done once, on the whole document."""
        if isinstance(value, dict):
            return {k: self.expand(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in self.env:
                self.fail(path, f"environment variable {name} is not set")
                return ""
            return self.env[name]

        return ENV_RE.sub(sub, value)

    def str_(self, raw: Mapping[str, Any], key: str, path: str, default: str | None = None,
             required: bool = False) -> str | None:
        value = raw.get(key)
        if value is None:
            if required:
                self.fail(f"{path}.{key}", "is required")
            return default
        if not isinstance(value, str) or not value:
            self.fail(f"{path}.{key}", "must be a non-empty string")
            return default
        return value

    def int_(self, raw: Mapping[str, Any], key: str, path: str, default: int, lo: int = 0,
             hi: int | None = None) -> int:
        if key not in raw:
            return default  # may lie outside the bounds a value given must keep (an "unset" marker)
        value = raw[key]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{path}.{key}", f"must be an integer, got {type(value).__name__}")
            return default
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            self.fail(f"{path}.{key}", f"must be {bound}, got {value}")
            return default
        return value

    def number(self, raw: Mapping[str, Any], key: str, path: str, default: float, lo: float) -> float:
        value = _numeric(raw.get(key, default))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo:
            self.fail(f"{path}.{key}", f"must be a number >= {lo:g}")
            return default
        return float(value)

    def fraction(self, raw: Mapping[str, Any], key: str, path: str, default: float) -> float:
        value = _numeric(raw.get(key, default))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            self.fail(f"{path}.{key}", "must be a number between 0 and 1")
            return default
        return float(value)

    def bool_(self, raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = raw.get(key, default)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            self.fail(f"{path}.{key}", "must be true or false")
            return default
        return value


def _numeric(value: Any) -> Any:
    """A string that reads as a finite number (from ``${VAR}``) as that number."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value
