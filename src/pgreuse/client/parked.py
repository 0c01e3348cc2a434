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
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import attrs
from psycopg import pq

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


def key_of(cls: type[Any], conninfo: str, kwargs: dict[str, Any]) -> Hashable | None:
    """The key of a ``connect()``'s parking connection, or ``None`` when it cannot be shared
    (an argument that cannot be compared, e.g. a dict)."""
    try:
        items = tuple(sorted((k, v) for k, v in kwargs.items() if k not in PER_OBJECT))
        key = (cls, conninfo, items)
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
    if parked.channel.dead or parked.pgconn.status != pq.ConnStatus.OK:
        return False
    channel = parked.channel
    try:
        seen = slots.check(parked.pgconn.socket, channel.sock.fileno())
    except (OSError, ValueError):
        return False
    if seen & slots.CONTROL_READABLE:
        channel.notice_end()  # new backends' fds, or the broker's end
    return not (seen & slots.BACKEND_UNFIT or channel.dead)


def _finish(parked: Parked) -> None:
    parked.pgconn.finish()  # Terminate to the broker: this parking connection ends
    with contextlib.suppress(OSError):
        os.close(parked.home)


class Reusable:
    """Mixin of :class:`pgreuse.client.lease.LeaseCore`: a connection's parking connection goes back
    to :data:`parked_connections` on ``close()`` when it is clean, and a new connection adopts one."""

    if TYPE_CHECKING:
        pgconn: pq.abc.PGconn
        _closed: bool
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

    _park_key: Hashable | None = None  # the connect() arguments it was made with
    _cancel_sent: bool = False

    def _adopt(self, kept: Parked, key: Hashable, lease_timeout: float) -> None:
        """Take over a kept parking connection (instead of :meth:`LeaseCore._bind`)."""
        self._channel = kept.channel
        self._lease_timeout = lease_timeout
        self._baseline = kept.baseline
        self._baseline_raw = kept.baseline_raw
        self._home = kept.home
        self._pool_telemetry = kept.pool_telemetry
        self._park_key = key

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
            self.pgconn, channel, self._home, self._baseline, self._baseline_raw, self._pool_telemetry
        )
        if not parked_connections.keep(key, kept):
            return False
        self._home = -1
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
