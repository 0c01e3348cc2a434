"""Slot words: who owns each slot of the shared-memory table (DESIGN.md §4).

A slot's owner is one aligned 64-bit word in its record (``shm``), changed only by compare-and-swap:
state (``SlotState``), the low 24 bits of the slot's generation, and a holder id: :data:`NOBODY`
for an idle slot any worker process may claim, :data:`BROKER` for a slot the broker owns (connecting,
resetting, idle in its proxy, lent to a proxy session), or the id the broker gave one worker's
control channel (never a pid: pids are reused).

``pgreuse._slots`` (C, atomics) does the work. :class:`PySlots` is its Python reference: the same
operations on the same bytes, correct only while a single process writes the table (the broker
without the C module, where no worker claims), and the model the differential test compares the C
module with (tests/test_slots.py).
"""

from __future__ import annotations

import mmap
import select
import struct
import time
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
NONE_IDLE = -1
PROXY_FIRST = -2  # the proxy has waiters: they go first


def make(state: SlotState | int, generation: int, holder: int) -> int:
    return (int(state) & 0xFF) | ((generation & GEN_MASK) << 8) | (holder << 32)


def state_of(word: int) -> SlotState:
    return SlotState(word & 0xFF)


def gen_of(word: int) -> int:
    return (word >> 8) & GEN_MASK


def holder_of(word: int) -> int:
    return word >> 32


class SlotsAPI(Protocol):
    def __init__(  # noqa: PLR0917 - the C type's signature
        self, table: mmap.mmap, slots_off: int, slot_size: int, n: int, pending_off: int,
        leases_off: int, use_ns_off: int, hist0_off: int, /,
    ) -> None: ...  # fmt: skip
    def load(self, index: int, /) -> int: ...
    def cas(self, index: int, expected: int, desired: int, /) -> bool: ...
    def store(self, index: int, value: int, /) -> None: ...
    def pending(self) -> int: ...
    def set_pending(self, n: int, /) -> None: ...
    def add(self, offset: int, n: int, /) -> None: ...
    def claim(self, holder: int, start: int, generations: list[int], parking: int, pid: int, /) -> int: ...
    def release(self, index: int, holder: int, generation: int, /) -> int: ...
    def close(self) -> None: ...


_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_q = struct.Struct("<q")
# Offsets in a slot record (shm._SLOT); _slotword.h has the same.
REC_WORD, REC_PARKING, REC_HOLDER_PID, REC_LEASE_START, REC_LEASES, REC_USE_NS = 0, 8, 12, 16, 24, 32


class PySlots:
    """The reference of ``pgreuse._slots.Slots`` (not atomic: one writing process only)."""

    def __init__(  # noqa: PLR0917 - the C type's signature
        self, mm: mmap.mmap, slots_off: int, slot_size: int, n: int, pending_off: int,
        leases_off: int, use_ns_off: int, hist0_off: int,
    ) -> None:  # fmt: skip
        self._mm = mm
        self._slots_off = slots_off
        self._slot_size = slot_size
        self.n = n
        self._pending_off = pending_off
        self._leases_off = leases_off
        self._use_ns_off = use_ns_off
        self._hist0_off = hist0_off

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
        if holder < FIRST_WORKER:
            raise ValueError(f"holder id {holder} is not a worker's")
        if self.pending():
            return PROXY_FIRST
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

    def release(self, index: int, holder: int, generation: int) -> int:
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
        self.add(self._hist0_off, 1)
        if not self.cas(index, lent, make(SlotState.IDLE, generation, NOBODY)):
            return -1
        return self.pending()

    def close(self) -> None:
        pass


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
_c = _cmodule.load("_slots")
# True when workers may claim slots: the atomics exist. Without them the broker lends every backend
# through its proxy.
ATOMIC = _c is not None
Slots: type[SlotsAPI] = _c.Slots if _c is not None else PySlots
check: Callable[[int, int], int] = _c.check if _c is not None else check_py
