"""psycopg_pool drop-in: ``from pgreuse import ConnectionPool`` instead of ``from psycopg_pool ...``.

These are psycopg_pool's own pools (same constructor, ``connection()``, ``get_stats()``, errors,
background workers), whose connections are pgreuse connections. What the pool holds per process is
*parked* connections to the broker, which cost no PostgreSQL backend; a backend is leased only for
the length of each transaction, and the broker's ``--max-size`` is what bounds PostgreSQL. So
``max_size`` here bounds how many threads (or tasks) of this process can hold a connection at once,
and ``min_size`` costs nothing on the server.

Open the pool after fork (in Gunicorn's ``post_fork`` or lazily), as with psycopg_pool itself: its
worker threads do not survive a fork.
"""

from __future__ import annotations

from typing import Any

import psycopg_pool

from .client import AsyncConnection, Connection
from .client.guard import check_prepare_threshold

__all__ = ["AsyncConnectionPool", "ConnectionPool"]


def _checked_kwargs(connection_class: type, base: type, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if not (isinstance(connection_class, type) and issubclass(connection_class, base)):
        raise TypeError(
            f"connection_class={connection_class!r}: a pgreuse pool needs {base.__module__}."
            f"{base.__name__} or a subclass of it"
        )
    kwargs = dict(kwargs or {})
    check_prepare_threshold(kwargs.get("prepare_threshold"))
    return kwargs


class ConnectionPool(psycopg_pool.ConnectionPool[Connection]):
    """psycopg_pool's ``ConnectionPool`` of :class:`pgreuse.Connection`.

    Raises:
        TypeError: ``connection_class`` is not a :class:`pgreuse.Connection` subclass.
        pgreuse.NotSupported: ``kwargs`` sets a ``prepare_threshold``.
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        connection_class: type[Connection] = Connection,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        kwargs = _checked_kwargs(connection_class, Connection, kwargs)
        super().__init__(conninfo, connection_class=connection_class, kwargs=kwargs, **options)


class AsyncConnectionPool(psycopg_pool.AsyncConnectionPool[AsyncConnection]):
    """psycopg_pool's ``AsyncConnectionPool`` of :class:`pgreuse.AsyncConnection`."""

    def __init__(
        self,
        conninfo: str = "",
        *,
        connection_class: type[AsyncConnection] = AsyncConnection,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        kwargs = _checked_kwargs(connection_class, AsyncConnection, kwargs)
        super().__init__(conninfo, connection_class=connection_class, kwargs=kwargs, **options)
