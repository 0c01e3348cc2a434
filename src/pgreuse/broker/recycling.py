"""--max-lifetime and --max-idle: backends that have been open too long are replaced, and backends
nobody used for a while are closed (down to --min-size), always while idle, never while lent.

A long-lived backend accumulates memory in PostgreSQL (caches of every table and function it has
touched) and keeps a server-side setting changed since it opened; PgBouncer's server_lifetime and
server_idle_timeout are the same remedy. Each backend's lifetime ends at a random point of its last
tenth, so that backends opened together are not all replaced at once, and the janitor replaces at
most one per tick. A backend idle in the shared table is taken back with the usual compare-and-swap
first: if a worker holds it right then, it is looked at again on the next tick.
"""

from __future__ import annotations

import logging
import random
import time

from ..wire.states import CloseReason, SlotState
from .backends import Backend, PoolFields

logger = logging.getLogger("pgreuse.broker")

JITTER = 0.1  # a lifetime ends at a random point of its last tenth


class Recycling(PoolFields):
    """Mixin of :class:`pgreuse.broker.pool.Pool`."""

    def _init_recycling(self) -> None:
        self._lifetimes: dict[tuple[int, int], float] = {}  # (slot, generation) -> its lifetime, s
        self._use_seen: dict[int, tuple[int, int, float]] = {}  # slot -> (generation, leases, since)

    def tick_recycle(self, now: float) -> None:
        """The janitor's part (``now``: ``time.monotonic()``)."""
        lifetime, max_idle = self.config.max_lifetime, self.config.max_idle
        if not (lifetime or max_idle) or self.closing or self.paused:
            return
        for b in self.slots:
            if b.sock is None or b.state not in (SlotState.IDLE, SlotState.SHARED):
                continue
            reason = None
            if lifetime and time.time() - b.opened_at > self._lifetime_of(b, lifetime):
                reason = CloseReason.MAX_LIFETIME
            elif max_idle and self._unused_for(b, now) > max_idle and self._alive() > self.config.min_size:
                reason = CloseReason.MAX_IDLE
            if reason is None or not self._take_for_recycling(b):
                continue
            logger.info("slot %d: backend pid %d %s; closing it", b.index, b.pid,
                        f"open for {time.time() - b.opened_at:.0f}s (--max-lifetime {lifetime:g})"
                        if reason is CloseReason.MAX_LIFETIME else
                        f"unused for {self._unused_for(b, now):.0f}s (--max-idle {max_idle:g})")  # fmt: skip
            self._close(b, reason, graceful=True)
            return  # one per tick: the pool never loses several backends at once

    def _lifetime_of(self, b: Backend, lifetime: float) -> float:
        key = (b.index, b.generation)
        got = self._lifetimes.get(key)
        if got is None:
            got = self._lifetimes[key] = lifetime * (1 - JITTER * random.random())
            if len(self._lifetimes) > 4 * len(self.slots):  # (old generations)
                self._lifetimes = {
                    k: v for k, v in self._lifetimes.items() if self.slots[k[0]].generation == k[1]
                }
        return got

    def _unused_for(self, b: Backend, now: float) -> float:
        """Seconds since ``b`` was last lent (by the broker or, from the table's count, by a worker)."""
        leases = self.table.lease_counts(b.index)[0] if b.state is SlotState.SHARED else b.leases
        seen = self._use_seen.get(b.index)
        if seen is None or seen[0] != b.generation or seen[1] != leases:
            self._use_seen[b.index] = (b.generation, leases, now)
            return 0.0
        return now - seen[2]

    def _take_for_recycling(self, b: Backend) -> bool:
        """Own ``b`` if it is idle now (taking it back from the table if it is shared there)."""
        if b.state is SlotState.IDLE:
            return b in self.idle
        return self._take_idle(b)
