"""The admin console's SHOW commands: each builds its result rows from the live broker.

Contract: ``SHOW POOLS | STATS | CLIENTS | SERVERS | CONFIG | VERSION | HELP`` each return one
:class:`~.admin_results.Result`, read from the live :class:`~.pool.Pool`, the proxy sessions and the
shared-memory table (shared slots as their slot word says); they change nothing but flush what the
pool has noted and not yet written to the table (TABLE_LAG). Column names are PgBouncer's where the
meaning is the same; pgreuse-only columns come last.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING

import attrs

from .. import __version__
from ..wire.states import SlotState
from .admin_results import INT8, TEXT, Result
from .reload import RELOADABLE

if TYPE_CHECKING:
    from .server import Broker


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


def _timestamp(epoch: float) -> str | None:
    if not epoch:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class ShowCommands:
    """Mixin of :class:`~.admin.Console`: the SHOW commands."""

    if TYPE_CHECKING:
        broker: Broker

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
