"""The shared-memory table: one versioned layout, written by the broker, readable by every process.

The file ``<socket-dir>/pgreuse.<port>.shm`` is ``mmap``'d by the broker (read-write) and by anyone who
wants the pool's truth (read-only): ``pgreuse stats``, the telemetry of every worker. It holds

* a header: magic, layout version, broker pid, a generation (the broker's start time in ns: a restarted
  broker is a new table), pool limits and identity;
* pool-wide counters (monotonic totals and a few gauges) and a wait-time histogram;
* one record per slot: the slot word (state, generation, holder id), the parking key the holder
  serves, holder pid, lease start, per-slot totals, backend pid, full generation;
* the wait queue where workers wait for a slot when none is idle (its layout is
  :mod:`pgreuse.slots`'s ``Q_*``: two tickets, the proxy's oldest wait, the wait limits, a ring).

This module and its parts, :mod:`.shm_layout` (the layout: sizes and offsets) and :mod:`.shm_readers`
(a slot's word, the snapshot), are the only ones that know offsets. Each slot record starts with its
*slot word* (:mod:`pgreuse.slots`): the state, generation and holder, changed only by compare-and-swap.
That word is the truth about who owns the slot: worker processes claim idle slots in it and give them
back without asking the broker (DESIGN.md §4), so they map the table read-write. The other fields are
written with ``struct.pack_into`` by whoever owns the slot (the holder writes the parking key it
serves, its pid, its lease start and its lease counts), so a reader may see a record mid-update; they
are statistics and routing hints, never ownership. Pool-wide lease counters are added atomically
(``Slots.add``) because workers add to them too.
"""

from __future__ import annotations

import bisect
import mmap
import os
import time

from . import slots as _slots
from .shm_layout import (
    _COUNTER,
    _COUNTER_OFFSETS,
    _COUNTERS_OFF,  # noqa: F401 - tests read the layout here
    _F64,
    _HEADER,
    _HIST_OFF,
    _I32,
    _LEASES_OFF,
    _LIMIT_OFF,
    _MIN_SIZE_OFF,
    _REASONS_OFF,
    _SLOT,  # noqa: F401 - tests read the layout here
    _SLOT_COUNTS,
    _SLOT_COUNTS_OFF,
    _SLOT_HOLDER,
    _SLOT_HOLDER_OFF,
    _SLOT_SIZE,
    _SLOT_TAIL,
    _SLOT_TAIL_OFF,
    _SLOTS_OFF,
    _WAIT_TIMEOUT_OFF,
    CLOSED_GATE,
    COUNTERS,
    FLAG_CLAIMS,
    LAYOUT_VERSION,
    MAGIC,
    WAIT_BOUNDS_NS,
    TableError,
    _queue_off,
    table_path,
    table_size,
)
from .shm_readers import TableReaders
from .slots import BROKER, Slots, SlotsAPI, state_of
from .slots import make as slot_word
from .snapshot import WAIT_BUCKETS
from .wire.states import CloseReason, SlotState

__all__ = [
    "CLOSED_GATE",
    "COUNTERS",
    "FLAG_CLAIMS",
    "LAYOUT_VERSION",
    "MAGIC",
    "WAIT_BOUNDS_NS",
    "Table",
    "TableError",
    "retire",
    "table_path",
    "table_size",
]


class Table(TableReaders):
    """A mapped table. ``create()`` for the broker, ``open()`` for everyone else."""

    def __init__(self, path: str, mm: mmap.mmap, max_size: int, writable: bool, inode: int = 0) -> None:
        self.path = path
        self._mm = mm
        self.max_size = max_size
        self.writable = writable
        # Readers compare it with the path's current inode: a restarted broker renames a new table
        # over the old one, and the old mapping would go on showing a dead broker's last state.
        self.inode = inode
        # The backends of the dead broker whose table this one replaced (its workers may still
        # hold copies of their sockets, which keep them connected): the broker ends them.
        self.retired: list[tuple[int, float]] = []  # (backend pid, opened at: epoch seconds)
        # The slot words (and the atomic counters): read-only mappings only load them.
        self.slots: SlotsAPI | None = (
            Slots(
                mm,
                _SLOTS_OFF,
                _SLOT_SIZE,
                max_size,
                _COUNTER_OFFSETS["pending"],
                _LEASES_OFF,
                _COUNTER_OFFSETS["use_ns"],
                _HIST_OFF,
                _queue_off(max_size),
            )
            if writable
            else None
        )

    @classmethod
    def create(
        cls,
        path: str,
        *,
        max_size: int,
        min_size: int,
        wait_timeout: float,
        database: str,
        user: str,
        claims: bool = False,
    ) -> Table:
        """Make a new table at ``path``. ``claims``: workers may claim idle slots in it."""
        size = table_size(max_size)
        # Write to a temporary name and rename: a reader never maps a half-initialised file.
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _HEADER.pack_into(
            mm, 0, MAGIC, LAYOUT_VERSION, os.getpid(), time.time_ns(), max_size, min_size,
            time.time(), wait_timeout, database.encode()[:64], user.encode()[:64],
            FLAG_CLAIMS if claims else 0, 0,
        )  # fmt: skip
        table = cls(path, mm, max_size, writable=True)
        table.set_limits(max_size, min_size, wait_timeout, 0)
        for i in range(max_size):
            table.write_slot_values(i, SlotState.CLOSED, CloseReason.NONE, False, 0, 0, 0, 0, 0, 0, 0.0)
        table.retired = retire(path)
        os.rename(tmp, path)
        return table

    @classmethod
    def open(cls, path: str, *, writable: bool = False) -> Table:
        """Map an existing table (``writable``: to claim slots); raise :class:`TableError` or
        ``OSError``."""
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if size < _SLOTS_OFF:
                raise TableError(f"{path}: {size} bytes is too small for a pgreuse table")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        magic, version, *_rest = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC:
            mm.close()
            raise TableError(f"{path} is not a pgreuse table (magic {magic!r})")
        if version != LAYOUT_VERSION:
            mm.close()
            raise TableError(
                f"{path} has layout version {version}, this pgreuse reads {LAYOUT_VERSION}: "
                "use the same pgreuse version as the broker"
            )
        max_size = _HEADER.unpack_from(mm, 0)[4]
        if size < table_size(max_size):
            mm.close()
            raise TableError(f"{path}: {size} bytes is too small for {max_size} slots")
        return cls(path, mm, max_size, writable=writable, inode=st.st_ino)

    @property
    def claims(self) -> bool:
        """Workers may claim idle slots in this table (the broker that made it has the atomics)."""
        return bool(_HEADER.unpack_from(self._mm, 0)[10] & FLAG_CLAIMS)

    @property
    def broker_pid(self) -> int:
        return int(_HEADER.unpack_from(self._mm, 0)[2])

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()  # (it holds the mapping's buffer)
            self.slots = None
        self._mm.close()

    # -- writers (broker only) -------------------------------------------------------------------

    def write_slot(
        self,
        index: int,
        *,
        state: SlotState,
        close_reason: CloseReason,
        dirty: bool,
        generation: int,
        backend_pid: int,
        holder_pid: int,
        lease_started_ns: int,
        leases: int,
        use_ns: int,
        opened_at: float,
    ) -> None:
        self.write_slot_values(index, state, close_reason, dirty, generation, backend_pid,
                               holder_pid, lease_started_ns, leases, use_ns, opened_at)  # fmt: skip

    def write_slot_values(  # noqa: PLR0917 - positional: it runs once per lease
        self, index: int, state: SlotState, close_reason: CloseReason, dirty: bool, generation: int,
        backend_pid: int, holder_pid: int, lease_started_ns: int, leases: int, use_ns: int,
        opened_at: float,
    ) -> None:  # fmt: skip
        """The whole record of a slot the broker owns, the word too (holder :data:`slots.BROKER`;
        in the order of :meth:`write_slot`'s fields, positionally: once per lease)."""
        off = _SLOTS_OFF + index * _SLOT_SIZE
        _SLOT_HOLDER.pack_into(self._mm, off + _SLOT_HOLDER_OFF, 0, holder_pid, lease_started_ns)
        _SLOT_COUNTS.pack_into(self._mm, off + _SLOT_COUNTS_OFF, leases, use_ns)
        _SLOT_TAIL.pack_into(self._mm, off + _SLOT_TAIL_OFF, backend_pid, generation, close_reason,
                             dirty, opened_at)  # fmt: skip
        assert self.slots is not None
        self.slots.store(index, slot_word(state, generation, BROKER))

    def write_shared(  # noqa: PLR0917 - the order of the record's fields
        self, index: int, close_reason: CloseReason, dirty: bool, generation: int, backend_pid: int,
        opened_at: float,
    ) -> None:  # fmt: skip
        """The broker's own fields of a slot it shares with the workers (the word, the holder's
        fields and the lease counts are not the broker's to write then)."""
        off = _SLOTS_OFF + index * _SLOT_SIZE + _SLOT_TAIL_OFF
        _SLOT_TAIL.pack_into(self._mm, off, backend_pid, generation, close_reason, dirty, opened_at)

    def lease_counts(self, index: int) -> tuple[int, int]:
        """Slot ``index``'s lease count and lent ns (workers add theirs while they hold it)."""
        leases, use_ns = _SLOT_COUNTS.unpack_from(
            self._mm, _SLOTS_OFF + index * _SLOT_SIZE + _SLOT_COUNTS_OFF
        )
        return int(leases), int(use_ns)

    def holder_fields(self, index: int) -> tuple[int, int, int]:
        """Slot ``index``'s parking key, holder pid and lease start (written by its holder)."""
        parking, pid, started = _SLOT_HOLDER.unpack_from(
            self._mm, _SLOTS_OFF + index * _SLOT_SIZE + _SLOT_HOLDER_OFF
        )
        return int(parking), int(pid), int(started)

    def add(self, counter: str, n: int = 1) -> None:
        if n >= 0:
            assert self.slots is not None
            self.slots.add(_COUNTER_OFFSETS[counter], n)
            return
        off = _COUNTER_OFFSETS[counter]  # gauges go down: the broker alone writes those
        value = _COUNTER.unpack_from(self._mm, off)[0] + n
        _COUNTER.pack_into(self._mm, off, value if value > 0 else 0)

    def add_lease_counts(self, leases: int, waits: int, wait_ns: int, use_ns: int, hist: list[int]) -> None:
        """Add lease counts the broker noted since the last call: ``leases`` granted, ``waits`` of
        them after queueing (``wait_ns`` in total, ``hist``: per bucket of WAIT_BOUNDS_NS; the
        others count in the first bucket), ``use_ns`` of lent time.

        The pool notes these in the process and writes them in batches (``pool.TABLE_LAG``): the
        proxy lends once per transaction, and four writes into the mapping per lease cost more than
        the rest of its bookkeeping. Workers add their own leases at the same time: atomic adds."""
        slots = self.slots
        assert slots is not None
        for off, n in ((_LEASES_OFF, leases), (_LEASES_OFF + 8, waits), (_LEASES_OFF + 16, wait_ns),
                       (_LEASES_OFF + 24, use_ns)):  # fmt: skip
            if n:
                slots.add(off, n)
        for i, queued in enumerate(hist):
            n = queued + (leases - waits if i == 0 else 0)
            if n:
                slots.add(_HIST_OFF + i * 8, n)

    def count_unqueued_lease(self, used_ns: int) -> None:
        """One lease that did not queue, held ``used_ns`` (a worker's claim the broker counts)."""
        self.add_lease_counts(1, 0, 0, used_ns, [0] * (len(WAIT_BUCKETS) + 1))

    def set(self, counter: str, value: int) -> None:
        _COUNTER.pack_into(self._mm, _COUNTER_OFFSETS[counter], max(0, value))

    def set_pending(self, n: int) -> None:
        """The proxy's queue length, which workers read before claiming (an atomic store)."""
        assert self.slots is not None
        self.slots.set_pending(n)

    def set_limits(self, max_size: int, min_size: int, wait_timeout: float, max_waiting: int) -> None:
        """The settings in force (at start, and after a reload): --max-size and --min-size, which
        readers report (the table keeps its slot count), and the table's wait queue: how long a
        worker waits in it, how many at once (0: as many as the ring holds); more go through the
        proxy, which refuses them."""
        _I32.pack_into(self._mm, _LIMIT_OFF, max_size)
        _I32.pack_into(self._mm, _MIN_SIZE_OFF, min_size)
        _F64.pack_into(self._mm, _WAIT_TIMEOUT_OFF, wait_timeout)
        q = _queue_off(self.max_size)
        cap = _slots.QR if not max_waiting else min(max_waiting, _slots.QR)
        _COUNTER.pack_into(self._mm, q + _slots.Q_TIMEOUT, int(wait_timeout * 1e9))
        _COUNTER.pack_into(self._mm, q + _slots.Q_CAP, cap)

    def limit(self) -> int:
        """--max-size now (a reload may have lowered it below the table's slot count)."""
        return int(_I32.unpack_from(self._mm, _LIMIT_OFF)[0]) or self.max_size

    def room_to_grow(self) -> bool:
        """The broker has fewer than --max-size backends open (a waiter then tells it so)."""
        opened = _COUNTER.unpack_from(self._mm, _COUNTER_OFFSETS["backends_opened"])[0]
        closed = _COUNTER.unpack_from(self._mm, _COUNTER_OFFSETS["backends_closed"])[0]
        return bool(opened - closed < self.limit())

    def wait_limit(self) -> float:
        """--wait-timeout, seconds, as the table's queue applies it."""
        return int(_COUNTER.unpack_from(self._mm, _queue_off(self.max_size) + _slots.Q_TIMEOUT)[0]) / 1e9

    def set_proxy_oldest(self, enqueued_ns: int) -> None:
        """When the proxy's first waiter queued (0: none): a worker that frees a slot gives it to
        whichever of that waiter and the table's first waited longer."""
        _COUNTER.pack_into(self._mm, _queue_off(self.max_size) + _slots.Q_PROXY_OLDEST, enqueued_ns)

    def queue_tickets(self) -> tuple[int, int]:
        """The wait queue's (head, tail): ``tail - head`` workers wait or are about to."""
        q = _queue_off(self.max_size)
        return (
            int(_COUNTER.unpack_from(self._mm, q + _slots.Q_HEAD)[0]),
            int(_COUNTER.unpack_from(self._mm, q + _slots.Q_TAIL)[0]),
        )

    def count_close(self, reason: CloseReason) -> None:
        self.add_at(_REASONS_OFF + int(reason) * 8)

    def add_at(self, off: int) -> None:
        assert self.slots is not None
        self.slots.add(off, 1)

    def observe_wait(self, seconds: float) -> None:
        self.add_at(_HIST_OFF + bisect.bisect_left(WAIT_BUCKETS, seconds) * 8)  # first bound >= it


def retire(path: str) -> list[tuple[int, float]]:
    """Close every slot of the table a dead broker left at ``path``, so that no worker that still
    maps it claims one of that broker's backends again; return those backends' pids and when each
    was opened (epoch seconds: a pid alone may since name another process)."""
    try:
        old = Table.open(path, writable=True)
    except (OSError, TableError):
        return []
    try:
        pids = []
        slots = old.slots
        assert slots is not None
        slots.cancel_waiters(0)  # its waiters go through the proxy (where they learn it is gone)
        for i in range(old.max_size):
            word = slots.load(i)
            slots.store(i, slot_word(SlotState.CLOSED, word >> 8, BROKER))
            pid, _gen, _reason, _dirty, opened = _SLOT_TAIL.unpack_from(
                old._mm, _SLOTS_OFF + i * _SLOT_SIZE + _SLOT_TAIL_OFF
            )
            if pid and state_of(word) is not SlotState.CLOSED:
                pids.append((int(pid), float(opened)))
        return pids
    finally:
        old.close()
