"""The C hot path of a lease (``pgreuse._slots.Hot``, in ``_slothot.c``), or its absence.

A select 1 on a pgreuse connection cost 10 µs more than on a dedicated one, and most of it was the
interpreter running :meth:`LeaseCore._begin` and :meth:`LeaseCore._after_wait_done` from a cold
cache after each round trip. ``Hot`` does their usual case (a slot this process gave back lately is
idle: claim it and swap its socket in; a clean end: swap back and give it back) and leaves every
other case, untouched, to them: they stay the reference, and the only path without the C module
(where nothing is claimed anyway: every transaction goes through the proxy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .. import _cmodule, telemetry
from ..shm import WAIT_BOUNDS_NS, Table
from .claims import CHECK_AFTER_NS
from .session_state import REPORTED_RAW

if TYPE_CHECKING:
    from .channel import ChannelBase

LEASED = -2  # Hot.begin: claimed and swapped in; the connection's _held is the Hot object
NOTHING = -1  # Hot.begin: nothing done, the Python path starts from scratch

# psycopg generators that only check the connection's state when it is idle and outside a
# pipeline: running them needs no backend, so no lease is taken for them (Django sets autocommit on
# every new connection; commit() and rollback() with no transaction open return at once).
STATE_ONLY_GENERATORS = frozenset(
    {
        "_set_autocommit_gen",
        "_set_isolation_level_gen",
        "_set_read_only_gen",
        "_set_deferrable_gen",
        "_commit_gen",
        "_rollback_gen",
    }
)


class HotAPI(Protocol):
    def begin(self, conn: Any, gen: Any, /) -> int | tuple[int, int]: ...
    def adopt(  # noqa: PLR0917 - the C type's signature
        self, conn: Any, slot: int, generation: int, backend_pid: int, waited_ns: int, bucket: int, /
    ) -> bool: ...
    def end(self, conn: Any, /) -> bool: ...
    def unlinger(self) -> None: ...


class _Cold:
    """No hot path: every lease's start and end runs the Python path."""

    def begin(self, conn: Any, gen: Any, /) -> int | tuple[int, int]:
        return NOTHING

    def adopt(  # noqa: PLR0917 - the C type's signature
        self, conn: Any, slot: int, generation: int, backend_pid: int, waited_ns: int, bucket: int, /
    ) -> bool:
        return False

    def end(self, conn: Any, /) -> bool:
        return False

    def unlinger(self) -> None:
        pass


COLD: HotAPI = _Cold()

_slots = _cmodule.load("_slots")


def for_connection(conn: Any, channel: ChannelBase) -> HotAPI:
    """The hot path for ``conn`` (a bound :class:`LeaseCore`), or :data:`COLD` when its channel
    claims nothing or not in a C table."""
    table: Table | None = channel.table
    if _slots is None or table is None or channel.holder == 0 or conn._home < 0:
        return COLD
    words = table.slots
    if not isinstance(words, _slots.Slots):
        return COLD
    pgconn = conn.pgconn
    hot: HotAPI = _slots.Hot(
        words, channel, pgconn, pgconn.socket, conn._home, pgconn.backend_pid,
        conn._baseline_raw, REPORTED_RAW, STATE_ONLY_GENERATORS, telemetry.watched,
        CHECK_AFTER_NS, tuple(WAIT_BOUNDS_NS),
    )  # fmt: skip
    return hot
