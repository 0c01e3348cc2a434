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

All of this runs on the broker's one asyncio loop thread; nothing here blocks. This module holds the
lending decisions; ``backends.py`` what a slot and a waiter are, ``upkeep.py`` opening, checking,
resetting and closing backends, ``mirror.py`` the table's records and counts, ``sharing.py`` the
slots shared with the workers, ``waiting.py`` the requests: the FIFO of waiters and its deadlines.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import select
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from ..shm import WAIT_BOUNDS_NS, Table
from ..wire import control
from ..wire.states import TRANSITIONS, CloseReason, SlotState, check_transition
from .backend_target import BackendTarget
from .backends import (  # noqa: F401 - Client, InProcessHolder, C_FIELDS: the pool's public names
    C_FIELDS,
    Backend,
    Client,
    InProcessHolder,
    Waiter,
    _PoolBase,
)
from .cancels import Cancels
from .config import BrokerConfig
from .exits import BackendExits
from .mirror import TableMirror
from .recycling import Recycling
from .resizing import Resizing
from .sharing import SharedSlots
from .upkeep import CHECKED_PARAMETERS, PINNED_PARAMETERS, Upkeep  # noqa: F401 - server.py's names
from .waiting import Waiting

logger = logging.getLogger("pgreuse.broker")

_RDHUP = getattr(select, "POLLRDHUP", 0x2000)
_OUTCOME_REASON = {o: o.name.lower() for o in control.Outcome}
# Enum members the lending path reads, as module constants: on Python 3.11 a member read off its
# class (SlotState.LENT) goes through EnumType.__getattr__, ten times the cost of a global, and the
# path runs once or twice per proxied transaction.
_CLOSED, _IDLE, _LENT, _RESETTING = SlotState.CLOSED, SlotState.IDLE, SlotState.LENT, SlotState.RESETTING
_CLEAN = control.Outcome.CLEAN


class Pool(TableMirror, Upkeep, SharedSlots, BackendExits, Recycling, Resizing, Cancels, Waiting, _PoolBase):
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
        self._init_exits()
        self._init_recycling()
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

    # -- lending ----------------------------------------------------------------------------------

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

    def give_back(
        self, b: Backend, client: Client, outcome: control.Outcome, *, unread_checked: bool = False
    ) -> None:
        """A proxy session gives ``b`` back (a worker's dirty or broken end of a claimed slot goes
        through ``sharing.worker_release``; its clean end never reaches the broker)."""
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

    # -- closing ----------------------------------------------------------------------------------

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

    # -- janitor ----------------------------------------------------------------------------------
