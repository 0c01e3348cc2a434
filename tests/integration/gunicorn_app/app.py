"""A WSGI app that uses pgreuse the way a Gunicorn app would: a connection per thread, lazily."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import pgreuse

_local = threading.local()


def _conn() -> pgreuse.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = pgreuse.connect(os.environ["PGREUSE_CONNINFO"])
    return conn


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    conn = _conn()
    with conn.transaction():
        conn.execute("insert into hits (worker) values (%s)", (os.getpid(),))
        (count, backend) = conn.execute("select count(*), pg_backend_pid() from hits").fetchone()  # type: ignore[misc]
        lease = conn.lease  # None when the transaction went through the broker's proxy
        assert (lease is None) == conn.proxied
    body = json.dumps(
        {
            "worker": os.getpid(),
            "thread": threading.get_ident(),
            "backend": backend,
            "count": count,
            "claimed": lease is not None,
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])  # fmt: skip
    return [body]
