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
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from .. import __version__
from ..wire import frames
from ..wire.states import SlotState
from .config import ConfigError
from .reload import RELOADABLE

if TYPE_CHECKING:
    from .server import Broker

logger = logging.getLogger("pgreuse.broker")

ADMIN_DATABASE = "pgreuse"
INT8 = 20
TEXT = 25
_TYPE_LEN = {INT8: 8, TEXT: -1}
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")

# PgBouncer's names for server states; "tested" is its word for "running the reset query".
_SERVER_STATE = {
    SlotState.CONNECTING: "login",
    SlotState.IDLE: "idle",
    SlotState.LENT: "active",
    SlotState.RESETTING: "tested",
}

HELP = """\
pgreuse admin console commands:
  SHOW POOLS      clients and backends per pool (cl_active, cl_waiting, sv_active, sv_idle, ...)
  SHOW STATS      totals: transactions, queries, bytes, time waited and used, errors
  SHOW CLIENTS    one row per client connection (parked pgreuse connections and proxied clients)
  SHOW SERVERS    one row per backend connection
  SHOW CONFIG     the broker's settings
  SHOW VERSION    the pgreuse version
  PAUSE           stop lending backends (waits for lent ones to come back); clients queue
  RESUME          lend again after PAUSE
  RELOAD          re-read --config-file; apply the settings SHOW CONFIG calls changeable
  SHUTDOWN        stop the broker (lent backends get --shutdown-timeout to come back)"""


class AdminError(Exception):
    """A console command failed; ``sqlstate`` and the message go to the client."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


@attrs.frozen
class Result:
    """What one command answers: a result set (``columns`` non-empty) or only a command tag."""

    tag: str
    columns: tuple[tuple[str, int], ...] = ()
    rows: tuple[tuple[object, ...], ...] = ()
    notices: tuple[str, ...] = ()

    def encode(self) -> bytes:
        out = [frames.notice_response("00000", n) for n in self.notices]
        if self.columns:
            out.append(row_description(self.columns))
            out.extend(data_row(r) for r in self.rows)
        out.append(frames.frame(b"C", self.tag.encode() + b"\0"))
        return b"".join(out)


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns of type ``int8`` or ``text``."""
    body = [_I16.pack(len(columns))]
    for name, oid in columns:
        body.append(name.encode() + b"\0" + _FIELD.pack(0, 0, oid, _TYPE_LEN[oid], -1, 0))
    return frames.frame(b"T", b"".join(body))


def data_row(values: Sequence[object]) -> bytes:
    """DataRow in text format; ``None`` is SQL NULL."""
    body = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            body.append(_I32.pack(-1))
            continue
        raw = str(v).encode()
        body.append(_I32.pack(len(raw)) + raw)
    return frames.frame(b"D", b"".join(body))


def _timestamp(epoch: float) -> str | None:
    if not epoch:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Console:
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

    # -- SHOW -------------------------------------------------------------------------------------

    def show_pools(self) -> Result:
        b = self.broker
        pool = b.pool
        assert pool is not None
        waiting = len(pool.waiters)
        oldest = pool.waiters[0].enqueued_ns if pool.waiters else 0
        maxwait_ns = time.monotonic_ns() - oldest if oldest else 0
        cols = (
            ("database", TEXT), ("user", TEXT), ("cl_active", INT8), ("cl_waiting", INT8),
            ("sv_active", INT8), ("sv_idle", INT8), ("sv_used", INT8), ("sv_tested", INT8),
            ("sv_login", INT8), ("maxwait", INT8), ("maxwait_us", INT8), ("pool_mode", TEXT),
            ("paused", INT8), ("max_size", INT8), ("min_size", INT8),
        )  # fmt: skip
        seen = [pool.seen(s)[0] for s in pool.slots]  # shared slots as their word says
        row = (
            b.target.database,
            b.target.user,
            max(0, len(b.sessions) - waiting),
            waiting,
            seen.count(SlotState.LENT),
            seen.count(SlotState.IDLE),
            0,  # PgBouncer: idle but due for a health check; pgreuse checks idle backends continuously
            pool.count(SlotState.RESETTING),
            pool.count(SlotState.CONNECTING),
            maxwait_ns // 1_000_000_000,
            (maxwait_ns // 1000) % 1_000_000,
            b.config.pool_mode,
            int(pool.paused),
            b.config.max_size,
            b.config.min_size,
        )
        return Result("SHOW", cols, (row,))

    def show_stats(self) -> Result:
        b = self.broker
        assert b.table is not None and b.pool is not None
        b.pool.flush_table()  # what the pool has noted and not yet written (TABLE_LAG) counts too
        snap = b.table.snapshot()
        c = snap.counters
        ps = b.proxy_stats
        cols = (
            ("database", TEXT), ("total_xact_count", INT8), ("total_query_count", INT8),
            ("total_received", INT8), ("total_sent", INT8), ("total_xact_time", INT8),
            ("total_wait_time", INT8), ("total_wait_count", INT8), ("timeouts", INT8),
            ("unavailable", INT8), ("backends_opened", INT8), ("backends_closed", INT8),
            ("connect_failures", INT8), ("protocol_errors", INT8), ("max_pending", INT8),
            ("proxy_xact_count", INT8), ("proxy_broken", INT8),
        )  # fmt: skip
        row = (
            b.target.database,
            c["leases"],
            ps.queries,  # proxied sync points only: handoff clients talk to PostgreSQL directly
            ps.received,
            ps.sent,
            c["use_ns"] // 1000,
            c["wait_ns"] // 1000,
            c["waits"],
            c["timeouts"],
            c["unavailable"],
            c["backends_opened"],
            c["backends_closed"],
            c["connect_failures"],
            c["protocol_errors"],
            c["max_pending"],
            ps.xacts,
            ps.broken,
        )
        return Result("SHOW", cols, (row,))

    def show_clients(self) -> Result:
        b = self.broker
        pool = b.pool
        assert pool is not None
        lent = {}
        for slot in pool.slots:
            seen, _pid, _kind, _leases, _started, parking = pool.seen(slot)
            if seen is SlotState.LENT and parking:
                lent[parking] = slot
        waiting = {w.parking: w for w in pool.waiters}
        now_ns = time.monotonic_ns()
        cols = (
            ("type", TEXT), ("user", TEXT), ("database", TEXT), ("state", TEXT), ("addr", TEXT),
            ("port", INT8), ("connect_time", TEXT), ("request_time", TEXT), ("wait", INT8),
            ("wait_us", INT8), ("remote_pid", INT8), ("tls", TEXT), ("application_name", TEXT),
            ("mode", TEXT), ("parking_key", INT8), ("server_pid", INT8),
        )  # fmt: skip
        rows = []
        for key, s in sorted(b.sessions.items()):
            server = lent.get(key)
            w = waiting.get(key)
            state = "active" if server else "waiting" if w else "idle"
            wait_ns = now_ns - w.enqueued_ns if w else 0
            addr, _, port = s.addr.partition(":")
            # fmt: off
            rows.append(
                (
                    "C", s.user, s.database, state, addr, int(port) if port else None,
                    _timestamp(s.connect_time), _timestamp(s.request_time),
                    wait_ns // 1_000_000_000, (wait_ns // 1000) % 1_000_000, s.pid or None, "",
                    s.application_name, "proxy" if s.proxied else "handoff", key,
                    server.pid if server else None,
                )
            )
            # fmt: on
        return Result("SHOW", cols, tuple(rows))

    def show_servers(self) -> Result:
        b = self.broker
        pool = b.pool
        assert pool is not None
        t = b.target
        now_ns = time.monotonic_ns()
        cols = (
            ("type", TEXT), ("user", TEXT), ("database", TEXT), ("state", TEXT), ("addr", TEXT),
            ("port", INT8), ("connect_time", TEXT), ("request_time", TEXT), ("remote_pid", INT8),
            ("tls", TEXT), ("slot", INT8), ("generation", INT8), ("holder_pid", INT8),
            ("holder", TEXT), ("leases", INT8), ("lease_us", INT8), ("dirty", INT8),
        )  # fmt: skip
        rows = []
        for s in pool.slots:
            if s.state is SlotState.CLOSED:
                continue
            state, holder_pid, holder_kind, leases, started_ns, _parking = pool.seen(s)
            lease_ns = now_ns - started_ns if started_ns else 0
            lease_start = time.time() - lease_ns / 1e9 if started_ns else 0.0
            # fmt: off
            rows.append(
                (
                    "S", t.user, t.database, _SERVER_STATE[state],
                    t.socket_path if t.is_unix else t.host, t.port, _timestamp(s.opened_at),
                    _timestamp(lease_start), s.pid or None,
                    s.tls.describe() if s.tls is not None else "", s.index,
                    s.generation, holder_pid or None, holder_kind, leases,
                    lease_ns // 1000, int(s.dirty),
                )
            )
            # fmt: on
        return Result("SHOW", cols, tuple(rows))

    def show_config(self) -> Result:
        cfg = self.broker.config
        defaults = type(cfg)(dsn="-")
        rows = []
        for field in attrs.fields(type(cfg)):
            value = getattr(cfg, field.name)
            default = getattr(defaults, field.name)
            if field.name == "dsn":
                value, default = self.broker.target.describe(), ""
            changeable = "yes" if field.name in RELOADABLE else "no"
            rows.append((field.name.replace("_", "-"), str(value), str(default), changeable))
        cols = (("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT))
        return Result("SHOW", cols, tuple(rows))

    def show_version(self) -> Result:
        return Result("SHOW", (("version", TEXT),), ((f"pgreuse {__version__}",),))

    def show_help(self) -> Result:
        return Result("SHOW", notices=(HELP,))

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
