# The C module built from _slots.c (optional). Its Slots type is described once, as
# pgreuse.slots.SlotsAPI (PySlots is its Python reference), and check() as pgreuse.slots.check_py.
from collections.abc import Callable

from pgreuse.slots import SlotsAPI

Slots: type[SlotsAPI]
check: Callable[[int, int], int]

class Hot:
    """The C hot path of one connection's leases (pgreuse.client.hot)."""

    slot: int
    generation: int
    backend_pid: int
    started: float
    fd_number: int
    waited: float
    bucket: int
    watched: bool
    span: object
    lingering: int
    def __init__(
        self,
        slots: SlotsAPI,
        channel: object,
        pgconn: object,
        fd_number: int,
        home: int,
        parking: int,
        baseline: tuple[bytes | None, ...],
        names: tuple[bytes, ...],
        state_only: frozenset[str],
        watched: Callable[[], bool],
        check_after_ns: int,
        wait_bounds_ns: tuple[int, ...],
        /,
    ) -> None: ...
    def begin(self, conn: object, gen: object, /) -> int | tuple[int, int]: ...
    def adopt(
        self, conn: object, slot: int, generation: int, backend_pid: int, waited_ns: int, bucket: int, /
    ) -> bool: ...
    def end(self, conn: object, /) -> bool: ...
    def unlinger(self) -> None: ...

HOT_LEASED: int
HOT_NOTHING: int
