"""A WSGI app whose every answer acknowledges a committed row: ``GET /?id=X`` inserts X, then says X."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import pgreuse

_local = threading.local()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = pgreuse.connect(os.environ["PGREUSE_CONNINFO"])
    (ack,) = parse_qs(environ.get("QUERY_STRING", ""))["id"]
    with conn.transaction():  # (committed when the block ends: the answer follows the commit)
        conn.execute("insert into acks (id, worker) values (%s, %s)", (ack, os.getpid()))
    body = ack.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
