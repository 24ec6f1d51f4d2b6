"""Guard verdicts for long SQL texts, judged in parser processes (guard_worker.py).

The C parser recurses once per level of nesting, without a depth check of its own on
every path: ``SELECT 1+1+...+1`` with 25,000 terms overflows its stack and the process
dies.  A text of up to ``guard.INLINE_CHARS`` cannot nest deep enough for that and is
parsed on the event loop.  A longer one (the tenant's ``max_sql_bytes`` bounds it) is
parsed in a worker process that parses one text at a time: a crash costs that process,
which is replaced, and refuses only that text; and a long parse (up to seconds for a few
hundred KB) does not freeze the event loop every tenant's requests share.  Verdicts are
cached by the guard either way, so a text is parsed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import sys

import orjson

from ..config import GuardConfig
from .guard import INLINE_CHARS, Guard, Verdict

log = logging.getLogger("tenant_proxy.guard")

TOO_DEEP = "the statement is nested too deeply to parse"
# Far above any parse the size cap lets through (~1.5 s for 64 KB of the slowest shape).
PARSE_TIMEOUT_S = 20.0


class _Died(Exception):
    pass


class _TenantLane:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.policy.guard_worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)  # its stderr is the gateway's: a broken install shows there
        return cls(proc)

    async def judge(self, request: bytes) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(struct.pack("!I", len(request)) + request)
            await self.proc.stdin.drain()
            (size,) = struct.unpack("!I", await self.proc.stdout.readexactly(4))
            return await self.proc.stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Died() from exc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class ParseWorkers:
    """Up to ``workers`` parser processes, started on first use and replaced when one dies."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._idle: list[_Worker] = []
        self._started = 0
        self._free = asyncio.Semaphore(workers)
        # One long parse at a time per tenant: a tenant sending many delays its own, and
        # another tenant's long text waits for at most one of each other tenant's.
        self._tenants: dict[str, _TenantLane] = {}
        self.crashes = 0

    async def verdict(self, guard: Guard, cfg: GuardConfig, sql: str, tenant: str) -> Verdict:
        """``guard``'s verdict on ``sql``; parsed here when short, in a worker when long."""
        if len(sql) <= INLINE_CHARS:
            return guard.verdict(sql)
        verdict = guard.cached(sql)
        if verdict is not None:
            return verdict
        lane = self._tenants.get(tenant)
        if lane is None:
            lane = self._tenants[tenant] = _TenantLane()
        lane.users += 1
        try:
            async with lane.lock:
                verdict = guard.cached(sql)  # sent twice at once: parsed once
                if verdict is None:
                    verdict = await self._judge(cfg, sql)
                    guard.remember(sql, verdict)
        finally:
            lane.users -= 1
            if not lane.users:
                del self._tenants[tenant]
        return verdict

    async def _judge(self, cfg: GuardConfig, sql: str) -> Verdict:
        request = orjson.dumps({"cfg": [sorted(cfg.deny_functions), sorted(cfg.allow_functions),
                                        sorted(cfg.allow_call)], "sql": sql})
        async with self._free:
            worker = self._idle.pop() if self._idle else await _Worker.start()
            try:
                async with asyncio.timeout(PARSE_TIMEOUT_S):
                    answer = await worker.judge(request)
            except (_Died, TimeoutError) as exc:
                worker.kill()  # a broken install would die too: its stderr, the gateway's, says so
                await worker.proc.wait()
                self.crashes += 1
                log.warning("the SQL parser %s on a %d-character statement; refused",
                            "crashed" if isinstance(exc, _Died) else "timed out", len(sql))
                return Verdict("", "", TOO_DEEP)
            except BaseException:
                worker.kill()  # cancelled mid-frame: its stream is out of step
                raise
            self._idle.append(worker)
        command, fp, rejection, row_limit, limit_param = orjson.loads(answer)
        return Verdict(command, fp, rejection, row_limit, limit_param)

    async def warm_up(self) -> None:
        """Start a worker now rather than on the first long statement."""
        async with self._free:
            self._idle.append(await _Worker.start())

    async def close(self) -> None:
        for worker in self._idle:
            worker.kill()
            await worker.proc.wait()
        self._idle.clear()
