"""The pool's upkeep of its backends: opening them (with a backoff when PostgreSQL refuses), checking
idle ones, resetting dirty ones, closing them with a reason and replacing them, the janitor's tick,
and shutdown. A mixin of :class:`pgreuse.broker.pool.Pool`: the lending decisions are there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import time

from ..wire import control
from ..wire.frames import terminate
from ..wire.states import CloseReason, SlotState
from .backends import Backend, PoolFields
from .connector import BackendConnectError, BackendQueryError, open_backend, run_simple_query

logger = logging.getLogger("pgreuse.broker")

# client_connection_check_interval (ms) of every backend (PostgreSQL >= 14; 0: not set).
CHECK_INTERVAL_MS = 500

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


class Upkeep(PoolFields):
    """Opening, checking, resetting, closing and replacing backends."""

    _no_check_interval = False  # the server refused client_connection_check_interval

    def start(self) -> None:
        """End a dead broker's backends, then open ``min_size`` (at least one: its parameters are
        what parked clients see)."""
        retired = self.table.retired
        if retired:
            self._spawn(self._start_after(retired))
            return
        self._open_min()

    async def _start_after(self, retired: list[tuple[int, float]]) -> None:
        await self.end_retired(retired)
        self._open_min()

    def _open_min(self) -> None:
        for _ in range(max(1, self.config.min_size)):
            self._open_one()

    def _open_one(self) -> bool:
        if self.closing or not self._states[SlotState.CLOSED] or not self.room_for_one():
            return False
        # (not one whose last backend has not ended yet: PostgreSQL would see both)
        b = next((s for s in self.slots if s.state is SlotState.CLOSED and s.index not in self.exiting), None)
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
        if CHECK_INTERVAL_MS and not self._no_check_interval:
            # A backend whose client (a worker) died in the middle of a statement ends at the next
            # check instead of when the statement is done: its row locks go, and its slot can take
            # a new backend (exits.py waits for the old one to end).
            opts.append(f"-c client_connection_check_interval={CHECK_INTERVAL_MS}")
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
            if "client_connection_check_interval" in str(exc) and not self._no_check_interval:
                # PostgreSQL < 14 has no such setting: open it again without.
                logger.info("PostgreSQL has no client_connection_check_interval: backends go without")
                self._no_check_interval = True
                b.close_reason = CloseReason.CONNECT_FAILED
                self._transition(b, SlotState.CLOSED, "connect failed")
                self._open_one()
                return
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

    async def _reset(self, b: Backend) -> None:
        assert b.sock is not None
        while b.cancels:
            # A cancel forwarded to this backend may still land: not before it is done (the cancel
            # connection's own timeout bounds this), and the reset below then clears what it did.
            await asyncio.sleep(0.002)
        if b.sock is None or b.state is not SlotState.RESETTING:
            return  # closed meanwhile
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
                # (rolling back whatever a dead holder left half done). Only the sending side:
                # the slot is refilled once PostgreSQL closes its end (exits.py).
                b.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.await_exit(b, b.sock)
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
        self.check_exits(time.monotonic())
        self.tick_recycle(time.monotonic())
        self.trim()  # (a --max-size lowered by a reload)
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
        self.drop_exits()
        self.flush_table()  # the last batch (the table outlives the loop for readers)
        pid = os.getpid()
        logger.info("pool closed (broker pid %d)", pid)
