"""The pool: the broker's backends, the FIFO of waiters, and every decision about lending.

Invariants:

* At most ``max_size`` slots hold a socket (connecting, idle, lent or resetting) at any time.
* A slot changes state only through :meth:`Pool._transition`, which checks the state machine and
  mirrors the slot into the shared-memory table (a step that the same call leaves again, like
  ``resetting`` on a clean release, is mirrored only by the step it ends in). For in-process (proxy)
  leases the mirror and the lease counters are written in batches, within :data:`TABLE_LAG`.
* The slot word in the shared-memory table says who owns a slot (DESIGN.md §4). The broker shares
  backends it does not use with the workers, who claim them there without asking; the broker takes
  them back with the same compare-and-swap (:mod:`pgreuse.broker.sharing`).
* A backend is lent only from ``idle``, and reaches ``idle`` only from a fresh connect or after a
  ``resetting`` step that proved nothing is left unread on its socket. One exception, the proxy's
  hot path: a backend an in-process holder gives back clean, having read its socket up to
  ReadyForQuery ``I`` and found nothing after it, goes straight to the next waiter if that is
  in-process too (:meth:`Pool._hand_over`): the slot stays ``lent`` and only its holder changes.
* A backend whose holder process died, or whose holder saw it fail, is closed (``shutdown()`` first:
  other workers may still cache a dup of its fd) and never lent again; a replacement is opened in a
  fresh generation of the same slot.
* Waiters are served first-come first-served; each has a deadline after which it is denied.
* A backend whose connection is encrypted (TLS) is only ever lent to in-process holders (the proxy):
  its encryption state lives in the broker, so its fd means nothing in another process. The pool is
  ``proxy_only`` when its backends use TLS (decided by the target's sslmode, or by the first backend
  for ``prefer``/``allow``); a handoff pool keeps every backend plaintext (DESIGN.md §3 rule 10).

All of this runs on the broker's one asyncio loop thread; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from ..shm import WAIT_BOUNDS_NS, Table
from ..wire import control, scan
from ..wire.frames import terminate
from ..wire.states import TRANSITIONS, CloseReason, SlotState, check_transition
from .config import BrokerConfig
from .connector import (
    BackendConnectError,
    BackendQueryError,
    BackendTarget,
    open_backend,
    run_simple_query,
    send_cancel,
)
from .sharing import SHARE_LAG, SharedSlots
from .tls import TLSStream

logger = logging.getLogger("pgreuse.broker")

# With the C core (pgreuse._proxycore), Backend and Pool keep the fields the proxy's lending path
# reads on every transaction in C base types, where that path reaches them without the attribute
# machinery (see _poolcore.h); the Python code below reads and writes them as usual. Without it
# (not built, or PGREUSE_PURE_PYTHON=1) they are plain Python classes.
if TYPE_CHECKING:
    _BackendBase = object
    _WaiterBase = object
    _PoolBase = object
    C_FIELDS = False
else:
    _core = None
    if not scan.PURE_PYTHON:
        with contextlib.suppress(ImportError):  # not built: the Python classes serve
            from .. import _proxycore as _core
    C_FIELDS = _core is not None
    _BackendBase = _core.BackendCore if C_FIELDS else object
    _WaiterBase = _core.WaiterCore if C_FIELDS else object
    _PoolBase = _core.PoolCore if C_FIELDS else object

# Parameters that change how values are encoded or parsed by the client (DESIGN.md §3 rule 7): every
# backend of a pool must report the same values, because parked clients cached them at startup.
PINNED_PARAMETERS = ("client_encoding", "DateStyle", "IntervalStyle", "TimeZone")
CHECKED_PARAMETERS = (
    *PINNED_PARAMETERS,
    "standard_conforming_strings",
    "integer_datetimes",
    "server_encoding",
)
_RDHUP = getattr(select, "POLLRDHUP", 0x2000)
_OUTCOME_REASON = {o: o.name.lower() for o in control.Outcome}
# Enum members the lending path reads, as module constants: on Python 3.11 a member read off its
# class (SlotState.LENT) goes through EnumType.__getattr__, ten times the cost of a global, and the
# path runs once or twice per proxied transaction.
_CLOSED, _IDLE, _LENT, _RESETTING = SlotState.CLOSED, SlotState.IDLE, SlotState.LENT, SlotState.RESETTING
_SHARED = SlotState.SHARED
_CLEAN = control.Outcome.CLEAN
# Longest a slot record, a lease counter or the ``pending`` gauge of the shared-memory table may lag
# behind the pool for in-process (proxy) leases. They are written in batches: the proxy lends once
# per transaction, and writing the mapping at every lease cost more than the rest of its bookkeeping.
# Readers are statistics (``pgreuse stats``, telemetry), never decisions.
TABLE_LAG = 0.05


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


class Pool(SharedSlots, _PoolBase):
    def __init__(
        self,
        config: BrokerConfig,
        target: BackendTarget,
        table: Table,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.config = config
        self.target = target
        self.table = table
        self.loop = loop
        self.slots = [Backend(i) for i in range(config.max_size)]
        for b in self.slots:
            b.idle_watch = functools.partial(self._idle_readable, b)
        # Slots per state, kept by _transition: the lending path never scans the slots.
        self._states = dict.fromkeys(SlotState, 0)
        self._states[SlotState.CLOSED] = len(self.slots)
        # One timer for every queued waiter (the earliest deadline), not one per request.
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = 0  # the deadline it is armed for (monotonic ns)
        self._debug = logger.isEnabledFor(logging.DEBUG)  # refreshed by tick()
        # Settings read on every lease, as plain fields (config is frozen).
        self._reset_every_lease = bool(config.reset_every_lease)
        self._max_waiting = int(config.max_waiting)
        self._wait_timeout_ns = int(config.wait_timeout * 1e9)
        self._waiter_type = Waiter  # (what the C lending path creates)
        # Lease counts noted and not yet added to the table, by _write_counters (batched like the
        # slot records, see TABLE_LAG): leases, those that queued, their wait in total and per
        # bucket of WAIT_BOUNDS_NS (the unqueued ones count in the first bucket when written),
        # and lent time.
        self._noted_leases = self._noted_waits = self._noted_wait_ns = self._noted_use_ns = 0
        self._noted_hist = [0] * (len(WAIT_BOUNDS_NS) + 1)
        self._wait_bounds = WAIT_BOUNDS_NS
        # Table writes batched for TABLE_LAG (see flush_table).
        self._lagging: set[Backend] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        self.idle: list[Backend] = []  # used as a stack: the most recently returned goes out first
        self.waiters: deque[Waiter] = deque()
        self.parameters: dict[str, str] | None = None
        self.last_connect_error: str | None = None
        self.closing = False
        # PAUSE (admin console): nothing is lent until RESUME; requests queue and may time out.
        self.paused = False
        # True: backends use TLS, only the proxy can lend them; None: not known until the first
        # backend is open (sslmode prefer/allow over TCP).
        self.proxy_only: bool | None = True if target.tls_required else None if target.tls_possible else False
        self._retry_at = 0.0  # monotonic: no new connect attempt before this after failures
        self._backoff = 0.0
        self._max_pending = 0
        self._attempt_done = asyncio.Event()  # set after every connect attempt (for parking)
        self._tasks: set[asyncio.Task[None]] = set()
        self._init_sharing()
        for b in self.slots:
            self._publish(b)

    def __repr__(self) -> str:
        counts = {s: 0 for s in SlotState}
        for b in self.slots:
            counts[b.state] += 1
        return (
            f"<Pool {self.target.database!r} idle={counts[SlotState.IDLE]} "
            f"lent={counts[SlotState.LENT]} connecting={counts[SlotState.CONNECTING]} "
            f"waiting={len(self.waiters)}>"
        )

    # -- state ------------------------------------------------------------------------------------

    def _transition(self, b: Backend, new: SlotState, reason: str, *, publish: bool = True) -> None:
        """Move ``b`` to ``new``. ``publish=False``: a step the same callback leaves again (a clean
        release on its way to the next holder), which no reader of the table could act on."""
        old = b.state
        if new not in TRANSITIONS[old]:
            check_transition(b.index, old, new, reason)  # raises
        if self._debug:  # this runs up to three times per transaction: no eager work
            logger.debug("slot %d gen %d: %s -> %s (%s)", b.index, b.generation, old.name,
                         new.name, reason)  # fmt: skip
        states = self._states
        states[old] -= 1
        states[new] += 1
        b.state = new
        if publish:
            self._publish(b)

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

    def _alive(self) -> int:
        return len(self.slots) - self._states[SlotState.CLOSED]

    def _count(self, state: SlotState) -> int:
        return self._states[state]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def runner() -> None:
            try:
                await coro
            except Exception:
                logger.exception("internal error in a pool task")

        task = self.loop.create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- opening backends -------------------------------------------------------------------------

    def start(self) -> None:
        """Open ``min_size`` backends (at least one: its parameters are what parked clients see)."""
        for _ in range(max(1, self.config.min_size)):
            self._open_one()

    def _open_one(self) -> bool:
        if self.closing or not self._states[SlotState.CLOSED]:
            return False
        b = next((s for s in self.slots if s.state is SlotState.CLOSED), None)
        if b is None:
            return False
        b.generation += 1
        b.close_reason = CloseReason.NONE
        b.dirty = False
        self._transition(b, SlotState.CONNECTING, "opening a backend")
        self._spawn(self._connect(b))
        return True

    def _startup_options(self) -> str | None:
        opts = []
        if self.config.idle_transaction_timeout > 0:
            ms = max(1, int(self.config.idle_transaction_timeout * 1000))
            opts.append(f"-c idle_in_transaction_session_timeout={ms}")
        if self.parameters is not None:
            # Pin what the first backend reported, so a server default changed later (ALTER
            # SYSTEM, a reload) cannot give new backends values that parked clients did not see.
            for name in PINNED_PARAMETERS:
                if name in self.parameters:
                    value = self.parameters[name].replace("\\", "\\\\").replace(" ", "\\ ")
                    opts.append(f"-c {name}={value}")
        return " ".join(opts) or None

    async def _connect(self, b: Backend) -> None:
        try:
            opened = await open_backend(
                self.target,
                extra_options=self._startup_options(),
                # prefer/allow on a handoff pool: stay plaintext while the server accepts it.
                plaintext_first=self.proxy_only is False,
            )
        except BackendConnectError as exc:
            self.last_connect_error = str(exc)
            self.table.add("connect_failures")
            self._backoff = min(5.0, max(0.25, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            logger.warning("slot %d: %s (next attempt in %.2fs)", b.index, exc, self._backoff)
            b.close_reason = CloseReason.CONNECT_FAILED
            self._transition(b, SlotState.CLOSED, "connect failed")
            self.table.count_close(CloseReason.CONNECT_FAILED)  # after the slot: see _close
            self._connect_failed()
            self._attempt_done.set()
            self._attempt_done = asyncio.Event()
            return
        if self.closing:
            opened.sock.close()
            b.close_reason = CloseReason.SHUTDOWN
            self._transition(b, SlotState.CLOSED, "opened during shutdown")
            return
        mismatch = self._parameter_mismatch(opened.parameters)
        if opened.tls is not None and self.proxy_only is False:
            mismatch = (
                f"new backend uses TLS ({opened.tls.describe()}), but this pool hands plaintext "
                f"backends to its clients (its first backend with sslmode={self.target.sslmode} "
                "was plaintext) and the server now refuses plaintext: restart the broker, which "
                "then serves the pool through its proxy"
            )
        b.sock = opened.sock
        b.tls = opened.tls
        b.pid = opened.backend_pid
        b.secret = opened.backend_secret
        b.opened_at = time.time()
        b.leases = 0
        b.use_ns = 0
        self.table.add("backends_opened")
        self.table.add("connect_ns", int(opened.connect_seconds * 1e9))
        if mismatch:
            self.last_connect_error = mismatch
            logger.error("slot %d: %s", b.index, mismatch)
            self._transition(b, SlotState.IDLE, "connected")
            self._close(b, CloseReason.PARAMETER_MISMATCH, graceful=True)
            self._connect_failed()
            self._attempt_done.set()
            self._attempt_done = asyncio.Event()
            return
        if self.parameters is None:
            self.parameters = dict(opened.parameters)
        if self.proxy_only is None:
            self.proxy_only = opened.tls is not None
            logger.info(
                "backends on %s use %s: %s",
                self.target.address(),
                opened.tls.describe() if opened.tls is not None else "no TLS",
                "the pool is proxy-only" if self.proxy_only else "pgreuse clients get handoff",
            )
        self._backoff = 0.0
        self._retry_at = 0.0
        self.last_connect_error = None
        logger.info(
            "slot %d gen %d: backend pid %d open in %.1f ms",
            b.index, b.generation, b.pid, opened.connect_seconds * 1000,
        )  # fmt: skip
        self._transition(b, SlotState.IDLE, "connected")
        self.push_fd(b)  # every worker holds its fd before the slot can be claimed
        self._make_idle(b)
        self._attempt_done.set()
        self._attempt_done = asyncio.Event()

    def _parameter_mismatch(self, params: dict[str, str]) -> str | None:
        if self.parameters is None:
            return None
        for name in CHECKED_PARAMETERS:
            want, got = self.parameters.get(name), params.get(name)
            if want != got:
                return (
                    f"new backend reports {name}={got!r} but the pool's clients were started "
                    f"with {name}={want!r}; restart the broker after changing server defaults"
                )
        return None

    def _connect_failed(self) -> None:
        """Deny every waiter when nothing that could serve them is left."""
        if self._alive():
            return
        msg = f"the broker cannot reach PostgreSQL: {self.last_connect_error}"
        while self.waiters:
            w = self.waiters.popleft()
            self._deny(w, control.DenyCode.UNAVAILABLE, msg, counter="unavailable")
        self.publish_pending()

    async def wait_parameters(self, timeout: float) -> dict[str, str]:
        """The parameters parked clients are told; raise ``BackendConnectError`` if unreachable."""
        deadline = time.monotonic() + timeout
        while self.parameters is None:
            if not any(b.state is SlotState.CONNECTING for b in self.slots):
                if time.monotonic() < self._retry_at and self.last_connect_error:
                    raise BackendConnectError(self.last_connect_error)
                if not self._open_one():
                    raise BackendConnectError(self.last_connect_error or "no slot free to connect")
            done = self._attempt_done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendConnectError(
                    f"no backend opened within {timeout}s; last error: {self.last_connect_error}"
                )
            try:
                await asyncio.wait_for(done.wait(), remaining)
            except TimeoutError:
                continue
            if self.parameters is None and self.last_connect_error:
                raise BackendConnectError(self.last_connect_error)
        return self.parameters

    # -- lending ----------------------------------------------------------------------------------

    def request(self, client: Client, request: int, parking: int) -> None:
        """A proxy session asks for a backend for ``request``; it is answered with ``granted`` or a
        ``Deny`` (workers never ask: they claim in the table, or send through the proxy)."""
        if self.idle and not self.waiters and not self.paused and not self.closing:
            self._grant(self.idle.pop(), client, request, parking, time.monotonic_ns())
            return
        w = Waiter(client, request, parking, time.monotonic_ns())
        if self.closing:
            self._deny(w, control.DenyCode.CLOSED, "the broker is shutting down")
            return
        if self.last_connect_error and not self._alive() and time.monotonic() < self._retry_at:
            # PostgreSQL was unreachable a moment ago: fail now with the reason instead of making
            # the caller sit out the whole wait timeout.
            self._deny(
                w,
                control.DenyCode.UNAVAILABLE,
                f"the broker cannot reach PostgreSQL: {self.last_connect_error}",
                counter="unavailable",
            )
            return
        if self._max_waiting and len(self.waiters) >= self._max_waiting:
            self._deny(
                w,
                control.DenyCode.TOO_MANY,
                f"{len(self.waiters)} requests already wait for a backend (--max-waiting "
                f"{self.config.max_waiting}); try again later, or raise --max-waiting/--max-size",
                counter="too_many",
            )
            return
        w.deadline_ns = w.enqueued_ns + self._wait_timeout_ns
        self.waiters.append(w)
        self._arm_expiry(w.deadline_ns)
        self._note_max_pending()
        if self.idle or self._states[_CLOSED] or self._states[_SHARED]:
            self._dispatch()  # paused with idle backends, room to open one, or some shared
        else:
            self._flush_soon()  # the pending gauge

    def _note_max_pending(self) -> None:
        """The table's ``max_pending``: the longest the queue has been."""
        if len(self.waiters) > self._max_pending:
            self._max_pending = len(self.waiters)
            self.table.set("max_pending", self._max_pending)

    def _dispatch(self) -> None:
        # The queue length first, then a look at the shared slots: a worker gives a slot back and
        # then reads it, so one of the two sees the other (slots._slotword.h: all seq_cst).
        self.publish_pending()
        if self.paused:
            self.publish_pending()
            return
        while self.waiters and self.idle:
            self._grant_waiter(self.idle.pop(), self.waiters.popleft())
        if self.waiters and self.shared:
            self.take_back_for_waiters()
        self.publish_pending()
        if not self.waiters:
            return
        # Open more backends for whoever still waits, up to max_size.
        need = len(self.waiters) - self._count(SlotState.CONNECTING)
        while need > 0 and self._open_one():
            need -= 1

    def _grant_waiter(self, b: Backend, w: Waiter) -> None:
        self._grant(b, w.client, w.request, w.parking, w.enqueued_ns, queued=True)

    def _grant(
        self, b: Backend, client: Client, request: int, parking: int, asked_ns: int, *, queued: bool = False
    ) -> None:
        """Lend ``b`` for ``request`` (``queued``: nonzero if the request waited in the FIFO)."""
        now = time.monotonic_ns()
        b.holder = client
        b.parking = parking
        b.lease_started_ns = now
        b.leases += 1
        self._transition(b, _LENT, "granted", publish=False)
        # The idle watch stays registered: the holder swaps b.on_readable (see Backend). It sends
        # the query it holds first: the bookkeeping below is off that query's path.
        client.granted(b, request)  # type: ignore[attr-defined]
        self._note_lease(now - asked_ns, queued)
        self._publish_soon(b)

    def _deny(self, w: Waiter, code: control.DenyCode, message: str, counter: str = "") -> None:
        if counter:
            self.table.add(counter)
        w.client.send(control.Deny(w.request, code, message))

    def _arm_expiry(self, deadline_ns: int) -> None:
        """Make sure the expiry timer fires by ``deadline_ns`` (it serves every waiter)."""
        if self._expiry is not None:
            if deadline_ns >= self._expiry_at:
                return
            self._expiry.cancel()
        self._expiry_at = deadline_ns
        delay = max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)
        self._expiry = self.loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        """Deny every waiter past its deadline; arm the timer for the next deadline."""
        self._expiry = None
        # Loops round timers to the millisecond: a waiter due within one counts as due.
        now = time.monotonic_ns() + 1_000_000
        expired = [w for w in self.waiters if w.deadline_ns <= now]
        if expired:
            # One pass, not a remove() per waiter (a burst of timeouts is not quadratic).
            # Denials below may queue new requests (a client's next pipelined query).
            self.waiters = deque(w for w in self.waiters if w.deadline_ns > now)
            self.publish_pending()
        for w in expired:
            detail = (
                f"; last connection error: {self.last_connect_error}"
                if (self.last_connect_error and not self._alive())
                else ""
            )
            timeout = (w.deadline_ns - w.enqueued_ns) / 1e9
            try:
                self._deny(
                    w,
                    control.DenyCode.TIMEOUT,
                    f"no backend free within {timeout:g}s (--wait-timeout; all "
                    f"{self.config.max_size} of --max-size are in use){detail}",
                    counter="timeouts",
                )
            except Exception:
                # A bug in one client's handling of its refusal must not leave the other expired
                # waiters unanswered, or the timer unarmed for those still queued.
                logger.exception("internal error refusing a timed-out request of pid %d", w.client.pid)
        if self.waiters:
            self._arm_expiry(min(w.deadline_ns for w in self.waiters))

    def abandon(self, client: Client, request: int) -> None:
        for w in self.waiters:
            if w.client is client and w.request == request:
                self.waiters.remove(w)
                self.publish_pending()
                return
        # Already granted or denied: the worker handles the late answer itself.

    def release(
        self,
        client: Client,
        index: int,
        generation: int,
        outcome: control.Outcome,
        *,
        unread_checked: bool = False,
    ) -> None:
        """A holder gives a backend back. ``unread_checked``: an in-process holder read the socket up
        to ReadyForQuery ``I`` and found nothing after it, so the poll for unread bytes is skipped
        (whatever arrives later is caught by the idle watch)."""
        if not 0 <= index < len(self.slots):
            logger.warning("pid %d released slot %d, which does not exist", client.pid, index)
            return
        b = self.slots[index]
        if b.generation != generation:
            logger.debug("pid %d released stale slot %d gen %d", client.pid, index, generation)
            return
        self.give_back(b, client, outcome, unread_checked=unread_checked)

    def give_back(
        self, b: Backend, client: Client, outcome: control.Outcome, *, unread_checked: bool = False
    ) -> None:
        """:meth:`release` for a holder that has the :class:`Backend` itself (the proxy)."""
        if b.holder is not client or b.state is not _LENT:
            # The broker already took this backend back (it died while lent, or was revoked).
            logger.debug("pid %d gave back slot %d, which it no longer holds", client.pid, b.index)
            return
        if outcome is _CLEAN and not self._reset_every_lease:
            # The hot path (once per proxied transaction): _end_lease inlined; an in-process
            # holder's records reach the table in the next batch (TABLE_LAG).
            now = time.monotonic_ns()
            self._count_use(b, now - b.lease_started_ns, client.in_process)
            waiters = self.waiters
            if (
                unread_checked
                and client.in_process
                and waiters
                and waiters[0].client.in_process
                and b.tls is None
                and not self.paused
                and not self.closing
            ):
                self._hand_over(b, waiters.popleft(), now)
                return
            b.holder = None
            b.parking = 0
            b.lease_started_ns = 0
            self._transition(b, _RESETTING, "clean", publish=False)
            problem = None if unread_checked and b.tls is None else self._unread(b)
            if problem is not None:
                self._close(b, problem, graceful=False)
                return
            self._transition(b, _IDLE, "clean release", publish=False)
            self._make_idle(b, lazy=client.in_process)
            return
        self._end_lease(b)
        # The reset below reads the socket through the loop itself, and a close needs no watch: an
        # in-process holder may have left its read registration in place.
        self._unwatch(b)
        if outcome is control.Outcome.BROKEN:
            self._close(b, CloseReason.CLIENT_REPORTED_BROKEN, graceful=False)
            return
        self._transition(b, _RESETTING, _OUTCOME_REASON[outcome])
        b.dirty = True
        self._spawn(self._reset(b))

    def _hand_over(self, b: Backend, w: Waiter, now: int) -> None:
        """Lend ``b``, given back clean by an in-process holder, straight to the in-process waiter
        ``w`` (under load, once per proxied transaction).

        The slot stays ``LENT``: only its holder changes. The skipped ``resetting`` and ``idle``
        steps prove nothing a handover needs: the holder read the socket up to ReadyForQuery ``I``
        and found nothing after it (``unread_checked``, plaintext only), and the socket stays
        registered with the loop, where the new holder takes over the read callback.
        """
        assert b.watched  # the old holder left the read registration in place (see Backend)
        client = w.client
        b.holder = client
        b.parking = w.parking
        b.lease_started_ns = now
        b.leases += 1
        client.granted(b, w.request)  # type: ignore[attr-defined]
        self._note_lease(now - w.enqueued_ns, True)
        self._publish_soon(b)  # (arms the timer that also writes the counters and pending)
        if self.waiters and self._states[_CLOSED]:
            self._dispatch()  # open more backends for those still waiting

    def _count_use(self, b: Backend, used: int, in_process: bool) -> None:
        """Count ``used`` ns of ``b``'s lease ending: a worker's reaches the table at once (its
        telemetry reads it), an in-process holder's within TABLE_LAG."""
        b.use_ns += used
        self._noted_use_ns += used
        if in_process:
            self._flush_soon()
        else:
            self._write_counters()

    def _end_lease(self, b: Backend) -> None:
        if b.lease_started_ns:
            in_process = b.holder is None or b.holder.in_process
            self._count_use(b, time.monotonic_ns() - b.lease_started_ns, in_process)
        b.holder = None
        b.parking = 0
        b.lease_started_ns = 0

    def _unread(self, b: Backend) -> CloseReason | None:
        """A backend returned at ReadyForQuery 'I' must have nothing waiting on its socket."""
        assert b.sock is not None
        if b.tls is not None and (b.tls.buffered() or b.tls.wants_write):
            return CloseReason.UNREAD_DATA
        p = select.poll()
        p.register(b.sock.fileno(), select.POLLIN | _RDHUP)
        events = p.poll(0)
        if not events:
            return None
        ev = events[0][1]
        if ev & (_RDHUP | select.POLLHUP | select.POLLERR):
            return CloseReason.SERVER_CLOSED
        return CloseReason.UNREAD_DATA

    async def _reset(self, b: Backend) -> None:
        assert b.sock is not None
        try:
            q = await run_simple_query(b.stream, self.config.reset_query, timeout=10.0)
        except BackendQueryError as exc:
            logger.warning("slot %d: reset failed: %s", b.index, exc)
            self._close(b, CloseReason.RESET_FAILED, graceful=False)
            return
        if q.error is not None or q.transaction_status != b"I":
            logger.warning("slot %d: %s failed: %s", b.index, self.config.reset_query, q.error)
            self._close(b, CloseReason.RESET_FAILED, graceful=False)
            return
        b.dirty = False
        self.table.add("resets")
        self._transition(b, SlotState.IDLE, "reset")
        self._make_idle(b)

    def _make_idle(self, b: Backend, *, lazy: bool = False) -> None:
        """``b`` just became IDLE: lend it to the first waiter, or keep it on the idle stack.
        ``lazy``: it comes back from an in-process lease; its record may lag (TABLE_LAG)."""
        if self.closing:
            self._close(b, CloseReason.SHUTDOWN, graceful=True)
            return
        self._watch(b)
        if self.waiters and not self.paused:
            self._grant_waiter(b, self.waiters.popleft())
            self.publish_pending()
            if self.waiters and self._states[_CLOSED]:
                self._dispatch()  # open more backends for those still waiting
            return
        if lazy:
            self._publish_soon(b)
        else:
            self._publish(b)
        self.idle.append(b)
        if self.waiters:
            self._dispatch()
        elif self.sharing:
            self._flush_soon()  # shares it within SHARE_LAG

    # -- watching idle backends -------------------------------------------------------------------

    def _watch(self, b: Backend) -> None:
        assert b.sock is not None
        b.on_readable = b.idle_watch
        if not b.watched:
            self.loop.add_reader(b.sock.fileno(), b.dispatch_readable)
            b.watched = True

    def _unwatch(self, b: Backend) -> None:
        if b.watched and b.sock is not None:
            self.loop.remove_reader(b.sock.fileno())
        b.watched = False
        b.on_readable = None

    def _idle_readable(self, b: Backend) -> None:
        # An idle backend speaks only to say goodbye (a FATAL on shutdown or termination).
        assert b.sock is not None
        try:
            data = b.stream.recv(4096)
        except BlockingIOError:
            return  # TLS: part of a record; the rest makes the socket readable again
        except OSError as exc:
            data = str(exc).encode()
        logger.warning(
            "slot %d: backend pid %d %s while idle; replacing it",
            b.index, b.pid, "closed the connection" if not data else f"sent {data[:60]!r}",
        )  # fmt: skip
        self._close(b, CloseReason.SERVER_CLOSED, graceful=False)

    # -- closing ----------------------------------------------------------------------------------

    def _close(self, b: Backend, reason: CloseReason, *, graceful: bool) -> None:
        """Close slot ``b``'s backend for ``reason`` and open a replacement if anyone needs one."""
        self._unwatch(b)
        if b in self.idle:
            self.idle.remove(b)
        revoked = getattr(b.holder, "revoked", None)
        if b.state is SlotState.LENT and revoked is not None:
            revoked(b)  # an in-process holder (InProcessHolder) stops using the fd first
        if b.sock is not None:
            try:
                if graceful:
                    b.stream.send(terminate())
                # shutdown() acts on the socket itself, not on this fd: every worker that cached
                # a dup of it sees the connection end too, and PostgreSQL ends the session
                # (rolling back whatever a dead holder left half done).
                b.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            b.sock.close()
            b.sock = None
            b.tls = None
            had_socket = True
        else:
            had_socket = False
        self._end_lease(b)
        b.close_reason = reason
        logger.info("slot %d gen %d: backend pid %d closed: %s",
                    b.index, b.generation, b.pid, reason.name.lower())  # fmt: skip
        self._transition(b, SlotState.CLOSED, reason.name.lower())
        # Counted after the slot is written: a reader takes the counters first, so one that sees
        # this close also sees the slot closed (or later), never the closed backend as idle.
        if had_socket:
            self.table.add("backends_closed")
        self.table.count_close(reason)
        self._refill()

    def _refill(self) -> None:
        if self.closing:
            return
        if time.monotonic() < self._retry_at:
            return  # the janitor tries again after the backoff
        while self._alive() < self.config.min_size and self._open_one():
            pass
        self._dispatch()

    def client_gone(self, client: Client) -> None:
        """A worker process closed its control channel (it exited, or died)."""
        self.worker_gone(client)
        for b in self.slots:
            if b.holder is client and b.state is SlotState.LENT:
                # Its protocol state is unknown (a dead worker's unread result would come back as
                # the answer to the next holder's query): never reuse it.
                logger.warning(
                    "slot %d: holder pid %d went away holding backend pid %d; closing it",
                    b.index, client.pid, b.pid,
                )  # fmt: skip
                self._close(b, CloseReason.HOLDER_EXITED, graceful=False)

    def pause(self) -> None:
        """Stop lending (admin ``PAUSE``): requests queue, and time out after ``--wait-timeout``.
        Workers stop claiming too: the backends nobody holds are taken back from the table."""
        self.paused = True
        self.publish_pending()  # (closes the gate first: nobody claims from now on)
        self.take_back_idle()

    def resume(self) -> None:
        """Lend again after :meth:`pause` (admin ``RESUME``), serving the queue in order."""
        self.paused = False
        self._dispatch()
        self._flush_soon()  # share what is idle again

    def count(self, state: SlotState) -> int:
        """Slots in ``state`` now."""
        return self._count(state)

    def cancel(self, parking: int) -> None:
        """Forward a CancelRequest for the lease that parking connection ``parking`` holds."""
        held = next((b for b in self.slots if b.state is SlotState.LENT and b.parking == parking), None)
        held = held or self.shared_lease_of(parking)
        if held is None:
            # Still waiting for a backend: what was sent never reached PostgreSQL; answer it the way
            # PostgreSQL answers a cancelled statement (a client such as psycopg waits for that).
            waiter = next((w for w in self.waiters if w.parking == parking), None)
            if waiter is None:
                logger.debug("cancel for parking %d: no lease held, nothing to cancel", parking)
                return
            self.waiters.remove(waiter)
            self.publish_pending()
            self._deny(waiter, control.DenyCode.CANCELED, "canceling statement due to user request "
                       "(it was waiting for a backend)")  # fmt: skip
            return
        logger.info("forwarding cancel to backend pid %d (slot %d)", held.pid, held.index)
        self._spawn(send_cancel(self.target, held.pid, held.secret, tls=held.tls is not None))

    # -- janitor ----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Periodic checks: dead or overdue lent backends, min_size after a failure backoff."""
        self._debug = logger.isEnabledFor(logging.DEBUG)
        limit_ns = int(self.config.max_lease_time * 1e9)
        now_ns = time.monotonic_ns()
        for b in self.slots:
            if (
                limit_ns
                and b.state is SlotState.LENT
                and b.lease_started_ns
                and now_ns - b.lease_started_ns > limit_ns
            ):
                # A stuck holder (a hung worker, a transaction that never ends) must not keep a
                # backend forever: shutdown() takes it from every copy of the socket; PostgreSQL
                # rolls back; the holder's next read fails as a lost connection.
                logger.warning(
                    "slot %d: pid %d held backend pid %d for %.1fs (--max-lease-time %g); revoking",
                    b.index, b.holder.pid if b.holder else 0, b.pid,
                    (now_ns - b.lease_started_ns) / 1e9, self.config.max_lease_time,
                )  # fmt: skip
                self._close(b, CloseReason.REVOKED, graceful=False)
                continue
            if b.state is SlotState.LENT and b.sock is not None:
                p = select.poll()
                p.register(b.sock.fileno(), _RDHUP)
                if p.poll(0):
                    # PostgreSQL ended this session while a worker held it (idle-in-transaction
                    # timeout, pg_terminate_backend, a crash). The holder gets the server's error
                    # on its next read; the slot gets a new backend now.
                    holder = b.holder.pid if b.holder else 0
                    logger.warning(
                        "slot %d: backend pid %d hung up while lent to pid %d; replacing it",
                        b.index, b.pid, holder,
                    )  # fmt: skip
                    self._close(b, CloseReason.DIED_WHILE_LENT, graceful=False)
        self.tick_shared(now_ns)
        if not self.closing and time.monotonic() >= self._retry_at:
            self._refill()

    async def shutdown(self, timeout: float) -> None:
        """Deny waiters, give lent backends ``timeout`` seconds to come back, close everything."""
        self.closing = True
        while self.waiters:
            self._deny(self.waiters.popleft(), control.DenyCode.CLOSED, "the broker is shutting down")
        self.publish_pending()
        for b in list(self.idle):
            self._close(b, CloseReason.SHUTDOWN, graceful=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            not self.close_shared(force=False)
            or any(b.state in (SlotState.LENT, SlotState.RESETTING) for b in self.slots)
        ):
            await asyncio.sleep(0.05)
        self.close_shared(force=True)
        for b in self.slots:
            if b.state is not SlotState.CLOSED and b.sock is not None:
                self._close(b, CloseReason.SHUTDOWN, graceful=b.state is SlotState.IDLE)
        for t in list(self._tasks):
            t.cancel()
        self.flush_table()  # the last batch (the table outlives the loop for readers)
        pid = os.getpid()
        logger.info("pool closed (broker pid %d)", pid)
