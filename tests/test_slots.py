"""The slot words: the C module (pgreuse._slots) against its Python reference (slots.PySlots).

Both run the same random scripts of claims, releases, compare-and-swaps, stores, queue lengths,
counter adds and the wait queue's steps (enqueue, hand over, rescue, wait with a zero timeout so it
never blocks, cancel, skip) on two tables of the same layout; after every step the results and the
tables' bytes must be equal (clock readings are compared as zero or not). Planted
bugs in the reference (a flipped comparison, a dropped step) must make the comparison fail, or it
proves nothing.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from pgreuse import shm, slots
from pgreuse.wire.states import SlotState

pytestmark = pytest.mark.skipif(not slots.ATOMIC, reason="PGREUSE_PURE_PYTHON=1: no C module to compare")

N = 4
_SLOT_TIME_FIELDS = (slots.REC_LEASE_START, slots.REC_USE_NS)


def _table(tmp_path: Any, name: str) -> shm.Table:
    table = shm.Table.create(
        str(tmp_path / name), max_size=N, min_size=1, wait_timeout=1.0, database="d", user="u", claims=True
    )
    table.set_limits(table.max_size, 0, 0.0, 3)  # wait() never blocks; a small ring fills up
    return table


def _reference(table: shm.Table, kind: type[slots.PySlots] = slots.PySlots) -> slots.PySlots:
    off = shm._COUNTER_OFFSETS
    return kind(table._mm, shm._SLOTS_OFF, shm._SLOT_SIZE, N, off["pending"], shm._LEASES_OFF,
                off["use_ns"], shm._HIST_OFF, shm._queue_off(N))  # fmt: skip


def _normalised(table: shm.Table) -> bytes:
    """The table's bytes, with each clock reading replaced by whether it is zero."""
    data = bytearray(table._mm[:])
    times = [shm._SLOTS_OFF + i * shm._SLOT_SIZE + f for i in range(N) for f in _SLOT_TIME_FIELDS]
    times += [shm._COUNTER_OFFSETS["use_ns"], shm._COUNTER_OFFSETS["wait_ns"]]
    times += [shm._queue_off(N) + slots.Q_RING + k * slots.Q_ENTRY + 8 for k in range(slots.QR)]
    for off in times:
        (value,) = struct.unpack_from("<q", data, off)
        struct.pack_into("<q", data, off, int(value != 0))
    return bytes(data[shm._COUNTERS_OFF :])  # (the header holds each broker's pid and start time)


def _word(rng: random.Random) -> int:
    state = rng.choice(
        [SlotState.CLOSED, SlotState.IDLE, SlotState.IDLE, SlotState.LENT, SlotState.RESETTING]
    )
    holder = rng.choice([slots.NOBODY, slots.NOBODY, slots.BROKER, 2, 3])
    return slots.make(state, rng.choice([1, 2, 0xFFFFFF]), holder)


def _step(rng: random.Random, words: slots.SlotsAPI, peer: slots.SlotsAPI) -> tuple[str, Any]:
    """One random operation, chosen with ``rng``, on ``words`` (``peer`` is read for realistic
    arguments: the current words, so that CASes and releases often match)."""
    i = rng.randrange(N)
    current = peer.load(i)
    op = rng.choice(
        ["store", "cas", "cas", "pending", "claim", "claim", "claim", "release", "release", "add",
         "enqueue", "enqueue", "hand_over", "rescue", "wait", "wait", "cancel_waiters", "skip",
         "proxy_oldest", "linger", "take_lingering"]
    )  # fmt: skip
    tail = _qget(peer, slots.Q_TAIL)
    if op == "store":
        return op, words.store(i, _word(rng))
    if op == "cas":
        expected = current if rng.random() < 0.7 else _word(rng)
        return op, words.cas(i, expected, _word(rng))
    if op == "pending":
        return op, words.set_pending(rng.choice([0, 0, 0, 1, 3, shm.CLOSED_GATE]))
    if op == "claim":
        gens = [rng.choice([slots.NOT_HELD, slots.gen_of(peer.load(k)), 2]) for k in range(N)]
        return op, words.claim(rng.choice([2, 3, 4]), rng.randrange(N), gens, rng.randrange(1 << 31), 77)
    if op == "release":
        holder = slots.holder_of(current) if rng.random() < 0.8 else rng.choice([2, 3])
        gen = slots.gen_of(current) if rng.random() < 0.8 else 2
        return op, words.release(i, holder, gen, rng.choice([0, 0, 3, 16]))
    if op == "enqueue":
        return op, words.enqueue(rng.choice([2, 3, 4]))
    if op == "hand_over":
        owned = current if rng.random() < 0.8 else _word(rng)
        return op, words.hand_over(i, owned)
    if op == "rescue":
        return op, words.rescue(rng.choice([2, 3]))
    if op == "wait":
        ticket = max(0, tail - rng.randrange(4))
        return op, words.wait(ticket, rng.choice([2, 3, 4]), 5, 77, -1)[0]
    if op == "cancel_waiters":
        return op, words.cancel_waiters(rng.choice([0, 2, 3]))
    if op == "skip":
        return op, words.skip(_qget(peer, slots.Q_HEAD))
    if op == "linger":
        # A holder keeps slot i for its next transaction: a stamp long past (waiters take it), or
        # one a minute ahead (young for the whole script, on both sides).
        young = rng.random() < 0.5
        _set_linger(peer, i, slots.linger_stamp(_T0 + (60_000_000_000 if young else -1_000_000_000)))
        return op, None
    if op == "take_lingering":
        return op, words.take_lingering()
    if op == "proxy_oldest":
        _qset(peer, slots.Q_PROXY_OLDEST, rng.choice([0, 1, 1 << 62]))
        return op, None
    return op, words.add(shm._COUNTER_OFFSETS[rng.choice(["leases", "timeouts", "resets"])], rng.randrange(5))


_T0 = time.monotonic_ns()  # (the same stamps on both sides of a comparison)


def _set_linger(words: Any, i: int, stamp: int) -> None:
    mm = words._mm if isinstance(words, slots.PySlots) else _MAPS[id(words)]
    struct.pack_into("<I", mm, shm._SLOTS_OFF + i * shm._SLOT_SIZE + slots.REC_LINGER, stamp)


def _qget(words: Any, off: int) -> int:
    mm = words._mm if isinstance(words, slots.PySlots) else _MAPS[id(words)]
    return int(struct.unpack_from("<Q", mm, shm._queue_off(N) + off)[0])


def _qset(words: Any, off: int, value: int) -> None:
    mm = words._mm if isinstance(words, slots.PySlots) else _MAPS[id(words)]
    struct.pack_into("<Q", mm, shm._queue_off(N) + off, value)


_MAPS: dict[int, Any] = {}  # id(C Slots) -> its table's mmap


def _first_difference(
    tmp_path: Any, seed: int, reference: type[slots.PySlots], steps: int = 300
) -> str | None:
    """Run one script on C and on ``reference``; describe the first difference, or None."""
    c_table, py_table = _table(tmp_path, f"c{seed}"), _table(tmp_path, f"py{seed}")
    assert c_table.slots is not None
    c, py = c_table.slots, _reference(py_table, reference)
    _MAPS[id(c)] = c_table._mm
    try:
        for n in range(steps):
            got_c = _step(random.Random(seed * 1000 + n), c, c)
            got_py = _step(random.Random(seed * 1000 + n), py, py)
            if got_c != got_py:
                return f"seed {seed} step {n}: C {got_c} != Python {got_py}"
            if _normalised(c_table) != _normalised(py_table):
                return f"seed {seed} step {n} ({got_c[0]}): the tables differ"
        return None
    finally:
        c_table.close()
        py_table.close()


@pytest.mark.parametrize("seed", range(40))
def test_c_and_python_slot_words_agree(tmp_path, seed):
    assert _first_difference(tmp_path, seed, slots.PySlots) is None


class _IgnoresQueue(slots.PySlots):
    def pending(self) -> int:  # claim() no longer lets the proxy's waiters go first
        return 0 if self._in_claim else super().pending()

    _in_claim = False

    def claim(self, *args: Any) -> int:
        self._in_claim = True
        try:
            return super().claim(*args)
        finally:
            self._in_claim = False


class _ClaimsAnyGeneration(slots.PySlots):
    def claim(self, holder: int, start: int, generations: list[int], parking: int, pid: int) -> int:
        # a flipped comparison: a slot whose fd this process does not hold counts as held
        return super().claim(holder, start, [slots.gen_of(self.load(i)) for i in range(self.n)], parking, pid)


class _KeepsParking(slots.PySlots):
    def release(self, index: int, holder: int, generation: int, bucket: int) -> int:
        parking = self._mm[self._rec(index) + slots.REC_PARKING : self._rec(index) + slots.REC_PARKING + 4]
        result = super().release(index, holder, generation, bucket)
        self._mm[self._rec(index) + slots.REC_PARKING : self._rec(index) + slots.REC_PARKING + 4] = parking
        return result  # a dropped step: the parking key outlives the lease (a cancel would follow it)


class _ReleasesAnyHolder(slots.PySlots):
    def release(self, index: int, holder: int, generation: int, bucket: int) -> int:
        # a dropped check: a release by someone who does not hold the slot is taken
        return super().release(index, slots.holder_of(self.load(index)), generation, bucket)


class _GrantsTheGone(slots.PySlots):
    def _first(self) -> tuple[int, int]:
        # a dropped check: a cancelled waiter at the head is granted a slot nobody will use
        h = self._qget(slots.Q_HEAD)
        e = self._entry(h)
        if self._published(e, h) and e & 0xFF == slots.QE_CANCELLED:
            return slots.entry(slots.QE_WAITING, 2, h), h
        return super()._first()


class _ProxyLast(slots.PySlots):
    def pending(self) -> int:
        # a flipped comparison: the table's waiters go first even when the proxy's waited longer
        return 0 if self._releasing else super().pending()

    _releasing = False

    def release(self, index: int, holder: int, generation: int, bucket: int) -> int:
        self._releasing = True
        try:
            return super().release(index, holder, generation, bucket)
        finally:
            self._releasing = False


class _NoCap(slots.PySlots):
    def enqueue(self, holder: int) -> int:
        # a dropped limit: more wait than --max-waiting allows
        self._qset(slots.Q_CAP, slots.QR)
        return super().enqueue(holder)


class _StealsTheYoung(slots.PySlots):
    def take_lingering(self) -> int:
        # a flipped comparison: a slot whose holder may still come back is taken from it
        for i in range(self.n):
            off = self._rec(i) + slots.REC_LINGER
            if struct.unpack_from("<I", self._mm, off)[0]:
                struct.pack_into("<I", self._mm, off, slots.linger_stamp(_T0 - 1_000_000_000))
        return super().take_lingering()


class _LeavesTheStamp(slots.PySlots):
    def hand_over(self, index: int, owned: int) -> int:
        # a dropped step: a lingering slot is handed on, and its stamp (cleared just before)
        # comes back, so that it is handed on again
        off = self._rec(index) + slots.REC_LINGER
        result = super().hand_over(index, owned)
        if self._taking:
            struct.pack_into("<I", self._mm, off, slots.linger_stamp(_T0 - 1_000_000_000))
        return result

    _taking = False

    def _take_lingering(self) -> tuple[int, bool]:
        self._taking = True
        try:
            return super()._take_lingering()
        finally:
            self._taking = False


MUTANTS: list[Callable[..., slots.PySlots]] = [
    _IgnoresQueue,
    _ClaimsAnyGeneration,
    _KeepsParking,
    _ReleasesAnyHolder,
    _GrantsTheGone,
    _ProxyLast,
    _NoCap,
    _StealsTheYoung,
    _LeavesTheStamp,
]


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.__name__)
def test_the_comparison_catches_planted_bugs(tmp_path, mutant):
    found = [_first_difference(tmp_path, seed, mutant, steps=200) for seed in range(8)]
    assert any(found), f"{mutant.__name__} went unnoticed"


def test_the_word_layout_is_the_c_modules():
    # _slotword.h packs the same bits: a word made here is read back by the C claim.
    word = slots.make(SlotState.LENT, 0x123456 | 1 << 24, 0xFFFFFFFE)
    assert (slots.state_of(word), slots.gen_of(word), slots.holder_of(word)) == (
        SlotState.LENT,
        0x123456,
        0xFFFFFFFE,
    )
    assert shm._SLOT.size == 64 and shm._SLOTS_OFF % 8 == 0
