"""Slot words: who owns each slot of the shared-memory table (DESIGN.md §4).

A slot's owner is one aligned 64-bit word in its record (``shm``), changed only by compare-and-swap:
state (``SlotState``), the low 24 bits of the slot's generation, and a holder id: :data:`NOBODY`
for an idle slot any worker process may claim, :data:`BROKER` for a slot the broker owns (connecting,
resetting, idle in its proxy, lent to a proxy session), or the id the broker gave one worker's
control channel (never a pid: pids are reused).

``pgreuse._slots`` (C, atomics) does the work. :class:`PySlots` (``slots_reference``) is its Python
reference, and the model the differential test compares the C module with (tests/test_slots.py).
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable
from typing import Protocol

from . import _cmodule
from .wire.states import SlotState

NOBODY = 0
BROKER = 1
FIRST_WORKER = 2
GEN_MASK = 0xFFFFFF
NOT_HELD = -1  # in a generations list: this process has no fd for the slot

# claim() results besides a slot index
NONE_IDLE = -1  # nothing idle, or workers wait in the table's queue: queue behind them
PROXY_FIRST = -2  # the proxy has waiters: they go first

# The table's wait queue (_slotqueue.h has the same): a block after the slot records.
Q_HEAD, Q_TAIL, Q_PROXY_OLDEST, Q_TIMEOUT, Q_CAP, Q_RING = 0, 8, 16, 24, 32, 64
QR = 256  # ring entries: at most this many workers wait in the table at once
Q_ENTRY = 16  # entry word, since_ns
Q_BYTES = Q_RING + QR * Q_ENTRY
QE_FREE, QE_WAITING, QE_GRANTED, QE_CANCELLED = 0, 1, 2, 3
STAMP_MASK = 0xFFFFFF
# enqueue() and wait() results besides a ticket or a slot index
Q_FULL = -1  # cap workers wait already: this transaction goes through the proxy
Q_CANCELLED = -2  # the broker cancelled the wait (pause, shutdown, a ticket left unpublished)
Q_TIMEOUT_PASSED = -5  # --wait-timeout passed
Q_CONTROL = -6  # the control channel has something to read (the broker's end?)
Q_LOST = -7  # granted a slot the broker took back before it reached the waiter
CLOSED_GATE = 1 << 32  # shm.CLOSED_GATE (shm imports this module)
_PENDING = -8  # poll_turn(): granted, but the releaser has not stored the word yet


def make(state: SlotState | int, generation: int, holder: int) -> int:
    return (int(state) & 0xFF) | ((generation & GEN_MASK) << 8) | (holder << 32)


# Set by the broker in a LENT word while a cancel it forwarded to that backend may still land: the
# holder's release then fails (the word is not the one it wrote), it tells the broker, and the broker
# resets the backend once the cancel is done, before anyone else gets it (PgBouncer's PR #717).
CANCEL_FLAG = 0x80


def state_of(word: int) -> SlotState:
    return SlotState(word & 0x7F)


def canceling(word: int) -> bool:
    """A cancel the broker forwarded to this slot's backend may still land."""
    return bool(word & CANCEL_FLAG)


def gen_of(word: int) -> int:
    return (word >> 8) & GEN_MASK


def holder_of(word: int) -> int:
    return word >> 32


def entry(state: int, value: int, ticket: int) -> int:
    """A wait-queue entry word: state, value (holder while waiting, slot once granted), stamp."""
    return (state & 0xFF) | ((value & 0xFFFFFFFF) << 8) | ((ticket & STAMP_MASK) << 40)


def _check_worker(holder: int) -> None:
    if not FIRST_WORKER <= holder <= 0xFFFFFFFF:  # 0 and 1 are nobody and the broker
        raise ValueError(f"holder id {holder} is not a worker's")


class SlotsAPI(Protocol):
    def __init__(  # noqa: PLR0917 - the C type's signature
        self, table: mmap.mmap, slots_off: int, slot_size: int, n: int, pending_off: int,
        leases_off: int, use_ns_off: int, hist0_off: int, queue_off: int, /,
    ) -> None: ...  # fmt: skip
    def load(self, index: int, /) -> int: ...
    def cas(self, index: int, expected: int, desired: int, /) -> bool: ...
    def store(self, index: int, value: int, /) -> None: ...
    def pending(self) -> int: ...
    def set_pending(self, n: int, /) -> None: ...
    def add(self, offset: int, n: int, /) -> None: ...
    def claim(self, holder: int, start: int, generations: list[int], parking: int, pid: int, /) -> int: ...
    def release(self, index: int, holder: int, generation: int, bucket: int, /) -> int: ...
    def hand_over(self, index: int, owned: int, /) -> int: ...
    def enqueue(self, holder: int, /) -> int: ...
    def rescue(self, holder: int, /) -> None: ...
    def take_lingering(self) -> int: ...
    def wait(
        self, ticket: int, holder: int, parking: int, pid: int, control_fd: int, /
    ) -> tuple[int, int]: ...
    def cancel_waiters(self, holder: int, /) -> int: ...
    def skip(self, ticket: int, /) -> bool: ...
    def waiting(self) -> int: ...
    def close(self) -> None: ...


_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_q = struct.Struct("<q")
# Offsets in a slot record (shm_layout._SLOT); _slotword.h has the same.
REC_WORD, REC_PARKING, REC_HOLDER_PID, REC_LEASE_START, REC_LEASES, REC_USE_NS = 0, 8, 12, 16, 24, 32
# In the record's padding: nonzero while the holder keeps the slot for its next transaction
# ("linger": pgreuse._slots.Hot); a waiter takes it once LINGER_STEAL_NS old (_slotword.h).
REC_LINGER = 52
LINGER_STEAL_NS = 200_000


def linger_stamp(now_ns: int) -> int:
    """A REC_LINGER stamp for ``now_ns`` (1024 ns units, 32 bits, never 0)."""
    return ((now_ns >> 10) & 0xFFFFFFFF) or 1


def linger_age(stamp: int, now_ns: int) -> int:
    """How old ``stamp`` is at ``now_ns``, ns (negative: later than now; wraps after 36 minutes)."""
    d = (linger_stamp(now_ns) - stamp) & 0xFFFFFFFF
    return (d - (1 << 32) if d >= 1 << 31 else d) << 10


BACKEND_UNFIT = 1  # check(): the backend's peer hung up, or data waits on it
CONTROL_READABLE = 2  # check(): the control channel has something to read


def check_py(backend_fd: int, control_fd: int) -> int:
    """The reference of ``_slots.check``: one poll of both, with no wait."""
    p = select.poll()
    p.register(backend_fd, select.POLLIN | _RDHUP)
    p.register(control_fd, select.POLLIN)
    ready = dict(p.poll(0))
    return (BACKEND_UNFIT if ready.get(backend_fd) else 0) | (
        CONTROL_READABLE if ready.get(control_fd) else 0
    )


_RDHUP = getattr(select, "POLLRDHUP", 0x2000)

# (Here, not at the top: the reference uses the constants above.)
from .slots_reference import PySlots  # noqa: E402

_c = _cmodule.load("_slots")
# True when workers may claim slots: the atomics exist. Without them the broker lends every backend
# through its proxy.
ATOMIC = _c is not None
Slots: type[SlotsAPI] = _c.Slots if _c is not None else PySlots
check: Callable[[int, int], int] = _c.check if _c is not None else check_py
