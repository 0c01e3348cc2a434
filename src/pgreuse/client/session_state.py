"""What a pgreuse connection notes about the session of the backend it holds (DESIGN.md §6): the
statements that leave state behind (the backend is then reset before anyone else gets it), and the
reported parameters a statement changed (put back while the backend is still held, so libpq's cache
is right again). The decisions are ``session.py``'s; this mixin applies them to a connection.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from psycopg import pq, sql

from .. import errors
from .channel import ChannelBase
from .session import LISTEN_REFUSED, REPORTED_PARAMETERS, Verdict, changed_parameters, classify_sql

logger = logging.getLogger("pgreuse.client")

REPORTED_RAW = tuple(name.encode() for name in REPORTED_PARAMETERS)


class SessionState:
    """Mixin of :class:`pgreuse.client.lease.LeaseCore`."""

    if TYPE_CHECKING:
        pgconn: pq.abc.PGconn
        _channel: ChannelBase | None
        _proxying: bool

    _session_dirty: bool = False
    _baseline: dict[str, str | None]
    _baseline_raw: tuple[bytes | None, ...] = ()  # the same, as libpq reports them (compared per lease)

    def _take_dirty(self) -> bool:
        dirty, self._session_dirty = self._session_dirty, False
        return dirty

    def _reported(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name in REPORTED_PARAMETERS:
            value = self.pgconn.parameter_status(name.encode())
            out[name] = value.decode() if value is not None else None
        return out

    def _reported_raw(self) -> tuple[bytes | None, ...]:
        return tuple(map(self.pgconn.parameter_status, REPORTED_RAW))

    def _note_statement(self, query: bytes) -> None:
        verdict = classify_sql(query)
        if verdict is Verdict.DIRTY:
            if self._proxying and self._channel is not None:
                # Mid-way through a proxied transaction: tell the broker before the statement goes.
                self._channel.dirty(self.pgconn.backend_pid)
            else:
                self._session_dirty = True  # the lease's end says it, or _claim if it proxies
        elif verdict is Verdict.REFUSE:
            raise errors.NotSupported(LISTEN_REFUSED)

    def _restore_statements(self, proxied: bool = False) -> list[sql.SQL | sql.Composed]:
        """Statements that put back the reported parameters a statement changed (usually none).

        They run while the backend is still leased, so PostgreSQL's ParameterStatus answers bring
        libpq's cache (which psycopg's adapters read: TimeZone, DateStyle, client_encoding) back to
        the values every backend of the pool has.

        ``proxied``: the transaction went through the broker's proxy, which may have reset the
        backend since (or give these statements another one), where the value is the pool's
        already. PostgreSQL reports a parameter only when its value differs from what that backend
        last reported, so setting the pool's value there would report nothing and leave libpq's
        cache wrong: in one transaction (one backend), the cached value is set first, then the
        pool's, and the second is reported whatever the backend held before.
        """
        if self._reported_raw() == self._baseline_raw:
            return []  # (the usual case, without decoding ten values)
        current = self._reported()
        changed = changed_parameters(self._baseline, current)
        if not changed:
            return []
        logger.debug("restoring session parameters %s after a lease", changed)
        statements: list[sql.SQL | sql.Composed] = []
        if "session_authorization" in changed or "is_superuser" in changed:
            statements.append(sql.SQL("RESET SESSION AUTHORIZATION"))
        settable = [n for n in changed if n not in ("session_authorization", "is_superuser")]
        if settable and proxied:
            statements.insert(0, sql.SQL("BEGIN"))
            statements.append(_set_config(settable, current))
            statements += [_set_config(settable, self._baseline), sql.SQL("COMMIT")]
        elif settable:
            statements.append(_set_config(settable, self._baseline))
        return statements


def _set_config(names: list[str], values: dict[str, str | None]) -> sql.Composed:
    calls = sql.SQL(", ").join(
        sql.SQL("pg_catalog.set_config({}, {}, false)").format(
            sql.Literal(n), sql.Literal(values.get(n) or "")
        )
        for n in names
    )
    return sql.SQL("SELECT {}").format(calls)
