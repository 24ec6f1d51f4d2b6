"""Heavy hitters and bounded tenant labels, without I/O."""

from __future__ import annotations

import random
import re

from proxy.config import MetricsConfig
from proxy.observe.hotspots import HeavyHitters, SpaceSaving, choose_labelled
from proxy.observe.metrics import OTHER, Metrics
from proxy.observe.trace import RequestTrace


def test_space_saving_keeps_capacity_and_overestimates() -> None:
    s = SpaceSaving(capacity=3)
    for key, w in [("a", 5), ("b", 1), ("c", 1), ("d", 1), ("a", 5)]:
        s.add(key, w)
    assert len(s.counters) == 3
    assert s.counters["a"].weight == 10
    assert s.counters["d"].weight >= 1 and s.counters["d"].error >= 1  # inherited the evicted minimum
    assert s.total == 13 and s.requests == 5


def test_zipf_stream_over_10000_tenants_keeps_the_true_top_10() -> None:
    rng = random.Random(7)
    tenants = [f"t{i:05d}" for i in range(10_000)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(tenants))]
    hh = HeavyHitters(window_s=60, capacity=200, hot_share=0.25)
    truth: dict[str, float] = {}
    for i, tenant in enumerate(rng.choices(tenants, weights=weights, k=100_000)):
        cost = rng.uniform(0.0005, 0.002)
        truth[tenant] = truth.get(tenant, 0.0) + cost
        hh.add(tenant, cost, now=i * 0.0005)  # 50 s of traffic, inside one window
    true_top10 = sorted(truth, key=truth.__getitem__, reverse=True)[:10]
    labelled = choose_labelled(hh.top(50, now=50.0), frozenset(), 50)
    assert set(true_top10) <= labelled
    assert len(labelled) == 50
    # memory stays O(capacity), not O(tenants)
    assert all(len(s.counters) <= 200 for _, s in hh._ring)


def test_window_expires_old_traffic_and_flags_hot_tenants() -> None:
    hh = HeavyHitters(window_s=60, capacity=16, hot_share=0.25)
    for i in range(100):
        hh.add("busy", 0.01, now=i * 0.1)
    hh.add("quiet", 0.001, now=5.0)
    top = hh.top(5, now=10.0)
    assert top[0].tenant == "busy" and top[0].hot and not top[1].hot
    assert abs(top[0].requests_per_s - 100 / 10) < 0.5
    assert hh.top(5, now=200.0) == []
    assert hh.load_of("busy", now=200.0).share == 0.0


def test_pinned_tenants_come_first() -> None:
    hh = HeavyHitters(window_s=60, capacity=16, hot_share=0.25)
    for t in ("a", "b", "c"):
        hh.add(t, 1.0, now=0.0)
    assert choose_labelled(hh.top(10, 0.0), frozenset({"pinned"}), 2) == {"pinned", "a"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{" + want + "}") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _observe(m: Metrics, tenant: str, db_s: float = 0.01, status: int = 200, code: str | None = None) -> None:
    trace = RequestTrace(endpoint="/v1/query", tenant=tenant, wait_s=0.001, db_s=db_s, rows=2, error_code=code)
    m.observe(trace, status, db_s + 0.002, "rid")


def test_labels_are_bounded_and_dropped_tenants_leave_no_series() -> None:
    clock = Clock()
    m = Metrics(MetricsConfig(tenant_label_limit=3, hotspot_window_s=10), "test", frozenset({"pin"}), lambda: [],
                lambda: {}, clock=clock)
    for t in ("a", "b", "c", "d"):
        for _ in range({"a": 10, "b": 5, "c": 1, "d": 1}[t]):
            _observe(m, t)
    clock.now = 2.0
    _observe(m, "a")
    text = m.exposition(None)[0].decode()
    tenants = set(re.findall(r'tenant_proxy_requests_total\{[^}]*tenant="([^"]+)"', text))
    assert tenants <= {"a", "b", "pin", OTHER} and "a" in tenants
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("tenant_proxy_requests_total{"))
    assert total == 18  # every request counted exactly once, labelled or folded
    assert _value(text, "tenant_proxy_tenants_folded_total") > 0
    assert _value(text, "tenant_proxy_tenant_label_limit") == 3
    # "a" stops, "d" becomes the heaviest after the window moves on: "a" loses its series
    clock.now = 20.0
    for _ in range(30):
        _observe(m, "d", db_s=0.05)
    clock.now = 22.0
    _observe(m, "d", db_s=0.05)
    text = m.exposition(None)[0].decode()
    assert 'tenant="a"' not in text and 'tenant="d"' in text
    assert _value(text, "tenant_proxy_hot_tenants", tenant="d") == 1.0


def test_rejections_and_openmetrics_exemplars() -> None:
    m = Metrics(MetricsConfig(tenant_label_limit=5), "test", frozenset({"x"}), lambda: [], lambda: {})
    m.observe(RequestTrace(endpoint="/v1/query", error_code="unauthenticated"), 401, 0.001, "req-1")
    m.observe(RequestTrace(endpoint="/v1/query", tenant="x", error_code="statement_rejected"), 400, 0.001, "req-2")
    text = m.exposition(None)[0].decode()
    assert _value(text, "tenant_proxy_rejected_total", tenant="__none__", reason="auth") == 1
    assert _value(text, "tenant_proxy_rejected_total", tenant="x", reason="guard") == 1
    body, ctype = m.exposition("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert b'# {request_id="req-2"}' in body


def test_exemplars_fit_openmetrics_and_counts_match_the_buckets() -> None:
    m = Metrics(MetricsConfig(tenant_label_limit=5), "test", frozenset({"x"}), lambda: [], lambda: {})
    fits, too_long = "f" * (128 - len("request_id")), "t" * 128
    for duration, rid in ((0.0004, "a"), (0.003, fits), (0.004, too_long), (31.0, "slow")):
        m.observe(RequestTrace(endpoint="/v1/query", tenant="x", wait_s=0.0, db_s=duration), 200, duration, rid)
    body = m.exposition("application/openmetrics-text; version=1.0.0")[0].decode()
    assert f'request_id="{fits}"' in body and too_long not in body
    text = m.exposition(None)[0].decode()
    name = "tenant_proxy_request_duration_seconds"
    cumulative = {le: _value(text, name + "_bucket", endpoint="/v1/query", le=le, tenant="x")
                  for le in ("0.0005", "0.001", "0.005", "30.0", "+Inf")}
    assert cumulative == {"0.0005": 1, "0.001": 1, "0.005": 3, "30.0": 3, "+Inf": 4}
    assert _value(text, name + "_count", endpoint="/v1/query", tenant="x") == 4
    assert abs(_value(text, name + "_sum", endpoint="/v1/query", tenant="x") - 31.0074) < 1e-9
    # a bound is inclusive ("le"): an observation equal to it is in that bucket
    m.observe(RequestTrace(endpoint="/v1/query", tenant="x"), 200, 0.001, "edge")
    text = m.exposition(None)[0].decode()
    assert _value(text, name + "_bucket", endpoint="/v1/query", le="0.001", tenant="x") == 2


def test_forget_drops_a_tenant_everywhere() -> None:
    m = Metrics(MetricsConfig(tenant_label_limit=5), "test", frozenset(), lambda: [], lambda: {})
    for t in ("gone", "stays"):
        _observe(m, t)
    m.forget("gone")
    text = m.exposition(None)[0].decode()
    assert 'tenant="gone"' not in text and 'tenant="stays"' in text
    assert all(load.tenant != "gone" for load in m.hot.top(5, m.clock()))
    _observe(m, "stays")  # recording goes on normally
