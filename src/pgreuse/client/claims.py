"""A worker's claims in the shared-memory table (DESIGN.md §4), the part of the control channel that
never talks to the broker in the usual case.

:meth:`TableClaims.claim_into` takes an idle slot with one compare-and-swap, with the holder id the
broker gave this channel, and swaps the slot's socket (which this process already holds) onto
libpq's fd number. When nothing is idle, a sync connection's thread waits in the table's queue until
a worker that frees a slot hands it over (:meth:`TableClaims._wait_turn`); an async one, or any
transaction while the broker's proxy has waiters, goes through the proxy instead.
:meth:`TableClaims.give_back` hands a clean slot to the first waiter, or back idle.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from .. import errors, shm, slots
from ..wire import control

# A claimed backend this process gave back less than this long ago is used without a look at its
# socket (and at the control channel): it was fine then. Older ones are checked first, one poll()
# for both: PostgreSQL may have ended the session meanwhile, or the broker may have died.
CHECK_AFTER_NS = 10_000_000
_monotonic_ns = time.monotonic_ns
_dup2 = os.dup2
POKE = control.encode(control.Poke())
_CLEAN = control.Outcome.CLEAN


class TableClaims:
    """Mixin of :class:`pgreuse.client.channel.ChannelBase`: claims, waits and clean releases."""

    if TYPE_CHECKING:
        path: str
        pid: int
        broker_pid: int
        max_size: int
        holder: int
        table: shm.Table | None
        sock: socket.socket
        _lock: threading.Lock
        _gens: list[int]
        _full: list[int]
        _fds: list[int]
        _pids: list[int]
        _given_back: list[int]
        _wanted: set[tuple[int, int]]
        _start: int
        _outbox: object
        _dead: str | None

        @property
        def dead(self) -> bool: ...
        def _flush(self) -> None: ...
        def _drain_locked(self) -> None: ...
        def _try_send(self, data: bytes) -> bool: ...
        def _send(self, msg: control.Message) -> None: ...
        def report(self, slot: int, generation: int, outcome: control.Outcome) -> None: ...

    def _open_table(self) -> None:
        sock_dir, name = os.path.split(self.path)
        path = shm.table_path(sock_dir, int(name.rsplit(".", 1)[-1]))
        try:
            table = shm.Table.open(path, writable=True)
        except (OSError, shm.TableError):
            return  # no claims: every transaction goes through the proxy
        if table.broker_pid != self.broker_pid or not table.claims or table.max_size != self.max_size:
            table.close()  # a table left by another broker, or one without atomics
            return
        self.table = table

    # -- claims -----------------------------------------------------------------------------------

    # A sync connection's thread may wait in the table's queue (the C wait lets go of the GIL); an
    # event loop must not block, so an async connection's transaction goes through the proxy.
    waits_in_table = False

    def claim_into(
        self, parking: int, fd_number: int, claimed: int | tuple[int, int] = -1
    ) -> tuple[int, int, int, int] | None:
        """Claim an idle slot, or wait in the table's queue for one, and ``dup2`` its socket onto
        ``fd_number``: ``(slot, generation, backend_pid, waited ns)``, or ``None`` when the
        transaction should go through the proxy. ``claimed``: what the C hot path left to this
        one: a slot it claimed (not given back here lately: it is checked first), or the outcome
        of its wait in the table's queue."""
        table = self.table
        if table is None or table.slots is None:
            return None
        words = table.slots
        if isinstance(claimed, tuple):
            return self._wait_turn(table, words, parking, fd_number, claimed)
        if self._dead is not None:
            if claimed >= 0:
                words.release(claimed, self.holder, self._gens[claimed], 0)
            return None
        if self._outbox:
            self._flush()  # (a dirty or broken end the broker must hear of)
        claim = words.claim
        with self._lock:
            got = claimed if claimed >= 0 else claim(self.holder, self._start, self._gens, parking, self.pid)
            for _attempt in range(len(self._fds)):
                if got <= -3:
                    # An idle slot of a generation whose fd has not been read yet: read, retry.
                    self._drain_locked()
                    if self._dead is not None:
                        return None
                    got = claim(self.holder, self._start, self._gens, parking, self.pid)
                if got < 0:
                    if got <= -3:
                        self._want(-3 - got)
                    break
                if _monotonic_ns() - self._given_back[got] >= CHECK_AFTER_NS:
                    gen = self._gens[got]  # (a drain that finds the broker's end forgets them)
                    seen = slots.check(self._fds[got], self.sock.fileno())
                    if seen & slots.CONTROL_READABLE:
                        self._drain_locked()  # new fds, or the broker's end
                        if self._dead is not None:
                            # The broker died: this table and its backends are not ours to use.
                            words.release(got, self.holder, gen, 0)
                            return None
                    if seen & slots.BACKEND_UNFIT:
                        # PostgreSQL ended that session while it sat idle in the table (a restart,
                        # a terminate): the broker replaces it; this transaction tries another slot.
                        self.report(got, self._full[got], control.Outcome.BROKEN)
                        got = claim(self.holder, self._start, self._gens, parking, self.pid)
                        continue
                return self._swap_in(words, got, fd_number, 0)
            else:
                return None
        if got == slots.NONE_IDLE and self.waits_in_table:
            return self._wait_turn(table, words, parking, fd_number)
        return None

    def _swap_in(
        self, words: slots.SlotsAPI, got: int, fd_number: int, waited_ns: int
    ) -> tuple[int, int, int, int]:
        try:
            _dup2(self._fds[got], fd_number, inheritable=False)
        except BaseException:
            # Nothing was sent on it: it goes back as it was.
            words.release(got, self.holder, self._gens[got], 0)
            raise
        return got, self._full[got], self._pids[got], waited_ns

    def _poke_if_room(self) -> None:
        """A worker queues in the table: the broker opens backends for the table's waiters when it
        hears of them (and has room for more)."""
        if self.table is not None and self.table.room_to_grow():
            with contextlib.suppress(errors.BrokerUnavailable):
                self._try_send(POKE)

    def _wait_turn(
        self,
        table: shm.Table,
        words: slots.SlotsAPI,
        parking: int,
        fd_number: int,
        waited: tuple[int, int] | None = None,
    ) -> tuple[int, int, int, int] | None:
        """Wait in the table's queue (FIFO) until a worker that frees a slot hands it here: no
        broker in between. ``None``: the queue is full or the broker cancelled the wait (pause,
        shutdown): the proxy takes the transaction. ``waited``: the C hot path waited, and this is
        the ``(got, waited ns)`` it leaves to this path."""
        while True:
            if waited is not None:
                (got, waited_ns), waited = waited, None
            else:
                ticket = words.enqueue(self.holder)
                if ticket < 0:
                    return None
                words.rescue(self.holder)  # a slot freed as this ticket was published
                self._poke_if_room()
                got, waited_ns = words.wait(ticket, self.holder, parking, self.pid, self.sock.fileno())
            if got == slots.Q_TIMEOUT_PASSED:
                limit = table.wait_limit()
                raise errors.PoolTimeout(errors.wait_timeout_message(limit, table.limit()))
            if got == slots.Q_CONTROL:
                with self._lock:
                    self._drain_locked()  # a new fd, or the broker's end
                if self.dead:
                    return None
                continue
            if got < 0:
                return None
            with self._lock:
                gen = slots.gen_of(words.load(got))
                if self._gens[got] != gen:
                    # A backend newer than the fd this process holds: on to the next waiter.
                    words.release(got, self.holder, gen, 0)
                    self._want(got)
                    return None
                return self._swap_in(words, got, fd_number, waited_ns)

    def end_lease(  # noqa: PLR0917 - one call per transaction: no argument object
        self, slot: int, generation: int, bucket: int, outcome: control.Outcome, home: int, fd_number: int
    ) -> None:
        """The end of a lease: the parking socket ``home`` goes back onto libpq's ``fd_number`` (-1:
        libpq gave that number up when the backend failed, DESIGN.md §3 rule 4: never dup2 into a
        number it gave up, it may belong to someone else by now). Then a clean slot goes to the first
        worker waiting in the table, or back idle, and the broker hears of it only when its proxy has
        waiters (they get the slot now); a dirty or broken one goes to the broker, which resets or
        replaces the backend. ``bucket``: the lease's wait in the histogram."""
        if home >= 0:
            try:
                _dup2(home, fd_number, inheritable=False)
            except BaseException:
                # libpq's fd still points at the backend: it is not clean for anyone else.
                self.report(slot, generation, control.Outcome.BROKEN)
                raise
        if outcome is not _CLEAN:
            self.report(slot, generation, outcome)
            return
        table = self.table
        if table is None or table.slots is None:
            return
        pending = table.slots.release(slot, self.holder, generation & slots.GEN_MASK, bucket)
        self._given_back[slot] = _monotonic_ns()
        if pending:
            self._released(slot, generation, pending)

    def _released(self, slot: int, generation: int, pending: int) -> None:
        """After a clean slot went back (here or in the C hot path, ``pgreuse._slots.Hot``) and its
        release said the broker must hear of it (``pending``: Slots.release's answer)."""
        if pending < 0:
            # The word is not the one this process wrote: the broker flagged it (a cancel it
            # forwarded may still land: it resets the backend first) or took the slot back. Either
            # way it must hear that this lease is over.
            self.report(slot, generation, control.Outcome.CLEAN)
        elif pending > 0 and not self._dead:
            # Never waited for: a poke the full socket cannot take now is dropped, and the broker's
            # janitor hands idle shared slots to its waiters on its next tick anyway.
            with contextlib.suppress(errors.BrokerUnavailable):
                self._try_send(POKE)

    def _want(self, slot: int) -> None:
        word = self.table.word(slot) if self.table is not None else 0
        key = (slot, slots.gen_of(word))
        if key not in self._wanted:
            self._wanted.add(key)
            with contextlib.suppress(errors.BrokerUnavailable):
                self._send(control.Want(slot))
