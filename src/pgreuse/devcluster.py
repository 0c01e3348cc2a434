"""A throwaway PostgreSQL cluster (initdb + pg_ctl in a temp dir) for the demo and the tests.

Contract: :meth:`DevCluster.create` returns a *running* cluster that listens on a Unix socket in a
short directory under ``/tmp`` and on ``127.0.0.1:<free port>``, with a database ``pgreuse_test``
and three password roles (``md5user``/``md5pass`` over ``md5``, ``scramuser``/``scrampass`` over
``scram-sha-256``, ``pwuser``/``pwpass`` over ``password``; TCP only, the Unix socket trusts
everyone). The cluster is tuned for speed, not durability (``fsync=off``): never give it data you
want. :meth:`DevCluster.destroy` is always safe to call, also after a failed start, and twice.

When the process runs as root (CI containers), initdb and pg_ctl run as the ``postgres`` user
through ``runuser``, because initdb refuses to run as root. Finding the programs, running them and
killing a postmaster that will not stop are in :mod:`pgreuse.devcluster_commands`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

import attrs
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .devcluster_commands import (
    _RUN_AS,
    ClusterError,
    _run_as_root,
    find_pg_bindir,
    kill_postmaster,
    require_run_as_user,
    run_program,
)

__all__ = ["PASSWORD_ROLES", "ClusterError", "DevCluster", "find_pg_bindir"]

logger = logging.getLogger("pgreuse.devcluster")

#: role -> (password, pg_hba method); each may log in over TCP only with its own method.
PASSWORD_ROLES: Mapping[str, tuple[str, str]] = {
    "md5user": ("md5pass", "md5"),
    "scramuser": ("scrampass", "scram-sha-256"),
    "pwuser": ("pwpass", "password"),
}

_START_TIMEOUT = 60  # seconds, pg_ctl -t
_STOP_TIMEOUT = 30  # seconds before a fast stop is escalated to an immediate one
_PORT_ATTEMPTS = 5  # another process may grab the free port between probe and bind
_BIND_FAILURE = re.compile(r"could not bind|could not create any TCP/IP sockets|already in use")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"(no server log at {path}: {exc})"


def _conf_value(value: str) -> str:
    # Quoting is valid for every parameter type and spares deciding what counts as a bare word.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@attrs.define
class DevCluster:
    """A PostgreSQL cluster in temporary directories, owned by this process.

    Use :meth:`create` to get a running one and :meth:`destroy` (or ``with``) to get rid of it.
    """

    bindir: str
    datadir: str
    socket_dir: str
    port: int
    superuser: str = "postgres"
    dbname: str = "pgreuse_test"
    # postgresql.conf settings we own, rewritten in full when the port changes.
    _settings: dict[str, str] = attrs.field(init=False, factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        *,
        max_connections: int = 40,
        extra_conf: Mapping[str, str] | None = None,
        dbname: str = "pgreuse_test",
    ) -> DevCluster:
        """initdb, configure, start, and create the test database and roles.

        Raises:
            ClusterError: no server binaries, or initdb/start/setup failed (with the log tail).
        """
        bindir = find_pg_bindir()
        require_run_as_user()
        port = _free_port()
        # The socket path (<dir>/.s.PGSQL.<port>) must stay under 107 bytes: a short dir in /tmp,
        # never pytest's tmp_path or a long $TMPDIR.
        socket_dir = tempfile.mkdtemp(prefix="pgr-", dir="/tmp")
        try:
            datadir = tempfile.mkdtemp(prefix="pgr-data-", dir="/tmp")
        except BaseException:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        cluster = cls(
            bindir=bindir,
            datadir=datadir,
            socket_dir=socket_dir,
            port=port,
            dbname=dbname,
        )
        try:
            cluster._initdb(max_connections, extra_conf or {})
            cluster._start(may_change_port=True)
            cluster._setup()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    # -- paths -------------------------------------------------------------------------------------

    @property
    def log_file(self) -> str:
        """The server log (pg_ctl -l)."""
        return os.path.join(self.datadir, "server.log")

    @property
    def _pid_file(self) -> str:
        return os.path.join(self.datadir, "postmaster.pid")

    # -- conninfo ----------------------------------------------------------------------------------

    def dsn(self, **overrides: str) -> str:
        """Conninfo for the Unix socket, as the superuser, to ``dbname``; keywords override."""
        params: dict[str, str] = {
            "host": self.socket_dir,
            "port": str(self.port),
            "user": self.superuser,
            "dbname": self.dbname,
        }
        params.update(overrides)
        return make_conninfo("", **params)

    def tcp_dsn(self, **overrides: str) -> str:
        """Conninfo for ``127.0.0.1:<port>``, no TLS (handoff needs plaintext); keywords override.

        Overrides such as ``user="md5user", password="md5pass"`` log in as a password role.
        """
        params: dict[str, str] = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "sslmode": "disable",
            "user": self.superuser,
            "dbname": self.dbname,
        }
        params.update(overrides)
        return make_conninfo("", **params)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        Raises:
            ClusterError: pg_ctl failed or timed out; the message holds the server log tail.
        """
        self._start(may_change_port=False)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; a no-op when it is not running.

        A fast stop that hangs for more than 30 s is escalated to ``-m immediate``, then SIGKILL.

        Raises:
            ClusterError: the server could not be stopped at all.
        """
        if not self.is_running():
            return
        modes = [mode] if mode == "immediate" else [mode, "immediate"]
        for m in modes:
            try:
                result = self._pg_ctl(
                    ["stop", "-w", "-t", str(_STOP_TIMEOUT), "-m", m], timeout=_STOP_TIMEOUT + 15
                )
            except subprocess.TimeoutExpired:
                logger.warning("pg_ctl stop -m %s on %s timed out", m, self.datadir)
                continue
            if result.returncode == 0 or not self.is_running():
                return
            logger.warning("pg_ctl stop -m %s on %s failed: %s", m, self.datadir, result.stdout)
        kill_postmaster(self._pid_file, self.datadir)

    def restart(self) -> None:
        """Stop (fast) and start again on the same port and socket; existing connections break.

        Raises:
            ClusterError: the server did not come back.
        """
        self.stop()
        self.start()
        self.wait_ready()

    def set_hba(self, rules: Sequence[str]) -> None:
        """Replace pg_hba.conf with ``rules`` (one line each) and reload the server.

        Raises:
            ClusterError: the reload failed (the server log says why).
        """
        self._write_owned("pg_hba.conf", "\n".join(rules) + "\n")
        result = self._pg_ctl(["reload"], timeout=30)
        if result.returncode != 0:
            raise ClusterError(f"pg_ctl reload on {self.datadir} failed:\n{result.stdout}")

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll until a connection over the Unix socket succeeds.

        Raises:
            ClusterError: still not connectable after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(dbname="postgres"), connect_timeout=5) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"cluster at {self.socket_dir} port {self.port} not ready after "
                        f"{timeout}s: {exc}\n--- {self.log_file} ---\n{_tail(self.log_file)}"
                    ) from exc
            time.sleep(0.1)

    def is_running(self) -> bool:
        """Whether a postmaster owns the data directory (pg_ctl status)."""
        if not os.path.exists(self._pid_file):
            return False
        try:
            return self._pg_ctl(["status"], timeout=30).returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            return True  # unknown: let stop() try its escalation

    def destroy(self) -> None:
        """Stop the server and delete its directories. Safe after a failed start, and idempotent."""
        try:
            if os.path.isdir(self.datadir):
                self.stop()
        except Exception:
            logger.exception("stopping the cluster in %s failed; deleting it anyway", self.datadir)
            kill_postmaster(self._pid_file, self.datadir)
        for path in (self.datadir, self.socket_dir):
            shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> DevCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- internals ---------------------------------------------------------------------------------

    def _pg_ctl(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        return run_program(self.bindir, "pg_ctl", ["-D", self.datadir, *args], timeout=timeout)

    def _initdb(self, max_connections: int, extra_conf: Mapping[str, str]) -> None:
        # Clients running as any user (the broker's tests) must reach the socket.
        os.chmod(self.socket_dir, 0o755)
        if _run_as_root():
            for path in (self.socket_dir, self.datadir):
                shutil.chown(path, user=_RUN_AS, group=None)
        args = ["-D", self.datadir, "-A", "trust", "-U", self.superuser]
        args += ["--no-sync", "-E", "UTF8", "--locale=C"]
        try:
            result = run_program(self.bindir, "initdb", args, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"initdb -D {self.datadir} timed out after 120 s") from exc
        if result.returncode != 0:
            raise ClusterError(f"initdb -D {self.datadir} failed:\n{result.stdout}")
        self._settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.socket_dir,
            "max_connections": str(max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "logging_collector": "off",
            **extra_conf,
        }
        self._write_conf()
        with open(os.path.join(self.datadir, "postgresql.conf"), "a", encoding="utf-8") as f:
            f.write("\n# pgreuse.devcluster settings (the port may be rewritten on bind failure)\n")
            f.write("include 'pgreuse.conf'\n")
        hba = ["local all all trust"]
        hba += [f"host all {role} 127.0.0.1/32 {how}" for role, (_, how) in PASSWORD_ROLES.items()]
        hba += ["host all all 127.0.0.1/32 trust"]
        self._write_owned("pg_hba.conf", "\n".join(hba) + "\n")

    def _write_conf(self) -> None:
        lines = [f"port = {self.port}"]
        lines += [f"{key} = {_conf_value(value)}" for key, value in self._settings.items()]
        self._write_owned("pgreuse.conf", "\n".join(lines) + "\n")

    def _write_owned(self, name: str, text: str) -> None:
        path = os.path.join(self.datadir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o600)
        if _run_as_root():
            shutil.chown(path, user=_RUN_AS, group=None)

    def _start(self, *, may_change_port: bool) -> None:
        attempts = _PORT_ATTEMPTS if may_change_port else 1
        for attempt in range(1, attempts + 1):
            log_offset = os.path.getsize(self.log_file) if os.path.exists(self.log_file) else 0
            args = ["start", "-w", "-t", str(_START_TIMEOUT), "-l", self.log_file]
            try:
                result = self._pg_ctl(args, timeout=_START_TIMEOUT + 30)
            except subprocess.TimeoutExpired as exc:
                raise ClusterError(
                    f"pg_ctl start on {self.datadir} hung for {_START_TIMEOUT + 30}s\n"
                    f"--- {self.log_file} ---\n{_tail(self.log_file)}"
                ) from exc
            if result.returncode == 0:
                return
            new_log = self._log_since(log_offset)
            if attempt < attempts and _BIND_FAILURE.search(new_log):
                logger.info("port %d taken before postgres bound it; retrying", self.port)
                self.port = _free_port()
                self._write_conf()
                continue
            raise ClusterError(
                f"pg_ctl start on {self.datadir} (port {self.port}) failed:\n{result.stdout}"
                f"--- {self.log_file} ---\n{_tail(self.log_file)}"
            )

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return ""

    def _setup(self) -> None:
        try:
            with psycopg.connect(self.dsn(dbname="postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
                for role, (password, method) in PASSWORD_ROLES.items():
                    # The stored form decides which methods can verify it: md5 needs an md5 hash.
                    encryption = "md5" if method == "md5" else "scram-sha-256"
                    conn.execute(sql.SQL("SET password_encryption = {}").format(sql.Literal(encryption)))
                    conn.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                            sql.Identifier(role), sql.Literal(password)
                        )
                    )
                    conn.execute(
                        sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(
                            sql.Identifier(self.dbname), sql.Identifier(role)
                        )
                    )
            # PG15 no longer lets every role create objects in schema public.
            with psycopg.connect(self.dsn(), autocommit=True) as conn:
                for role in PASSWORD_ROLES:
                    conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(role)))
        except psycopg.Error as exc:
            raise ClusterError(
                f"setting up roles and database {self.dbname!r} failed: {exc}\n"
                f"--- {self.log_file} ---\n{_tail(self.log_file)}"
            ) from exc
