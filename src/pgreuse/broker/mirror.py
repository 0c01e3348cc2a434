"""The pool's mirror in the shared-memory table: slot records and lease counts, written at once for
what a worker must see and in batches (within :data:`TABLE_LAG`) for the proxy's leases. A mixin of
:class:`pgreuse.broker.pool.Pool`. Readers of these fields are statistics (``pgreuse stats``,
telemetry); who owns a slot is its slot word (``sharing.py``).
"""

from __future__ import annotations

import bisect

from ..shm import WAIT_BOUNDS_NS
from ..wire.states import SlotState
from .backends import Backend, PoolFields
from .sharing import SHARE_LAG

# Longest a slot record, a lease counter or the ``pending`` gauge of the shared-memory table may lag
# behind the pool for in-process (proxy) leases. They are written in batches: the proxy lends once
# per transaction, and writing the mapping at every lease cost more than the rest of its bookkeeping.
# Readers are statistics (``pgreuse stats``, telemetry), never decisions.
TABLE_LAG = 0.05


class TableMirror(PoolFields):
    """Writes the pool's slots and counts into the shared-memory table."""

    def _publish(self, b: Backend) -> None:
        if b.state is SlotState.SHARED:  # the word, the holder's fields and counts are not ours
            self.table.write_shared(b.index, b.close_reason, b.dirty, b.generation, b.pid, b.opened_at)
            return
        holder = b.holder.pid if b.holder else 0
        self.table.write_slot_values(b.index, b.state, b.close_reason, b.dirty, b.generation, b.pid,
                                     holder, b.lease_started_ns, b.leases, b.use_ns, b.opened_at)  # fmt: skip

    def _publish_soon(self, b: Backend) -> None:
        """Write ``b``'s record within TABLE_LAG (an in-process lease: see TABLE_LAG)."""
        self._lagging.add(b)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Run :meth:`flush_table` within TABLE_LAG (SHARE_LAG where workers claim: the flush also
        shares the idle backends): lagging records, noted counters, ``pending``."""
        if self._flush_timer is None:
            lag = SHARE_LAG if self.claims and self.workers else TABLE_LAG
            self._flush_timer = self.loop.call_later(lag, self.flush_table)

    def flush_table(self) -> None:
        """Bring the table up to date with the pool: lagging slot records, counters, ``pending``;
        share the idle backends with the workers."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        for b in self._lagging:
            self._publish(b)
        self._lagging.clear()
        self.publish_pending()
        self._write_counters()
        self.share_idle()

    def _write_counters(self) -> None:
        """Add the lease counts noted since the last time to the table."""
        if self._noted_leases or self._noted_use_ns:
            hist = self._noted_hist
            self.table.add_lease_counts(self._noted_leases, self._noted_waits, self._noted_wait_ns,
                                        self._noted_use_ns, hist)  # fmt: skip
            self._noted_leases = self._noted_waits = self._noted_wait_ns = self._noted_use_ns = 0
            hist[:] = [0] * len(hist)

    def _note_lease(self, waited_ns: int, queued: bool) -> None:
        """Count a lease (``queued``: granted after ``waited_ns`` in the FIFO)."""
        self._noted_leases += 1
        if queued:
            self._noted_waits += 1
            self._noted_wait_ns += waited_ns
            self._noted_hist[bisect.bisect_left(WAIT_BOUNDS_NS, waited_ns)] += 1

    def _count_use(self, b: Backend, used: int, in_process: bool) -> None:
        """Count ``used`` ns of ``b``'s lease ending: a worker's reaches the table at once (its
        telemetry reads it), an in-process holder's within TABLE_LAG."""
        b.use_ns += used
        self._noted_use_ns += used
        if in_process:
            self._flush_soon()
        else:
            self._write_counters()
