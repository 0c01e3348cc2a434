"""A Starlette app on pgreuse's asyncio pool: every Gunicorn (uvicorn) worker shares the broker's backends.

The pool is opened in the lifespan handler, which runs in the worker after Gunicorn forked it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import pgreuse

pool = pgreuse.AsyncConnectionPool(
    os.environ.get("PGREUSE_CONNINFO", ""), min_size=1, max_size=8, open=False, name="asgi"
)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await pool.open(wait=True)
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        await conn.execute("create table if not exists visits (id serial primary key, path text, worker int)")
    yield
    await pool.close()


async def visit(request: Request) -> JSONResponse:
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "insert into visits (path, worker) values (%s, %s)", (request.url.path, os.getpid())
        )
        cur = await conn.execute("select count(*), pg_backend_pid() from visits")
        row = await cur.fetchone()
        assert row is not None
        return JSONResponse({"visits": row[0], "backend": row[1], "worker": os.getpid()})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(pool.get_stats())


app = Starlette(routes=[Route("/", visit), Route("/stats", stats)], lifespan=lifespan)
