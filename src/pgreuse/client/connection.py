"""A ``psycopg.Connection`` that leases a backend from the broker for each transaction.

At rest, libpq's socket is the *parking* connection to the broker. :meth:`Connection.wait` is the one
door every network operation of psycopg goes through; before it, a backend is leased and its socket
``dup2``'d onto libpq's fd number, and after it the lease is given back if the connection is idle
(DESIGN.md §3). libpq keeps only the integer fd, so it never notices the swap.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import pq

from .channel import Channel, channel_for
from .guard import StatementGuard, check_prepare_threshold
from .held import Lease
from .hot import LEASED
from .lease import (
    DEFAULT_LEASE_TIMEOUT,
    LeaseCore,
)

__all__ = ["Connection", "Cursor", "Lease", "connect"]


class Cursor(StatementGuard, psycopg.Cursor[Any]):
    """psycopg's cursor, noting what each statement leaves in the session (see ``session.py``)."""


class Connection(LeaseCore, psycopg.Connection[Any]):
    """A psycopg connection whose backend is leased from a pgreuse broker per transaction.

    Use it exactly like ``psycopg.Connection``; ``conn.lease`` shows the backend held right now.
    Server-side prepared statements are off (``prepare_threshold`` is ``None``): their names are per
    connection in psycopg and would collide on shared backends.
    """

    _channel: Channel | None = None

    def __init__(self, pgconn: pq.abc.PGconn, *args: Any, **kwargs: Any) -> None:
        super().__init__(pgconn, *args, **kwargs)
        self._init_lease()
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
        check_prepare_threshold(prepare_threshold)
        reopened, key = cls._from_kept(conninfo, lease_timeout, kwargs)
        if reopened is not None:
            assert isinstance(reopened, Connection)
            return reopened
        channel = channel_for(cls._control_path(conninfo, kwargs))
        conn = super().connect(conninfo, prepare_threshold=None, **kwargs)
        assert isinstance(conn, Connection)
        conn._bind(channel, lease_timeout)
        conn._park_key = key
        return conn

    # -- the swap point ---------------------------------------------------------------------------

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        # (This runs for every statement: the checks on the attributes spare calls when idle. The
        # C hot path does the usual claim and the usual clean end; anything else, or all of it
        # without the C module, is the Python path's.)
        if self._held is None and not self._proxying:
            got = self._hot.begin(self, gen)
            if got != LEASED:
                self._begin(gen, got)  # (a claim in the table, a wait there, or the proxy)
        try:
            return super().wait(gen, *args, **kwargs)
        except psycopg.Error as exc:
            mapped = self._refused(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            if (
                (self._held is not None or self._proxying)
                and not self._hot.end(self)
                and not self._after_wait_done()
            ):
                self._after_wait_steps_run()

    def _after_wait(self) -> None:
        if not self._after_wait_done():
            self._after_wait_steps_run()

    def _after_wait_steps_run(self) -> None:
        steps = self._after_wait_steps()
        for stmt in steps:
            try:
                super().wait(self._exec_command(stmt))
            except BaseException as exc:
                steps.throw(exc)  # settles the lease as broken, and raises
                raise

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[psycopg.Pipeline]:
        # libpq leaves pipeline mode in exit_pipeline_mode(), after the last wait(): give the
        # lease back here if that left the connection idle — also when the block raised.
        try:
            with super().pipeline() as p:
                yield p
        finally:
            with self.lock:
                self._after_wait()

    @contextlib.contextmanager
    def _pipeline_nolock(self) -> Iterator[psycopg.Pipeline]:
        # psycopg >= 3.3 runs executemany() in this pipeline (the caller holds the lock).
        try:
            with super()._pipeline_nolock() as p:
                yield p
        finally:
            self._after_wait()

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        if os.getpid() != self._owner_pid:
            # A forked child: its copy must neither terminate nor release the parent's backend.
            self._neuter_in_child()
            super().close()
            return
        if self.closed:
            self._give_back(broken=True)
            self._close_home()
            return
        if self._held is not None:
            # A stream() or copy() left open holds the connection lock in its suspended generator
            # and never lets go while close() waits: rollback() would wait for it forever. Roll back
            # only if the lock is free now (psycopg's own close() takes no lock at all).
            if self.lock.acquire(blocking=False):
                self.lock.release()
                with contextlib.suppress(psycopg.Error):
                    if self.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                        self.rollback()
            # Still leased (no rollback, it failed, or a COPY/stream was left open): the backend's
            # state is unknown, so the broker must not lend it as is (it closes it; PostgreSQL
            # rolls back).
            self._give_back(broken=True)
        elif self._park():
            return  # its parking connection is kept for the next connect()
        super().close()  # Terminate now reaches the parking socket only (rule 5)
        self._close_home()

    def cancel_safe(self, *args: Any, **kwargs: Any) -> None:
        self._cancel_sent = True
        super().cancel_safe(*args, **kwargs)


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

    Takes psycopg's ``connect()`` arguments (``autocommit``, ``row_factory``, ...). A transaction
    that finds no idle backend waits in the broker's proxy, which raises
    :class:`pgreuse.PoolTimeout` after its ``--wait-timeout`` (``lease_timeout`` is accepted for
    compatibility and unused).
    """
    return Connection.connect(conninfo, **kwargs)
