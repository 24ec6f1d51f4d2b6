"""The access log's queue and writer thread: same lines as before, all of them, in order, in whole-line writes."""

from __future__ import annotations

import datetime
import io
import json
import logging
import select

import pytest

from proxy.config import LoggingConfig
from proxy.observe.access_log import AccessLog, LineBatchHandler
from proxy.observe.trace import RequestTrace

TENANT = "aaaaaaaa-0000-4000-8000-00000000000a"


def _trace(i: int = 0) -> RequestTrace:
    t = RequestTrace(endpoint="/v1/query", tenant=TENANT, caller="svc-a", fingerprint="855d9591af2d2bef", rows=i)
    t.wait_s, t.db_s = 0.0000581, 0.0011594
    return t


class _Chunks(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)


def _logger(name: str, handler: logging.Handler | None) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers.clear()
    if handler is not None:
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_the_line_keeps_its_fields_order_and_format() -> None:
    out = _Chunks()
    log = AccessLog(_logger("test.access.format", LineBatchHandler(out)))
    before = datetime.datetime.now(datetime.UTC)
    log.record(LoggingConfig(), _trace(4), 200, 0.0027161, "rid-1")
    log.close()
    line = out.getvalue().decode()
    assert line.endswith("\n") and line.count("\n") == 1
    body = json.loads(line)
    assert list(body) == ["time", "request_id", "caller", "tenant", "endpoint", "fingerprint", "status", "error",
                          "rows", "duration_ms", "wait_ms", "db_ms"]
    assert body | {"time": None} == {"time": None, "request_id": "rid-1", "caller": "svc-a", "tenant": TENANT,
                                     "endpoint": "/v1/query", "fingerprint": "855d9591af2d2bef", "status": 200,
                                     "error": None, "rows": 4, "duration_ms": 2.716, "wait_ms": 0.058,
                                     "db_ms": 1.159}
    at = datetime.datetime.fromisoformat(body["time"])
    assert body["time"].endswith("+00:00") and len(body["time"]) == len("2026-11-25T15:47:51.604+00:00")
    assert abs((at - before).total_seconds()) < 5


def test_every_line_is_written_in_order_in_whole_line_chunks() -> None:
    out = _Chunks()
    log = AccessLog(_logger("test.access.many", LineBatchHandler(out)))
    for i in range(20_000):  # more than wakes the writer early, then a stop with lines still queued
        log.record(LoggingConfig(), _trace(i), 200, 0.001, f"rid-{i}")
    log.close()
    assert [json.loads(x)["rows"] for x in out.getvalue().splitlines()] == list(range(20_000))
    assert len(out.writes) < 20_000 / 5
    for w in out.writes:
        assert w.endswith(b"\n") and len(w) <= select.PIPE_BUF


def test_sampling_and_errors() -> None:
    out = _Chunks()
    log = AccessLog(_logger("test.access.sample", LineBatchHandler(out)))
    cfg = LoggingConfig(access_sample=0.0)
    log.record(cfg, _trace(), 200, 0.001, "skipped")
    log.record(cfg, _trace(), 503, 0.001, "kept")
    log.close()
    assert [json.loads(x)["request_id"] for x in out.getvalue().splitlines()] == ["kept"]


def test_without_the_batch_handler_each_line_is_a_log_record(caplog: pytest.LogCaptureFixture) -> None:
    logger = _logger("test.access.records", None)
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="test.access.records")
    log = AccessLog(logger)
    for i in range(3):
        log.record(LoggingConfig(), _trace(i), 200, 0.001, f"rid-{i}")
    log.close()
    log.record(LoggingConfig(), _trace(3), 200, 0.001, "after-stop")  # written at once
    assert [json.loads(r.getMessage())["request_id"] for r in caplog.records] == \
        ["rid-0", "rid-1", "rid-2", "after-stop"]
