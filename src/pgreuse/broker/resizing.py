"""A --max-size lowered by a reload: the pool closes backends down to it, idle ones first, and lets
lent ones finish their transaction (one given back over the limit is closed then, not lent again).

The shared-memory table keeps the slots it was made with at start (workers map it by that size), so
the pool's capacity never changes; ``--max-size`` limits how many of those slots hold a backend, and
how many PostgreSQL sees: a slot whose backend is closed but not yet ended counts too (exits.py).
"""

from __future__ import annotations

import logging

from ..wire.states import CloseReason, SlotState
from .backends import PoolFields
from .config import BrokerConfig

logger = logging.getLogger("pgreuse.broker")


class Resizing(PoolFields):
    """Mixin of :class:`pgreuse.broker.pool.Pool`."""

    def apply_settings(self, config: BrokerConfig) -> None:
        """Run with ``config`` from now on (a reload): the limits the lending path caches, the
        table's wait limits, and the backends open, down to a lower --max-size (idle ones first)
        or up to a higher --min-size (and for waiters a higher --max-size lets in)."""
        self.config = config
        self._max_waiting = int(config.max_waiting)
        self._wait_timeout_ns = int(config.wait_timeout * 1e9)
        self.table.set_limits(config.max_size, config.min_size, config.wait_timeout, config.max_waiting)
        self.trim()
        self._refill()

    def room_for_one(self) -> bool:
        """Another backend may be opened without PostgreSQL seeing more than --max-size."""
        return self._alive() + len(self.exiting) < self.config.max_size

    def trim(self) -> None:
        """Close idle backends (the broker's, then those shared with the workers that nobody holds)
        while more than --max-size are open. Called on reload, and by the janitor: a lent one
        comes back to a worker's table slot without the broker hearing of it."""
        excess = self._alive() - self.config.max_size
        if excess <= 0 or self.closing:
            return
        for b in [*self.idle, *self.shared]:
            if excess <= 0:
                return
            if b.state is SlotState.SHARED and not self._take_idle(b):
                continue  # a worker holds it: it comes back later
            logger.info(
                "slot %d: backend pid %d closed: %d backends open, --max-size is %d now",
                b.index, b.pid, self._alive(), self.config.max_size,
            )  # fmt: skip
            self._close(b, CloseReason.POOL_SHRUNK, graceful=True)
            excess -= 1
