"""The admin console: the ``pgreuse`` database on the broker's PG-protocol listener.

Contract: ``psql -h <socket-dir> -p <port> pgreuse`` (any allowed uid; the Unix socket already
checked ``SO_PEERCRED``) gets a session that answers, over the simple query protocol, with real result
rows (RowDescription, DataRow, CommandComplete) in the spirit of PgBouncer's console::

    SHOW POOLS | STATS | CLIENTS | SERVERS | CONFIG | VERSION | HELP
    PAUSE | RESUME | RELOAD | SHUTDOWN

Column names are PgBouncer's where the meaning is the same; pgreuse-only columns come last. Numbers
come from the live :class:`~.pool.Pool`, the proxy sessions and the shared-memory table. Commands are
case-insensitive, several may be sent in one Query separated by ``;``. Unknown commands and the
extended protocol get an ErrorResponse and the session goes on.

This module holds the session and the command dispatch; ``admin_show.py`` the SHOW commands' rows,
``admin_results.py`` their encoding.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..wire import frames
from .admin_results import Result
from .admin_show import ShowCommands
from .config import ConfigError

if TYPE_CHECKING:
    from .server import Broker

logger = logging.getLogger("pgreuse.broker")

ADMIN_DATABASE = "pgreuse"


class AdminError(Exception):
    """A console command failed; ``sqlstate`` and the message go to the client."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


class Console(ShowCommands):
    """Executes console commands against one broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def run(self, sql: str) -> bytes:
        """Answer one Query message: each ``;``-separated command in turn, stopping at an error."""
        out: list[bytes] = []
        commands = [c.strip() for c in sql.split(";") if c.strip()]
        if not commands:
            return frames.frame(b"I", b"")  # EmptyQueryResponse
        for command in commands:
            try:
                result = await self.execute(command)
            except AdminError as exc:
                out.append(frames.error_response(exc.sqlstate, exc.message, hint=exc.hint))
                break
            out.append(result.encode())
        return b"".join(out)

    async def execute(self, command: str) -> Result:
        words = command.split()
        verb = words[0].upper()
        args = [w.upper() for w in words[1:]]
        if verb == "SHOW" and len(args) == 1:
            show = {
                "POOLS": self.show_pools,
                "STATS": self.show_stats,
                "CLIENTS": self.show_clients,
                "SERVERS": self.show_servers,
                "CONFIG": self.show_config,
                "VERSION": self.show_version,
                "HELP": self.show_help,
            }.get(args[0])
            if show is not None:
                return show()
        if verb in ("PAUSE", "RESUME") and len(words) <= 2:
            self._check_database(words[1:])
            return await self.pause() if verb == "PAUSE" else self.resume()
        if verb == "RELOAD" and not args:
            try:
                return Result("RELOAD", notices=tuple(self.broker.reload()))
            except ConfigError as exc:
                raise AdminError(
                    "F0000", f"reload failed, the settings in use stay: {exc}",
                    hint="fix the file and RELOAD again",
                ) from exc  # fmt: skip
        if verb == "SHUTDOWN" and not args:
            logger.warning("SHUTDOWN requested on the admin console")
            asyncio.get_running_loop().call_soon(self.broker.stop)
            return Result("SHUTDOWN")
        raise AdminError(
            "42601",
            f"unknown admin command {command[:80]!r}",
            hint="SHOW HELP lists the commands (SHOW POOLS|STATS|CLIENTS|SERVERS|CONFIG, PAUSE, "
            "RESUME, RELOAD, SHUTDOWN)",
        )

    def _check_database(self, names: Sequence[str]) -> None:
        pool_db = self.broker.target.database
        if names and names[0] != pool_db:
            raise AdminError(
                "3D000",
                f"database {names[0]!r} is not served by this broker (its pool is {pool_db!r})",
                hint=f"use PAUSE {pool_db}, or PAUSE alone",
            )

    # -- control ----------------------------------------------------------------------------------

    async def pause(self) -> Result:
        pool = self.broker.pool
        assert pool is not None
        pool.pause()
        # Like PgBouncer, PAUSE returns once no backend is lent; bounded so psql never hangs forever.
        deadline = time.monotonic() + self.broker.config.shutdown_timeout
        while pool.lent_now() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            pool.take_back_idle()  # what workers gave back since
        lent = pool.lent_now()
        notices: tuple[str, ...] = ()
        if lent:
            notices = (
                f"paused, but {lent} backend(s) are still lent after "
                f"{self.broker.config.shutdown_timeout:g}s (--shutdown-timeout); they return when "
                "their transactions end",
            )
        logger.warning("pool paused from the admin console")
        return Result("PAUSE", notices=notices)

    def resume(self) -> Result:
        pool = self.broker.pool
        assert pool is not None
        pool.resume()
        logger.warning("pool resumed from the admin console")
        return Result("RESUME")


def startup_reply(broker: Broker, application_name: str) -> bytes:
    """AuthenticationOk .. ReadyForQuery for an admin session (works while PostgreSQL is down)."""
    params = dict(broker.pool.parameters or {}) if broker.pool is not None else {}
    shown = {
        "server_version": params.get("server_version", "16.0"),
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO",
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
        "application_name": application_name,
    }
    out = [frames.auth_ok()]
    out += [frames.parameter_status(k, v) for k, v in shown.items()]
    out.append(frames.backend_key_data(0, 0))
    out.append(frames.ready_for_query(b"I"))
    return b"".join(out)


async def serve(broker: Broker, sock: socket.socket, pending: bytes) -> None:
    """Run one admin session on ``sock`` (startup already read) until the client leaves."""
    loop = asyncio.get_running_loop()
    console = Console(broker)
    reader = frames.FrameReader(max_frame=1024 * 1024)
    reader.feed(pending)
    skipping = False  # after an extended-protocol message: skip to Sync, like a server in error
    while True:
        msg = reader.next_message()
        if msg is None:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                return
            reader.feed(data)
            continue
        if msg.type == b"X":
            return
        if msg.type == b"Q":
            sql, _ = frames.read_cstring(msg.body, 0, "query")
            reply = await console.run(sql.decode("utf-8", "replace"))
            await loop.sock_sendall(sock, reply + frames.ready_for_query(b"I"))
            continue
        if msg.type == b"S":
            skipping = False
            await loop.sock_sendall(sock, frames.ready_for_query(b"I"))
            continue
        if not skipping and msg.type in (b"P", b"B", b"D", b"E", b"C", b"H", b"F"):
            skipping = True
            await loop.sock_sendall(sock, frames.error_response(
                "0A000", "the pgreuse admin console speaks the simple query protocol only",
                hint="use psql, or send commands as plain queries"))  # fmt: skip
