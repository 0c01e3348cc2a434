"""The control-channel listener: one ``SOCK_SEQPACKET`` channel per worker process.

``<socket-dir>/.s.PGREUSE.<port>`` carries the lease messages (:mod:`pgreuse.wire.control`) and the
backend fds (``SCM_RIGHTS``). A worker says Hello; it is answered with a Welcome (the table's slot
count, whether to go through the proxy, and its holder id if it may claim slots) and then every open
slot's fd (DESIGN.md §4). Users let in by ``--allow-uid``/``--allow-gid`` get no holder id and no
fds (:mod:`.access` says why). A channel that breaks the protocol or floods its outbox is dropped
with a log line, and its leases are taken back as for a dead worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from .. import slots
from ..wire import control
from .broker_fields import BrokerFields
from .connector import BackendConnectError
from .control_client import ControlClient, OutboxFull, outbox_limit

logger = logging.getLogger("pgreuse.broker")


class ControlListener(BrokerFields):
    """Mixin of :class:`pgreuse.broker.server.Broker`."""

    async def _serve_control(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        assert self.pool is not None and self.table is not None
        peer, refusal = self._allowed(sock, "control channel")
        if peer is None:
            # Any version decodes a Deny: the worker reports why instead of a bare EOF.
            # Its Hello is read first (briefly): closing before it comes would fail the worker's send
            # with EPIPE, and the Deny would go unread.
            with contextlib.suppress(OSError, TimeoutError):
                sock.send(control.encode(control.Deny(0, control.DenyCode.BAD_REQUEST, refusal)))
                async with asyncio.timeout(1.0):
                    await loop.sock_recv(sock, control.MAX_MESSAGE + 1)
            sock.close()
            return
        peer_pid = peer.pid
        ended: asyncio.Future[BaseException | None] = loop.create_future()

        def overflowed(why: OutboxFull) -> None:
            if not ended.done():
                ended.set_result(why)

        client = ControlClient(sock, peer_pid, loop, self._new_holder(),
                               limit=outbox_limit(len(self.pool.slots)), on_overflow=overflowed)  # fmt: skip
        client.trusted = peer.trusted
        self.table.add("clients")

        def readable() -> None:
            # One registration for the channel's life, and every queued packet read per wake-up:
            # this is the lease hot path, and sock_recv() would add and remove the reader per message.
            try:
                while not ended.done():  # (an overflow ends it while it reads)
                    try:
                        packet = sock.recv(control.MAX_MESSAGE + 1)
                    except BlockingIOError:
                        return
                    if not packet:
                        raise ConnectionResetError("end of file")
                    self._handle_control(client, control.decode(packet))
            except Exception as exc:
                if not ended.done():
                    ended.set_result(exc)

        loop.add_reader(sock.fileno(), readable)
        try:
            why = await ended
            if isinstance(why, OutboxFull):
                self.table.add("protocol_errors")  # (logged when it overflowed)
            elif isinstance(why, control.ControlError):
                logger.warning("control channel of pid %d dropped: %s", peer_pid, why)
                self.table.add("protocol_errors")
            elif why is not None and not isinstance(why, OSError):
                logger.error("control channel of pid %d dropped by an internal error", peer_pid,
                             exc_info=why)  # fmt: skip
        finally:
            client.drop()
            self.table.add("clients", -1)
            self.pool.client_gone(client)
            self._holders.discard(client.holder)
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
                loop.remove_writer(sock.fileno())
            sock.close()

    def _new_holder(self) -> int:
        """A holder id no open control channel has (ids are 32-bit in the slot word)."""
        while True:
            holder = self._next_holder
            self._next_holder = holder + 1 if holder < 0xFFFFFFFF else slots.FIRST_WORKER
            if holder not in self._holders:
                self._holders.add(holder)
                return holder

    def _welcome(self, client: ControlClient) -> control.Welcome:
        assert self.pool is not None
        proxy_only = self.pool.proxy_only
        if proxy_only is None:
            # PostgreSQL unreachable so far: guess from the sslmode. A wrong guess only costs
            # speed: a worker told "proxy" never claims, and a TLS pool never shares a slot.
            proxy_only = self.target.tls_possible
        claims = self.pool.claims and not proxy_only and client.trusted
        # The table's slot count (workers map it by that size), not --max-size: a reload may
        # lower that below the slots the table was made with.
        return control.Welcome(control.VERSION, os.getpid(), len(self.pool.slots), proxy_only,
                               client.holder if claims else 0)  # fmt: skip

    def _greet(self, client: ControlClient) -> None:
        """The Welcome, then every open slot's fd (DESIGN.md §4)."""
        assert self.pool is not None
        welcome = self._welcome(client)
        client.send(welcome)
        if welcome.holder:
            self.pool.join(client)

    async def _welcome_when_known(self, client: ControlClient) -> None:
        """sslmode prefer/allow: whether backends use TLS is known once one is open."""
        assert self.pool is not None
        # Below the worker's Hello timeout (10 s), so it gets an answer rather than a timeout.
        with contextlib.suppress(BackendConnectError):
            await self.pool.wait_parameters(min(5.0, self.config.wait_timeout))
        self._greet(client)

    def _handle_control(self, client: ControlClient, msg: control.Message) -> None:
        assert self.pool is not None
        match msg:
            case control.Hello(version, _pid):
                if version != control.VERSION:
                    why = (
                        f"the worker speaks control protocol {version} and this broker (pid "
                        f"{os.getpid()}) speaks {control.VERSION}: run the same pgreuse version in "
                        "the broker and the application"
                    )
                    # Any version decodes a Deny: the worker reports why instead of a bare EOF.
                    client.send(control.Deny(0, control.DenyCode.BAD_REQUEST, why))
                    raise control.ControlError(why)
                if self.pool.proxy_only is not None:
                    self._greet(client)
                else:
                    self._spawn(self._welcome_when_known(client))
            case control.Poke():
                self.pool.poked()
            case control.Release(slot, generation, outcome):
                self.pool.worker_release(client, slot, generation, outcome)
            case control.Want(slot) if client.trusted:  # (others get no fds: broker/access.py)
                self.pool.want(client, slot)
            case control.Dirty(parking_key):
                parking = self.parkings.get(parking_key)
                session = self.sessions.get(parking_key)
                if parking is not None and parking.peer_pid == client.pid and session is not None:
                    session.mark_dirty()
            case _:
                raise control.ControlError(f"unexpected message from a worker: {msg!r}")
