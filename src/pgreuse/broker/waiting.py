"""Asking for a backend: a proxy session's request, the FIFO of waiters, their deadlines, refusals.

A request is granted at once from the idle stack when nobody waits; otherwise it queues (first come,
first served) with a deadline ``--wait-timeout`` away, or is refused at once when the broker shuts
down, cannot reach PostgreSQL, or ``--max-waiting`` requests already wait. One timer serves every
waiter (armed for the earliest deadline) and denies those past theirs. Granting a queued waiter
(``_dispatch``) stays in :mod:`pgreuse.broker.pool`; the C lending path (``_lending.h``) does the
common cases of :meth:`Waiting.request` itself and calls ``_arm_expiry`` and ``_note_max_pending``
by name.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from .. import errors
from ..wire import control
from ..wire.states import SlotState
from .backends import Client, PoolFields, Waiter

logger = logging.getLogger("pgreuse.broker")

# Enum members read on the lending path, as module constants (see pool.py).
_CLOSED, _SHARED = SlotState.CLOSED, SlotState.SHARED


class Waiting(PoolFields):
    """Mixin of :class:`pgreuse.broker.pool.Pool`."""

    def request(self, client: Client, request: int, parking: int) -> None:
        """A proxy session asks for a backend for ``request``; it is answered with ``granted`` or a
        ``Deny`` (workers never ask: they claim in the table, or send through the proxy)."""
        if self.idle and not self.waiters and not self.paused and not self.closing:
            self._grant(self.idle.pop(), client, request, parking, time.monotonic_ns())
            return
        w = Waiter(client, request, parking, time.monotonic_ns())
        if self.closing:
            self._deny(w, control.DenyCode.CLOSED, "the broker is shutting down")
            return
        if self.last_connect_error and not self._alive() and time.monotonic() < self._retry_at:
            # PostgreSQL was unreachable a moment ago: fail now with the reason instead of making
            # the caller sit out the whole wait timeout.
            self._deny(
                w,
                control.DenyCode.UNAVAILABLE,
                f"the broker cannot reach PostgreSQL: {self.last_connect_error}",
                counter="unavailable",
            )
            return
        if self._max_waiting and (queued := len(self.waiters) + self.table_waiting()) >= self._max_waiting:
            self._deny(
                w,
                control.DenyCode.TOO_MANY,
                f"{queued} requests already wait for a backend (--max-waiting "
                f"{self.config.max_waiting}); try again later, or raise --max-waiting/--max-size",
                counter="too_many",
            )
            return
        w.deadline_ns = w.enqueued_ns + self._wait_timeout_ns
        self.waiters.append(w)
        self._arm_expiry(w.deadline_ns)
        self._note_max_pending()
        if self.idle or self._states[_CLOSED] or self._states[_SHARED]:
            self._dispatch()  # paused with idle backends, room to open one, or some shared
        else:
            self._flush_soon()  # the pending gauge

    def _note_max_pending(self) -> None:
        """The table's ``max_pending``: the longest the queue has been."""
        if len(self.waiters) > self._max_pending:
            self._max_pending = len(self.waiters)
            self.table.set("max_pending", self._max_pending)

    def _deny(self, w: Waiter, code: control.DenyCode, message: str, counter: str = "") -> None:
        if counter:
            self.table.add(counter)
        w.client.send(control.Deny(w.request, code, message))

    def _arm_expiry(self, deadline_ns: int) -> None:
        """Make sure the expiry timer fires by ``deadline_ns`` (it serves every waiter)."""
        if self._expiry is not None:
            if deadline_ns >= self._expiry_at:
                return
            self._expiry.cancel()
        self._expiry_at = deadline_ns
        delay = max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)
        self._expiry = self.loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        """Deny every waiter past its deadline; arm the timer for the next deadline."""
        self._expiry = None
        # Loops round timers to the millisecond: a waiter due within one counts as due.
        now = time.monotonic_ns() + 1_000_000
        expired = [w for w in self.waiters if w.deadline_ns <= now]
        if expired:
            # One pass, not a remove() per waiter (a burst of timeouts is not quadratic).
            # Denials below may queue new requests (a client's next pipelined query).
            self.waiters = deque(w for w in self.waiters if w.deadline_ns > now)
            self.publish_pending()
        for w in expired:
            detail = (
                f"; last connection error: {self.last_connect_error}"
                if (self.last_connect_error and not self._alive())
                else ""
            )
            timeout = (w.deadline_ns - w.enqueued_ns) / 1e9
            try:
                self._deny(
                    w,
                    control.DenyCode.TIMEOUT,
                    errors.wait_timeout_message(timeout, self.config.max_size) + detail,
                    counter="timeouts",
                )
            except Exception:
                # A bug in one client's handling of its refusal must not leave the other expired
                # waiters unanswered, or the timer unarmed for those still queued.
                logger.exception("internal error refusing a timed-out request of pid %d", w.client.pid)
        if self.waiters:
            self._arm_expiry(min(w.deadline_ns for w in self.waiters))

    def abandon(self, client: Client, request: int) -> None:
        for w in self.waiters:
            if w.client is client and w.request == request:
                self.waiters.remove(w)
                self.publish_pending()
                return
        # Already granted or denied: the worker handles the late answer itself.
