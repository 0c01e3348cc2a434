"""What the pool is made of: its backends (one per slot), its waiters, and who may hold a backend.

With the C core (pgreuse.broker._proxycore), Backend, Waiter and the pool keep the fields the proxy's lending
path reads on every transaction in C base types, where that path reaches them without the attribute
machinery (see _poolcore.h); the Python code reads and writes them as usual. Without it (not built,
or PGREUSE_PURE_PYTHON=1) they are plain Python classes. :class:`PoolFields` names, for the type
checker, what the pool's parts (lending in ``pool.py``, ``upkeep.py``, ``mirror.py``, ``sharing.py``)
use of each other.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from .. import _cmodule
from ..wire import control
from ..wire.states import CloseReason, SlotState
from .tls import TLSStream

if TYPE_CHECKING:
    from ..shm import Table
    from .backend_target import BackendTarget
    from .config import BrokerConfig

if TYPE_CHECKING:
    _BackendBase = object
    _WaiterBase = object
    _PoolBase = object
    C_FIELDS = False
else:
    _core = _cmodule.load("broker._proxycore")  # None: not built, or PGREUSE_PURE_PYTHON=1
    C_FIELDS = _core is not None
    _BackendBase = _core.BackendCore if C_FIELDS else object
    _WaiterBase = _core.WaiterCore if C_FIELDS else object
    _PoolBase = _core.PoolCore if C_FIELDS else object


class Client(Protocol):
    """What the pool needs of a lease holder: a control-channel client (one worker process), or a
    proxy session inside the broker (:mod:`pgreuse.broker.proxy`)."""

    pid: int
    fds: dict[int, int]  # slot -> generation of the fd this process holds
    in_process: bool  # an InProcessHolder (the proxy), not a worker process

    def send(self, msg: control.Message, fd: int | None = None) -> None: ...


class InProcessHolder(Client, Protocol):
    """A holder inside the broker that reads and writes the backend socket itself (a proxy session).

    The pool calls :meth:`revoked` just before it closes a backend such a holder has lent (the backend
    died, shutdown): the holder must stop using the socket, whose fd number is about to be reused.
    """

    def granted(self, backend: Backend, request: int) -> None:
        """The answer to ``request``: ``backend`` is lent. Its socket is registered with the loop for
        reading (``backend.watched``); the holder points ``backend.on_readable`` at itself."""

    def revoked(self, backend: Backend) -> None: ...


# Not slotted: a slot of the class would hide its C base's field of the same name.
@attrs.define(eq=False, slots=False)
class Backend(_BackendBase):
    index: int
    state: SlotState = SlotState.CLOSED
    generation: int = 0
    sock: socket.socket | None = None
    pid: int = 0
    secret: int = 0
    holder: Client | None = None
    parking: int = 0  # parking key the current lease serves: where a CancelRequest is routed
    lease_started_ns: int = 0
    leases: int = 0
    use_ns: int = 0
    opened_at: float = 0.0
    dirty: bool = False
    close_reason: CloseReason = CloseReason.NONE
    # The loop has a reader registered for ``sock`` (``dispatch_readable``). It stays registered
    # while the backend moves between the idle watch and in-process holders, which only swap
    # ``on_readable``: a registration costs an epoll_ctl and, in uvloop, a transport lookup.
    watched: bool = False
    on_readable: Callable[[], None] | None = None
    idle_watch: Callable[[], None] | None = None  # the pool's handler while idle
    tls: TLSStream | None = None  # set: encrypted, read and write through it (never handed off)
    cancels: int = 0  # cancels forwarded to this backend and not done yet: it is not lent meanwhile

    if not C_FIELDS:  # (the C base type has it)

        def dispatch_readable(self) -> None:
            """The loop's read callback for ``sock``: whoever holds the backend now."""
            if self.on_readable is not None:
                self.on_readable()

    @property
    def stream(self) -> socket.socket | TLSStream:
        """What to read and write the backend's protocol on (``sock`` itself unless TLS)."""
        assert self.sock is not None
        return self.tls if self.tls is not None else self.sock


@attrs.define(eq=False, slots=False)  # (not slotted: see Backend)
class Waiter(_WaiterBase):
    client: Client
    request: int
    parking: int
    enqueued_ns: int
    deadline_ns: int = 0  # set when queued: denied after this (monotonic ns)


class PoolFields:
    """The pool's state and the methods its parts call across modules (for the type checker)."""

    if TYPE_CHECKING:
        config: BrokerConfig
        target: BackendTarget
        table: Table
        loop: asyncio.AbstractEventLoop
        slots: list[Backend]
        idle: list[Backend]
        waiters: deque[Waiter]
        parameters: dict[str, str] | None
        last_connect_error: str | None
        closing: bool
        paused: bool
        proxy_only: bool | None
        claims: bool
        workers: set[Client]
        shared: list[Backend]
        exiting: dict[int, tuple[socket.socket, float, int]]
        _states: dict[SlotState, int]
        _debug: bool
        _max_waiting: int
        _max_pending: int
        _expiry: asyncio.TimerHandle | None
        _expiry_at: int
        _wait_timeout_ns: int
        _retry_at: float
        _backoff: float
        _attempt_done: asyncio.Event
        _tasks: set[asyncio.Task[None]]
        _lagging: set[Backend]
        _flush_timer: asyncio.TimerHandle | None
        _noted_leases: int
        _noted_waits: int
        _noted_wait_ns: int
        _noted_use_ns: int
        _noted_hist: list[int]

        def _transition(self, b: Backend, new: SlotState, reason: str, *, publish: bool = True) -> None: ...
        def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...
        def _alive(self) -> int: ...
        def _count(self, state: SlotState) -> int: ...
        def _dispatch(self) -> None: ...
        def _grant(
            self, b: Backend, client: Client, request: int, parking: int, asked_ns: int, *, queued: bool = ...
        ) -> None: ...
        def _open_one(self) -> bool: ...
        def room_for_one(self) -> bool: ...
        def trim(self) -> None: ...
        def _refill(self) -> None: ...
        def grow_for_table(self) -> None: ...
        def await_exit(self, b: Backend, sock: socket.socket) -> None: ...
        def check_exits(self, now: float) -> None: ...
        def drop_exits(self) -> None: ...
        async def end_retired(self, backends: list[tuple[int, float]]) -> None: ...
        def _deny(self, w: Waiter, code: control.DenyCode, message: str, counter: str = "") -> None: ...
        def _make_idle(self, b: Backend, *, lazy: bool = False) -> None: ...
        def _watch(self, b: Backend) -> None: ...
        def _unwatch(self, b: Backend) -> None: ...
        def _end_lease(self, b: Backend) -> None: ...
        def _close(self, b: Backend, reason: CloseReason, *, graceful: bool) -> None: ...
        def _reset(self, b: Backend) -> Coroutine[Any, Any, None]: ...
        def _publish(self, b: Backend) -> None: ...
        def _publish_soon(self, b: Backend) -> None: ...
        def _flush_soon(self) -> None: ...
        def _write_counters(self) -> None: ...
        def flush_table(self) -> None: ...
        def publish_pending(self) -> None: ...
        def push_fd(self, b: Backend) -> None: ...
        def share_idle(self) -> None: ...
        def tick_shared(self, now_ns: int) -> None: ...
        def table_waiting(self) -> int: ...
        def _take_idle(self, b: Backend) -> bool: ...
        def tick_recycle(self, now: float) -> None: ...
        def close_shared(self, *, force: bool) -> bool: ...
