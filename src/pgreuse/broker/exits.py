"""A closed backend's slot is refilled only once PostgreSQL has ended that backend.

The bound pgreuse promises is on the connections PostgreSQL sees, not on the broker's sockets. A
backend the broker closes does not end at once: PostgreSQL notices the end of its connection at its
next read, or, in the middle of a statement, at the next ``client_connection_check_interval`` (set on
every backend, see ``upkeep.py``); a terminated one takes a moment to exit. Opening the replacement
at once put PostgreSQL over ``--max-size`` for that moment (measured: 5 or 6 backends of a pool of 4
in 70 of 1,270 samples under chaos). So the broker closes a backend by sending its FIN
(``shutdown(SHUT_WR)``: it reaches every worker's copy of the socket) and frees the slot when
PostgreSQL closes its end, which it does as the backend exits; after :data:`EXIT_WAIT` it gives up
waiting, says so, and frees the slot anyway. It looks for that end with ``poll()`` (``POLLRDHUP``)
every :data:`EXIT_POLL`, and reads and drops what a backend still sends until it ends (a large
result for a dead holder: PostgreSQL reads our FIN only once its send is done). A backend that has
already closed its end is never read: its last words (a FATAL) are for the holder.

The same bound holds when a broker starts over a dead one's table: the dead broker's backends stay
connected while worker processes hold copies of their sockets, so the new broker ends them
(:meth:`BackendExits.end_retired`) and waits until they are gone before it opens its own.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time

from .backends import Backend, PoolFields
from .connector import BackendConnectError, BackendQueryError, open_backend, run_simple_query

logger = logging.getLogger("pgreuse.broker")

EXIT_WAIT = 10.0  # seconds a closed backend may take to end before its slot is refilled anyway
EXIT_POLL = 0.02  # seconds between two looks at a closed backend's socket
_ENDED = select.POLLRDHUP | select.POLLHUP | select.POLLERR
# The application_name of the one connection a new broker opens to end a dead broker's backends,
# and how long it waits for them to be gone before it opens its own.
RETIRING_APP = "pgreuse-ending-previous-backends"
RETIRE_WAIT = 5.0


class BackendExits(PoolFields):
    """Mixin of :class:`pgreuse.broker.pool.Pool`: backends closed but not yet ended."""

    def _init_exits(self) -> None:
        self.exiting: dict[int, tuple[socket.socket, float, int]] = {}  # slot -> (socket, deadline, pid)

    def await_exit(self, b: Backend, sock: socket.socket) -> None:
        """``b``'s backend is closed (its FIN sent): free its slot once PostgreSQL ends it."""
        self.exiting[b.index] = (sock, time.monotonic() + EXIT_WAIT, b.pid)
        self.loop.call_soon(self._poll_exit, b.index)  # (after the slot is closed)

    def _poll_exit(self, index: int) -> None:
        got = self.exiting.get(index)
        if got is None:
            return
        sock = got[0]
        p = select.poll()
        p.register(sock.fileno(), _ENDED)
        if not p.poll(0):
            # Not ended yet. A backend that is sending (a large result nobody reads any more)
            # would not read our FIN before its send is done: read and drop what it sends. (One
            # that had ended before, with a FATAL for a holder still alive, is never read here.)
            try:
                while sock.recv(65536, socket.MSG_DONTWAIT):
                    pass
            except BlockingIOError:
                pass
            except OSError:
                self._exited(index)  # (a reset: ended)
                return
            if not p.poll(0):
                if not self.closing:
                    self.loop.call_later(EXIT_POLL, self._poll_exit, index)
                return
        self._exited(index)

    def _exited(self, index: int) -> None:
        sock, _deadline, _pid = self.exiting.pop(index)
        sock.close()
        if not self.closing:
            self._refill()  # the slot may take a new backend now
            self.grow_for_table()

    def check_exits(self, now: float) -> None:
        """The janitor's part: give up on backends that did not end within :data:`EXIT_WAIT`."""
        for index, (_sock, deadline, pid) in list(self.exiting.items()):
            if now > deadline:
                logger.warning(
                    "slot %d: backend pid %d has not ended %gs after it was closed; opening a "
                    "replacement (PostgreSQL sees one backend more until it ends)",
                    index, pid, EXIT_WAIT,
                )  # fmt: skip
                self._exited(index)

    def drop_exits(self) -> None:
        """Shutdown: stop waiting (the broker's sockets close with it)."""
        for index in list(self.exiting):
            self.exiting.pop(index)[0].close()

    async def end_retired(self, backends: list[tuple[int, float]]) -> None:
        """End the backends of a dead broker (its table named them, with when each was opened):
        worker processes that still hold copies of their sockets keep them connected, past
        ``--max-size``, until PostgreSQL ends them. Asks PostgreSQL on a connection of its own,
        before the pool opens its own; a pid is ended only if its session started when that broker
        opened it (give or take a few seconds: a pid may since name someone else's backend)."""
        if not backends:
            return
        wanted = ",".join(str(int(p)) for p, _opened in backends)
        opened_at = ",".join(repr(float(t)) for _pid, t in backends)
        try:
            # Named, so an operator counting connections can tell it from the pool's backends.
            opened = await open_backend(self.target, extra_options=f"-c application_name={RETIRING_APP}")
        except BackendConnectError as exc:
            logger.warning("could not end the previous broker's backends %s: %s", wanted, exc)
            return
        try:
            q = await run_simple_query(
                opened.stream,
                "select count(pg_terminate_backend(a.pid)) from pg_stat_activity a "
                f"join unnest('{{{wanted}}}'::int[], '{{{opened_at}}}'::float8[]) r(pid, opened) "
                "on a.pid = r.pid and abs(extract(epoch from a.backend_start) - r.opened) < 5 "
                "and a.usename = current_user",
                timeout=10.0,
            )
            logger.info("ended the previous broker's backends %s (%s)", wanted, q.error or "done")
            # pg_terminate_backend() only signals: the pool opens its own once they are gone, so
            # that PostgreSQL never sees both (a few milliseconds; at most RETIRE_WAIT).
            deadline = time.monotonic() + RETIRE_WAIT
            while time.monotonic() < deadline:
                left = await run_simple_query(
                    opened.stream,
                    f"select count(*) from pg_stat_activity where pid in ({wanted})",
                    timeout=5.0,
                )
                if left.error or not left.rows or left.rows[0][0] == "0":
                    break
                await asyncio.sleep(0.01)
        except BackendQueryError as exc:
            logger.warning("could not end the previous broker's backends %s: %s", wanted, exc)
        finally:
            opened.sock.close()
