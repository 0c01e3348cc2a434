"""A ``psycopg.AsyncConnection`` that leases a backend from the broker for each transaction.

The same lease rules as :class:`pgreuse.Connection` (the shared part is :class:`LeaseCore`): a claim in
the shared-memory table never waits, so nothing here blocks the event loop; a transaction that finds
no idle backend awaits its answer through the broker's proxy like any query. psycopg's async API is
asyncio-only, so this runs on asyncio (uvloop included).

The swap happens between two ``wait()`` calls, never during one: psycopg's asyncio wait registers
the fd with the loop only for the duration of the wait, so no stale registration survives a swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import pq

from .async_channel import AsyncChannel, async_channel_for
from .guard import StatementGuard, check_prepare_threshold
from .hot import LEASED
from .lease import (
    DEFAULT_LEASE_TIMEOUT,
    LeaseCore,
)

__all__ = ["AsyncConnection", "AsyncCursor", "connect_async"]


class AsyncCursor(StatementGuard, psycopg.AsyncCursor[Any]):
    """psycopg's async cursor, noting what each statement leaves in the session."""


class AsyncConnection(LeaseCore, psycopg.AsyncConnection[Any]):
    """An asyncio psycopg connection whose backend is leased from a pgreuse broker per transaction."""

    _channel: AsyncChannel | None = None

    def __init__(self, pgconn: pq.abc.PGconn, *args: Any, **kwargs: Any) -> None:
        super().__init__(pgconn, *args, **kwargs)
        self._init_lease()
        self.cursor_factory = AsyncCursor

    @classmethod
    async def connect(  # type: ignore[override]
        cls,
        conninfo: str = "",
        *,
        prepare_threshold: int | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        **kwargs: Any,
    ) -> AsyncConnection:
        """Connect to a pgreuse broker; see :func:`pgreuse.connect`.

        Raises:
            NotSupported: ``prepare_threshold`` is not ``None``.
            BrokerUnavailable: no broker answers at ``<host>/.s.PGREUSE.<port>``.
        """
        check_prepare_threshold(prepare_threshold)
        scope = id(asyncio.get_running_loop())  # (its control channel is this loop's)
        reopened, key = cls._from_kept(conninfo, lease_timeout, kwargs, scope)
        if reopened is not None:
            assert isinstance(reopened, AsyncConnection)
            return reopened
        channel = await async_channel_for(cls._control_path(conninfo, kwargs))
        try:
            conn = await super().connect(conninfo, prepare_threshold=None, **kwargs)
        except BaseException:
            channel.drop_user()
            raise
        assert isinstance(conn, AsyncConnection)
        conn._bind(channel, lease_timeout)
        conn._park_key = key
        return conn

    def _park_loop(self) -> weakref.ref[Any] | None:
        return weakref.ref(asyncio.get_running_loop())

    async def cancel_safe(self, *args: Any, **kwargs: Any) -> None:
        self._cancel_sent = True
        await super().cancel_safe(*args, **kwargs)

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self._held is None and not self._proxying:
            got = self._hot.begin(self, gen)  # (the usual claim, in C: see hot.py)
            if got != LEASED:
                self._begin(gen, got)  # (never waits: a claim in the table, or the proxy)
        try:
            return await super().wait(gen, *args, **kwargs)
        except psycopg.Error as exc:
            mapped = self._refused(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            if (self._held is not None or self._proxying) and not self._hot.end(self):
                await self._after_wait()

    async def _after_wait(self) -> None:
        if self._after_wait_done():
            return
        steps = self._after_wait_steps()
        for stmt in steps:
            try:
                await super().wait(self._exec_command(stmt))
            except BaseException as exc:
                steps.throw(exc)  # settles the lease as broken, and raises
                raise

    @contextlib.asynccontextmanager
    async def pipeline(self) -> AsyncIterator[psycopg.AsyncPipeline]:
        try:
            async with super().pipeline() as p:
                yield p
        finally:
            async with self.lock:
                await self._after_wait()

    @contextlib.asynccontextmanager
    async def _pipeline_nolock(self) -> AsyncIterator[psycopg.AsyncPipeline]:
        # psycopg >= 3.3 runs executemany() in this pipeline (the caller holds the lock).
        try:
            async with super()._pipeline_nolock() as p:
                yield p
        finally:
            await self._after_wait()

    async def close(self) -> None:
        try:
            await self._close()
        finally:
            channel, self._channel = self._channel, None
            if channel is not None:
                channel.drop_user()

    async def _close(self) -> None:
        if os.getpid() != self._owner_pid:
            # A forked child: its copy must neither terminate nor release the parent's backend.
            self._neuter_in_child()
            await super().close()
            return
        if self.closed:
            self._give_back(broken=True)
            self._close_home()
            return
        if self._held is not None:
            # As in Connection.close(): a stream() or copy() left open holds the lock for good, so
            # roll back only if the lock is free now.
            if not self.lock.locked():
                with contextlib.suppress(psycopg.Error):
                    if self.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                        await self.rollback()
            self._give_back(broken=True)
        elif self._park():
            return  # its parking connection is kept for the next connect_async() in this loop
        await super().close()
        self._close_home()


async def connect_async(conninfo: str = "", **kwargs: Any) -> AsyncConnection:
    """``await pgreuse.connect_async("host=/run/pgreuse port=6432 dbname=app")``."""
    return await AsyncConnection.connect(conninfo, **kwargs)
