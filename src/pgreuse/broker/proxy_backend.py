"""A proxy session's backend side: forward what the backend answers, and watch where it stands.

Backend bytes go to the client unchanged; only the frame headers are scanned
(:func:`~pgreuse.wire.scan.scan_server`), for ReadyForQuery's status and the sync points it
answers, and for a ParameterStatus (a ``SET``: the backend must be reset before another client gets
it). At ReadyForQuery ``I`` with everything answered, the backend goes back to the pool (transaction
mode, or a client that has left).
"""

from __future__ import annotations

from ..wire import control, frames, scan
from ..wire.scan import scan_server
from .proxy_fields import _HEADER, _RBUF, _RECV, SessionFields


class BackendToClient(SessionFields):
    """Mixin of :class:`~.proxy_session.PyProxySession`."""

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
