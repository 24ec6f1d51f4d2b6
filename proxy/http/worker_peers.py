"""One of several ``serve --workers`` processes: its slot, its peer socket, and the merged scrape.

Each worker keeps its own figures (proxy/observe/metrics.py: plain counters on its event loop).
prometheus_client's multiprocess mode would need those to be its own mmap-backed
metrics, giving back the per-increment cost the metrics module removed and losing the
exemplars and the removal of a tenant's series; so a scrape merges instead.  Every
worker answers ``GET /worker/metrics`` (its own figures, OpenMetrics) on a Unix socket
in the directory the supervisor made for this run (mode 0700, so no other user
reaches it); the worker that takes a ``/metrics`` scrape asks the others there and adds
the figures up: every request is counted once, whichever worker took it.

How families merge: counters and histograms add up (the latest exemplar per bucket
stays); gauges add up (in-flight requests, pool connections: the host's totals) except
``_MAX`` (the highest worker's figure: build info, label limit, hotspot estimates, sync
age) and ``_MIN`` (the lowest: catalog version applied, catalog connected, Redis up).  PgBouncer's
figures come from the answering worker alone.  A worker that does not answer within
``PEER_TIMEOUT_S`` (restarting) is missing from that scrape, ``tenant_proxy_workers_scraped``
says so, and the counts it had are gone with it (Prometheus sees a counter reset).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .appkeys import GATEWAY

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("tenant_proxy.workers")

PEER_PATH = "/worker/metrics"
PEER_TIMEOUT_S = 2.0
_MAX = frozenset({"tenant_proxy_build_info", "tenant_proxy_tenant_label_limit", "tenant_proxy_tenant_load_share",
                  "tenant_proxy_hot_tenants", "tenant_proxy_control_sync_age_seconds"})
_MIN = frozenset({"tenant_proxy_control_version", "tenant_proxy_control_connected",
                  "tenant_proxy_rate_limit_redis_up"})


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which worker this process is (``index`` of ``count``) and where the peer sockets live."""

    index: int
    count: int
    directory: Path

    def socket(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"

    def argument(self) -> str:
        """The hidden ``serve --worker-slot`` value the supervisor passes."""
        return f"{self.index}/{self.count}/{self.directory}"

    @classmethod
    def parse(cls, value: str) -> WorkerSlot:
        index, count, directory = value.split("/", 2)
        return cls(int(index), int(count), Path(directory))


async def start_peer_site(gateway: Gateway, slot: WorkerSlot) -> web.AppRunner:
    """Serve this worker's own figures on its peer socket (the caller cleans the runner up)."""
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get(PEER_PATH, _own_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path = slot.socket(slot.index)
    path.unlink(missing_ok=True)  # left by this slot's previous worker, if it died
    await web.UnixSite(runner, str(path)).start()
    return runner


def _own_snapshot(gateway: Gateway) -> Any:
    return dataclasses.replace(gateway.metrics.snapshot(), pgbouncer=None)


async def _own_metrics(request: web.Request) -> web.Response:
    snapshot = _own_snapshot(request.app[GATEWAY])
    body = await asyncio.get_running_loop().run_in_executor(None, openmetrics, snapshot)
    return web.Response(body=body, headers={"Content-Type": OPENMETRICS, "X-Worker-Pid": str(os.getpid())})


async def _ask(path: Path) -> tuple[str, str] | None:
    """A peer's (pid, OpenMetrics text), or None when it does not answer."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                         timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)) as http, \
                http.get(f"http://worker{PEER_PATH}") as r:
            if r.status == 200:
                return r.headers.get("X-Worker-Pid", "?"), await r.text()
            log.warning("worker at %s answered %d to the merged scrape", path, r.status)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("worker at %s is missing from this scrape (%s)", path, type(exc).__name__)
    return None


async def merged_exposition(gateway: Gateway, slot: WorkerSlot, accept: str | None) -> tuple[bytes, str]:
    """The whole host's figures: this worker's and every peer's that answers."""
    own = gateway.metrics.snapshot()
    peers = [i for i in range(slot.count) if i != slot.index]
    answers = await asyncio.gather(*(_ask(slot.socket(i)) for i in peers))
    found = [(str(i), a[0], a[1]) for i, a in zip(peers, answers, strict=True) if a is not None]
    return await asyncio.get_running_loop().run_in_executor(
        None, _render_merged, own, (str(slot.index), str(os.getpid())), found, slot.count, accept)


def _render_merged(own: Any, me: tuple[str, str], peers: list[tuple[str, str, str]], count: int,
                   accept: str | None) -> tuple[bytes, str]:
    merged = _Merged()
    per_worker = CounterMetricFamily("tenant_proxy_worker_requests", "HTTP requests each worker took (every "
                                     "endpoint and code)", labels=["worker", "pid"])
    own_families = list(own.collect())
    merged.add(own_families)
    per_worker.add_metric(list(me), _requests(own_families))
    for index, pid, text in peers:
        families = [f for f in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
                    if not f.name.startswith("pgbouncer_")]
        merged.add(families)
        per_worker.add_metric([index, pid], _requests(families))
    merged.extra = [per_worker, GaugeMetricFamily("tenant_proxy_workers_scraped", f"Workers (of {count}) "
                                                  "whose figures this scrape holds", value=1 + len(peers))]
    encoder, content_type = choose_encoder(accept or "")
    return encoder(merged), content_type


def _requests(families: Iterable[Metric]) -> float:
    return sum(s.value for f in families if f.name == "tenant_proxy_requests"
               for s in f.samples if s.name.endswith("_total"))


class _Merged:
    """Families added up sample by sample; ``collect`` is what the exposition encoders read."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
        self.extra: list[Metric] = []

    def add(self, families: Iterable[Metric]) -> None:
        for fam in families:
            if fam.name not in self.families:
                self.families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            pick = max if fam.name in _MAX else min if fam.name in _MIN else None
            into = self.samples.setdefault(fam.name, {})
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = Sample(s.name, dict(s.labels), s.value, None, s.exemplar)
                    continue
                value = pick(old.value, s.value) if pick is not None else old.value + s.value
                into[key] = old._replace(value=value, exemplar=_later(old.exemplar, s.exemplar))

    def collect(self) -> Iterator[Metric]:
        for name, fam in self.families.items():
            fam.samples = list(self.samples[name].values())
            yield fam
        yield from self.extra


def _later(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return a or b
    return b if _when(b) >= _when(a) else a


def _when(exemplar: Any) -> float:
    return 0.0 if exemplar.timestamp is None else float(exemplar.timestamp)  # a float, or a parsed Timestamp
