"""A proxy session's lease: asking the pool for a backend, getting it or a refusal, giving it back.

A request may be answered at once (an idle backend) or later; a refusal answers the queries that
were waiting like a server whose first statement failed, and the session goes on. A backend goes
back ``CLEAN``, ``DIRTY`` (reset before it is lent again) or ``BROKEN`` (closed); one that fails or
is revoked while lent ends the client with a FATAL error: its transaction is gone.
"""

from __future__ import annotations

import logging
import time

from ..wire import control, frames
from .backends import Backend
from .proxy_fields import _IDLE, SessionFields

logger = logging.getLogger("pgreuse.broker")

_DENY_SQLSTATE = {
    # PgBouncer answers a query_wait_timeout with 08P01; tools keyed to it keep working.
    control.DenyCode.TIMEOUT: "08P01",
    control.DenyCode.UNAVAILABLE: "08006",
    control.DenyCode.CLOSED: "57P01",
    control.DenyCode.BAD_REQUEST: "08P01",
    control.DenyCode.TOO_MANY: "53300",
    control.DenyCode.CANCELED: "57014",  # query_canceled, as PostgreSQL answers a cancelled query
}


class SessionLease(SessionFields):
    """Mixin of :class:`~.proxy_session.PyProxySession`."""

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
