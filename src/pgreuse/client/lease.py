"""The lease and the fd swap, shared by the sync and the async connection (DESIGN.md §3, §4).

:class:`LeaseCore` holds all of it, and none of it waits: at the first ``wait()`` of a transaction it
claims an idle slot in the shared-memory table and swaps that backend's socket onto libpq's fd
number, or, when no slot is idle or the broker's proxy has waiters (they go first), lets the
transaction go through the proxy on the parking connection as it is. At the end of each ``wait()``
it decides whether the lease goes back, and what the session left behind. The two connection classes
add only how they reopen a control channel and how they run the rare statement that restores
session parameters.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict

from .. import errors, telemetry
from ..shm import WAIT_BOUNDS_NS
from ..wire import control
from . import hot
from .channel import ChannelBase
from .guard import ServerCursorGuard, broker_socket_dir_and_port, check_prepare_threshold, guarded
from .held import Lease, _Held
from .parked import Reusable
from .session import LISTEN_REFUSED
from .session_state import SessionState

logger = logging.getLogger("pgreuse.client")

# Kept for compatibility of connect(lease_timeout=...): a transaction that waits for a backend waits
# in the broker's proxy, which answers within its --wait-timeout.
DEFAULT_LEASE_TIMEOUT = 300.0


class AfterWait(enum.Enum):
    KEEP = 0  # mid-transaction, COPY, pipeline, stream: the backend stays
    BROKEN = 1  # libpq lost the connection
    IDLE = 2  # back at ReadyForQuery 'I': give it back
    PROXIED_IDLE = 3  # a transaction that went through the proxy is over: only the parameters to check


# os.getpid() is a system call each time (glibc caches nothing); this runs once per transaction.
_pids = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pids.__setitem__(0, os.getpid()))

# Looked up once: the checks below run once or twice per statement.
_OK = pq.ConnStatus.OK
_IDLE = pq.TransactionStatus.IDLE
_PIPELINE_OFF = pq.PipelineStatus.OFF
_monotonic = time.monotonic
_CLEAN = control.Outcome.CLEAN
_DIRTY = control.Outcome.DIRTY
_BROKEN = control.Outcome.BROKEN


class LeaseCore(Reusable, SessionState):
    """Mixin for psycopg connection classes: the lease state and the swap."""

    if TYPE_CHECKING:
        pgconn: pq.abc.PGconn
        _pipeline: Any
        _prepared: Any

    # A _Held, or the connection's C hot path (pgreuse._slots.Hot) while it holds a lease: both
    # carry the same fields.
    _held: _Held | None = None
    _hot: hot.HotAPI = hot.COLD  # the usual lease start and end in C, or nothing
    _channel: ChannelBase | None = None
    _owner_pid: int = 0
    _home: int = -1  # a dup of the parking socket, swapped back onto libpq's fd at every release
    _proxying: bool = False  # the current transaction goes through the broker's proxy
    _proxy_span: telemetry.LeaseSpan | None = None
    _lease_timeout: float = DEFAULT_LEASE_TIMEOUT
    _pool_telemetry: telemetry.PoolTelemetry | None = None

    def _init_lease(self) -> None:
        self._held = None
        self._owner_pid = os.getpid()
        self._session_dirty = False
        self._proxying = False
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
        self._server_cursor_factory = guarded(cls, ServerCursorGuard)

    @staticmethod
    def _control_path(conninfo: str, kwargs: dict[str, Any]) -> str:
        """The broker's control socket path, from ``connect()``'s arguments (checked: a socket
        directory, a port)."""
        socket_dir, port = broker_socket_dir_and_port(conninfo_to_dict(conninfo, **kwargs))
        return os.path.join(socket_dir, f".s.PGREUSE.{port}")

    def _bind(self, channel: ChannelBase, lease_timeout: float) -> None:
        """After psycopg's connect: the channel to lease through, and the session's baseline."""
        self._channel = channel
        self._lease_timeout = lease_timeout
        self._baseline = self._reported()
        self._baseline_raw = self._reported_raw()
        self._home = os.dup(self.pgconn.socket)
        self._heat()

    def _heat(self) -> None:
        """Give this connection the C hot path (``hot.py``) if its channel claims in a C table."""
        channel = self._channel
        self._hot = hot.for_connection(self, channel) if channel is not None else hot.COLD

    def _cool(self) -> None:
        """No C hot path from now on: it names this connection's libpq connection and home socket,
        which are going (closed, or kept for another connection). A slot it kept for the next
        transaction goes back now."""
        hot_path, self._hot = self._hot, hot.COLD
        hot_path.unlinger()

    def _close_home(self) -> None:
        self._cool()
        home, self._home = self._home, -1
        if home >= 0:
            os.close(home)

    # prepare_threshold is forced to None (DESIGN.md §3 rule 6).
    @property
    def prepare_threshold(self) -> int | None:
        return None

    @prepare_threshold.setter
    def prepare_threshold(self, value: int | None) -> None:
        check_prepare_threshold(value)
        self._prepared.prepare_threshold = None

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
        """The backend claimed right now, or ``None``: between transactions, and in a transaction
        that goes through the broker's proxy (:attr:`proxied`)."""
        held = self._held
        if held is None:
            return None
        return Lease(held.slot, held.generation, held.backend_pid, held.waited, held.started)

    @property
    def proxied(self) -> bool:
        """The current transaction goes through the broker's proxy: no backend was idle when it
        began, or the proxy had waiters (they go first), or the pool's backends use TLS."""
        return self._proxying

    def _describe(self) -> str:
        held = self._held
        return f"leased slot={held.slot} pid={held.backend_pid}" if held else "parked"

    # -- before a wait ----------------------------------------------------------------------------

    def _begin(self, gen: Any, claimed: int | tuple[int, int] = hot.NOTHING) -> None:
        """The first ``wait()`` of a transaction (the caller checked that nothing is held and nothing
        goes through the proxy now): claim a backend for it, or send it to the proxy. Generators that
        only look at the connection's state need no backend. ``claimed``: what the C hot path left
        to this path after the same checks as below (a slot it claimed, or the outcome of its wait
        in the table's queue: ``TableClaims.claim_into``)."""
        code = getattr(gen, "gi_code", None)
        if (
            claimed == hot.NOTHING
            and code is not None
            and code.co_name in hot.STATE_ONLY_GENERATORS
            and self._state_only()
        ):
            return
        if _pids[0] != self._owner_pid:
            raise errors.WrongProcess(
                f"this pgreuse connection was opened in process {self._owner_pid} and is used in "
                f"process {os.getpid()}: open connections after fork (e.g. in Gunicorn's "
                "post_fork or lazily per request), not in the master with preload_app"
            )
        channel = self._channel
        if channel is None:
            raise errors.BrokerUnavailable("connection was not opened with pgreuse.connect()")
        pgconn = self.pgconn
        if pgconn.status != _OK:
            return  # a closed or broken connection: psycopg reports it itself
        # Claim an idle slot (DESIGN.md §4), or wait in the table for one (sync connections), or
        # let the transaction go through the proxy: TLS backends (rule 10), the proxy has waiters
        # (who go first), the table's queue is full, or an asyncio connection found nothing idle.
        fd_number = pgconn.socket
        try:
            got = channel.claim_into(pgconn.backend_pid, fd_number, claimed)
        except errors.PoolTimeout as exc:
            limit = channel.table.wait_limit() if channel.table is not None else 0.0
            telemetry.lease_denied(self._telemetry(), exc, limit)
            raise
        if channel._dead is not None:
            # The broker that parked this connection is gone (its channel ended): it can never
            # lease again, and its parking socket is dead too.
            self._lost_broker()
            raise channel.dead_error()
        if got is None:
            self._proxying = True
            self._proxy_span = telemetry.proxied_started(self._telemetry())
            if self._session_dirty:
                # The statement that dirtied the session is about to go through the proxy: the
                # broker must reset that backend before it lends it again.
                self._session_dirty = False
                channel.dirty(pgconn.backend_pid)
            return
        slot, generation, backend_pid, waited_ns = got
        bucket = bisect.bisect_left(WAIT_BOUNDS_NS, waited_ns) if waited_ns else 0
        watched = telemetry.watched()
        if not watched and self._hot.adopt(self, slot, generation, backend_pid, waited_ns, bucket):
            return  # (the C hot path holds it, and gives it back at a clean end)
        held = self._held = _Held(slot, generation, backend_pid, _monotonic(), fd_number)
        if waited_ns:
            held.waited = waited_ns / 1e9
            held.bucket = bucket
        if watched:
            held.watched = True
            held.span = telemetry.lease_granted(self._pool_telemetry or self._telemetry(), held)

    def _state_only(self) -> bool:
        """A state-only generator runs without the server now: idle, and outside a pipeline."""
        return bool(
            self.pgconn.transaction_status == pq.TransactionStatus.IDLE
            and self.pgconn.pipeline_status == pq.PipelineStatus.OFF
            and self._pipeline is None
        )

    def _lost_broker(self) -> None:
        """The broker that parked this connection is gone: it can never lease again.

        Make it report closed/broken, as psycopg does for a lost server, so frameworks open a new one.
        """
        self._cool()
        self.pgconn.finish()

    def _telemetry(self) -> telemetry.PoolTelemetry | None:
        if self._pool_telemetry is None and self._channel is not None:
            db = self.pgconn.db.decode()
            self._pool_telemetry = telemetry.for_control_socket(self._channel.path, db)
        return self._pool_telemetry

    # -- after a wait -----------------------------------------------------------------------------

    def _after_wait_state(self) -> AfterWait:
        if self._held is None:
            if self._proxying and self._idle_now():
                # Through the proxy: no lease to give back, but a changed reported parameter must
                # still be put back in libpq's cache (the broker resets the backend itself).
                self._proxied_over(None)
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

    def _after_wait_done(self) -> bool:
        """The end of a ``wait()`` in the usual cases, without :meth:`_after_wait_steps`' generator
        (this runs once per statement): True if nothing else is to be done."""
        held = self._held
        if held is None and not self._proxying:
            return True
        pgconn = self.pgconn
        if pgconn.status != _OK:
            return False
        if pgconn.transaction_status != _IDLE or pgconn.pipeline_status != _PIPELINE_OFF:
            return True  # mid-transaction: the backend stays
        if self._reported_raw() != self._baseline_raw:
            return False  # parameters to put back first
        if held is None:
            self._proxied_over(None)  # a transaction through the proxy is over
        else:
            self._give_back(broken=False, dirty=self._take_dirty())
        return True

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
            yield from self._restore_statements(proxied=True)

    def _give_back(self, *, broken: bool, dirty: bool = False) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        channel = self._channel
        assert channel is not None
        if self.pgconn.status == _OK:
            libpq_fd = held.fd_number  # (libpq gives up its socket only with the connection)
        else:
            try:
                libpq_fd = self.pgconn.socket
            except psycopg.OperationalError:
                libpq_fd = -1
        # A dirty backend: the broker runs DISCARD ALL before lending it again.
        outcome = _BROKEN if broken else (_DIRTY if dirty else _CLEAN)
        home = self._home if libpq_fd == held.fd_number else -1
        channel.end_lease(held.slot, held.generation, held.bucket, outcome, home, held.fd_number)
        if held.watched:
            telemetry.lease_released(
                self._pool_telemetry or self._telemetry(), held, held.span, broken=broken, dirty=dirty
            )

    def _proxied_over(self, refused: BaseException | None) -> None:
        """The transaction that went through the proxy is over (``refused``: the proxy said why)."""
        self._proxying = False
        span, self._proxy_span = self._proxy_span, None
        telemetry.proxied_ended(self._telemetry(), span, refused)

    def _refused(self, exc: psycopg.Error) -> psycopg.Error:
        """The error to raise for ``exc`` from a ``wait()``: a transaction that waited in the broker's
        proxy and was refused there raises the pool error that names it (PoolTimeout,
        TooManyRequests...), as psycopg_pool does."""
        mapped = errors.from_proxy_refusal(exc)
        if mapped is None:
            return exc
        if self._proxying:
            self._proxied_over(mapped)
        return mapped

    # -- fork -------------------------------------------------------------------------------------

    def _neuter_in_child(self) -> None:
        """In a forked child, point libpq's fd at a dead socket: its Terminate must not reach the
        parent's parking connection (or a backend the parent holds)."""
        with contextlib.suppress(psycopg.OperationalError, OSError):
            a, b = socket.socketpair()
            b.close()
            os.dup2(a.fileno(), self.pgconn.socket, inheritable=False)
            a.close()
        self._cool()
        self._held = None
        self._proxying = False
