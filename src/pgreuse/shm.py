"""The shared-memory table: one versioned layout, written by the broker, readable by every process.

The file ``<socket-dir>/pgreuse.<port>.shm`` is ``mmap``'d by the broker (read-write) and by anyone who
wants the pool's truth (read-only): ``pgreuse stats``, the telemetry of every worker. It holds

* a header: magic, layout version, broker pid, a generation (the broker's start time in ns: a restarted
  broker is a new table), pool limits and identity;
* pool-wide counters (monotonic totals and a few gauges) and a wait-time histogram;
* one record per slot: state, generation, backend pid, holder pid, lease start, per-slot totals.

This module is the only one that knows offsets. Values are written with ``struct.pack_into`` one field
group at a time, so a reader may see a slot mid-update; readers are statistics, never decisions. The
fast path (a worker claiming an idle slot itself) will add an OFD ``fcntl`` lock per slot byte range;
the layout already keeps one record per slot so such a lock covers exactly one record.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import time
from collections.abc import Sequence

import attrs

from .wire.states import CloseReason, SlotState

MAGIC = b"PGREUSE\0"
LAYOUT_VERSION = 3  # 2: counters "resets", "too_many"; 3: close reason "revoked"

# Upper bounds (seconds) of the wait-time histogram buckets; the last bucket is open-ended.
WAIT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

COUNTERS: tuple[str, ...] = (
    "leases",  # leases granted
    "waits",  # leases that had to queue first
    "wait_ns",  # total time spent queued, ns
    "use_ns",  # total time backends spent lent, ns
    "timeouts",  # requests denied after --wait-timeout
    "unavailable",  # requests denied because PostgreSQL could not be reached
    "backends_opened",
    "backends_closed",
    "connect_ns",  # total time spent opening backends, ns
    "connect_failures",
    "protocol_errors",  # clients dropped for malformed input
    "pending",  # gauge: requests queued now
    "clients",  # gauge: control channels (worker processes) now
    "parked",  # gauge: parking connections now
    "max_pending",  # high-water mark of pending
    "resets",  # backends reset (DISCARD ALL) after a lease left session state behind
    "too_many",  # requests denied at once because --max-waiting were already queued
)

_HEADER = struct.Struct("<8sIIQIIdd64s64s")
_COUNTER = struct.Struct("<Q")
_SLOT = struct.Struct("<BBBxIIIQQQd")
_N_REASONS = len(CloseReason)
_COUNTERS_OFF = _HEADER.size
_REASONS_OFF = _COUNTERS_OFF + len(COUNTERS) * 8
# Byte offset of each counter: add()/set() run on every lease, a tuple.index() per call would scan.
_COUNTER_OFFSETS: dict[str, int] = {name: _COUNTERS_OFF + i * 8 for i, name in enumerate(COUNTERS)}
_LEASES_OFF = _COUNTER_OFFSETS["leases"]
# leases, waits and wait_ns are adjacent: flush() reads and writes them as one ...
assert COUNTERS[:3] == ("leases", "waits", "wait_ns")
assert COUNTERS[3] == "use_ns"  # ... and use_ns follows them: add_lease_counts() writes all four
_LEASE_COUNTERS = struct.Struct("<QQQQ")
_SLOT_SIZE = _SLOT.size
# The bounds in ns: wait_ns counts in bucket bisect_left(WAIT_BOUNDS_NS, wait_ns).
WAIT_BOUNDS_NS = tuple(round(b * 1e9) for b in WAIT_BUCKETS)
_HIST_OFF = _REASONS_OFF + _N_REASONS * 8
_SLOTS_OFF = _HIST_OFF + (len(WAIT_BUCKETS) + 1) * 8


class TableError(RuntimeError):
    """The file is not a pgreuse table of this layout version."""


def table_path(socket_dir: str, port: int) -> str:
    return os.path.join(socket_dir, f"pgreuse.{port}.shm")


def table_size(max_size: int) -> int:
    return _SLOTS_OFF + max_size * _SLOT.size


@attrs.frozen
class SlotRecord:
    index: int
    state: SlotState
    close_reason: CloseReason
    dirty: bool
    generation: int
    backend_pid: int
    holder_pid: int
    lease_started_ns: int  # CLOCK_MONOTONIC, same clock in every process; 0 when not lent
    leases: int
    use_ns: int
    opened_at: float  # epoch seconds, 0 when never opened


@attrs.frozen
class Snapshot:
    broker_pid: int
    generation: int
    max_size: int
    min_size: int
    started_at: float
    wait_timeout: float
    database: str
    user: str
    counters: dict[str, int]
    closed_by_reason: dict[str, int]
    wait_histogram: tuple[int, ...]  # counts per WAIT_BUCKETS bound, plus one open-ended bucket
    slots: tuple[SlotRecord, ...]

    def count(self, state: SlotState) -> int:
        return sum(1 for s in self.slots if s.state == state)


class Table:
    """A mapped table. ``create()`` for the broker, ``open()`` for readers."""

    def __init__(self, path: str, mm: mmap.mmap, max_size: int, writable: bool, inode: int = 0) -> None:
        self.path = path
        self._mm = mm
        self.max_size = max_size
        self.writable = writable
        # Readers compare it with the path's current inode: a restarted broker renames a new table
        # over the old one, and the old mapping would go on showing a dead broker's last state.
        self.inode = inode

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
    ) -> Table:
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
        )  # fmt: skip
        os.rename(tmp, path)
        return cls(path, mm, max_size, writable=True)

    @classmethod
    def open(cls, path: str) -> Table:
        """Map an existing table read-only; raise :class:`TableError` or ``OSError``."""
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if size < _SLOTS_OFF:
                raise TableError(f"{path}: {size} bytes is too small for a pgreuse table")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
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
        return cls(path, mm, max_size, writable=False, inode=st.st_ino)

    def close(self) -> None:
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

    def write_slot_values(self, index: int, *values: object) -> None:
        """:meth:`write_slot` with the fields in layout order, positionally (once per lease)."""
        _SLOT.pack_into(self._mm, _SLOTS_OFF + index * _SLOT_SIZE, *values)

    def add(self, counter: str, n: int = 1) -> None:
        off = _COUNTER_OFFSETS[counter]
        value = _COUNTER.unpack_from(self._mm, off)[0] + n
        _COUNTER.pack_into(self._mm, off, value if value > 0 else 0)

    def add_lease_counts(self, leases: int, waits: int, wait_ns: int, use_ns: int, hist: list[int]) -> None:
        """Add lease counts the broker noted since the last call: ``leases`` granted, ``waits`` of
        them after queueing (``wait_ns`` in total, ``hist``: per bucket of WAIT_BOUNDS_NS; the
        others count in the first bucket), ``use_ns`` of lent time.

        The pool notes these in the process and writes them in batches (``pool.TABLE_LAG``): the
        proxy lends once per transaction, and four struct writes into the mapping per lease cost
        more than the rest of its bookkeeping."""
        mm = self._mm
        old = _LEASE_COUNTERS.unpack_from(mm, _LEASES_OFF)
        _LEASE_COUNTERS.pack_into(mm, _LEASES_OFF, old[0] + leases, old[1] + waits, old[2] + wait_ns,
                                  old[3] + use_ns)  # fmt: skip
        for i, queued in enumerate(hist):
            n = queued + (leases - waits if i == 0 else 0)
            if n:
                off = _HIST_OFF + i * 8
                _COUNTER.pack_into(mm, off, _COUNTER.unpack_from(mm, off)[0] + n)

    def set(self, counter: str, value: int) -> None:
        _COUNTER.pack_into(self._mm, _COUNTER_OFFSETS[counter], max(0, value))

    def count_close(self, reason: CloseReason) -> None:
        off = _REASONS_OFF + int(reason) * 8
        _COUNTER.pack_into(self._mm, off, _COUNTER.unpack_from(self._mm, off)[0] + 1)

    def observe_wait(self, seconds: float) -> None:
        bucket = bisect.bisect_left(WAIT_BUCKETS, seconds)  # the first bound >= seconds
        off = _HIST_OFF + bucket * 8
        _COUNTER.pack_into(self._mm, off, _COUNTER.unpack_from(self._mm, off)[0] + 1)

    # -- readers ---------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        mm = self._mm
        (_m, _v, pid, gen, max_size, min_size, started, wait_timeout, db, user) = _HEADER.unpack_from(mm, 0)
        counters = {
            name: _COUNTER.unpack_from(mm, _COUNTERS_OFF + i * 8)[0] for i, name in enumerate(COUNTERS)
        }
        reasons = {
            r.name.lower(): _COUNTER.unpack_from(mm, _REASONS_OFF + int(r) * 8)[0]
            for r in CloseReason
            if r is not CloseReason.NONE
        }
        hist = tuple(_COUNTER.unpack_from(mm, _HIST_OFF + i * 8)[0] for i in range(len(WAIT_BUCKETS) + 1))
        slots = []
        for i in range(self.max_size):
            (state, reason, dirty, generation, bpid, holder, started_ns, leases, use_ns, opened) = (
                _SLOT.unpack_from(mm, _SLOTS_OFF + i * _SLOT.size)
            )
            slots.append(
                SlotRecord(
                    i,
                    SlotState(state),
                    CloseReason(reason),
                    bool(dirty),
                    generation,
                    bpid,
                    holder,
                    started_ns,
                    leases,
                    use_ns,
                    opened,
                )
            )
        return Snapshot(
            pid, gen, max_size, min_size, started, wait_timeout,
            db.rstrip(b"\0").decode(), user.rstrip(b"\0").decode(),
            counters, reasons, hist, tuple(slots),
        )  # fmt: skip


def histogram_quantile(hist: Sequence[int], q: float) -> float:
    """Upper bound (seconds) of the bucket holding quantile ``q`` of the waits; inf if open-ended."""
    total = sum(hist)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return WAIT_BUCKETS[i] if i < len(WAIT_BUCKETS) else float("inf")
    return float("inf")
