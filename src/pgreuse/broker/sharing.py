"""The pool's side of the shared-memory claims: slots it shares with the workers, and takes back.

The slot word (:mod:`pgreuse.slots`) is the truth about who owns a slot (DESIGN.md §4). A backend the
broker owns and nobody uses sits on the pool's idle stack, registered with the event loop; once the
proxy has not lent it for a whole :data:`SHARE_LAG` (so a proxy under load keeps its backends), and
if some worker is there to claim it, the broker *shares* it: it stops
watching its socket and stores ``IDLE(nobody)`` in the word. From then on the pool calls it
``SHARED``: any worker process may claim it with a compare-and-swap and give it back the same way,
and the broker does not know which at any moment. The broker takes a shared slot back with the
same compare-and-swap (:meth:`SharedSlots._own`): to lend it to a proxy client, to reset it after
a worker's dirty end, to close it when its holder died, its lease ran over ``--max-lease-time``, or
PostgreSQL hung up on it.

When no slot is idle, a worker's transaction waits in the table's queue (``slots.Q_*``), and a slot
a worker gives back goes straight to the first waiter there: the broker is not on that path either.
Its part is to share its own idle backends with that queue at once (:meth:`SharedSlots.share_idle`
hands each to the first waiter), to cancel the waits of a worker that died (or all of them when it
pauses or shuts down: they go through the proxy then), and to publish when its own proxy's oldest
waiter queued, so a worker that frees a slot serves whichever queue waited longer.

Every worker process holds a copy of every shared backend's socket (sent with ``Fd`` when its
control channel opens and for each new generation), so closing the broker's copy ends nothing:
:meth:`Pool._close` ends a backend with ``shutdown()``, which reaches every copy.
"""

from __future__ import annotations

import logging
import select
import time

from .. import slots
from ..shm import CLOSED_GATE
from ..wire import control
from ..wire.states import CloseReason, SlotState
from .backends import Backend, Client, PoolFields

logger = logging.getLogger("pgreuse.broker")

# How often the broker looks at its idle stack while it holds backends there: one the proxy did not
# lend for a whole period goes to the workers. A proxy client's next transaction, tens of
# microseconds later, finds its backend still registered with the loop (sharing and taking back
# cost two epoll_ctl calls and a compare-and-swap in Python).
SHARE_LAG = 0.001
_RDHUP = getattr(select, "POLLRDHUP", 0x2000)
_SHARED, _IDLE, _LENT = SlotState.SHARED, SlotState.IDLE, SlotState.LENT
STUCK_TICKET = 1.0  # seconds the queue's head may stand on a ticket nobody published
MAX_FD_BACKLOG = 64  # Fd messages owed to a worker that reads nothing: later ones it asks for


class SharedSlots(PoolFields):
    """Mixin of :class:`pgreuse.broker.pool.Pool`: the shared slots and the workers' channels."""

    def _init_sharing(self) -> None:
        # Workers may claim only where the table has atomics (the C module) and backends are
        # plaintext (a TLS backend's state lives in the broker). --reset-every-lease: every
        # transaction goes through the proxy, which resets the backend after each; --no-handoff
        # asks for the proxy alone.
        self.claims = self.table.claims and not (self.config.reset_every_lease or self.config.no_handoff)
        self.shared: list[Backend] = []
        self._leases_seen: dict[int, int] = {}  # slot -> its lease count at the last share_idle
        self.workers: set[Client] = set()
        self._stuck_head = (-1, 0)  # (the queue's head, since when): see _skip_unpublished_ticket

    @property
    def sharing(self) -> bool:
        """Backends nobody uses go to the table now: some worker may claim them (with nobody to
        claim, sharing would only cost the proxy two epoll_ctl calls per backend it takes back)."""
        return (
            self.claims
            and bool(self.workers)
            and self.proxy_only is False
            and not self.closing
            and not self.paused
        )

    # -- sharing and taking back ------------------------------------------------------------------

    def share_idle(self) -> None:
        """Share the backends of the idle stack that the proxy did not lend since the last call
        (a flush, every :data:`SHARE_LAG` while there are some): a proxy under load keeps its
        backends, and a backend the proxy no longer needs goes to the workers. Workers waiting in
        the table get them at once."""
        if not self.sharing or self.waiters:
            return
        words = self.table.slots
        assert words is not None
        queued = self.table_waiting() > 0
        kept = []
        while self.idle:
            b = self.idle.pop()
            if self._leases_seen.get(b.index, 0) != b.leases and not queued:
                self._leases_seen[b.index] = b.leases  # lent since: look again next time
                kept.append(b)
                continue
            self._leases_seen[b.index] = b.leases
            self._unwatch(b)  # a worker may use the socket from now on
            self._transition(b, _SHARED, "shared", publish=False)
            # The whole record first (it may lag, see TABLE_LAG), then the word that lets workers in.
            self.table.write_slot_values(b.index, _IDLE, b.close_reason, b.dirty, b.generation, b.pid,
                                         0, 0, b.leases, b.use_ns, b.opened_at)  # fmt: skip
            words.hand_over(b.index, slots.make(_IDLE, b.generation, slots.BROKER))
            self.shared.append(b)
        if kept:
            self.idle.extend(reversed(kept))  # (the same order: a stack)
            self._flush_soon()

    def poked(self) -> None:
        """A worker gave a slot back while the proxy has waiters, or queued in the table while
        the pool has room to grow."""
        self.take_back_for_waiters()
        self.grow_for_table()

    def grow_for_table(self) -> None:
        """Workers wait in the table's queue: open backends for them, up to --max-size (each goes
        to the first of them when the broker shares it)."""
        if not self.claims or self.closing or time.monotonic() < self._retry_at:
            return
        need = self.table_waiting() - self._count(SlotState.CONNECTING) - len(self.idle)
        while need > 0 and self._open_one():
            need -= 1

    def table_waiting(self) -> int:
        """Workers waiting in the table's queue now (or about to)."""
        return self.table.slots.waiting() if self.claims else 0  # type: ignore[union-attr]

    def _own(self, b: Backend, word: int) -> bool:
        """Take shared slot ``b`` back if its word is still ``word``; its holder becomes the broker.
        The caller then moves ``b`` out of ``SHARED``."""
        taken = slots.make(slots.state_of(word), b.generation, slots.BROKER)
        if not self.table.slots.cas(b.index, word, taken):  # type: ignore[union-attr]
            return False
        self.shared.remove(b)
        b.leases, b.use_ns = self.table.lease_counts(b.index)
        return True

    def _take_idle(self, b: Backend) -> bool:
        """Take shared ``b`` back if nobody holds it: it is then ``IDLE`` and watched again."""
        if not self._own(b, slots.make(_IDLE, b.generation, slots.NOBODY)):
            return False
        self._transition(b, _IDLE, "taken back", publish=False)
        self._watch(b)
        return True

    def take_back_for_waiters(self) -> None:
        """Lend shared backends nobody holds to the proxy's waiters (after a worker's poke)."""
        for b in list(self.shared):
            if not self.waiters or self.paused or self.closing:
                return
            if self._take_idle(b):
                self._make_idle(b)  # the first waiter gets it

    def take_back_idle(self) -> None:
        """Take back every shared slot nobody holds (PAUSE)."""
        for b in list(self.shared):
            if self._take_idle(b):
                self.idle.append(b)

    def lent_now(self) -> int:
        """Backends lent now, to proxy clients or to workers."""
        return sum(1 for b in self.slots if self.seen(b)[0] is _LENT)

    def publish_pending(self) -> None:
        """The proxy's queue length, at once: a worker that sees it claims nothing (FIFO), and one
        that gives a slot back while it is not 0 pokes the broker. While the pool is paused or
        closing, or PostgreSQL cannot be reached and no backend is left, :data:`shm.CLOSED_GATE`
        is added and the table's waiters are cancelled: nobody claims or waits in the table,
        everything goes through the proxy (which queues it, or says why it cannot)."""
        n = len(self.waiters)
        if self.paused or self.closing or (self.last_connect_error and not self._alive()):
            # (PostgreSQL unreachable with no backend left: the proxy gives the reason at once)
            n += CLOSED_GATE
        if self.claims:
            self.table.set_proxy_oldest(self.waiters[0].enqueued_ns if self.waiters else 0)
            self.table.set_pending(n)
            if n >= CLOSED_GATE:
                # The table's waiters go through the proxy too (it queues them while paused, and
                # refuses them while closing).
                self.table.slots.cancel_waiters(0)  # type: ignore[union-attr]
        else:
            self.table.set("pending", n)

    # -- the workers ------------------------------------------------------------------------------

    def join(self, client: Client) -> None:
        """A worker's control channel opened: send it every open slot's fd."""
        self.workers.add(client)
        for b in self.slots:
            self._send_fd(client, b)
        self._flush_soon()  # (which shares the idle backends: someone may claim them now)

    def leave(self, client: Client) -> None:
        self.workers.discard(client)

    def want(self, client: Client, index: int) -> None:
        """A worker lacks slot ``index``'s fd (it did not read it in time, or it was not sent)."""
        if 0 <= index < len(self.slots):
            client.fds.pop(index, None)
            self._send_fd(client, self.slots[index])

    def push_fd(self, b: Backend) -> None:
        """``b`` has a new backend: every worker gets its fd before the slot can be claimed."""
        for client in self.workers:
            self._send_fd(client, b)

    def _send_fd(self, client: Client, b: Backend) -> None:
        if (
            b.sock is None
            or b.tls is not None
            or b.state in (SlotState.CLOSED, SlotState.CONNECTING)
            or client.fds.get(b.index) == b.generation
            or getattr(client, "backlog", 0) >= MAX_FD_BACKLOG
        ):
            return
        client.fds[b.index] = b.generation
        client.send(control.Fd(b.index, b.generation, b.pid), b.sock.fileno())

    def worker_release(self, client: Client, index: int, generation: int, outcome: control.Outcome) -> None:
        """A worker's dirty or broken end of a claimed slot: reset it, or replace it."""
        if not 0 <= index < len(self.slots):
            logger.warning("pid %d released slot %d, which does not exist", client.pid, index)
            return
        b = self.slots[index]
        word = self._own_lease(b, generation, getattr(client, "holder", 0))
        if word is None:
            logger.debug("pid %d released slot %d gen %d, which it does not hold", client.pid, index,
                         generation)  # fmt: skip
            return
        self._count_worker_lease(b)
        if outcome is control.Outcome.BROKEN:
            self._close(b, CloseReason.CLIENT_REPORTED_BROKEN, graceful=False)
            return
        if outcome is control.Outcome.CLEAN and not b.cancels and not slots.canceling(word):
            # (a clean end needs no message, see claims.give_back, unless a cancel made it fail)
            self._transition(b, _IDLE, "clean (told)")
            self._watch(b)
            self._make_idle(b)
            return
        # Dirty, or a cancel was forwarded to it: reset (after the cancel is done, see _reset).
        self._transition(b, SlotState.RESETTING, outcome.name.lower())
        b.dirty = True
        self._spawn(self._reset(b))

    def _own_lease(self, b: Backend, generation: int, holder: int) -> int | None:
        """Take back shared ``b`` if ``holder`` holds it at ``generation``, with or without the
        cancel flag (a worker whose release failed on the flag sends its clean end): the word it
        had, or None."""
        if b.state is not _SHARED or b.generation != generation:
            return None
        word = slots.make(_LENT, generation, holder)
        for w in (word, word | slots.CANCEL_FLAG):
            if self._own(b, w):
                return w
        return None

    def _close_held_by_dead(self, b: Backend, who: str) -> None:
        """``b`` (taken back) was held by a worker that died: its protocol state is unknown."""
        logger.warning("slot %d: %s went away holding backend pid %d; closing it", b.index, who, b.pid)
        self._count_worker_lease(b)
        self._close(b, CloseReason.HOLDER_EXITED, graceful=False)

    def _count_worker_lease(self, b: Backend) -> None:
        """A worker's lease that ended without its own count (a dirty, broken or dead end)."""
        _parking, _pid, started = self.table.holder_fields(b.index)
        if started:
            used = max(0, time.monotonic_ns() - started)
            b.leases += 1
            b.use_ns += used
            self.table.count_unqueued_lease(used)

    def worker_gone(self, client: Client) -> None:
        """A worker's control channel closed: every slot it holds is in an unknown protocol state
        (a dead worker's unread result would come back as the answer to the next query)."""
        self.workers.discard(client)
        holder = getattr(client, "holder", 0)
        if holder < slots.FIRST_WORKER:
            return
        # Its waits first: nobody grants it a slot from now on (a grant that came first is among
        # its held slots below, or the janitor's, see tick_shared).
        self.table.slots.cancel_waiters(holder)  # type: ignore[union-attr]
        for b in list(self.shared):
            if self._own_lease(b, b.generation, holder) is not None:
                self._close_held_by_dead(b, f"holder pid {client.pid}")

    def seen(self, b: Backend) -> tuple[SlotState, int, str | None, int, int, int]:
        """Slot ``b`` as the admin console shows it, shared or not: state, holder pid, holder kind
        (``proxy``/``handoff``), leases, lease start (monotonic ns, 0 if not lent), parking key."""
        if b.state is not _SHARED:
            holder = b.holder
            kind = None if holder is None else "proxy" if holder.in_process else "handoff"
            return (b.state, holder.pid if holder else 0, kind, b.leases, b.lease_started_ns,
                    b.parking)  # fmt: skip
        word = self.table.word(b.index)
        parking, pid, started = self.table.holder_fields(b.index)
        leases = self.table.lease_counts(b.index)[0]
        if slots.state_of(word) is _LENT and slots.holder_of(word) >= slots.FIRST_WORKER:
            return _LENT, pid, "handoff", leases, started, parking
        return _IDLE, 0, None, leases, 0, 0

    # -- upkeep -----------------------------------------------------------------------------------

    def tick_shared(self, now_ns: int) -> None:
        """The janitor's part for shared slots: overdue leases, backends PostgreSQL hung up on."""
        limit_ns = int(self.config.max_lease_time * 1e9)
        live = {getattr(c, "holder", 0) for c in self.workers}
        self._skip_unpublished_ticket(now_ns)
        # A slot a worker kept for its next transaction ("linger") and did not come back for: to
        # the table's waiters, or idle for the proxy's (the table's waiters take it sooner).
        if self.claims:
            self.table.slots.take_lingering()  # type: ignore[union-attr]
        for b in list(self.shared):
            word = self.table.word(b.index)
            lent = slots.state_of(word) is _LENT
            holder = slots.holder_of(word)
            if lent and holder >= slots.FIRST_WORKER and holder not in live and self._own(b, word):
                # Granted from the table's queue to a worker that died as it was handed over.
                self._close_held_by_dead(b, "its holder")
                continue
            if lent and limit_ns:
                _parking, holder_pid, started = self.table.holder_fields(b.index)
                if started and now_ns - started > limit_ns and self._own(b, word):
                    logger.warning(
                        "slot %d: pid %d held backend pid %d for %.1fs (--max-lease-time %g); revoking",
                        b.index, holder_pid, b.pid, (now_ns - started) / 1e9,
                        self.config.max_lease_time,
                    )  # fmt: skip
                    self._count_worker_lease(b)
                    self._close(b, CloseReason.REVOKED, graceful=False)
                    continue
            if b.sock is None:
                continue
            p = select.poll()
            p.register(b.sock.fileno(), _RDHUP)
            if p.poll(0) and self._own(b, word):
                logger.warning("slot %d: backend pid %d hung up while %s; replacing it", b.index, b.pid,
                               "lent to a worker" if lent else "idle")  # fmt: skip
                if lent:
                    self._count_worker_lease(b)
                self._close(b, CloseReason.DIED_WHILE_LENT if lent else CloseReason.SERVER_CLOSED,
                            graceful=False)  # fmt: skip
        if self.waiters:
            self.take_back_for_waiters()  # a poke lost to a full channel costs one tick at most
        self.grow_for_table()

    def _skip_unpublished_ticket(self, now_ns: int) -> None:
        """A ticket taken but never published (its process died between the two steps) would stop
        the table's queue: once the head has stood on one for :data:`STUCK_TICKET`, skip it."""
        head, tail = self.table.queue_tickets()
        if tail <= head:
            self._stuck_head = (-1, 0)
            return
        seen, since = self._stuck_head
        if seen != head:
            self._stuck_head = (head, now_ns)
        elif now_ns - since > STUCK_TICKET * 1e9 and self.table.slots.skip(head):  # type: ignore[union-attr]
            logger.warning("the table's wait queue stood on ticket %d for %.1fs: skipped it", head,
                           (now_ns - since) / 1e9)  # fmt: skip

    def close_shared(self, *, force: bool) -> bool:
        """Shutdown: close the shared backends nobody holds (``force``: held ones too). True when
        none is left."""
        for b in list(self.shared):
            word = self.table.word(b.index)
            if (slots.holder_of(word) == slots.NOBODY or force) and self._own(b, word):
                self._close(b, CloseReason.SHUTDOWN, graceful=slots.state_of(word) is _IDLE)
        return not self.shared
