"""What a pool of database connections reports about itself (pg/pool.py makes it; the
scheduler, /admin/pool and the metrics read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolStats:
    name: str
    size: int
    idle: int
    max: int
    waiting: int
    timeouts: int
