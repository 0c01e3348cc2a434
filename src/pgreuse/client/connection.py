"""A ``psycopg.Connection`` that leases a backend from the broker for each transaction.

At rest, libpq's socket is the *parking* connection to the broker. :meth:`Connection.wait` is the one
door every network operation of psycopg goes through; before it, a backend is leased and its socket
``dup2``'d onto libpq's fd number, and after it the lease is given back if the connection is idle
(DESIGN.md §3). libpq keeps only the integer fd, so it never notices the swap.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import weakref
from collections.abc import Iterator
from typing import Any

import attrs
import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict

from .. import errors
from ..wire import control
from .channel import Channel, channel_for
from .session import LISTEN_REFUSED, REPORTED_PARAMETERS, Verdict, changed_parameters, classify_sql

logger = logging.getLogger("pgreuse.client")

# psycopg generators that only check the connection's state when it is idle and outside a
# pipeline: running them needs no backend, so no lease is taken for them (Django sets autocommit on
# every new connection; commit() and rollback() with no transaction open return at once).
_STATE_ONLY_GENERATORS = frozenset(
    {
        "_set_autocommit_gen",
        "_set_isolation_level_gen",
        "_set_read_only_gen",
        "_set_deferrable_gen",
        "_commit_gen",
        "_rollback_gen",
    }
)

# The broker answers an Acquire within its own --wait-timeout; this bounds our wait when it does not.
DEFAULT_LEASE_TIMEOUT = 300.0


@attrs.frozen
class Lease:
    """The backend a connection holds right now (``conn.lease``; ``None`` at rest)."""

    slot: int
    generation: int
    backend_pid: int  # the real PostgreSQL backend pid; conn.info.backend_pid is the parking key
    waited: float  # seconds spent waiting for the broker's grant
    started: float  # time.monotonic() when granted


@attrs.define
class _Held:
    lease: Lease
    fd_number: int  # libpq's socket fd, now pointing at the backend
    home: int  # dup of the parking socket, swapped back on release


def broker_socket_dir_and_port(params: dict[str, Any]) -> tuple[str, int]:
    host = str(params.get("host") or os.environ.get("PGHOST", ""))
    port = str(params.get("port") or os.environ.get("PGPORT", "") or "5432")
    if not host.startswith("/") or "," in host:
        raise psycopg.ProgrammingError(
            f"pgreuse.connect() needs host=<the broker's socket directory> (an absolute path), got "
            f"host={host!r}; e.g. pgreuse.connect('host=/run/pgreuse port=6432 dbname=app')"
        )
    try:
        return host, int(port)
    except ValueError:
        raise psycopg.ProgrammingError(f"port={port!r} is not a number") from None


class Cursor(psycopg.Cursor[Any]):
    """psycopg's cursor, noting what each statement leaves in the session (see ``session.py``)."""

    def _convert_query(self, *args: Any, **kwargs: Any) -> Any:
        # Every way of sending a statement (execute, executemany, stream, copy) goes through here,
        # and the result holds the final query bytes, whatever form the query was written in.
        pgq = super()._convert_query(*args, **kwargs)
        conn = self._conn
        if isinstance(conn, Connection):
            conn._note_statement(pgq.query)
        return pgq


class Connection(psycopg.Connection[Any]):
    """A psycopg connection whose backend is leased from a pgreuse broker per transaction.

    Use it exactly like ``psycopg.Connection``; ``conn.lease`` shows the backend held right now.
    Server-side prepared statements are off (``prepare_threshold`` is ``None``): their names are per
    connection in psycopg and would collide on shared backends.
    """

    _held: _Held | None = None
    _channel: Channel | None = None
    _owner_pid: int = 0
    _lease_timeout: float = DEFAULT_LEASE_TIMEOUT
    _session_dirty: bool = False
    _baseline: dict[str, str | None]

    def __init__(self, pgconn: pq.abc.PGconn, *args: Any, **kwargs: Any) -> None:
        super().__init__(pgconn, *args, **kwargs)
        self._held = None
        self._owner_pid = os.getpid()
        self._session_dirty = False
        self._baseline = {}
        self.cursor_factory = Cursor
        _live.add(self)

    @classmethod
    def connect(  # type: ignore[override]
        cls,
        conninfo: str = "",
        *,
        prepare_threshold: int | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        **kwargs: Any,
    ) -> Connection:
        """Connect to a pgreuse broker (``host`` = its socket directory, ``port`` = its port).

        Raises:
            NotSupported: ``prepare_threshold`` is not ``None``.
            BrokerUnavailable: no broker answers at ``<host>/.s.PGREUSE.<port>``.
            psycopg.OperationalError: the broker refused the startup (its message says why).
        """
        if prepare_threshold is not None:
            raise errors.NotSupported(
                f"prepare_threshold={prepare_threshold!r}: server-side prepared statements cannot "
                "follow a connection across shared backends; leave prepare_threshold=None"
            )
        params = conninfo_to_dict(conninfo, **kwargs)
        socket_dir, port = broker_socket_dir_and_port(params)
        channel = channel_for(os.path.join(socket_dir, f".s.PGREUSE.{port}"))
        conn = super().connect(conninfo, prepare_threshold=None, **kwargs)
        assert isinstance(conn, Connection)
        conn._channel = channel
        conn._lease_timeout = lease_timeout
        conn._baseline = conn._reported()
        return conn

    # prepare_threshold is forced to None (DESIGN.md §3 rule 6).
    @property
    def prepare_threshold(self) -> int | None:
        return None

    @prepare_threshold.setter
    def prepare_threshold(self, value: int | None) -> None:
        if value is not None:
            raise errors.NotSupported(
                f"prepare_threshold={value!r}: server-side prepared statements cannot follow a "
                "connection across shared backends; leave it None"
            )
        self._prepared.prepare_threshold = None

    @property
    def lease(self) -> Lease | None:
        """The backend leased right now, or ``None`` between transactions."""
        held = self._held
        return held.lease if held else None

    def __repr__(self) -> str:
        held = self._held
        state = f"leased slot={held.lease.slot} pid={held.lease.backend_pid}" if held else "parked"
        return f"<pgreuse.Connection {state} closed={self.closed}>"

    # -- the swap point ---------------------------------------------------------------------------

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self._held is None and not self._state_only(gen):
            self._take_lease()
        try:
            return super().wait(gen, *args, **kwargs)
        finally:
            self._after_wait()

    def _state_only(self, gen: Any) -> bool:
        name = getattr(getattr(gen, "gi_code", None), "co_name", "")
        return (
            name in _STATE_ONLY_GENERATORS
            and self.pgconn.transaction_status == pq.TransactionStatus.IDLE
            and self.pgconn.pipeline_status == pq.PipelineStatus.OFF
            and self._pipeline is None
        )

    def _take_lease(self) -> None:
        if os.getpid() != self._owner_pid:
            raise errors.WrongProcess(
                f"this pgreuse connection was opened in process {self._owner_pid} and is used in "
                f"process {os.getpid()}: open connections after fork (e.g. in Gunicorn's "
                "post_fork or lazily per request), not in the master with preload_app"
            )
        if self._channel is None:
            raise errors.BrokerUnavailable("connection was not opened with pgreuse.connect()")
        if self.pgconn.status != pq.ConnStatus.OK:
            return  # psycopg reports the closed/broken connection itself
        fd_number = self.pgconn.socket
        parking = self.pgconn.backend_pid
        t0 = time.monotonic()
        try:
            if self._channel.dead:
                self._channel = channel_for(self._channel.path)
            grant = self._channel.acquire(parking, self._lease_timeout)
        except errors.BrokerUnavailable:
            # The broker that parked this connection is gone (or restarted and does not know its
            # parking key): the connection can never lease again. Make it report closed/broken,
            # as psycopg does for a lost server, so frameworks open a new one.
            self.pgconn.finish()
            raise
        t1 = time.monotonic()
        try:
            home = os.dup(fd_number)
            # dup2 onto libpq's fd number; the received fd is closed right after. O_NONBLOCK and
            # socket options are left alone: they belong to the file description the broker shares.
            os.dup2(grant.fd, fd_number, inheritable=False)
        except BaseException:
            os.close(grant.fd)
            self._channel.release(grant.slot, grant.generation, control.Outcome.CLEAN)
            raise
        os.close(grant.fd)
        lease = Lease(grant.slot, grant.generation, grant.backend_pid, t1 - t0, t1)
        self._held = _Held(lease, fd_number, home)

    def _after_wait(self) -> None:
        held = self._held
        if held is None:
            return
        pgconn = self.pgconn
        if pgconn.status == pq.ConnStatus.BAD:
            self._give_back(broken=True)
            return
        if (
            pgconn.transaction_status == pq.TransactionStatus.IDLE
            and pgconn.pipeline_status == pq.PipelineStatus.OFF
        ):
            try:
                restored = self._restore_parameters()
            except psycopg.Error:
                # The backend refused the reset: its session state is unknown.
                self._give_back(broken=True)
                raise
            dirty = restored or self._session_dirty
            self._session_dirty = False
            self._give_back(broken=False, dirty=dirty)

    # -- session state (DESIGN.md §6) ----------------------------------------------------------------

    def _reported(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name in REPORTED_PARAMETERS:
            value = self.pgconn.parameter_status(name.encode())
            out[name] = value.decode() if value is not None else None
        return out

    def _note_statement(self, query: bytes) -> None:
        verdict = classify_sql(query)
        if verdict is Verdict.DIRTY:
            self._session_dirty = True
        elif verdict is Verdict.REFUSE:
            raise errors.NotSupported(LISTEN_REFUSED)

    def _restore_parameters(self) -> bool:
        """Put back reported parameters a statement changed; True if the session was touched.

        Runs while the backend is still leased, so that PostgreSQL's ParameterStatus answers bring
        libpq's cache (which psycopg's adapters read: TimeZone, DateStyle, client_encoding) back to
        the values every backend of the pool has.
        """
        changed = changed_parameters(self._baseline, self._reported())
        if not changed:
            return False
        statements: list[sql.SQL | sql.Composed] = []
        if "session_authorization" in changed or "is_superuser" in changed:
            statements.append(sql.SQL("RESET SESSION AUTHORIZATION"))
        settable = [n for n in changed if n not in ("session_authorization", "is_superuser")]
        if settable:
            statements.append(
                sql.SQL("SELECT {}").format(
                    sql.SQL(", ").join(
                        sql.SQL("pg_catalog.set_config({}, {}, false)").format(
                            sql.Literal(n), sql.Literal(self._baseline.get(n) or "")
                        )
                        for n in settable
                    )
                )
            )
        for stmt in statements:
            super().wait(self._exec_command(stmt))
        logger.debug("restored session parameters %s after a lease", changed)
        return True

    def _give_back(self, *, broken: bool, dirty: bool = False) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        libpq_fd = -1
        with contextlib.suppress(psycopg.OperationalError):
            libpq_fd = self.pgconn.socket
        if libpq_fd == held.fd_number:
            os.dup2(held.home, held.fd_number, inheritable=False)
        # else: libpq already closed that fd number when the backend failed; never dup2 into a
        # number it gave up — it may belong to someone else by now.
        os.close(held.home)
        assert self._channel is not None
        if broken:
            outcome = control.Outcome.BROKEN
        elif dirty:
            outcome = control.Outcome.DIRTY  # the broker runs DISCARD ALL before lending it again
        else:
            outcome = control.Outcome.CLEAN
        self._channel.release(held.lease.slot, held.lease.generation, outcome)

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("withhold"):
            raise errors.NotSupported(
                "WITH HOLD cursors outlive their transaction, and the backend goes to another "
                "client at commit; fetch the rows inside the transaction instead (withhold=False)"
            )
        return super().cursor(*args, **kwargs)

    def notifies(self, *args: Any, **kwargs: Any) -> Any:
        raise errors.NotSupported(LISTEN_REFUSED)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[psycopg.Pipeline]:
        with super().pipeline() as p:
            yield p
        # libpq leaves pipeline mode in exit_pipeline_mode(), after the last wait(): give the
        # lease back here if that left the connection idle.
        with self.lock:
            if self._held is not None and self.pgconn.pipeline_status == pq.PipelineStatus.OFF:
                self._after_wait()

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            if self._held is not None:
                self._give_back(broken=True)
            return
        if os.getpid() != self._owner_pid:
            # A forked child: libpq would send Terminate on the parent's parking socket. Point the
            # fd number at a dead socket in this process only, then let psycopg close.
            self._neuter_in_child()
            super().close()
            return
        if self._held is not None:
            with contextlib.suppress(psycopg.Error):
                if self.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                    self.rollback()
            if self._held is not None:
                # Still leased (rollback failed or a COPY/stream was left open): the backend's
                # state is unknown, so the broker must not lend it as is.
                self._give_back(broken=True)
        super().close()  # Terminate now reaches the parking socket only

    def _neuter_in_child(self) -> None:
        import socket  # noqa: PLC0415

        with contextlib.suppress(psycopg.OperationalError, OSError):
            a, b = socket.socketpair()
            b.close()
            os.dup2(a.fileno(), self.pgconn.socket, inheritable=False)
            a.close()
        self._held = None

    def __del__(self, *args: Any, **kwargs: Any) -> None:
        held = self._held
        if held is not None and os.getpid() == self._owner_pid:
            # Dropped while leased: give the backend back as broken rather than let libpq's
            # finaliser send Terminate into it.
            with contextlib.suppress(Exception):
                self._give_back(broken=True)
        elif held is not None:
            with contextlib.suppress(Exception):
                self._neuter_in_child()
        sup = getattr(super(), "__del__", None)
        if sup is not None:
            sup()


_live: weakref.WeakSet[Connection] = weakref.WeakSet()


def _at_exit() -> None:
    # Rule 5 at interpreter exit: libpq's finaliser would send Terminate on whatever fd it holds.
    for conn in list(_live):
        if conn._held is not None and os.getpid() == conn._owner_pid:
            with contextlib.suppress(Exception):
                conn._give_back(broken=True)


atexit.register(_at_exit)


def connect(conninfo: str = "", **kwargs: Any) -> Connection:
    """Open a pgreuse connection: ``pgreuse.connect("host=/run/pgreuse port=6432 dbname=app")``.

    Takes psycopg's ``connect()`` arguments (``autocommit``, ``row_factory``, ...), plus
    ``lease_timeout``, the longest a call waits for the broker's answer (the broker's own
    ``--wait-timeout`` normally answers first with :class:`pgreuse.PoolTimeout`).
    """
    return Connection.connect(conninfo, **kwargs)
