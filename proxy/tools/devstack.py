"""A throwaway local PostgreSQL + PgBouncer (transaction mode) from the machine's binaries.

Used by ``tenant-proxy dev`` (``make run``) and by the test fixtures.  PostgreSQL
refuses to run as root, so when started as root every server process runs as the
``postgres`` user.  PgBouncer's config is the top-level ``pgbouncer.ini`` with only
ports, paths and (for tests) the pool size substituted: clients other than PgBouncer's own
users are looked up with its auth_query (deploy/sql/004_pgbouncer_auth.sql), as in
production.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The migrations ship inside the package (deploy/sql links here), so a wheel can migrate too.
SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
DEMO_SQL = REPO / "deploy" / "dev" / "demo.sql"
PGBOUNCER_INI = REPO / "pgbouncer.ini"
DATABASE = "appdb"


def default_dev_dir() -> Path:
    """Where ``tenant-proxy dev`` keeps its cluster: outside the checkout, which the
    ``postgres`` user may not be able to enter, and kept between runs."""
    return Path(tempfile.gettempdir()) / f"pg-tenant-proxy-dev-{os.getuid()}"
APP_USER, APP_PASSWORD = "app", "secret"
SUPERUSER, SUPERUSER_PASSWORD = "postgres", "postgres-dev-only"
# pgbouncer.ini's auth_user, which runs auth_query; its password is the one auth_file keeps.
AUTH_USER, AUTH_PASSWORD = "pgbouncer_auth", "pgbouncer-auth-dev-only"

DEMO_BANNER = """
pg-tenant-proxy is running (demo data: tenants acme and globex).
  curl -s localhost:{port}/v1/query -H 'Authorization: Bearer demo-acme-key' \\
       -H 'Content-Type: application/json' \\
       -d '{{"sql": "SELECT event_type, data, created_at FROM events ORDER BY created_at"}}'
  curl -s localhost:{port}/v1/query -H 'Authorization: Bearer demo-reporting-key' \\
       -H 'X-Tenant-Id: 22222222-2222-4222-8222-222222222222' -d '{{"sql": "SELECT count(*) FROM events"}}'
  health: curl -s localhost:{admin_port}/readyz
Ctrl-C stops the gateway, PgBouncer and PostgreSQL.
"""


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path:
    """Directory of the PostgreSQL server binaries, preferring version 15."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: (("/15/" not in p), p))
    found = shutil.which("initdb")
    if found:
        candidates.append(found)
    if not candidates:
        raise StackError("PostgreSQL server binaries (initdb) not found: run `make setup` or install postgresql-15")
    return Path(candidates[0]).parent


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if not found:
        raise StackError("pgbouncer not found: run `make setup` or `apt-get install pgbouncer`")
    return found


def render_pgbouncer_ini(template: str, values: dict[str, str], databases: dict[str, str]) -> str:
    """Substitute settings in pgbouncer.ini, keeping every comment and unlisted setting."""
    out, section = [], ""
    for line in template.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[]")
        m = re.match(r"^([a-z_]+)\s*=", stripped)
        if m and section == "pgbouncer" and m.group(1) in values:
            line = f"{m.group(1)} = {values[m.group(1)]}"
        elif m and section == "databases" and m.group(1) in databases:
            line = f"{m.group(1)} = {databases[m.group(1)]}"
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass
class LocalStack:
    root: Path
    pg_port: int = 0
    bouncer_port: int = 0
    pool_size: int = 20
    replica_of: LocalStack | None = None  # start as a streaming replica of this stack
    tls: bool = False  # PgBouncer also offers TLS to clients (a self-signed certificate)
    logical: bool = False  # wal_level = logical, for publications (tenant-proxy move's online copy)
    _bouncer: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.pg_port = self.pg_port or free_port()
        self.bouncer_port = self.bouncer_port or free_port()
        self.bindir = pg_bindir()
        self.as_postgres = os.geteuid() == 0
        self.data = self.root / "pgdata"
        self.run_dir = self.root / "run"

    # -- connection strings -------------------------------------------------------
    @property
    def gateway_dsn(self) -> str:
        """The gateway's role through PgBouncer."""
        return f"postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{self.bouncer_port}/{DATABASE}"

    @property
    def pgbouncer_admin_dsn(self) -> str:
        """PgBouncer's admin console as a stats user (SHOW POOLS/STATS/LISTS)."""
        return f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{self.bouncer_port}/pgbouncer"

    @property
    def admin_dsn(self) -> str:
        """The superuser, straight to PostgreSQL (for fixtures and set-up only)."""
        return f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{self.pg_port}/{DATABASE}"

    # -- lifecycle ------------------------------------------------------------------
    def _user_kwargs(self) -> dict[str, object]:
        if not self.as_postgres:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _run(self, *cmd: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd="/", input=stdin,
                              **self._user_kwargs())  # type: ignore[call-overload]
        if proc.returncode != 0:
            raise StackError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return str(proc.stdout)

    def _prepare_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            for path in (self.root, self.run_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
                path.chmod(0o755)
            reach = subprocess.run(["test", "-w", str(self.root), "-a", "-x", str(self.root)], cwd="/",
                                   **self._user_kwargs())  # type: ignore[call-overload]
            if reach.returncode != 0:
                raise StackError(f"the postgres user cannot reach {self.root}: a directory above it is closed to "
                                 f"others (a 0700 home directory?); use a directory under {tempfile.gettempdir()}, "
                                 "or leave --dir out for the default")

    def start(self) -> None:
        self._prepare_dirs()
        if not (self.data / "PG_VERSION").exists():
            if self.replica_of is not None:
                self._basebackup(self.replica_of)
            else:
                self._initdb()
        self._configure_pg()
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgresql.log"),
                  "-w", "-t", "60", "start")
        try:
            if self.replica_of is None:  # a standby gets everything from its primary
                self._migrate()
            self._start_bouncer()
        except BaseException:
            self.stop()
            raise

    def _basebackup(self, primary: LocalStack) -> None:
        """A streaming replica of ``primary`` (pg_basebackup -R writes its primary_conninfo)."""
        self._run(str(self.bindir / "pg_basebackup"), "-D", str(self.data), "-h", "127.0.0.1",
                  "-p", str(primary.pg_port), "-U", SUPERUSER, "-X", "stream", "-R", "-c", "fast",
                  env={**os.environ, "PGPASSWORD": SUPERUSER_PASSWORD})
        self.data.chmod(0o700)

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()

    def _configure_pg(self) -> None:
        # A throwaway cluster: durability settings are off for speed.
        conf = f"""
listen_addresses = '127.0.0.1'
port = {self.pg_port}
unix_socket_directories = '{self.run_dir}'
max_connections = 200
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
log_min_messages = warning
"""
        if self.logical:
            conf += "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n"
        auto = self.data / "postgresql.auto.conf"
        # keep what pg_basebackup -R wrote for a replica (primary_conninfo)
        kept = [line for line in auto.read_text().splitlines() if line.startswith("primary_conninfo")] \
            if auto.exists() else []
        self._write_as_owner(auto, "# written by pg-tenant-proxy devstack\n" + conf + "\n".join(kept) + "\n")

    def _write_as_owner(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def psql(self, sql: str | None = None, *, file: Path | None = None, database: str = DATABASE) -> str:
        """Run SQL as the superuser over the local socket.  A file is read here and fed on
        standard input: psql runs as ``postgres``, which may not enter the checkout (a 0700
        home directory)."""
        cmd = [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.run_dir),
               "-p", str(self.pg_port), "-U", SUPERUSER, "-d", database, "-At"]
        if file is None:
            return self._run(*cmd, "-c", sql or "")
        try:
            return self._run(*cmd, "-f", "-", stdin=file.read_text())
        except StackError as exc:
            raise StackError(f"{file.name}: {exc}") from None

    def _migrate(self) -> None:
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'", database="postgres")
        if not exists.strip():
            self.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        self.run_migrations()
        self.psql(f"ALTER ROLE {APP_USER} PASSWORD '{APP_PASSWORD}'")
        self.psql(f"ALTER ROLE {AUTH_USER} PASSWORD '{AUTH_PASSWORD}'")

    def run_migrations(self) -> None:
        """``tenant-proxy migrate`` on the stack's database, the path production takes.  In a
        thread of its own: a caller may be inside a running event loop (async fixtures)."""
        from .migrate import MigrateError, migrate

        def run() -> None:
            asyncio.run(migrate(self.admin_dsn, SQL_DIR, lambda line: None))

        with ThreadPoolExecutor(1) as pool:
            try:
                pool.submit(run).result()
            except MigrateError as exc:
                raise StackError(f"migrate: {exc}") from None

    def load_demo(self) -> None:
        self.psql(file=DEMO_SQL)

    def _start_bouncer(self) -> None:
        ini = self.root / "pgbouncer.ini"
        userlist = self.root / "userlist.txt"
        # Only PgBouncer's own users: auth_user, and the superuser as the stats user.  The
        # gateway's role is found through auth_query, so its secret lives in PostgreSQL only.
        self._write_as_owner(userlist, f'"{AUTH_USER}" "{AUTH_PASSWORD}"\n"{SUPERUSER}" "{SUPERUSER_PASSWORD}"\n')
        values = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.bouncer_port),
            "unix_socket_dir": str(self.run_dir),
            "auth_file": str(userlist),
            "logfile": str(self.root / "pgbouncer.log"),
            "pidfile": str(self.run_dir / "pgbouncer.pid"),
            "default_pool_size": str(self.pool_size),
            "stats_users": SUPERUSER,
        }
        databases = {DATABASE: f"host=127.0.0.1 port={self.pg_port} dbname={DATABASE}"}
        text = render_pgbouncer_ini(PGBOUNCER_INI.read_text(), values, databases)
        if self.tls:  # settings the reference has only as comments
            text = text.replace("[pgbouncer]\n", "[pgbouncer]\n" + "".join(
                f"{k} = {v}\n" for k, v in self._client_tls().items()), 1)
        self._write_as_owner(ini, text)
        self.start_bouncer()

    def _client_tls(self) -> dict[str, str]:
        """A throwaway self-signed certificate; clients may use TLS or not (``allow``)."""
        key, cert = self.root / "bouncer.key", self.root / "bouncer.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        key.chmod(0o600)
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            for path in (key, cert):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        return {"client_tls_sslmode": "allow", "client_tls_key_file": str(key), "client_tls_cert_file": str(cert)}

    def start_bouncer(self) -> None:
        """Start (or restart) PgBouncer with the rendered config and wait until it listens."""
        log = open(self.root / "pgbouncer.stderr", "ab")  # noqa: SIM115 - owned by the child process
        self._bouncer = subprocess.Popen([pgbouncer_binary(), str(self.root / "pgbouncer.ini")], stdout=log,
                                         stderr=log, cwd="/", **self._user_kwargs())  # type: ignore[call-overload]
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._bouncer.poll() is not None:
                raise StackError(f"pgbouncer exited: {(self.root / 'pgbouncer.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.bouncer_port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise StackError("pgbouncer did not start listening within 15 s")

    def stop_bouncer(self) -> None:
        if self._bouncer is not None and self._bouncer.poll() is None:
            self._bouncer.terminate()
            try:
                self._bouncer.wait(10)
            except subprocess.TimeoutExpired:
                self._bouncer.kill()
                self._bouncer.wait()
        self._bouncer = None

    def restart_postgres(self) -> None:
        """Restart PostgreSQL (fast shutdown), as a failover or an upgrade would."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgresql.log"),
                  "-m", "fast", "-w", "-t", "60", "restart")

    def stop(self) -> None:
        self.stop_bouncer()
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


class RedisServer:
    """The machine's redis-server on a free port in ``root`` (tests, benchmarks): the
    fleet's shared rate limits (limits.redis_url)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port} (installed? `make test` installs it)")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None
