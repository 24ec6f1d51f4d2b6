"""The per-request series as plain counters in dicts (no lock, no validation per
increment), and their copy turned into Prometheus metric families at scrape time
(metrics.py says why)."""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

# Sub-millisecond to 30 s; twelve buckets keep 50 labelled tenants under 300 KB per scrape.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0)
_LE = (*(floatToGoString(b) for b in BUCKETS), "+Inf")  # type: ignore[no-untyped-call]
# OpenMetrics caps an exemplar's label names and values at 128 characters in all.
_EXEMPLAR_ID_MAX = 128 - len("request_id")


class Histogram:
    """One histogram series: a count per bucket (not cumulative), the sum, and the
    latest exemplar per bucket as (request id, value, time)."""

    __slots__ = ("counts", "exemplars", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_LE)
        self.total = 0.0
        self.exemplars: list[tuple[str, float, float] | None] | None = None

    def observe(self, value: float, request_id: str | None = None) -> None:
        i = bisect_left(BUCKETS, value)  # the first bucket whose bound is >= value ("le")
        self.counts[i] += 1
        self.total += value
        if request_id is not None and len(request_id) <= _EXEMPLAR_ID_MAX:
            if self.exemplars is None:
                self.exemplars = [None] * len(_LE)
            self.exemplars[i] = (request_id, value, time.time())


class Family:
    """A metric's series by label values, the tenant label first."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], histogram: bool = False) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.histogram = histogram
        self.series: dict[tuple[str, ...], Any] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.series[key] = self.series.get(key, 0.0) + amount

    def observe(self, key: tuple[str, ...], value: float, request_id: str | None = None) -> None:
        h = self.series.get(key)
        if h is None:
            h = self.series[key] = Histogram()
        h.observe(value, request_id)

    def drop_tenant(self, tenant: str) -> None:
        for key in [k for k in self.series if k[0] == tenant]:
            del self.series[key]

    def copy(self) -> FamilyCopy:
        if not self.histogram:
            return FamilyCopy(self, list(self.series.items()))
        return FamilyCopy(self, [(key, (list(h.counts), h.total, list(h.exemplars or ())))
                                  for key, h in self.series.items()])


@dataclass(frozen=True, slots=True)
class FamilyCopy:
    of: Family
    items: list[tuple[tuple[str, ...], Any]]

    def family(self) -> Metric:
        f = self.of
        if not f.histogram:
            counter = CounterMetricFamily(f.name, f.doc, labels=f.labels)
            for key, value in self.items:
                counter.add_metric(key, value)
            return counter
        fam = HistogramMetricFamily(f.name, f.doc, labels=f.labels)
        for key, (counts, total, exemplars) in self.items:
            buckets: list[Any] = []
            running = 0
            for i, (le, n) in enumerate(zip(_LE, counts, strict=True)):
                running += n
                ex = exemplars[i] if exemplars else None
                buckets.append((le, running) if ex is None else
                               (le, running, Exemplar({"request_id": ex[0]}, ex[1], ex[2])))
            fam.add_metric(key, buckets, total)
        return fam
