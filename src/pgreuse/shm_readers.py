"""What every process reads of the table: a slot's word, the workers waiting in the table's queue,
and the whole table as a :class:`~.snapshot.Snapshot` (``pgreuse stats``, the telemetry, the admin
console).

A mixin of :class:`~.shm.Table`, apart from its writers: these only read the mapping, which is all a
read-only mapping may do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import slots as _slots
from .shm_layout import (
    _COUNTER,
    _COUNTERS_OFF,
    _HEADER,
    _HIST_OFF,
    _REASONS_OFF,
    _SLOT,
    _SLOT_SIZE,
    _SLOTS_OFF,
    CLOSED_GATE,
    COUNTERS,
    _queue_off,
)
from .slots import holder_of, state_of
from .snapshot import WAIT_BUCKETS, SlotRecord, Snapshot
from .wire.states import CloseReason

if TYPE_CHECKING:
    import mmap


class TableReaders:
    """Mixin of :class:`~.shm.Table`: its readers."""

    if TYPE_CHECKING:
        _mm: mmap.mmap
        max_size: int

    def table_waiters(self) -> int:
        """Workers waiting in the table's queue now (its ring's entries that say so)."""
        ring = _queue_off(self.max_size) + _slots.Q_RING
        return sum(
            1
            for k in range(_slots.QR)
            if self._mm[ring + k * _slots.Q_ENTRY] == _slots.QE_WAITING  # (the state: low byte)
        )

    def word(self, index: int) -> int:
        """Slot ``index``'s word (an aligned 8-byte read: never torn)."""
        return int(_COUNTER.unpack_from(self._mm, _SLOTS_OFF + index * _SLOT_SIZE)[0])

    def snapshot(self) -> Snapshot:
        mm = self._mm
        (_m, _v, pid, gen, slot_count, min_size, started, wait_timeout, db, user, _flags, limit) = (
            _HEADER.unpack_from(mm, 0)
        )
        max_size = limit or slot_count
        counters = {
            name: _COUNTER.unpack_from(mm, _COUNTERS_OFF + i * 8)[0] for i, name in enumerate(COUNTERS)
        }
        # The gauge: requests queued in the proxy, and workers waiting in the table's queue.
        counters["pending"] = (counters["pending"] & (CLOSED_GATE - 1)) + self.table_waiters()
        reasons = {
            r.name.lower(): _COUNTER.unpack_from(mm, _REASONS_OFF + int(r) * 8)[0]
            for r in CloseReason
            if r is not CloseReason.NONE
        }
        hist = tuple(_COUNTER.unpack_from(mm, _HIST_OFF + i * 8)[0] for i in range(len(WAIT_BUCKETS) + 1))
        slots = []
        for i in range(self.max_size):
            (word, parking, holder_pid, started_ns, leases, use_ns, bpid, generation, reason, dirty,
             opened) = _SLOT.unpack_from(mm, _SLOTS_OFF + i * _SLOT_SIZE)  # fmt: skip
            slots.append(
                SlotRecord(
                    i,
                    state_of(word),
                    CloseReason(reason),
                    bool(dirty),
                    generation,
                    bpid,
                    holder_pid,
                    started_ns,
                    leases,
                    use_ns,
                    opened,
                    holder_of(word),
                    parking,
                )
            )
        return Snapshot(
            pid, gen, max_size, min_size, started, wait_timeout,
            db.rstrip(b"\0").decode(), user.rstrip(b"\0").decode(),
            counters, reasons, hist, tuple(slots),
        )  # fmt: skip
