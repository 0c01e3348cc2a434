"""The shared-memory table's layout: the header, the counters, the close reasons, the wait-time
histogram and the slot records, where each lies, and the table file's name and size.

What the table holds and who writes it is :mod:`pgreuse.shm`'s docstring. The offsets are apart from
:class:`~.shm.Table` so that they can be read in one place: ``slots.REC_*`` and ``_slotword.h`` name
the same ones, and ``tests/test_slots.py`` checks that they agree.
"""

from __future__ import annotations

import os
import struct

from . import slots as _slots
from .snapshot import WAIT_BUCKETS
from .wire.states import CloseReason

MAGIC = b"PGREUSE\0"
# 2: counters "resets", "too_many"; 3: close reason "revoked"; 4: slot words, parking key, flags;
# 5: the wait queue after the slots; 6: close reasons max_lifetime, max_idle; 7: pool_shrunk
LAYOUT_VERSION = 7
FLAG_CLAIMS = 1  # header flags: workers may claim idle slots (the broker has the atomics)
# Added to the ``pending`` word while the pool is paused or closing: a worker claims only while the
# word is 0, so nobody claims then; readers see the queue length alone (the low 32 bits).
CLOSED_GATE = _slots.CLOSED_GATE

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

_HEADER = struct.Struct("<8sIIQIIdd64s64sII")  # ... flags, --max-size now (0: the slot count)
# The settings a reload may change, where _HEADER keeps them: min_size, wait_timeout, the live limit.
_MIN_SIZE_OFF, _WAIT_TIMEOUT_OFF, _LIMIT_OFF = 28, 40, 180
_F64 = struct.Struct("<d")
_COUNTER = struct.Struct("<Q")
_I32 = struct.Struct("<I")
# word, parking, holder_pid, lease_started_ns, leases, use_ns, backend_pid, generation, close_reason,
# dirty, opened_at: the word first and 8-aligned (slots.REC_* and _slotword.h name these offsets)
_SLOT = struct.Struct("<QIIqQQIIBB6xd")
_SLOT_TAIL = struct.Struct("<IIBB6xd")  # the broker's fields: backend_pid .. opened_at
_SLOT_TAIL_OFF = 40
_SLOT_COUNTS = struct.Struct("<QQ")  # leases, use_ns
_SLOT_COUNTS_OFF = 24
_SLOT_HOLDER = struct.Struct("<IIq")  # parking, holder_pid, lease_started_ns
_SLOT_HOLDER_OFF = 8
_N_REASONS = len(CloseReason)
_COUNTERS_OFF = _HEADER.size
_REASONS_OFF = _COUNTERS_OFF + len(COUNTERS) * 8
# Byte offset of each counter: add()/set() run on every lease, a tuple.index() per call would scan.
_COUNTER_OFFSETS: dict[str, int] = {name: _COUNTERS_OFF + i * 8 for i, name in enumerate(COUNTERS)}
_LEASES_OFF = _COUNTER_OFFSETS["leases"]
# add_lease_counts() finds waits, wait_ns and use_ns at 8, 16 and 24 bytes after leases, and the
# table queue's wait (_slots.c) waits, wait_ns and timeouts at 8, 16 and 32
assert COUNTERS[:5] == ("leases", "waits", "wait_ns", "use_ns", "timeouts")  # (and _slots.c)
_SLOT_SIZE = _SLOT.size
# The bounds in ns: wait_ns counts in bucket bisect_left(WAIT_BOUNDS_NS, wait_ns).
WAIT_BOUNDS_NS = tuple(round(b * 1e9) for b in WAIT_BUCKETS)
_HIST_OFF = _REASONS_OFF + _N_REASONS * 8
_SLOTS_OFF = _HIST_OFF + (len(WAIT_BUCKETS) + 1) * 8
assert _SLOTS_OFF % 8 == 0 and _SLOT.size == 64


class TableError(RuntimeError):
    """The file is not a pgreuse table of this layout version."""


def table_path(socket_dir: str, port: int) -> str:
    return os.path.join(socket_dir, f"pgreuse.{port}.shm")


def table_size(max_size: int) -> int:
    return _queue_off(max_size) + _slots.Q_BYTES


def _queue_off(max_size: int) -> int:
    return _SLOTS_OFF + max_size * _SLOT.size
