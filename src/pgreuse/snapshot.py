"""What a reader of the shared-memory table sees (``Table.snapshot()``): the pool's counters, the
wait-time histogram and every slot's record, as plain values (``shm.py`` owns the bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from .wire.states import CloseReason, SlotState

# Upper bounds (seconds) of the wait-time histogram buckets; the last bucket is open-ended.
WAIT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


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
    holder: int = 0  # slots.NOBODY, slots.BROKER or a worker's control-channel id
    parking: int = 0  # the parking key the holder serves (where a CancelRequest goes)


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
