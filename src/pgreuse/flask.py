"""Flask extension: one pgreuse connection per app context, opened lazily, given back at teardown.

::

    from pgreuse.flask import PgReuse, get_db

    pgreuse_ext = PgReuse(app)          # or PgReuse() and pgreuse_ext.init_app(app) in a factory

    @app.post("/todos")
    def add():
        db = get_db()                   # or pgreuse_ext.connection
        with db.transaction():          # one backend for the block, returned at COMMIT
            db.execute("insert into todos (title) values (%s)", [request.json["title"]])
        ...

Contract: inside an app context (every request has one), the first use of ``get_db()`` or
``pgreuse_ext.connection`` gives that context a :class:`pgreuse.Connection` of its own; later uses in
the same context get the same one. At teardown an open transaction is rolled back (uncommitted work is
discarded, as with a failed request, and the backend goes back to the broker), the connection's
settings are put back, and it is kept parked for the next app context of this process (up to
``PGREUSE_MAX_IDLE`` of them) or closed. A parked connection holds no PostgreSQL backend, only its
Unix socket to the broker. Nothing is opened in a process before it is used, so Gunicorn's master
(``preload_app``) opens nothing.

Config keys (read by ``init_app``; an unknown ``PGREUSE_*`` key is refused, to catch typos):

``PGREUSE_CONNINFO``
    the broker: ``"host=<socket dir> port=<port> dbname=<db>"``. Default: ``$PGREUSE_CONNINFO``,
    read at first use; ``pgreuse.gunicorn``'s hooks export it to the workers.
``PGREUSE_AUTOCOMMIT``
    default ``True``: each statement commits on its own (and leases a backend just for itself);
    group statements with ``with db.transaction():``. ``False`` is psycopg's default: a
    transaction begins at the first statement and holds a backend until ``commit()``.
``PGREUSE_LEASE_TIMEOUT``
    seconds a statement waits for the broker's answer (default: pgreuse's, 300; the broker's own
    ``--wait-timeout`` normally answers first with :class:`pgreuse.PoolTimeout`).
``PGREUSE_MAX_IDLE``
    parked connections kept per process for the next app contexts (default 8; 0 closes each one
    at teardown).

Other ``psycopg.connect()`` arguments (``row_factory=dict_row``, ...) are given to ``PgReuse(...)``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from typing import Any

import attrs
import psycopg
from flask import Flask, current_app, g  # type: ignore[import-not-found, unused-ignore]  # see below
from psycopg import pq

from .client import Connection, connect

__all__ = ["CONFIG_DEFAULTS", "PgReuse", "get_db"]

# The ignore on `import flask`: `nox -s typecheck` may run without Flask installed (Flask names are
# then Any); with Flask installed the ignore is unused, and says so harmlessly.

EXTENSION_KEY = "pgreuse"
_G_KEY = "_pgreuse_connection"

#: The config keys pgreuse reads, with their defaults.
CONFIG_DEFAULTS: Mapping[str, Any] = {
    "PGREUSE_CONNINFO": None,
    "PGREUSE_AUTOCOMMIT": True,
    "PGREUSE_LEASE_TIMEOUT": None,
    "PGREUSE_MAX_IDLE": 8,
}

# Connection settings a view may change; put back before a connection is parked for another context.
_RESETTABLE = ("row_factory", "isolation_level", "read_only", "deferrable")


@attrs.define(eq=False)
class _AppState:
    """Per app: the settings read at init_app, and this process's parked connections."""

    conninfo: str | None
    autocommit: bool
    lease_timeout: float | None
    max_idle: int
    connect_kwargs: dict[str, Any]
    pid: int = attrs.field(factory=os.getpid)
    idle: list[Connection] = attrs.field(factory=list)
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    defaults: dict[str, Any] = attrs.field(factory=dict)  # _RESETTABLE values of a fresh connection

    def checkout(self) -> Connection:
        with self.lock:
            self._forget_if_forked()
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
        return self._open()

    def _open(self) -> Connection:
        conninfo = self.conninfo if self.conninfo is not None else os.environ.get("PGREUSE_CONNINFO")
        if not conninfo:
            raise RuntimeError(
                "pgreuse.flask does not know which broker to use: set "
                "app.config['PGREUSE_CONNINFO'] (e.g. 'host=/run/pgreuse port=6432 dbname=app'), or "
                "run under Gunicorn with pgreuse.gunicorn's hooks, which export $PGREUSE_CONNINFO"
            )
        kwargs = dict(self.connect_kwargs)
        if self.lease_timeout is not None:
            kwargs["lease_timeout"] = self.lease_timeout
        conn = connect(conninfo, autocommit=self.autocommit, **kwargs)
        if not self.defaults:
            self.defaults = {name: getattr(conn, name) for name in _RESETTABLE}
        return conn

    def checkin(self, conn: Connection) -> None:
        if conn.closed:
            return
        try:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.rollback()  # uncommitted work is discarded; the backend goes back
            if conn.autocommit != self.autocommit:
                conn.autocommit = self.autocommit
            for name, value in self.defaults.items():
                if getattr(conn, name) != value:
                    setattr(conn, name, value)
        except psycopg.Error:
            conn.close()
            return
        if conn.lease is not None:  # still leased (e.g. a COPY left open): never park it
            conn.close()
            return
        with self.lock:
            self._forget_if_forked()
            if len(self.idle) < self.max_idle:
                self.idle.append(conn)
                return
        conn.close()

    def _forget_if_forked(self) -> None:
        # Connections parked by the parent belong to it: close() in a child leaves them alone.
        if self.pid != os.getpid():
            for conn in self.idle:
                with contextlib.suppress(Exception):
                    conn.close()
            self.idle.clear()
            self.pid = os.getpid()

    def close_idle(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class PgReuse:
    """The Flask extension: ``PgReuse(app)``, or ``PgReuse()`` then ``init_app(app)``.

    ``connect_kwargs`` go to :func:`pgreuse.connect` for every connection (e.g.
    ``row_factory=psycopg.rows.dict_row``); ``autocommit`` and ``lease_timeout`` come from the
    config keys instead.
    """

    def __init__(self, app: Flask | None = None, **connect_kwargs: Any) -> None:
        for key, setting in (("autocommit", "PGREUSE_AUTOCOMMIT"),
                             ("lease_timeout", "PGREUSE_LEASE_TIMEOUT")):  # fmt: skip
            if key in connect_kwargs:
                raise TypeError(f"PgReuse({key}=...): set app.config[{setting!r}] instead")
        self.connect_kwargs = connect_kwargs
        self.app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the ``PGREUSE_*`` config of ``app`` and register the teardown.

        Raises:
            ValueError: a ``PGREUSE_*`` key pgreuse does not know, or a value of the wrong kind
                (the message names the key and the value).
            RuntimeError: ``app`` already has a pgreuse extension.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"app {app.name!r} already has a pgreuse extension (init_app ran twice)")
        for key, value in CONFIG_DEFAULTS.items():
            app.config.setdefault(key, value)
        unknown = sorted(k for k in app.config if k.startswith("PGREUSE_") and k not in CONFIG_DEFAULTS)
        if unknown:
            raise ValueError(
                f"app.config has {', '.join(unknown)}, which pgreuse.flask does not know; "
                f"its keys are {', '.join(CONFIG_DEFAULTS)}"
            )
        app.extensions[EXTENSION_KEY] = _AppState(
            conninfo=_check(app, "PGREUSE_CONNINFO", lambda v: v is None or isinstance(v, str),
                            "a libpq conninfo string, e.g. 'host=/run/pgreuse port=6432 dbname=app'"),
            autocommit=_check(app, "PGREUSE_AUTOCOMMIT", lambda v: isinstance(v, bool), "True or False"),
            lease_timeout=_check(app, "PGREUSE_LEASE_TIMEOUT", _none_or_positive, "seconds, > 0"),
            max_idle=_check(app, "PGREUSE_MAX_IDLE",
                            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                            "a number of connections, >= 0"),
            connect_kwargs=dict(self.connect_kwargs),
        )  # fmt: skip
        app.teardown_appcontext(_teardown)

    @property
    def connection(self) -> Connection:
        """This app context's pgreuse connection, opened on first use (same as :func:`get_db`)."""
        return get_db()

    def close_idle(self, app: Flask | None = None) -> None:
        """Close the parked connections of ``app`` (default: the current app) in this process."""
        target = app or self.app or current_app
        _state(target).close_idle()


def get_db() -> Connection:
    """The current app context's pgreuse connection, opened (or taken from the parked ones) on first use.

    Raises:
        RuntimeError: outside an app context, or ``init_app`` was not called for the current app,
            or no broker is configured (the message says what to set).
        pgreuse.BrokerUnavailable: no broker answers at the configured address.
    """
    conn: Connection | None = g.get(_G_KEY)
    if conn is None or conn.closed:
        conn = _state(current_app).checkout()
        setattr(g, _G_KEY, conn)
    return conn


def _state(app: Flask) -> _AppState:
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, _AppState):
        raise RuntimeError(
            f"app {app.name!r} has no pgreuse extension: call PgReuse(app) or PgReuse().init_app(app)"
        )
    return state


def _teardown(exc: BaseException | None) -> None:
    conn: Connection | None = g.pop(_G_KEY, None)
    if conn is not None:
        _state(current_app).checkin(conn)


def _none_or_positive(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value > 0)


def _check(app: Flask, key: str, ok: Any, what: str) -> Any:
    value = app.config[key]
    if not ok(value):
        raise ValueError(f"app.config[{key!r}] is {value!r}: give {what}")
    return value
