"""The Python reference of ``pgreuse._slots.Slots`` (:class:`PySlots`): the same operations on the
same bytes as the C module, correct only while a single process writes the table (the broker without
the C module, where no worker claims), and the model the differential test compares the C module with
(tests/test_slots.py). The slot words' layout and constants are ``slots``'s.
"""

from __future__ import annotations

import mmap
import time

from .slots import (
    _I,
    _PENDING,
    _Q,
    BROKER,
    CLOSED_GATE,
    LINGER_STEAL_NS,
    NOBODY,
    NONE_IDLE,
    PROXY_FIRST,
    Q_CANCELLED,
    Q_CAP,
    Q_ENTRY,
    Q_FULL,
    Q_HEAD,
    Q_LOST,
    Q_PROXY_OLDEST,
    Q_RING,
    Q_TAIL,
    Q_TIMEOUT,
    Q_TIMEOUT_PASSED,
    QE_CANCELLED,
    QE_FREE,
    QE_GRANTED,
    QE_WAITING,
    QR,
    REC_HOLDER_PID,
    REC_LEASE_START,
    REC_LEASES,
    REC_LINGER,
    REC_PARKING,
    REC_USE_NS,
    STAMP_MASK,
    _check_worker,
    _q,
    entry,
    gen_of,
    holder_of,
    linger_age,
    make,
    state_of,
)
from .wire.states import SlotState


class PySlots:
    """The reference of ``pgreuse._slots.Slots`` (not atomic: one writing process only)."""

    def __init__(  # noqa: PLR0917 - the C type's signature
        self, mm: mmap.mmap, slots_off: int, slot_size: int, n: int, pending_off: int,
        leases_off: int, use_ns_off: int, hist0_off: int, queue_off: int,
    ) -> None:  # fmt: skip
        self._mm = mm
        self._slots_off = slots_off
        self._slot_size = slot_size
        self.n = n
        self._pending_off = pending_off
        self._leases_off = leases_off
        self._use_ns_off = use_ns_off
        self._hist0_off = hist0_off
        self._q = queue_off

    def _rec(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"slot {index} does not exist (the table has {self.n})")
        return self._slots_off + index * self._slot_size

    def load(self, index: int) -> int:
        return int(_Q.unpack_from(self._mm, self._rec(index))[0])

    def cas(self, index: int, expected: int, desired: int) -> bool:
        if self.load(index) != expected:
            return False
        _Q.pack_into(self._mm, self._rec(index), desired)
        return True

    def store(self, index: int, value: int) -> None:
        _Q.pack_into(self._mm, self._rec(index), value)

    def pending(self) -> int:
        return int(_Q.unpack_from(self._mm, self._pending_off)[0])

    def set_pending(self, n: int) -> None:
        _Q.pack_into(self._mm, self._pending_off, max(0, n))

    def add(self, offset: int, n: int) -> None:
        _Q.pack_into(self._mm, offset, (_Q.unpack_from(self._mm, offset)[0] + n) & (2**64 - 1))

    def claim(self, holder: int, start: int, generations: list[int], parking: int, pid: int) -> int:
        _check_worker(holder)
        if self.pending():
            return PROXY_FIRST
        if self._first()[0]:
            return NONE_IDLE
        missing = -1
        for k in range(self.n):
            i = (start + k) % self.n
            w = self.load(i)
            if state_of(w) is not SlotState.IDLE or holder_of(w) != NOBODY:
                continue
            if generations[i] != gen_of(w):
                if missing < 0:
                    missing = i
                continue
            if not self.cas(i, w, make(SlotState.LENT, gen_of(w), holder)):
                continue
            rec = self._rec(i)
            _I.pack_into(self._mm, rec + REC_PARKING, parking)
            _I.pack_into(self._mm, rec + REC_HOLDER_PID, pid)
            _q.pack_into(self._mm, rec + REC_LEASE_START, time.monotonic_ns())
            return i
        return NONE_IDLE if missing < 0 else -3 - missing

    def release(self, index: int, holder: int, generation: int, bucket: int) -> int:
        if not 0 <= bucket < 17:
            raise ValueError(f"histogram bucket {bucket} does not exist")
        rec = self._rec(index)
        lent = make(SlotState.LENT, generation, holder)
        if self.load(index) != lent:
            return -1
        used = max(0, time.monotonic_ns() - _q.unpack_from(self._mm, rec + REC_LEASE_START)[0])
        self.add(rec + REC_LEASES, 1)
        self.add(rec + REC_USE_NS, used)
        _I.pack_into(self._mm, rec + REC_PARKING, 0)
        _I.pack_into(self._mm, rec + REC_HOLDER_PID, 0)
        _q.pack_into(self._mm, rec + REC_LEASE_START, 0)
        self.add(self._leases_off, 1)
        self.add(self._use_ns_off, used)
        self.add(self._hist0_off + bucket * 8, 1)
        pending = self.pending()
        if pending:
            # FIFO across both queues: the proxy's oldest waiter against the table's first
            first, ticket = self._first()
            oldest = self._qget(Q_PROXY_OLDEST)
            if not first or pending & CLOSED_GATE or oldest == 0 or oldest <= self._since(ticket):
                if not self.cas(index, lent, make(SlotState.IDLE, generation, NOBODY)):
                    return -1
                return pending
        return -1 if self.hand_over(index, lent) < 0 else 0

    # -- the wait queue (_slotqueue.h) -------------------------------------------------------------

    def _qget(self, off: int) -> int:
        return int(_Q.unpack_from(self._mm, self._q + off)[0])

    def _qset(self, off: int, value: int) -> None:
        _Q.pack_into(self._mm, self._q + off, value & (2**64 - 1))

    def _entry_off(self, ticket: int) -> int:
        return self._q + Q_RING + (ticket % QR) * Q_ENTRY

    def _entry(self, ticket: int) -> int:
        return int(_Q.unpack_from(self._mm, self._entry_off(ticket))[0])

    def _since(self, ticket: int) -> int:
        return int(_q.unpack_from(self._mm, self._entry_off(ticket) + 8)[0])

    @staticmethod
    def _published(e: int, ticket: int) -> bool:
        return e & 0xFF != QE_FREE and e >> 40 == ticket & STAMP_MASK

    def _first(self) -> tuple[int, int]:
        """The first waiter's entry word (0 if nobody waits at the head) and the head ticket."""
        while True:
            h = self._qget(Q_HEAD)
            e = self._entry(h)
            if not self._published(e, h):
                return 0, h
            if e & 0xFF == QE_WAITING:
                return e, h
            self._qset(Q_HEAD, h + 1)  # granted or cancelled: skip it

    def hand_over(self, index: int, owned: int) -> int:
        gen = gen_of(owned)
        idle = make(SlotState.IDLE, gen, NOBODY)
        while True:
            e, h = self._first()
            if e:
                if self.load(index) != owned:
                    return -1
                who = (e >> 8) & 0xFFFFFFFF
                _Q.pack_into(self._mm, self._entry_off(h), entry(QE_GRANTED, index, h))
                self._qset(Q_HEAD, h + 1)
                self.store(index, make(SlotState.LENT, gen, who))
                return who
            if not self.cas(index, owned, idle):
                return -1
            if not self._first()[0]:
                return 0
            if not self.cas(index, idle, owned):
                return 0

    def enqueue(self, holder: int) -> int:
        _check_worker(holder)
        tail, head = self._qget(Q_TAIL), self._qget(Q_HEAD)
        if tail - head >= min(self._qget(Q_CAP), QR):
            return Q_FULL
        self._qset(Q_TAIL, tail + 1)
        if self._published(self._entry(tail), tail):
            return Q_CANCELLED
        off = self._entry_off(tail)
        _q.pack_into(self._mm, off + 8, time.monotonic_ns())
        _Q.pack_into(self._mm, off, entry(QE_WAITING, holder, tail))
        return tail

    def take_lingering(self) -> int:
        """Lingering slots of holders that did not come back within LINGER_STEAL_NS go to the
        table's first waiter (or back idle), as their release would have: 1 if one did."""
        return self._take_lingering()[0]

    def _take_lingering(self) -> tuple[int, bool]:
        """take_lingering(), and whether a younger one still lingers (sq_take_lingering's due)."""
        now = time.monotonic_ns()
        took, young = 0, False
        for i in range(self.n):
            off = self._rec(i) + REC_LINGER
            v = int(_I.unpack_from(self._mm, off)[0])
            if not v:
                continue
            if linger_age(v, now) < LINGER_STEAL_NS:
                young = True
                continue
            w = self.load(i)
            if state_of(w) is SlotState.LENT:
                _I.pack_into(self._mm, off, 0)
                if self.hand_over(i, w) >= 0:
                    took = 1
        return took, young

    def rescue(self, holder: int) -> None:
        _check_worker(holder)
        for i in range(self.n):
            w = self.load(i)
            mine = make(SlotState.LENT, gen_of(w), holder)
            if not self._first()[0]:
                return
            if state_of(w) is not SlotState.IDLE or holder_of(w) != NOBODY or not self.cas(i, w, mine):
                continue
            self.hand_over(i, mine)

    def poll_turn(self, ticket: int, holder: int) -> int:
        """What wait() would return now without blocking: a slot, Q_CANCELLED, Q_LOST, or
        NONE_IDLE while still waiting."""
        e = self._entry(ticket)
        if e == entry(QE_GRANTED, (e >> 8) & 0xFFFFFFFF, ticket):
            i = (e >> 8) & 0xFFFFFFFF
            w = self.load(i)
            if holder_of(w) == holder and state_of(w) is SlotState.LENT:
                return i
            # (the releaser stores the word right after the grant: wait() waits for it, but
            # not past the deadline, nor once the broker took the slot)
            return Q_LOST if holder_of(w) <= BROKER or state_of(w) is not SlotState.LENT else _PENDING
        return NONE_IDLE if e == entry(QE_WAITING, holder, ticket) else Q_CANCELLED

    def cancel(self, ticket: int, holder: int) -> bool:
        if self._entry(ticket) != entry(QE_WAITING, holder, ticket):
            return False
        _Q.pack_into(self._mm, self._entry_off(ticket), entry(QE_CANCELLED, 0, ticket))
        return True

    def wait(self, ticket: int, holder: int, parking: int, pid: int, control_fd: int) -> tuple[int, int]:
        """Polls (this reference serves one process: nobody else can grant while it sleeps)."""
        _check_worker(holder)
        since = self._since(ticket)
        deadline = since + self._qget(Q_TIMEOUT)
        while True:
            e = self._entry(ticket)
            if e == entry(QE_GRANTED, (e >> 8) & 0xFFFFFFFF, ticket) and self._take_lingering()[1]:
                self._first()  # (as the C wait does once granted: it wakes the next waiter)
            got = self.poll_turn(ticket, holder)
            if got not in (NONE_IDLE, _PENDING):
                break
            now = time.monotonic_ns()
            if got == _PENDING and now > deadline:
                got = Q_LOST
                break
            if got == NONE_IDLE and now >= deadline:
                if self.cancel(ticket, holder):
                    got = Q_TIMEOUT_PASSED
                    break
                continue
            if self.take_lingering():
                continue
            time.sleep(0.001)
            if self.poll_turn(ticket, holder) == NONE_IDLE:
                self.rescue(holder)
        now = time.monotonic_ns()
        if got >= 0:
            rec = self._rec(got)
            _I.pack_into(self._mm, rec + REC_PARKING, parking)
            _I.pack_into(self._mm, rec + REC_HOLDER_PID, pid)
            _q.pack_into(self._mm, rec + REC_LEASE_START, now)
            self.add(self._leases_off + 8, 1)
            self.add(self._leases_off + 16, now - since)
        elif got == Q_TIMEOUT_PASSED:
            self.add(self._leases_off + 32, 1)
        return got, now - since

    def cancel_waiters(self, holder: int) -> int:
        n = 0
        for k in range(QR):
            off = self._q + Q_RING + k * Q_ENTRY
            e = int(_Q.unpack_from(self._mm, off)[0])
            if e & 0xFF != QE_WAITING or (holder and (e >> 8) & 0xFFFFFFFF != holder):
                continue
            _Q.pack_into(self._mm, off, entry(QE_CANCELLED, 0, e >> 40))
            n += 1
        return n

    def waiting(self) -> int:
        _e, head = self._first()
        return max(0, self._qget(Q_TAIL) - head)

    def skip(self, ticket: int) -> bool:
        if (
            self._qget(Q_HEAD) != ticket
            or self._qget(Q_TAIL) <= ticket
            or self._published(self._entry(ticket), ticket)
        ):
            return False
        _Q.pack_into(self._mm, self._entry_off(ticket), entry(QE_CANCELLED, 0, ticket))
        self._qset(Q_HEAD, ticket + 1)
        return True

    def close(self) -> None:
        pass
