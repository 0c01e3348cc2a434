"""A proxy session's client side: read what the client sends, and forward, drop or answer each message.

The usual read (whole ordinary messages, nothing being refused) takes one step with the C scanner
(:func:`~pgreuse.wire.scan.scan_client`); anything else goes through the message loop
(:meth:`ClientToBackend._from_client`), which counts sync points, asks for a lease when a message
needs a backend, refuses named prepared statements in transaction mode, and answers a denied lease
like a server in error until the next Sync. What the backend cannot take yet is buffered, bounded
(``_MAX_PENDING``) while no backend is held.
"""

from __future__ import annotations

import logging

from ..wire import frames, scan
from ..wire.scan import scan_client
from .proxy_fields import _HEADER, _RBUF, SessionFields, _Forward

logger = logging.getLogger("pgreuse.broker")

# scan.SYNC_POINTS and scan.NEUTRAL as _HEADER reads a type (one byte of bytes).
_SYNC_POINTS = frozenset(bytes((t,)) for t in scan.SYNC_POINTS)
_NEUTRAL = frozenset(bytes((t,)) for t in scan.NEUTRAL)
# Messages that need no backend when none is held: COPY data after a failed COPY (a server drops
# it too) and Flush with nothing in flight. The neutral ones, as types (_NO_BACKEND_NEEDED_CODES:
# as scan_client reports the first one).
_NO_BACKEND_NEEDED = _NEUTRAL
_NO_BACKEND_NEEDED_CODES = scan.NEUTRAL


class ClientToBackend(SessionFields):
    """Mixin of :class:`~.proxy_session.PyProxySession`."""

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
