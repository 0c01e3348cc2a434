"""Proxy mode: one client connection on the PG-protocol listener, forwarded to leased backends.

Contract (DESIGN.md §5). After startup every client of ``.s.PGSQL.<port>`` gets a
:class:`ProxySession`. A pgreuse connection parks there and never sends anything but Terminate; any
other client (psql, pgbench, a Go service) sends queries, and then:

* the first message that needs a server leases a backend from the :class:`~.pool.Pool` *in process*
  (the session is the pool's ``Client``; the lease carries the parking key, so a CancelRequest with
  that key reaches this backend);
* client bytes go to the backend and backend bytes to the client unchanged; only frame headers are
  parsed, to count sync points (Query, Sync, FunctionCall: each gets exactly one ReadyForQuery) and
  to read ReadyForQuery's status byte;
* in transaction mode the backend goes back at ReadyForQuery ``I`` once every sync point sent was
  answered and no message is half sent (so COPY, open transactions and pipelined batches keep it);
  in session mode it stays until the client leaves, and is then reset (``Outcome.DIRTY``);
* a backend that reports a ParameterStatus while lent changed session state (``SET``): it goes back
  ``DIRTY`` and the pool resets it before lending it again;
* a client that leaves while its backend is not idle (mid-transaction, mid-COPY, a query running)
  returns it ``BROKEN``: the pool closes it, PostgreSQL rolls back, it is never reused;
* a backend that fails or is revoked mid-lease gets the client a FATAL ErrorResponse, then the client
  is closed (its transaction is gone);
* a request the pool denies (``--wait-timeout``, PostgreSQL down) answers the waiting query with an
  ErrorResponse and ReadyForQuery, exactly as a server error would, and the session goes on.

Named prepared statements are per backend, so in transaction mode a Parse with a statement name
that would start a transaction (the client holds no backend) is answered by the broker with an
ErrorResponse (SQLSTATE 0A000) naming the statement, then ReadyForQuery at the client's Sync: a
statement prepared there would be unknown to the next transaction's backend, and left behind on this
one (``pgbench -M prepared`` stops with that message). Inside a transaction such a Parse is
forwarded — the statement works until the transaction ends — and the backend is reset before it is
lent again. Unnamed statements (``-M extended``, psycopg) always work; session mode allows names.

All of this runs as callbacks on the broker's loop thread: readers and writers registered with
``add_reader``/``add_writer`` on non-blocking sockets, no task per message.

:class:`PyProxySession` is the reference. Where ``pgreuse.broker._proxycore`` is built, the broker runs
:data:`ProxySession`, which takes the methods every transaction runs from that C module and the rest
from the reference (see the end of this module).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Final

import attrs

from .. import _cmodule
from ..wire import control, frames, scan
from ..wire.scan import scan_client, scan_server
from ..wire.states import TRANSITIONS, SlotState
from .backends import Backend
from .pool import Pool
from .tls import TLSStream

logger = logging.getLogger("pgreuse.broker")

_RECV = 256 * 1024
# Every plaintext read lands here and is copied out at its real size: recv(_RECV) would allocate
# _RECV bytes each time, which glibc serves with mmap/munmap above its threshold (two extra
# syscalls and page faults per read). One buffer serves all sessions: the loop runs one at a time.
_RBUF = memoryview(bytearray(_RECV))
# Bytes a client may send while it waits for a backend before the broker stops reading from it.
_MAX_PENDING = 1024 * 1024
_HEADER = struct.Struct("!ci")
_IDLE = ord("I")  # ReadyForQuery status: not in a transaction
# scan.SYNC_POINTS and scan.NEUTRAL as _HEADER reads a type (one byte of bytes).
_SYNC_POINTS = frozenset(bytes((t,)) for t in scan.SYNC_POINTS)
_NEUTRAL = frozenset(bytes((t,)) for t in scan.NEUTRAL)
# Messages that need no backend when none is held: COPY data after a failed COPY (a server drops
# it too) and Flush with nothing in flight. The neutral ones, as types (_NO_BACKEND_NEEDED_CODES:
# as scan_client reports the first one).
_NO_BACKEND_NEEDED = _NEUTRAL
_NO_BACKEND_NEEDED_CODES = scan.NEUTRAL

_DENY_SQLSTATE = {
    # PgBouncer answers a query_wait_timeout with 08P01; tools keyed to it keep working.
    control.DenyCode.TIMEOUT: "08P01",
    control.DenyCode.UNAVAILABLE: "08006",
    control.DenyCode.CLOSED: "57P01",
    control.DenyCode.BAD_REQUEST: "08P01",
    control.DenyCode.TOO_MANY: "53300",
    control.DenyCode.CANCELED: "57014",  # query_canceled, as PostgreSQL answers a cancelled query
}


@attrs.define
class PyProxyStats:
    """Totals over every proxy session of a broker (``SHOW STATS``); with the C core,
    ``pgreuse.broker._proxycore.ProxyCounters`` holds the same fields (see :data:`ProxyStats`)."""

    xacts: int = 0  # leases given back (transactions in transaction mode)
    queries: int = 0  # sync points forwarded
    received: int = 0  # bytes from clients
    sent: int = 0  # bytes to clients
    wait_ns: int = 0
    denied: int = 0
    broken: int = 0  # backends given back BROKEN


class _Forward:
    """Per-message decision while scanning a client chunk."""

    FORWARD: Final = 0
    DROP: Final = 1
    REJECT: Final = 2  # after a denied lease: answer like a server in error, until Sync


class PyProxySession:
    """One client connection on the PG-protocol listener (see the module docstring).

    This is the reference implementation; :data:`ProxySession` is the one the broker runs (see the
    end of this module)."""

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

    # -- client -> backend ------------------------------------------------------------------------

    def _client_readable(self) -> None:
        if self.closed:  # (the reader is removed at close: never read a descriptor number reused)
            return
        try:
            n = self.sock.recv_into(_RBUF)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._client_failed(exc)
            return
        if not n:
            self.close()
            return
        self.stats.received += n
        if not self._c_stash and not self._c_left and self._rejecting is None:
            # The usual read: whole messages that _decide would all forward (a Query; a
            # Parse/Bind/Describe/Execute/Sync), and no refusal being answered. What _decide does
            # for each of them, in one step, without the message loop.
            syncs, unsynced, first = scan_client(_RBUF, n, self.session_mode)
            if first >= 0 and not (
                first in _NO_BACKEND_NEEDED_CODES
                and self.backend is None
                and self._request is None
                and not self._want_lease
            ):
                self._quitting = False
                self.proxied = True
                if syncs:
                    self._syncs += syncs
                    self.stats.queries += syncs
                if unsynced >= 0:
                    self._unsynced = unsynced == 1
                if self.backend is not None and not self._to_backend:
                    self._forward(_RBUF[:n])  # copies only what the socket does not take
                else:
                    self._to_backend += _RBUF[:n]
                    if self.backend is None and self._request is None:
                        self._lease()  # (never inside _denied: this is a loop callback)
                self._interest()
                return
        self._client_slow(_RBUF[:n].tobytes())

    def _client_failed(self, exc: OSError) -> None:
        self.connection_error(exc)

    def connection_error(self, exc: OSError) -> None:
        """The client's socket has an error (it reset the connection): the client is gone.

        Called by the reader, or by the broker's :class:`~.hangups.HangupWatch` whatever the
        reader is doing (uvloop stops calling it): what the client still had queued is not read, a
        wait for a backend is abandoned, and a backend held mid-transaction goes back ``BROKEN``
        (PostgreSQL rolls back), as at end-of-file.
        """
        if self.closed:
            return
        logger.info("client key %d (pid %d, %s) %s: connection error: %s", self.parking_key, self.pid,
                    self.addr, self.state, exc.strerror or exc)  # fmt: skip
        self.close()

    def _client_slow(self, data: bytes) -> None:
        """A read the fast path does not take: the message loop handles it message by message."""
        try:
            self._from_client(data)
        except frames.ProtocolError as exc:
            logger.info("client key %d (pid %d) dropped: %s", self.parking_key, self.pid, exc)
            self.close(frames.error_response("08P01", f"pgreuse broker: {exc}", severity="FATAL"))
            return
        self._interest()

    def _from_client(self, data: bytes) -> None:
        """Scan ``data`` for message boundaries and forward, drop or answer each message."""
        if self._c_stash:
            data = self._c_stash + data
            self._c_stash = b""
        n = len(data)
        pos = 0
        keep_from = 0  # start of the run of bytes to forward
        out: list[bytes | memoryview] = []
        view: memoryview | None = None
        if self._c_left:  # the rest of a message begun in an earlier chunk
            pos = min(self._c_left, n)
            self._c_left -= pos
            if self._c_action != _Forward.FORWARD:
                keep_from = pos
        # One turn per message: this loop is the client half of the hot path.
        while pos < n:
            if n - pos < 5:
                self._c_stash = data[pos:]
                break
            type_, length = _HEADER.unpack_from(data, pos)
            if n - pos < 6 and type_ == b"P" and length > 4 and not self.session_mode:
                # A Parse's first body byte says whether it names its statement (transaction
                # mode): wait for it. (A Parse with no body at all has no such byte: _denied
                # replays whole messages and must not find one stashed.)
                self._c_stash = data[pos:]
                break
            if length < 4 or length > frames.MAX_FRAME:
                raise frames.ProtocolError(f"client message type {type_!r} has invalid length {length}")
            if type_ == b"P" and not self.session_mode and length > 4 and data[pos + 5]:
                action = self._named_parse(data, pos + 5, min(n, pos + 1 + length))
            else:
                action = self._decide(type_)
            end = pos + 1 + length
            if action != _Forward.FORWARD:
                if keep_from < pos:
                    view = view or memoryview(data)
                    out.append(view[keep_from:pos])
                keep_from = end
            if end > n:
                self._c_action = action
                self._c_left = end - n
            pos = end
        stop = min(pos, n)
        if keep_from == 0 and stop == n:
            out.append(data)  # all of it (the usual case): no copy, no view
        elif keep_from < stop:
            view = view or memoryview(data)
            out.append(view[keep_from:stop])
        for chunk in out:
            self._forward(chunk)
        if self._quitting and self.backend is not None and self._idle():
            self._give_back(self._outcome_on_leave())
        self._lease_if_wanted()

    def _lease_if_wanted(self) -> None:
        if self._want_lease and self._request is None and self.backend is None and not self.closed:
            if not self._denying:
                self._lease()
            elif not self._lease_deferred:
                # Answering a refusal: a refusal of this request may come back at once, and
                # leasing here would recurse once per pipelined query. Ask on the next loop turn.
                self._lease_deferred = True
                self.loop.call_soon(self._deferred_lease)

    def _deferred_lease(self) -> None:
        self._lease_deferred = False
        self._lease_if_wanted()
        self._interest()

    def _named_parse(self, data: bytes, start: int, end: int) -> int:
        """A Parse naming its statement, in transaction mode (see the module docstring)."""
        if (
            self._rejecting is not None
            or self.backend is not None
            or self._request is not None
            or self._want_lease
        ):
            # Inside a transaction (or behind messages that open one): it lives until the
            # transaction ends, and DISCARD ALL removes it before the backend is lent again.
            action = self._decide(b"P")
            self._dirty = True
            return action
        self._quitting = False
        self.proxied = True
        nul = data.find(b"\0", start, end)
        name = data[start : nul if nul >= 0 else end].decode("utf-8", "replace")
        if nul < 0:
            name += "..."
        logger.info("client key %d (pid %d): named prepared statement %r refused (transaction mode)",
                    self.parking_key, self.pid, name)  # fmt: skip
        self._reply(
            frames.error_response(
                "0A000",
                f'pgreuse broker: prepared statement "{name}" cannot be created: the broker pools in '
                "transaction mode, so the next transaction may run on another server connection, "
                "where a named statement does not exist",
                hint="use unnamed prepared statements (pgbench -M extended; psycopg and most drivers "
                "do by default), or run the broker with --pool-mode session",
            )
        )
        self._rejecting = b""  # the rest up to Sync is dropped, and Sync gets ReadyForQuery
        return _Forward.REJECT

    def _decide(self, type_: bytes) -> int:
        """What to do with a client message of ``type_`` whose header was just read."""
        if type_ == b"X":
            # Terminate is never forwarded: the backend outlives this client. The client closes
            # its socket next; a parked pgreuse connection's forked child may also send this on a
            # shared socket, so the session itself lives on until EOF. What the client sent before
            # it still goes to a backend, as a server would still run it: a lease wanted or asked
            # for stands (if the client hangs up while still queued, close() drops it).
            self._quitting = True
            return _Forward.DROP
        self._quitting = False
        if self._rejecting is not None:
            error = self._rejecting
            if type_ in (b"S", b"Q"):
                self._rejecting = None
                self._reply(error + frames.ready_for_query(b"I"))
            elif error:
                self._rejecting = b""  # sent once; the rest is dropped until Sync
                self._reply(error)
            return _Forward.REJECT
        self.proxied = True
        if self.backend is None and self._request is None and not self._want_lease:
            if type_ in _NO_BACKEND_NEEDED:
                return _Forward.DROP
            self._want_lease = True
        if type_ in _SYNC_POINTS:
            self._syncs += 1
            self._unsynced = False
            self.stats.queries += 1
        elif type_ not in _NEUTRAL:
            self._unsynced = True
        return _Forward.FORWARD

    def _forward(self, chunk: bytes | memoryview) -> None:
        if self.backend is None or self._to_backend:
            self._to_backend += chunk
            return
        assert self._bsock is not None
        try:
            sent = self._bsock.send(chunk)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._backend_failed(f"send failed: {exc}")
            return
        if sent < len(chunk):
            self._to_backend += chunk[sent:]

    def _backend_writable(self) -> None:
        assert self._bsock is not None
        try:
            # TLS: records already encrypted go first; new plaintext only once they are out.
            if self._btls is not None and not self._btls.flush():
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_failed(f"send failed: {exc}")
            return
        if self._to_backend:
            self._flush_to_backend()
        self._interest()

    def _flush_to_backend(self) -> None:
        """Send what is buffered for the backend (no copy); the rest waits for writability."""
        assert self._bsock is not None
        try:
            sent = self._bsock.send(self._to_backend)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_failed(f"send failed: {exc}")
            return
        del self._to_backend[:sent]

    # -- the lease --------------------------------------------------------------------------------

    def _lease(self) -> None:
        self._want_lease = False
        self._request = next(self._ids)
        self._request_ns = time.monotonic_ns()
        # May answer synchronously (an idle backend): send() below runs inside this call.
        self.pool.request(self, self._request, self.parking_key)

    def send(self, msg: control.Message, fd: int | None = None) -> None:
        """The pool's refusal of a request (``pool.Client``; grants come through :meth:`granted`)."""
        if not isinstance(msg, control.Deny) or msg.request != self._request:
            return  # an answer to a request this session abandoned
        self._request = None
        self.stats.wait_ns += time.monotonic_ns() - self._request_ns
        self._denied(msg)

    def granted(self, b: Backend, request: int) -> None:
        """The pool lends ``b`` for ``request`` (``pool.InProcessHolder``)."""
        if request != self._request or self.closed:
            # Cannot happen in process (abandon() runs before close() returns); never keep it.
            self.pool.give_back(b, self, control.Outcome.CLEAN)
            return
        self._request = None
        self.stats.wait_ns += time.monotonic_ns() - self._request_ns
        sock = b.sock
        assert sock is not None
        self.backend, self._bfd, self._btls = b, sock.fileno(), b.tls
        self._bsock = sock if b.tls is None else b.tls
        # The socket is still registered for reading (the pool's idle watch): take the callback.
        b.on_readable = self._on_backend
        if self._to_backend:
            self._flush_to_backend()
        if self._to_backend or not self._c_reading or self._btls is not None:
            self._interest()
        # else: reading both sides and writing neither, as registered already

    def _denied(self, msg: control.Deny) -> None:
        self.stats.denied += 1
        sqlstate = _DENY_SQLSTATE.get(msg.code, "08P01")
        prefix = "query_wait_timeout: " if msg.code is control.DenyCode.TIMEOUT else ""
        if msg.code is control.DenyCode.CLOSED:
            self.close(frames.error_response(sqlstate, f"pgreuse broker: {msg.message}", severity="FATAL"))
            return
        logger.info("client key %d (pid %d): no backend: %s", self.parking_key, self.pid, msg.message)
        # Nothing queued was sent anywhere: answer it like a server whose first statement failed
        # (ErrorResponse, then skip to the next Query or Sync), then carry on with what follows.
        pending = bytes(self._to_backend)
        self._to_backend.clear()
        stash, self._c_stash = self._c_stash, b""
        self._syncs = 0
        self._unsynced = False
        self._c_left = 0
        self._rejecting = frames.error_response(
            sqlstate,
            f"{prefix}pgreuse broker: {msg.message}",
            hint="retry later, or raise the broker's --max-size or --wait-timeout",
        )
        self._denying = True
        quitting = self._quitting  # (the replay goes through _decide, which clears it)
        try:
            self._from_client(pending)
        finally:
            self._denying = False
            self._quitting = self._quitting or quitting
        if self._c_stash:
            raise AssertionError("a complete buffer left an incomplete header")  # pragma: no cover
        self._c_stash = stash
        self._interest()

    def _give_back(self, outcome: control.Outcome, *, just_read: bool = False) -> None:
        """Return the backend; ``just_read``: the last recv ended exactly at ReadyForQuery ``I``."""
        b = self.backend
        assert b is not None
        clean = outcome is control.Outcome.CLEAN
        if not clean or self._b_writing:
            self._set_backend(reading=False, writing=False)
        # else the read registration goes back with the backend: the pool swaps its callback for
        # the idle watch (or removes it if it closes the backend) before the loop runs again.
        self.backend, self._bsock, self._bfd = None, None, -1
        self._btls = None
        if not clean:  # a clean backend is idle (_idle()): the protocol state is already at rest
            self._to_backend.clear()
            self._b_left = 0
            self._b_stash = b""
            self._syncs = 0
            self._unsynced = False
            self._tx = _IDLE
            self._dirty = False  # this lease's session state went back with it (outcome DIRTY)
            if outcome is control.Outcome.BROKEN:
                self.stats.broken += 1
        self.stats.xacts += 1
        self.pool.give_back(b, self, outcome, unread_checked=clean and just_read)

    def revoked(self, backend: Backend) -> None:
        """The pool is closing our backend (it died, or the broker shuts down): stop using it."""
        if backend is not self.backend:
            return
        self._set_backend(reading=False, writing=False)
        self.backend, self._bsock, self._bfd = None, None, -1
        self._btls = None
        self._to_backend.clear()
        self.close(
            frames.error_response(
                "08006",
                f"pgreuse broker: the server connection (backend pid {backend.pid}) was closed "
                "while this client was using it; its transaction is lost",
                severity="FATAL",
            )
        )

    def _backend_failed(self, why: str) -> None:
        b = self.backend
        assert b is not None
        logger.warning(
            "slot %d: backend pid %d failed while proxying for key %d: %s",
            b.index, b.pid, self.parking_key, why,
        )  # fmt: skip
        self._give_back(control.Outcome.BROKEN)
        self.close(
            frames.error_response(
                "08006",
                f"pgreuse broker: server connection lost (backend pid {b.pid}: {why}); "
                "the transaction is lost, reconnect and retry",
                severity="FATAL",
            )
        )

    # -- backend -> client ------------------------------------------------------------------------

    def _backend_readable(self) -> None:
        assert self._bsock is not None
        # Plaintext: a view of the shared buffer, not a copy. What outlives this call is copied out
        # (_reply's remainder, _scan_backend's stash).
        data: bytes | memoryview
        try:
            data = (
                _RBUF[: self._bsock.recv_into(_RBUF)]  # type: ignore[union-attr]
                if self._btls is None
                else self._btls.recv(_RECV)
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_failed(f"receive failed: {exc}")
            return
        if not data:
            self._backend_failed("the server closed the connection")
            return
        # Forward first, then scan: the bytes go to the client unchanged either way, and the scan
        # is then off the path of the answer (a malformed stream still ends the session below).
        self._reply(data)
        try:
            self._scan_backend(data)
        except frames.ProtocolError as exc:
            self._backend_failed(str(exc))
            return
        if self.closed:
            return
        if self.backend is not None and self._idle() and (self._quitting or not self.session_mode):
            self._release_at_idle()
        self._interest()

    def _release_at_idle(self) -> None:
        """The backend just reached ReadyForQuery ``I`` with everything answered: give it back."""
        # Session mode gets here only when the client has left (Terminate before the answer):
        # its session state goes back with the backend, which is reset before the next client.
        outcome = control.Outcome.DIRTY if self._dirty or self.session_mode else control.Outcome.CLEAN
        if self._dirty and not self._quitting and self.pool.parameters:
            # The client saw a SET change a reported parameter, and the backend is about to be
            # reset: tell the client what every backend it gets from now on reports, so its
            # driver's cache (libpq parses dates and encodings with it) is right again. libpq
            # takes a ParameterStatus while idle and applies it before the next result.
            self._reply(b"".join(
                frames.parameter_status(name, value)
                for name, value in self.pool.parameters.items()
                if name != "application_name"
            ))  # fmt: skip
        self._give_back(outcome, just_read=True)

    def _scan_backend(self, data: bytes | memoryview) -> None:
        if self._b_stash:
            data = self._b_stash + data
            self._b_stash = b""
        n = len(data)
        pos = 0
        if self._b_left:  # the rest of a message begun in an earlier read
            pos = min(self._b_left, n)
            self._b_left -= pos
        pos, self._syncs, tx, flags = scan_server(data, pos, self._syncs)
        if tx >= 0:
            self._tx = tx
        if flags:
            if flags & scan.UNSOLICITED_READY:
                raise frames.ProtocolError("server sent a ReadyForQuery nobody asked for")
            if flags & scan.BAD_LENGTH:
                type_, length = _HEADER.unpack_from(data, pos)
                raise frames.ProtocolError(f"server message type {type_!r} has invalid length {length}")
            if not self.session_mode:
                self._dirty = True  # ParameterStatus after a SET: the next holder must not inherit it
        if pos > n:
            self._b_left = pos - n
        elif pos < n:
            # Fewer than 6 bytes left: a header that may be cut (or a short message whose
            # successor, at least the ReadyForQuery that ends every answer, is still to come).
            self._b_stash = bytes(data[pos:])

    def _reply(self, data: bytes | memoryview) -> None:
        self.stats.sent += len(data)
        if self._to_client:
            self._to_client += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The client is gone; its EOF arrives through the reader and settles the lease.
            return
        if sent < len(data):
            self._to_client += data[sent:]

    def _client_writable(self) -> None:
        try:
            sent = self.sock.send(self._to_client)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._to_client.clear()
            self.close()
            return
        del self._to_client[:sent]
        self._interest()


# The C core (pgreuse.broker._proxycore, optional like the C scanners): a base type that holds the hot fields
# as struct members and overrides the methods every transaction runs (the read callbacks, _interest,
# _idle, _lease, granted) with C versions that handle the usual case and call the methods above for
# the rest; its _lease and clean release also do the pool's part for the usual cases (an idle
# backend and nobody waiting; a handover to the next proxy client). PGREUSE_PURE_PYTHON=1 runs the
# reference alone. CORE says which one runs.
ProxySession: type[PyProxySession] = PyProxySession
ProxyStats: type[PyProxyStats] = PyProxyStats
CORE = "python"
if TYPE_CHECKING:
    from . import _proxycore
else:
    _proxycore = _cmodule.load("broker._proxycore")  # None: not built, or PGREUSE_PURE_PYTHON=1
if _proxycore is not None:
    # The C core also lends and takes back backends in the usual cases (pool.Pool's request
    # and give_back, see _lending.h), through the slot transitions checked here.
    _idle, _lent = SlotState.IDLE, SlotState.LENT
    if not (
        _lent in TRANSITIONS[_idle]
        and SlotState.RESETTING in TRANSITIONS[_lent]
        and _idle in TRANSITIONS[SlotState.RESETTING]
    ):  # pragma: no cover
        raise ImportError("pgreuse.broker._proxycore takes slot transitions states.TRANSITIONS forbids")
    _proxycore.setup(PyProxySession, control.Outcome.CLEAN, _MAX_PENDING, SlotState.CLOSED, _idle, _lent,
                     SlotState.SHARED)  # fmt: skip

    class _CProxySession(_proxycore.SessionCore, PyProxySession):
        __slots__ = ()

    ProxySession = _CProxySession
    ProxyStats = _proxycore.ProxyCounters  # type: ignore[assignment]  # same fields
    CORE = "c"
