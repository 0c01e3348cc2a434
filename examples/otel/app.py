"""A WSGI app using pgreuse, with a request span like the one a framework instrumentation makes."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace

import pgreuse

tracer = trace.get_tracer("example.app")
_local = threading.local()


def _conn() -> pgreuse.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = pgreuse.connect(os.environ["PGREUSE_CONNINFO"])
    return conn


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    # opentelemetry-instrumentation-wsgi (or -django, -flask) would open this span for you; the
    # pgreuse.lease span becomes its child.
    with tracer.start_as_current_span(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"):
        conn = _conn()
        with conn.transaction():
            (now, backend) = conn.execute("select now()::text, pg_backend_pid()").fetchone()  # type: ignore[misc]
        body = json.dumps({"worker": os.getpid(), "backend": backend, "now": now}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
