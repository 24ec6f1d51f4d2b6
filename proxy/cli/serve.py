"""`tenant-proxy serve`, `check-config` and `dev`: running the gateway.

``serve --workers N`` (default 1: this process serves) starts N worker processes sharing
the ports (http/workers.py); SIGTERM drains them all, SIGHUP reloads them all.  A refused
``--workers`` (below 1, above four per CPU, with port 0) exits 2."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any, cast

from ..config import Settings
from ..http.worker_peers import WorkerSlot
from ..observe.access_log import LineBatchHandler
from .common import load as _load


class _TextOut:
    """A binary write/flush over a text stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, data: bytes) -> int:
        return int(self.stream.write(data.decode()))

    def flush(self) -> None:
        self.stream.flush()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    # The access log is one JSON object per line on stdout, for log shippers.
    # Written in batches by proxy/observe/access_log.py's thread, in whole lines.
    access = logging.getLogger("tenant_proxy.access")
    # A text stream without a binary buffer (stdout captured by a test or an embedding
    # program) gets the lines decoded.
    handler = LineBatchHandler(getattr(sys.stdout, "buffer", None) or cast(IO[bytes], _TextOut(sys.stdout)))
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    access.setLevel(logging.INFO)


async def _serve(settings: Settings, config_path: str, banner: str | None = None,
                 worker: WorkerSlot | None = None) -> None:
    from ..http.app import start_gateway

    running = await start_gateway(settings, Path(config_path), os.environ, worker=worker)
    logging.getLogger("tenant_proxy").info(
        "serving on %s:%d (admin %s:%d)", settings.server.host, running.port,
        settings.server.admin_host, running.admin_port)
    if banner:
        print(banner, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[list[str]]] = set()

    def reload() -> None:
        task = asyncio.ensure_future(running.gateway.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if worker is not None:
        orphan = asyncio.create_task(_stop_if_orphaned(os.getppid(), stop))
    await stop.wait()
    if worker is not None:
        orphan.cancel()
    # Graceful: report not-ready while load balancers notice, then stop accepting, let
    # in-flight requests finish (up to server.shutdown_timeout_s), then close the pools.
    running.gateway.draining = True
    await asyncio.sleep(running.gateway.runtime.settings.server.drain_s)  # as last reloaded
    await running.stop()


async def _stop_if_orphaned(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL, no chance to stop it) stops itself."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logging.getLogger("tenant_proxy").error("the supervisor (pid %d) is gone: stopping", parent)
    stop.set()


def _run(coro_factory: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        asyncio.run(coro_factory)  # type: ignore[arg-type]
    else:
        uvloop.run(coro_factory)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from ..http.workers import check_count, check_ports, supervise

    if args.worker_slot:  # one of the workers a supervisor started
        settings = _load(args.config)
        _setup_logging(settings.logging.level)
        _run(_serve(settings, args.config, worker=WorkerSlot.parse(args.worker_slot)))
        return 0
    problem = check_count(args.workers, os.cpu_count() or 1)
    if problem is None:
        settings = _load(args.config)
        problem = check_ports(settings, args.workers)
    if problem is not None:
        print(f"serve: {problem}", file=sys.stderr)
        return 2
    _setup_logging(settings.logging.level)
    if args.workers > 1:
        return supervise(args.config, settings, args.workers)
    _run(_serve(settings, args.config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from ..http.tls import server_context

    server_context(_load(args.config).server)  # the certificate and key files too
    print(f"{args.config}: ok")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from ..tools.devstack import DEMO_BANNER, LocalStack, StackError, default_dev_dir

    root = Path(args.dir).resolve() if args.dir else default_dev_dir()
    stack = LocalStack(root, pg_port=args.pg_port, bouncer_port=args.bouncer_port, pool_size=args.pool_size)
    try:
        stack.start()
    except StackError as exc:
        print(f"dev: {exc}", file=sys.stderr)
        return 1
    try:
        stack.load_demo()
        settings = _load(args.config)
        _setup_logging(settings.logging.level)
        _run(_serve(settings, args.config, banner=DEMO_BANNER.format(port=settings.server.port,
                                                                      admin_port=settings.server.admin_port)))
    finally:
        stack.stop()
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the ports (SO_REUSEPORT), each an "
                   "instance of the fleet; /metrics adds them up (default 1: this process serves, no other)")
    p.add_argument("--worker-slot", help=argparse.SUPPRESS)  # index/count/dir, from the supervisor
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file; exit 1 listing every problem")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("dev", help="start a throwaway PostgreSQL + PgBouncer with demo data, then serve")
    p.add_argument("--config", default="config/dev.yaml")
    p.add_argument("--dir", help="where the throwaway cluster lives (default: a directory under the temp dir, "
                   "kept between runs)")
    p.add_argument("--pg-port", type=int, default=55432)
    p.add_argument("--bouncer-port", type=int, default=6432)
    p.add_argument("--pool-size", type=int, default=20)
    p.set_defaults(func=cmd_dev)
