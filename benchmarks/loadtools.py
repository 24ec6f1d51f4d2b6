"""Thin wrappers over the external load generators used by benchmarks/throughput.py
(wrk, hey, pgbench) and the process probes it needs (pid by command line, RSS, the
gateway's status-code counters)."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.tools.devstack import APP_PASSWORD, APP_USER, DATABASE, LocalStack, free_port

from .harness import percentile

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
MARGIN_S = 1  # seconds at the start and end of each hey process's run that are not counted


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"{tool} not found: apt-get install -y {tool}")
    return path


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


# -- closed loop: wrk -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Saturation:
    ok_per_s: float
    requests: int
    non2xx: int
    socket_errors: int
    duration_s: float


def write_requests(path: Path, requests: Sequence[tuple[bytes, dict[str, str]]]) -> Path:
    """One request per line for wrk_post.lua: body, then "Header: value" fields, tab-separated."""
    with path.open("wb") as f:
        for body, headers in requests:
            assert b"\t" not in body and b"\n" not in body
            f.write(b"\t".join([body, *(f"{k}: {v}".encode() for k, v in headers.items())]) + b"\n")
    return path


def wrk(url: str, requests_file: Path, connections: int = 32, threads: int = 2, duration_s: int = 15) -> Saturation:
    out = _run([need("wrk"), "-c", str(connections), "-t", str(threads), "-d", f"{duration_s}s", "--timeout", "5s",
                "-s", str(WRK_SCRIPT), url, "--", str(requests_file)])
    m = re.search(r"^RESULT (.*)$", out, re.M)
    if m is None:
        raise RuntimeError(f"wrk printed no RESULT line:\n{out}")
    v = {k: int(x) for k, x in (kv.split("=") for kv in m.group(1).split())}
    duration = v["duration_us"] / 1e6
    return Saturation(ok_per_s=(v["requests"] - v["non2xx"]) / duration, requests=v["requests"], non2xx=v["non2xx"],
                      socket_errors=v["connect"] + v["read"] + v["write"] + v["timeout"], duration_s=duration)


# -- fixed rate: hey and pgbench -R ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    rate: float            # requested, per second
    achieved: float        # completed, per second
    p50_ms: float
    p99_ms: float
    codes: dict[str, int] = field(default_factory=dict)  # status code (or "error") -> count


def hey(url: str, body: bytes, headers: dict[str, str], rate: float, workdir: Path, duration_s: int = 10,
        workers: int = 32) -> Latency:
    """`workers` request streams adding up to `rate` per second, for `duration_s`.

    One `hey -c 32 -q rate/32` does not make a steady rate: its 32 workers start their
    tickers together, so it sends bursts of 32 requests at once, and the latency it reports
    is mostly the wait behind the other 31 of a burst.  So: 32 `hey -c 1 -q rate/32`
    processes, started 1/rate apart, each logging every request (`-o csv`, 0.1 ms
    resolution), merged.  Each runs two seconds longer than `duration_s`, and only requests
    sent between its first and its `duration_s + 1`th second count: 32 processes starting
    at once make their first requests (connection set-up included) take tens of ms, and so
    do 32 processes formatting their output at the end; either is enough to be the p99 of
    a run on its own.  hey times each request from when it is sent (a worker that falls
    behind skips ticks), so this is open-loop-ish: compare `achieved` with `rate`."""
    body_file = workdir / "hey-body.json"
    body_file.write_bytes(body)
    cmd = [need("hey"), "-z", f"{duration_s + 2 * MARGIN_S}s", "-c", "1", "-q", f"{rate / workers:.3f}", "-cpus", "1",
           "-o", "csv", "-m", "POST", "-T", "application/json", "-D", str(body_file)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    started = time.perf_counter()
    for i in range(workers):
        time.sleep(max(0.0, started + i / rate - time.perf_counter()))
        out_file = workdir / f"hey-{i}.csv"
        with out_file.open("wb") as out:
            procs.append((subprocess.Popen([*cmd, url], stdout=out, stderr=subprocess.PIPE), out_file))
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    for proc, out_file in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"hey failed ({proc.returncode}): {err.decode()[-2000:]}")
        for line in out_file.read_text().splitlines()[1:]:  # response-time,...,status-code,offset
            cols = line.split(",")
            if MARGIN_S <= float(cols[7]) < MARGIN_S + duration_s:
                latencies.append(float(cols[0]) * 1000)
                codes[cols[6]] += 1
        out_file.unlink()
    if not latencies:
        raise RuntimeError("hey recorded no responses")
    # hey's CSV holds completed responses only; requests that failed outright are what is missing.
    expected = int(rate * duration_s)
    if len(latencies) < 0.98 * expected:
        codes["missing (error or not sent)"] = expected - len(latencies)
    return Latency(rate=rate, achieved=len(latencies) / duration_s, p50_ms=percentile(latencies, 0.5),
                   p99_ms=percentile(latencies, 0.99), codes=dict(codes))


class Pgbench:
    """pgbench through PgBouncer as the gateway's role, running one custom script."""

    def __init__(self, stack: LocalStack, script: Path, workdir: Path) -> None:
        self.stack, self.script, self.workdir = stack, script, workdir
        self.binary = str(stack.bindir / "pgbench")
        self.env = {**os.environ, "PGPASSWORD": APP_PASSWORD}

    def _cmd(self, clients: int, threads: int, duration_s: int, *extra: str) -> list[str]:
        # -M simple: the script sends `BEGIN \; SET LOCAL ...` as one query (as the gateway does), which the
        # extended protocol cannot carry; PgBouncer 1.18 in transaction mode does not support -M prepared.
        return [self.binary, "-n", "-h", "127.0.0.1", "-p", str(self.stack.bouncer_port), "-U", APP_USER,
                "-M", "simple", "-f", str(self.script), "-c", str(clients), "-j", str(threads),
                "-T", str(duration_s), *extra, DATABASE]

    def tps(self, clients: int = 32, threads: int = 2, duration_s: int = 15) -> float:
        out = _run(self._cmd(clients, threads, duration_s), env=self.env)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        if failed and int(failed.group(1)):
            raise RuntimeError(f"pgbench transactions failed:\n{out}")
        m = re.search(r"^tps = ([\d.]+)", out, re.M)
        if m is None:
            raise RuntimeError(f"unexpected pgbench output:\n{out}")
        return float(m.group(1))

    def latency(self, rate: float, clients: int = 32, threads: int = 2, duration_s: int = 10) -> Latency:
        """`-R` schedules transactions (Poisson) and `-l` logs each one.  The log's latency (3rd column)
        counts from the scheduled start; the schedule lag (7th) is subtracted, so the figure is the
        service time, as hey measures it."""
        prefix = self.workdir / f"pgbench-{int(rate)}-{time.monotonic_ns()}"
        out = _run(self._cmd(clients, threads, duration_s, "-R", f"{rate:.1f}", "-l", f"--log-prefix={prefix}"),
                   env=self.env)
        service: list[float] = []
        for log in prefix.parent.glob(prefix.name + ".*"):
            for line in log.read_text().splitlines():
                cols = line.split()
                if len(cols) >= 7 and cols[2].isdigit():
                    service.append((int(cols[2]) - int(cols[6])) / 1000)
            log.unlink()
        m = re.search(r"^tps = ([\d.]+)", out, re.M)
        if not service or m is None:
            raise RuntimeError(f"pgbench wrote no per-transaction log:\n{out}")
        failed = re.search(r"number of failed transactions: (\d+)", out)
        codes = {"failed": int(failed.group(1))} if failed and int(failed.group(1)) else {}
        return Latency(rate=rate, achieved=float(m.group(1)), p50_ms=percentile(service, 0.5),
                       p99_ms=percentile(service, 0.99), codes=codes)


# -- processes --------------------------------------------------------------------------------------------------------
def pid_of(*fragments: str) -> int:
    """The one process whose command line contains every fragment (e.g. a config file's path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(f in cmdline for f in fragments):
            found.append(int(entry.name))
    if len(found) != 1:
        raise RuntimeError(f"expected one process matching {fragments}, found {found}")
    return found[0]


def require_ready(admin_port: int) -> None:
    """harness.gateway_process yields after 10 s even when the gateway never came up: fail clearly instead."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as r:
            if r.status == 200:
                return
    except OSError:
        pass
    raise RuntimeError(f"the gateway (admin port {admin_port}) is not ready: see its output above")


def rss_mb_of(pid: int) -> float:
    """Resident set size of another process, in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds_of(pid: int) -> float:
    """CPU time (user + system) another process has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def status_codes(admin_port: int) -> Counter[str]:
    """tenant_proxy_requests_total summed by status code, from the gateway's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    codes: Counter[str] = Counter()
    for m in re.finditer(r'^tenant_proxy_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        code = re.search(r'code="(\d+)"', m.group(1))
        if code:
            codes[code.group(1)] += int(float(m.group(2)))
    return codes


@contextlib.contextmanager
def bare_reference_process(stack: LocalStack) -> Iterator[int]:
    """benchmarks/bare_reference.py in its own process; yields its port once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bare_reference", "--port", str(port),
                             "--dsn", stack.gateway_dsn])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/", method="POST",
                                             data=b'{"tenant": "00000000-0000-4000-8000-000000000000", '
                                                  b'"event_type": "none"}')
                with urllib.request.urlopen(req, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare reference server did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


# -- who else is using the machine ------------------------------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSnapshot:
    busy: int    # jiffies of every CPU in user, nice and system time (/proc/stat)
    steal: int   # jiffies the hypervisor gave to another guest
    total: int   # jiffies of every CPU, every state
    own: int     # jiffies used by this benchmark: this process, its children, the PostgreSQL cluster


def cpu_snapshot(own_roots: Sequence[int]) -> CpuSnapshot:
    """The machine's CPU time so far, and the part of it used by this process tree and the trees under
    `own_roots` (live processes with their reaped children's time, plus this process's reaped children)."""
    procs: dict[int, tuple[int, int]] = {}  # pid -> (ppid, own + reaped children's jiffies)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        procs[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    me, own, todo = os.getpid(), 0, [*own_roots, os.getpid()]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        own += procs[pid][1] if pid != me else 0
        todo.extend(children.get(pid, ()))
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += round((usage.ru_utime + usage.ru_stime) * _TICKS)
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return CpuSnapshot(busy=sum(cpu[:3]), steal=cpu[7], total=sum(cpu), own=own)


def machine_share(a: CpuSnapshot, b: CpuSnapshot) -> tuple[float, float]:
    """(share of the machine's CPU time used by anything but this benchmark, share stolen by the hypervisor)
    between two snapshots.  Kernel interrupt work (e.g. loopback networking) is left out of both."""
    total = max(1, b.total - a.total)
    return max(0, (b.busy - a.busy) - (b.own - a.own)) / total, (b.steal - a.steal) / total
