"""The access log: one JSON line per request, formatted and written off the event loop.

Building and writing a line on the event loop (a LogRecord, the handler's lock, the
JSON and a write plus flush, one system call, per request) cost about 13 % of the
gateway's throughput.  So the event loop only appends the request's figures (a tuple)
to a queue; a thread wakes every ``FLUSH_S`` (sooner when the queue is long),
formats the lines and writes them in batches.  Every line is kept, in request order;
:meth:`AccessLog.close` (the gateway's graceful stop) writes what is left.

Where the lines go is the logging configuration's choice, read per batch: when the
``tenant_proxy.access`` logger does not propagate and its handlers are all
:class:`LineBatchHandler` (what ``tenant-proxy serve`` sets up: stdout), batches go
straight to their streams in writes of whole lines, at most ``PIPE_BUF`` bytes each, so
that the lines of several ``--workers`` sharing one pipe never interleave mid-line.
Otherwise (the gateway embedded, tests) each line is logged as one record, as before.
"""

from __future__ import annotations

import collections
import datetime
import logging
import random
import select
import threading
import time
from typing import IO

import orjson

from ..config import LoggingConfig
from .trace import RequestTrace

access_logger = logging.getLogger("tenant_proxy.access")

FLUSH_S = 0.1
_WAKE_AT = 4096  # queued lines that wake the writer before its interval ends
_CHUNK = getattr(select, "PIPE_BUF", 4096)

# (wall time, request id, caller, tenant, endpoint, fingerprint, status, error, rows, duration s, wait s, db s)
Entry = tuple[float, str, str | None, str | None, str, str | None, int, str | None, int, float,
              float | None, float | None]


class LineBatchHandler(logging.Handler):
    """Writes access-log batches to a binary stream in whole-line chunks (``tenant-proxy
    serve``: stdout).  A record logged to it directly is written as one line."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__()
        self.stream = stream
        self._io = threading.Lock()

    def write_lines(self, lines: list[bytes]) -> None:
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > _CHUNK:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        with self._io:
            self.stream.write(data)
            self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self._write(self.format(record).encode() + b"\n")


class _Clock:
    """ISO 8601 UTC times to the millisecond, the seconds part formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((t - second) * 1000):03d}+00:00"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def format_line(e: Entry, clock: _Clock) -> bytes:
    """One request's line: never SQL text, parameters or credentials."""
    return orjson.dumps({
        "time": clock.iso(e[0]), "request_id": e[1], "caller": e[2], "tenant": e[3], "endpoint": e[4],
        "fingerprint": e[5], "status": e[6], "error": e[7], "rows": e[8], "duration_ms": _ms(e[9]),
        "wait_ms": _ms(e[10]), "db_ms": _ms(e[11]),
    }, option=orjson.OPT_APPEND_NEWLINE)


class AccessLog:
    """The queue of lines not yet written and the thread that writes them (started on the first line)."""

    def __init__(self, logger: logging.Logger = access_logger) -> None:
        self.logger = logger
        self._queue: collections.deque[Entry] = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._clock = _Clock()
        self._write_lock = threading.Lock()

    def record(self, cfg: LoggingConfig, trace: RequestTrace, status: int, duration: float, request_id: str) -> None:
        """Queue one request's line (on the event loop: no formatting, no I/O)."""
        if status < 400 and cfg.access_sample < 1.0 and random.random() >= cfg.access_sample:
            return
        queue = self._queue
        queue.append((time.time(), request_id, trace.caller, trace.tenant, trace.endpoint, trace.fingerprint,
                      status, trace.error_code, trace.rows, duration, trace.wait_s, trace.db_s))
        if self._closed:  # a straggler after the stop: written at once
            self.flush()
        elif self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()
        elif len(queue) == _WAKE_AT:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write every queued line now (from any thread)."""
        with self._write_lock:
            queue = self._queue
            entries = [queue.popleft() for _ in range(len(queue))]
            if not entries:
                return
            lines = [format_line(e, self._clock) for e in entries]
            handlers = self.logger.handlers
            if not self.logger.propagate and handlers and all(isinstance(h, LineBatchHandler) for h in handlers):
                for h in handlers:
                    h.write_lines(lines)  # type: ignore[attr-defined]  # checked just above
            else:
                for line in lines:
                    self.logger.info(line[:-1].decode())

    def close(self) -> None:
        """Stop the writer and write what is left (the graceful stop: no line is lost)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
