"""Parking connections a process keeps for its next ``pgreuse.connect()`` with the same arguments.

Between transactions a pgreuse connection's libpq connection is only a parking spot at the broker:
the session lives on the backend each transaction leases, and a backend that a transaction left
state on is reset before anyone else gets it. So ``close()`` of a clean connection keeps its parking
connection here, and the next ``connect()`` with the same arguments wraps it in a new
``Connection`` object: no libpq connect, no broker round trip. That is what a web app that connects
per request pays (Django's default ``CONN_MAX_AGE = 0``): microseconds instead of a connection.

What is kept is what the first ``connect()`` established: the libpq connection (authenticated by the
broker, its reported parameters at the pool's values), the control channel, and the dup of the
parking socket that the lease swaps back at every release. What a new ``Connection`` object starts
afresh is everything psycopg keeps per object: autocommit, adapters, row and cursor factories,
notice handlers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import attrs
from psycopg import pq
from psycopg.adapt import AdaptersMap

from .. import slots, telemetry
from .channel import ChannelBase

# Parking connections kept per set of connect() arguments (about the threads of a process that
# connect at once), and in all (a process that connects with ever new arguments, e.g. an
# application_name per request, keeps the most recent): one more is closed on close(), as before.
MAX_KEPT = 16
MAX_KEPT_IN_ALL = 64

# psycopg's connect() arguments that set up the Connection object, not the libpq connection:
# connections that differ only in these share their parking connections.
PER_OBJECT = frozenset({"autocommit", "row_factory", "cursor_factory", "context"})


@attrs.define(slots=True, eq=False)
class Parked:
    """One clean parking connection, and what its connection had established with it."""

    pgconn: pq.abc.PGconn
    channel: ChannelBase
    home: int  # the dup of the parking socket (LeaseCore._home)
    baseline: dict[str, str | None]
    baseline_raw: tuple[bytes | None, ...]
    pool_telemetry: telemetry.PoolTelemetry | None
    loop: weakref.ref[Any] | None = None  # an asyncio connection's event loop: used there only


def key_of(cls: type[Any], conninfo: str, kwargs: dict[str, Any], scope: int = 0) -> Hashable | None:
    """The key of a ``connect()``'s parking connection, or ``None`` when it cannot be shared
    (an argument that cannot be compared, e.g. a dict). ``scope``: the event loop's id, for an
    asyncio connection (its control channel belongs to that loop)."""
    try:
        items = tuple(sorted((k, v) for k, v in kwargs.items() if k not in PER_OBJECT))
        key = (cls, conninfo, items, scope)
        hash(key)
    except TypeError:
        return None
    return key


class ParkedConnections:
    """The clean parking connections of this process, by ``connect()`` arguments."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[Hashable, list[Parked]] = {}
        self._order: collections.OrderedDict[int, Hashable] = collections.OrderedDict()  # oldest first

    def take(self, key: Hashable) -> Parked | None:
        """A kept parking connection that still works, or ``None``."""
        while True:
            with self._lock:
                kept = self._kept.get(key)
                if not kept:
                    return None
                parked = kept.pop()
                del self._order[id(parked)]
            if _usable(parked):
                return parked
            _finish(parked)

    def keep(self, key: Hashable, parked: Parked) -> bool:
        """Keep ``parked`` for the next ``connect()`` with ``key``; False when enough with that key
        are kept (the caller closes it)."""
        evicted = None
        with self._lock:
            kept = self._kept.setdefault(key, [])
            if len(kept) >= MAX_KEPT:
                return False
            if len(self._order) >= MAX_KEPT_IN_ALL:
                oldest_id, oldest_key = self._order.popitem(last=False)
                others = self._kept[oldest_key]
                evicted = next(p for p in others if id(p) == oldest_id)
                others.remove(evicted)
            kept.append(parked)
            self._order[id(parked)] = key
        if evicted is not None:
            _finish(evicted)
        return True

    def count(self) -> int:
        with self._lock:
            return len(self._order)

    def close_all(self) -> None:
        """Close every kept parking connection."""
        with self._lock:
            everything = [p for kept in self._kept.values() for p in kept]
            self._kept.clear()
            self._order.clear()
        for parked in everything:
            _finish(parked)

    def forget_in_child(self) -> None:
        """After fork, in the child: the kept connections are the parent's. They are dropped, not
        closed (psycopg's libpq objects send no Terminate in a process that did not open them)."""
        everything = [p for kept in self._kept.values() for p in kept]
        self._kept.clear()
        self._order.clear()
        self._lock = threading.Lock()
        for parked in everything:
            with contextlib.suppress(OSError):
                os.close(parked.home)


def _usable(parked: Parked) -> bool:
    """The broker is still there and has said nothing on this parking connection (an error, its
    end): one poll, no wait."""
    channel = parked.channel
    if channel.dead or parked.pgconn.status != pq.ConnStatus.OK:
        return False
    if parked.loop is not None and parked.loop() is not _running_loop():
        return False  # another loop that happens to have the same id
    try:
        seen = slots.check(parked.pgconn.socket, channel.sock.fileno())
    except (OSError, ValueError):
        return False
    if seen & slots.CONTROL_READABLE:
        channel.notice_end()  # new backends' fds, or the broker's end
    return not (seen & slots.BACKEND_UNFIT or channel.dead)


def _running_loop() -> Any:
    import asyncio  # noqa: PLC0415 - only asyncio connections get here

    return asyncio.get_running_loop()


def _finish(parked: Parked) -> None:
    parked.pgconn.finish()  # Terminate to the broker: this parking connection ends
    with contextlib.suppress(OSError):
        os.close(parked.home)
    parked.channel.drop_user()  # (an asyncio channel closes with its last connection)


class Reusable:
    """Mixin of :class:`pgreuse.client.lease.LeaseCore`: a connection's parking connection goes back
    to :data:`parked_connections` on ``close()`` when it is clean, and a new connection adopts one."""

    if TYPE_CHECKING:
        pgconn: pq.abc.PGconn
        _closed: bool
        _autocommit: bool
        _adapters: Any
        row_factory: Any
        cursor_factory: Any
        prepare_threshold: int | None
        _channel: ChannelBase | None
        _home: int
        _held: object
        _proxying: bool
        _pipeline: Any
        _lease_timeout: float
        _baseline: dict[str, str | None]
        _baseline_raw: tuple[bytes | None, ...]
        _pool_telemetry: telemetry.PoolTelemetry | None

        def _idle_now(self) -> bool: ...
        def _reported_raw(self) -> tuple[bytes | None, ...]: ...
        def _heat(self) -> None: ...
        def _cool(self) -> None: ...

    _park_key: Hashable | None = None  # the connect() arguments it was made with
    _cancel_sent: bool = False

    def _park_loop(self) -> weakref.ref[Any] | None:
        """The event loop a kept connection may be used in (an asyncio connection's)."""
        return None

    @classmethod
    def _from_kept(
        cls, conninfo: str, lease_timeout: float, kwargs: dict[str, Any], scope: int = 0
    ) -> tuple[Reusable | None, Hashable | None]:
        """The start of ``connect()``: a new connection on a parking connection this process kept
        for these arguments (``None`` when there is none), and their key (``None``: never kept)."""
        key = key_of(cls, conninfo, kwargs, scope)
        kept = parked_connections.take(key) if key is not None else None
        return (cls._reopen(kept, key, lease_timeout, **kwargs) if kept is not None else None), key

    def cancel(self) -> None:
        self._cancel_sent = True  # a late cancel must not reach the next user of this parking key
        super().cancel()  # type: ignore[misc]  # (psycopg's, after this mixin)

    @classmethod
    def _reopen(
        cls,
        kept: Parked,
        key: Hashable,
        lease_timeout: float,
        *,
        autocommit: bool = False,
        row_factory: Any = None,
        cursor_factory: Any = None,
        context: Any = None,
        **_conninfo: Any,
    ) -> Reusable:
        """A new connection on a parking connection this process kept, set up from the rest of
        ``connect()``'s arguments (``_conninfo``: those that made the key)."""
        conn = cls(kept.pgconn)  # type: ignore[call-arg]  # (a psycopg connection class)
        conn._channel = kept.channel
        conn._lease_timeout = lease_timeout
        conn._baseline = kept.baseline
        conn._baseline_raw = kept.baseline_raw
        conn._home = kept.home
        conn._pool_telemetry = kept.pool_telemetry
        conn._park_key = key
        # What psycopg's connect() sets on the connection it made (psycopg/connection.py).
        conn._autocommit = bool(autocommit)
        if row_factory:
            conn.row_factory = row_factory
        if cursor_factory:
            conn.cursor_factory = cursor_factory
        if context:
            conn._adapters = AdaptersMap(context.adapters)
        conn.prepare_threshold = None
        conn._heat()
        return conn

    def _park(self) -> bool:
        """On ``close()`` with nothing held: keep the parking connection for the next
        ``connect()`` if it is clean. True: kept, and this connection now reports closed."""
        key = self._park_key
        channel = self._channel
        if (
            key is None
            or channel is None
            or channel.dead
            or self._cancel_sent  # a cancel in flight must not reach the next user of the key
            or self._proxying
            or self._pipeline is not None
            or self._home < 0
            or getattr(self, "_pool", None) is not None  # psycopg_pool's: its own rules
            or not self._idle_now()
            or self._reported_raw() != self._baseline_raw
        ):
            return False
        kept = Parked(
            self.pgconn, channel, self._home, self._baseline, self._baseline_raw,
            self._pool_telemetry, self._park_loop(),
        )  # fmt: skip
        if not parked_connections.keep(key, kept):
            return False
        self._home = -1
        self._cool()  # (its C hot path names the kept libpq connection)
        self._channel = None  # (the kept connection holds its place on the channel now)
        self._closed = True
        self.pgconn = closed_pgconn()
        return True


_CLOSED: pq.abc.PGconn | None = None


def closed_pgconn() -> pq.abc.PGconn:
    """A libpq connection that is closed, for a ``Connection`` whose own went back here: it reports
    closed, and raises "the connection is closed" on use, as psycopg does after ``close()``."""
    global _CLOSED  # noqa: PLW0603
    if _CLOSED is None:
        dead = pq.PGconn.connect_start(b"host=/nonexistent-pgreuse-closed port=1")
        dead.finish()
        _CLOSED = dead
    return _CLOSED


parked_connections = ParkedConnections()
os.register_at_fork(after_in_child=parked_connections.forget_in_child)
