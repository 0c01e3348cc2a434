"""The lease and the fd swap, shared by the sync and the async connection (DESIGN.md §3).

:class:`LeaseCore` holds everything that does not wait: deciding whether an operation needs a backend,
swapping the granted socket onto libpq's fd number and back, deciding at the end of each ``wait()``
whether the lease goes back, and what the session left behind. The two connection classes add only
how they wait for the broker's grant (blocking, or with anyio) and how they run the rare statement
that restores session parameters.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import attrs
import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict

from .. import errors, telemetry
from ..wire import control
from .channel import ChannelBase, Grant
from .session import LISTEN_REFUSED, REPORTED_PARAMETERS, Verdict, changed_parameters, classify_sql

logger = logging.getLogger("pgreuse.client")

# psycopg generators that only check the connection's state when it is idle and outside a
# pipeline: running them needs no backend, so no lease is taken for them (Django sets autocommit on
# every new connection; commit() and rollback() with no transaction open return at once).
STATE_ONLY_GENERATORS = frozenset(
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
    span: telemetry.LeaseSpan | None = None


class AfterWait(enum.Enum):
    KEEP = 0  # mid-transaction, COPY, pipeline, stream: the backend stays
    BROKEN = 1  # libpq lost the connection
    IDLE = 2  # back at ReadyForQuery 'I': give it back
    PROXIED_IDLE = 3  # a proxy-only pool, idle: only the session parameters to check


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


def check_prepare_threshold(value: int | None) -> None:
    if value is not None:
        raise errors.NotSupported(
            f"prepare_threshold={value!r}: server-side prepared statements cannot follow a "
            "connection across shared backends; leave prepare_threshold=None"
        )


WITH_HOLD_REFUSED = (
    "WITH HOLD cursors outlive their transaction, and the backend goes to another client at "
    "commit; fetch the rows inside the transaction instead (withhold=False)"
)


class StatementGuard:
    """Cursor mixin: note what each statement leaves in the session (see ``session.py``)."""

    _conn: Any

    def _convert_query(self, *args: Any, **kwargs: Any) -> Any:
        # Every way of sending a statement (execute, executemany, stream, copy, a server cursor's
        # DECLARE) goes through here, and the result holds the final query bytes, whatever form
        # the query was written in.
        pgq = super()._convert_query(*args, **kwargs)  # type: ignore[misc]
        conn = self._conn
        if isinstance(conn, LeaseCore):
            conn._note_statement(pgq.query)
        return pgq


_guarded_classes: dict[type[Any], type[Any]] = {}


def guarded(cursor_class: type[Any]) -> type[Any]:
    """``cursor_class`` with :class:`StatementGuard` first in its MRO (one class per input)."""
    if issubclass(cursor_class, StatementGuard):
        return cursor_class
    made = _guarded_classes.get(cursor_class)
    if made is None:
        made = type(f"Guarded{cursor_class.__name__}", (StatementGuard, cursor_class), {})
        made = _guarded_classes.setdefault(cursor_class, made)
    return made


class LeaseCore:
    """Mixin for psycopg connection classes: the lease state and the swap."""

    if TYPE_CHECKING:
        pgconn: pq.abc.PGconn
        _pipeline: Any
        _prepared: Any

    _held: _Held | None = None
    _channel: ChannelBase | None = None
    _owner_pid: int = 0
    _lease_timeout: float = DEFAULT_LEASE_TIMEOUT
    _session_dirty: bool = False
    _baseline: dict[str, str | None]
    _pool_telemetry: telemetry.PoolTelemetry | None = None

    def _init_lease(self) -> None:
        self._held = None
        self._owner_pid = os.getpid()
        self._session_dirty = False
        self._baseline = {}

    # Any cursor class the application (or a framework: Django passes its own) installs keeps the
    # session-state guard: psycopg's connect(cursor_factory=...) and later assignments land here.
    @property
    def cursor_factory(self) -> Any:
        return self._cursor_factory

    @cursor_factory.setter
    def cursor_factory(self, cls: type[Any]) -> None:
        self._cursor_factory = guarded(cls)

    @property
    def server_cursor_factory(self) -> Any:
        return self._server_cursor_factory

    @server_cursor_factory.setter
    def server_cursor_factory(self, cls: type[Any]) -> None:
        self._server_cursor_factory = guarded(cls)

    @staticmethod
    def _control_path(conninfo: str, prepare_threshold: int | None, kwargs: dict[str, Any]) -> str:
        """Check the arguments of ``connect()``; return the broker's control socket path."""
        check_prepare_threshold(prepare_threshold)
        socket_dir, port = broker_socket_dir_and_port(conninfo_to_dict(conninfo, **kwargs))
        return os.path.join(socket_dir, f".s.PGREUSE.{port}")

    def _bind(self, channel: ChannelBase, lease_timeout: float) -> None:
        """After psycopg's connect: the channel to lease through, and the session's baseline."""
        self._channel = channel
        self._lease_timeout = lease_timeout
        self._baseline = self._reported()

    # prepare_threshold is forced to None (DESIGN.md §3 rule 6).
    @property
    def prepare_threshold(self) -> int | None:
        return None

    @prepare_threshold.setter
    def prepare_threshold(self, value: int | None) -> None:
        check_prepare_threshold(value)
        self._prepared.prepare_threshold = None

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("withhold"):
            raise errors.NotSupported(WITH_HOLD_REFUSED)
        return super().cursor(*args, **kwargs)  # type: ignore[misc]

    def notifies(self, *args: Any, **kwargs: Any) -> Any:
        raise errors.NotSupported(LISTEN_REFUSED)

    def __repr__(self) -> str:
        closed = self.pgconn.status == pq.ConnStatus.BAD
        return f"<pgreuse.{type(self).__name__} {self._describe()} closed={closed}>"

    def __del__(self, *args: Any, **kwargs: Any) -> None:
        if self._held is not None:
            with contextlib.suppress(Exception):
                if os.getpid() == self._owner_pid:
                    # Dropped while leased: give the backend back as broken rather than let
                    # libpq's finaliser send Terminate into it.
                    self._give_back(broken=True)
                else:
                    self._neuter_in_child()
        sup = getattr(super(), "__del__", None)
        if sup is not None:
            sup()

    @property
    def lease(self) -> Lease | None:
        """The backend leased right now, or ``None`` between transactions."""
        held = self._held
        return held.lease if held else None

    def _describe(self) -> str:
        held = self._held
        return f"leased slot={held.lease.slot} pid={held.lease.backend_pid}" if held else "parked"

    # -- before a wait ----------------------------------------------------------------------------

    def _needs_lease(self, gen: Any) -> bool:
        if self._held is not None:
            return False
        name = getattr(getattr(gen, "gi_code", None), "co_name", "")
        state_only = (
            name in STATE_ONLY_GENERATORS
            and self.pgconn.transaction_status == pq.TransactionStatus.IDLE
            and self.pgconn.pipeline_status == pq.PipelineStatus.OFF
            and self._pipeline is None
        )
        if state_only:
            return False
        if os.getpid() != self._owner_pid:
            raise errors.WrongProcess(
                f"this pgreuse connection was opened in process {self._owner_pid} and is used in "
                f"process {os.getpid()}: open connections after fork (e.g. in Gunicorn's "
                "post_fork or lazily per request), not in the master with preload_app"
            )
        if self._channel is None:
            raise errors.BrokerUnavailable("connection was not opened with pgreuse.connect()")
        if self._channel.proxy_only:
            # TLS backends cannot be handed off: libpq's queries go to the parking socket as they
            # are, and the broker proxies them (DESIGN.md §3 rule 10, §5).
            return False
        # A closed or broken connection: psycopg reports it itself.
        return bool(self.pgconn.status == pq.ConnStatus.OK)

    def _lost_broker(self) -> None:
        """The broker that parked this connection is gone: it can never lease again.

        Make it report closed/broken, as psycopg does for a lost server, so frameworks open a new one.
        """
        self.pgconn.finish()

    def _install(self, grant: Grant, t0: float) -> None:
        """Swap the granted backend onto libpq's fd number (rule 3)."""
        assert self._channel is not None
        fd_number = self.pgconn.socket
        t1 = time.monotonic()
        try:
            home = os.dup(fd_number)
            # O_NONBLOCK and socket options are left alone: they belong to the open file
            # description the broker shares.
            os.dup2(grant.fd, fd_number, inheritable=False)
        except BaseException:
            os.close(grant.fd)
            self._channel.release(grant.slot, grant.generation, control.Outcome.CLEAN)
            raise
        os.close(grant.fd)
        lease = Lease(grant.slot, grant.generation, grant.backend_pid, t1 - t0, t1)
        self._held = _Held(lease, fd_number, home, telemetry.lease_granted(self._telemetry(), lease))

    def _telemetry(self) -> telemetry.PoolTelemetry | None:
        if self._pool_telemetry is None and self._channel is not None:
            db = self.pgconn.db.decode()
            self._pool_telemetry = telemetry.for_control_socket(self._channel.path, db)
        return self._pool_telemetry

    # -- after a wait -----------------------------------------------------------------------------

    def _after_wait_state(self) -> AfterWait:
        if self._held is None:
            channel = self._channel
            if channel is not None and channel.proxy_only and self._idle_now():
                # Through the proxy: no lease to give back, but a changed reported parameter must
                # still be put back in libpq's cache (the broker resets the backend itself).
                return AfterWait.PROXIED_IDLE
            return AfterWait.KEEP
        if self.pgconn.status == pq.ConnStatus.BAD:
            return AfterWait.BROKEN
        return AfterWait.IDLE if self._idle_now() else AfterWait.KEEP

    def _idle_now(self) -> bool:
        pgconn = self.pgconn
        return bool(
            pgconn.status == pq.ConnStatus.OK
            and pgconn.transaction_status == pq.TransactionStatus.IDLE
            and pgconn.pipeline_status == pq.PipelineStatus.OFF
        )

    def _lease_failed(self, exc: BaseException, t0: float) -> None:
        """The broker did not grant: record it, and retire the connection if the broker is gone."""
        telemetry.lease_denied(self._telemetry(), exc, time.monotonic() - t0)
        if isinstance(exc, errors.BrokerUnavailable):
            self._lost_broker()

    def _after_wait_steps(self) -> Generator[sql.SQL | sql.Composed, None, None]:
        """The end of every ``wait()``: yield the statements to run (usually none), settle the lease.

        The sync and async connections drive this generator with their own wait; an exception a
        statement raised is thrown back in, and the lease is given back as broken.
        """
        state = self._after_wait_state()
        if state is AfterWait.BROKEN:
            self._give_back(broken=True)
        elif state is AfterWait.IDLE:
            restore = self._restore_statements()
            try:
                yield from restore
            except BaseException:
                # A refused reset, or an interrupt mid-reset: the backend's state is unknown.
                self._give_back(broken=True)
                raise
            self._give_back(broken=False, dirty=self._take_dirty() or bool(restore))
        elif state is AfterWait.PROXIED_IDLE:
            yield from self._restore_statements()

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
        # else: libpq already closed that fd number when the backend failed (rule 4); never dup2
        # into a number it gave up — it may belong to someone else by now.
        os.close(held.home)
        assert self._channel is not None
        if broken:
            outcome = control.Outcome.BROKEN
        elif dirty:
            outcome = control.Outcome.DIRTY  # the broker runs DISCARD ALL before lending it again
        else:
            outcome = control.Outcome.CLEAN
        self._channel.release(held.lease.slot, held.lease.generation, outcome)
        telemetry.lease_released(self._telemetry(), held.lease, held.span, broken=broken, dirty=dirty)

    def _take_dirty(self) -> bool:
        dirty, self._session_dirty = self._session_dirty, False
        return dirty

    # -- session state (DESIGN.md §6) -------------------------------------------------------------

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

    def _restore_statements(self) -> list[sql.SQL | sql.Composed]:
        """Statements that put back the reported parameters a statement changed (usually none).

        They run while the backend is still leased, so PostgreSQL's ParameterStatus answers bring
        libpq's cache (which psycopg's adapters read: TimeZone, DateStyle, client_encoding) back to
        the values every backend of the pool has.
        """
        changed = changed_parameters(self._baseline, self._reported())
        if not changed:
            return []
        logger.debug("restoring session parameters %s after a lease", changed)
        statements: list[sql.SQL | sql.Composed] = []
        if "session_authorization" in changed or "is_superuser" in changed:
            statements.append(sql.SQL("RESET SESSION AUTHORIZATION"))
        settable = [n for n in changed if n not in ("session_authorization", "is_superuser")]
        if settable:
            calls = sql.SQL(", ").join(
                sql.SQL("pg_catalog.set_config({}, {}, false)").format(
                    sql.Literal(n), sql.Literal(self._baseline.get(n) or "")
                )
                for n in settable
            )
            statements.append(sql.SQL("SELECT {}").format(calls))
        return statements

    # -- fork -------------------------------------------------------------------------------------

    def _neuter_in_child(self) -> None:
        """In a forked child, point libpq's fd at a dead socket: its Terminate must not reach the
        parent's parking connection (or a backend the parent holds)."""
        with contextlib.suppress(psycopg.OperationalError, OSError):
            a, b = socket.socketpair()
            b.close()
            os.dup2(a.fileno(), self.pgconn.socket, inheritable=False)
            a.close()
        self._held = None
