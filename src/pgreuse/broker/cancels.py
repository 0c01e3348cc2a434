"""Cancel requests: forwarded to the backend of the lease they name, and never to anyone else's.

A CancelRequest names a parking connection; the broker forwards it to the backend that connection
holds now (a proxy session's, or a slot a worker claimed in the table). A cancel is a signal
PostgreSQL sends once it has read the request, so a backend that went to another client in between
would cancel that client's statement (PgBouncer fixed the same race in its PR #717). So the backend
a cancel is forwarded to is not lent to anyone else until PostgreSQL is done with the cancel (it
closes the cancel connection then), and it is reset before it is lent again. A cancel for a
connection that holds no backend is dropped (or, if it waits for one, answers its wait).
"""

from __future__ import annotations

import logging

from .. import slots
from ..wire import control
from ..wire.states import SlotState
from .backends import Backend, PoolFields
from .connector import BackendConnectError, send_cancel

logger = logging.getLogger("pgreuse.broker")
_SHARED, _LENT = SlotState.SHARED, SlotState.LENT


class Cancels(PoolFields):
    """Mixin of :class:`pgreuse.broker.pool.Pool`."""

    def cancel(self, parking: int) -> None:
        """Forward a CancelRequest for the lease that parking connection ``parking`` holds.

        The backend is not lent to anyone else until PostgreSQL is done with the cancel (it closes
        the cancel connection once it has signalled the backend): a proxy session's lease ends
        dirty, a worker's claimed slot gets the cancel flag in its word, and either way the backend
        is reset after the cancel before it is lent again (``_reset`` waits for it)."""
        held = next((b for b in self.slots if b.state is SlotState.LENT and b.parking == parking), None)
        if held is not None:
            mark_dirty = getattr(held.holder, "mark_dirty", None)
            if mark_dirty is not None:
                mark_dirty()  # (its give-back then goes through the reset)
        else:
            held = self.flag_shared_lease(parking)
        if held is None:
            # Still waiting for a backend: what was sent never reached PostgreSQL; answer it the way
            # PostgreSQL answers a cancelled statement (a client such as psycopg waits for that).
            waiter = next((w for w in self.waiters if w.parking == parking), None)
            if waiter is None:
                logger.debug("cancel for parking %d: no lease held, nothing to cancel", parking)
                return
            self.waiters.remove(waiter)
            self.publish_pending()
            self._deny(waiter, control.DenyCode.CANCELED, "canceling statement due to user request "
                       "(it was waiting for a backend)")  # fmt: skip
            return
        logger.info("forwarding cancel to backend pid %d (slot %d)", held.pid, held.index)
        held.cancels += 1
        self._spawn(self._forward_cancel(held, held.generation))

    async def _forward_cancel(self, b: Backend, generation: int) -> None:
        try:
            await send_cancel(self.target, b.pid, b.secret, tls=b.tls is not None)
        except BackendConnectError as exc:
            logger.warning("slot %d: %s", b.index, exc)
        finally:
            b.cancels -= 1
            if b.cancels == 0 and b.generation == generation:
                self.cancel_done(b)

    def flag_shared_lease(self, parking: int) -> Backend | None:
        """The shared slot a worker claimed for parking connection ``parking``, with the cancel
        flag set in its word (a cancel is about to be forwarded to it); None if none is, or if the
        worker gave it back as we looked (the cancel is then dropped: it has nothing to cancel)."""
        for b in self.shared:
            word = self.table.word(b.index)
            if slots.state_of(word) is not _LENT or self.table.holder_fields(b.index)[0] != parking:
                continue
            if slots.canceling(word) or self.table.slots.cas(b.index, word, word | slots.CANCEL_FLAG):  # type: ignore[union-attr]
                return b
            return None
        return None

    def cancel_done(self, b: Backend) -> None:
        """Every cancel forwarded to ``b`` is done: a worker that still holds it may give it back as
        usual (the flag goes); one that gave it back left it to the broker, whose reset runs now."""
        if b.state is _SHARED:
            word = self.table.word(b.index)
            if slots.canceling(word):
                self.table.slots.cas(b.index, word, word & ~slots.CANCEL_FLAG)  # type: ignore[union-attr]
