"""``tenant-proxy serve --workers N``: the parent that starts N gateway processes and keeps them.

Each worker is a fresh ``python -m proxy serve`` (not a fork: no event loop, pool or
random state is shared) with a hidden ``--worker-slot``; all of them bind the same data
and admin ports with SO_REUSEPORT, so the kernel spreads new connections over them.
Each is an instance of the fleet of its own (its own pools and, with ``control.dsn``,
its own row in the catalog's instances).  The parent holds no port and serves nothing:

- SIGTERM or SIGINT: sent on as SIGTERM to every worker, each drains as a single
  process does (not ready for ``server.drain_s``, then in-flight requests finish); the
  parent exits 0 once all have exited 0, 1 if any had to be killed or failed.
- SIGHUP: sent on to every worker, each reloads its config file.
- A worker that exits on its own is logged and started again after ``RESTART_DELAY_S``;
  more than ``MAX_DEATHS`` exits within ``DEATH_WINDOW_S`` (a worker that cannot start,
  say) stops the others and the parent exits 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from ..config import Settings
from .worker_peers import WorkerSlot

log = logging.getLogger("tenant_proxy.workers")

WORKERS_PER_CPU = 4
RESTART_DELAY_S = 0.5
MAX_DEATHS = 5
DEATH_WINDOW_S = 60.0
_TICK_S = 0.1


def check_count(workers: int, cpus: int) -> str | None:
    """Why ``--workers`` is refused, or None."""
    if workers < 1:
        return f"--workers {workers}: give 1 or more (1, the default, is a single process)"
    if workers > cpus * WORKERS_PER_CPU:
        return (f"--workers {workers}: more than {WORKERS_PER_CPU} per CPU (this machine has {cpus}, "
                f"so at most {cpus * WORKERS_PER_CPU})")
    return None


def check_ports(settings: Settings, workers: int) -> str | None:
    """Several workers must share fixed ports: port 0 would give each a port of its own."""
    if workers > 1 and 0 in (settings.server.port, settings.server.admin_port):
        return (f"--workers {workers} needs fixed ports: server.port and server.admin_port must not be 0 "
                "(0 would give every worker a different port)")
    return None


class Supervisor:
    """Starts the workers, passes signals on, restarts a worker that dies."""

    def __init__(self, config_path: str, count: int, stop_timeout_s: float) -> None:
        self.config_path = config_path
        self.count = count
        self.stop_timeout_s = stop_timeout_s
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.restart_at: dict[int, float] = {}
        self.deaths: list[float] = []
        self._signals: list[int] = []
        self._directory = Path(tempfile.mkdtemp(prefix="tenant-proxy-workers-"))  # mode 0700

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _spawn(self, index: int) -> None:
        slot = WorkerSlot(index, self.count, self._directory)
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", self.config_path,
                                 "--worker-slot", slot.argument()])
        self.procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            for index in range(self.count):
                self._spawn(index)
            code = self._watch()
            return self._stop_all() or code
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)

    def _watch(self) -> int:
        """Until a stop signal (0) or workers that keep dying (1)."""
        while True:
            time.sleep(_TICK_S)
            while self._signals:
                sig = self._signals.pop(0)
                if sig != signal.SIGHUP:
                    log.info("received %s: draining %d workers", signal.Signals(sig).name, self.count)
                    return 0
                log.info("received SIGHUP: every worker reloads its config")
                for proc in self.procs.values():
                    proc.send_signal(signal.SIGHUP)
            if self._reap() > MAX_DEATHS:
                log.error("workers exited %d times within %g s: giving up", len(self.deaths), DEATH_WINDOW_S)
                return 1
            now = time.monotonic()
            for index, due in list(self.restart_at.items()):
                if now >= due:
                    del self.restart_at[index]
                    self._spawn(index)

    def _reap(self) -> int:
        """Note the workers that exited; the exits within the window."""
        now = time.monotonic()
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[index]
            self.deaths.append(now)
            self.restart_at[index] = now + RESTART_DELAY_S
            log.error("worker %d (pid %d) exited unexpectedly with %s; starting it again", index, proc.pid,
                      f"signal {-code}" if code < 0 else f"code {code}")
        self.deaths = [t for t in self.deaths if now - t < DEATH_WINDOW_S]
        return len(self.deaths)

    def _stop_all(self) -> int:
        """SIGTERM every worker and wait for its graceful stop; 1 if one failed or had to be killed."""
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        code = 0
        for index, proc in self.procs.items():
            try:
                result = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop within %g s: killed", index, proc.pid,
                          self.stop_timeout_s)
                proc.kill()
                proc.wait()
                result = 1
            if result not in (0, -signal.SIGTERM):  # -SIGTERM: stopped before its handlers were set
                code = 1
        log.info("all workers stopped")
        return code


def supervise(config_path: str, settings: Settings, count: int) -> int:
    """Run ``count`` workers of the config at ``config_path`` until SIGTERM."""
    s = settings.server
    log.info("starting %d workers on %s:%d (admin %s:%d), parent pid %d", count, s.host, s.port, s.admin_host,
             s.admin_port, os.getpid())
    return Supervisor(config_path, count, s.drain_s + s.shutdown_timeout_s + 10).run()
