"""The proxy session in Python: one client connection on the PG-protocol listener (:mod:`.proxy`
says what it does), its fields, its lifecycle and its readiness registrations.

:class:`PyProxySession` is the reference; its parts are mixins, one module each:
:mod:`.proxy_client` (client -> backend), :mod:`.proxy_lease` (the lease) and
:mod:`.proxy_backend` (backend -> client). Where ``pgreuse.broker._proxycore`` is built the broker
runs :data:`.proxy.ProxySession` instead, whose C base type overrides the methods every transaction
runs and calls these for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time

from ..wire import control, frames
from .backends import Backend
from .pool import Pool
from .proxy_backend import BackendToClient
from .proxy_client import ClientToBackend
from .proxy_fields import _IDLE, _MAX_PENDING, PyProxyStats, _Forward
from .proxy_lease import SessionLease
from .tls import TLSStream


class PyProxySession(ClientToBackend, SessionLease, BackendToClient):
    """One client connection on the PG-protocol listener (see :mod:`.proxy`).

    This is the reference implementation; :data:`.proxy.ProxySession` is the one the broker runs
    (see the end of that module)."""

    _ids = itertools.count(1)
    in_process = True  # pool.InProcessHolder: takes over the idle backend's loop registration

    def __init__(
        self,
        sock: socket.socket,
        pool: Pool,
        *,
        parking_key: int,
        peer_pid: int,
        session_mode: bool,
        stats: PyProxyStats,
        user: str,
        database: str,
        application_name: str,
        addr: str,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.fd = sock.fileno()
        self.pool = pool
        self.parking_key = parking_key
        self.pid = peer_pid  # pool.Client: shown as the holder pid
        self.fds: dict[int, int] = {}  # pool.Client: unused, no fd crosses a process boundary
        self.session_mode = session_mode
        self.stats = stats
        self.user = user
        self.database = database
        self.application_name = application_name
        self.addr = addr
        self.connect_time = time.time()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.proxied = False  # sent anything but Terminate: not a parked pgreuse connection
        self.closed = False
        # The lease.
        self.backend: Backend | None = None
        # The backend's socket, or its TLS stream (same send/recv/fileno surface).
        self._bsock: socket.socket | TLSStream | None = None
        self._btls: TLSStream | None = None
        self._bfd = -1
        self._request: int | None = None  # id of the request the pool has not answered yet
        self._request_ns = 0
        self._want_lease = False
        self._denying = False  # inside _denied: see _lease_if_wanted
        self._lease_deferred = False
        # Client -> backend.
        self._to_backend = bytearray()
        self._c_left = 0  # bytes of the current client message still to come
        self._c_action = _Forward.FORWARD
        self._c_stash = b""  # an incomplete header at the end of the last chunk
        self._rejecting: bytes | None = None  # ErrorResponse owed to a denied request
        self._syncs = 0  # sync points forwarded and not yet answered by ReadyForQuery
        self._unsynced = False  # a message forwarded since the last sync point
        self._quitting = False  # Terminate seen: give the backend back when it is idle
        # Backend -> client.
        self._to_client = bytearray()
        self._b_left = 0
        self._b_stash = b""
        self._tx = _IDLE  # ReadyForQuery's last status byte, as an int
        self._dirty = False
        # Readiness registrations.
        self._c_reading = False
        self._c_writing = False
        self._b_writing = False  # reading: self.backend.watched (see pool.Backend)
        self._on_backend = self._backend_readable  # bound once: installed at every lease

    def __repr__(self) -> str:
        lease = f"slot={self.backend.index}" if self.backend else "no backend"
        return f"<ProxySession key={self.parking_key} pid={self.pid} {lease} tx={chr(self._tx)}>"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, pending: bytes) -> None:
        """Begin serving; ``pending`` is what the client pipelined behind its StartupMessage."""
        if pending:
            self._from_client(pending)
        self._interest()

    @property
    def state(self) -> str:
        """PgBouncer's client state names: ``active`` (has a backend), ``waiting``, ``idle``."""
        if self.backend is not None:
            return "active"
        if self._request is not None:
            return "waiting"
        return "idle"

    @property
    def request_time(self) -> float:
        """Wall-clock time of the last lease request (``SHOW CLIENTS``), derived when asked."""
        if not self._request_ns:
            return 0.0
        return time.time() - (time.monotonic_ns() - self._request_ns) / 1e9

    @property
    def waiting_since_ns(self) -> int:
        return self._request_ns if self._request is not None else 0

    def close(self, error: bytes = b"") -> None:
        """End the session: settle the lease, send ``error`` (best effort) and close the client."""
        if self.closed:
            return
        self.closed = True
        if self._request is not None:
            self.pool.abandon(self, self._request)
            self._request = None
        if self.backend is not None:
            self._give_back(self._outcome_on_leave())
        self._set_client(reading=False, writing=False)
        if error:
            with contextlib.suppress(OSError):
                self.sock.send(bytes(self._to_client) + error)
        self._to_client.clear()
        if not self.done.done():
            self.done.set_result(None)

    def shutdown(self) -> bool:
        """Broker shutdown: close the client now unless it is inside a transaction. True if closed."""
        if self.backend is not None and not self._idle():
            return False
        self.close(frames.error_response("57P01", "pgreuse broker is shutting down", severity="FATAL"))
        return True

    def mark_dirty(self) -> None:
        """Its pgreuse client says the statement it is sending leaves session state (a temp table,
        an advisory lock, PREPARE...): the backend is reset before it is lent again."""
        self._dirty = True

    def _outcome_on_leave(self) -> control.Outcome:
        if not self._idle():
            return control.Outcome.BROKEN
        if self.session_mode or self._dirty:
            return control.Outcome.DIRTY
        return control.Outcome.CLEAN

    def _idle(self) -> bool:
        """The backend has answered everything and sits at ReadyForQuery ``I`` with nothing unread."""
        return (
            self._syncs == 0
            and not self._unsynced
            and self._tx == _IDLE
            and not self._b_left
            and not self._b_stash
            and not self._to_backend
            and not self._c_left
            and not (self._btls is not None and self._btls.wants_write)
        )

    # -- readiness --------------------------------------------------------------------------------

    def _interest(self) -> None:
        """Register exactly the readers and writers the buffers call for (backpressure)."""
        if self.closed:
            return
        if (
            not self._to_client
            and self._btls is None
            and (not self._to_backend or (self.backend is None and len(self._to_backend) < _MAX_PENDING))
        ):
            # Nothing buffered, or a query waiting for its backend (after almost every event): read
            # both sides, write neither.
            if not self._c_reading or self._c_writing:
                self._set_client(reading=True, writing=False)
            b = self.backend
            if b is not None and (not b.watched or self._b_writing):
                self._set_backend(reading=True, writing=False)
            return
        # With a backend, stop reading while it cannot take more; without one, bound the buffer.
        limit = 1 if self.backend is not None else _MAX_PENDING
        c_read = len(self._to_backend) < limit
        self._set_client(reading=c_read, writing=bool(self._to_client))
        if self._bsock is not None:
            tls_out = self._btls is not None and self._btls.wants_write
            self._set_backend(reading=not self._to_client, writing=bool(self._to_backend) or tls_out)

    def _set_client(self, *, reading: bool, writing: bool) -> None:
        if reading != self._c_reading:
            if reading:
                self.loop.add_reader(self.fd, self._client_readable)
            else:
                self.loop.remove_reader(self.fd)
            self._c_reading = reading
        if writing != self._c_writing:
            if writing:
                self.loop.add_writer(self.fd, self._client_writable)
            else:
                self.loop.remove_writer(self.fd)
            self._c_writing = writing

    def _set_backend(self, *, reading: bool, writing: bool) -> None:
        b = self.backend
        assert b is not None
        if reading != b.watched:
            if reading:
                self.loop.add_reader(self._bfd, b.dispatch_readable)
            else:
                self.loop.remove_reader(self._bfd)
            b.watched = reading
        if writing != self._b_writing:
            if writing:
                self.loop.add_writer(self._bfd, self._backend_writable)
            else:
                self.loop.remove_writer(self._bfd)
            self._b_writing = writing
