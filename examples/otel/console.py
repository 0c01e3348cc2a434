"""Run a few leases against a broker and print what OpenTelemetry sees, to the console.

    python -m pgreuse.broker --socket-dir /tmp/pgreuse --port 6432 --dsn "dbname=app" &
    python examples/otel/console.py --socket-dir /tmp/pgreuse --port 6432 --dbname app

One process, no fork: the SDK is set up at the top. Spans print as they end; metrics print once, at
exit (the reader's final collection).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from opentelemetry import trace
from otel_setup import setup

import pgreuse


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--socket-dir", required=True)
    p.add_argument("--port", type=int, default=6432)
    p.add_argument("--dbname", default="postgres")
    args = p.parse_args()
    setup(service_name="pgreuse-console", export_interval=60)
    tracer = trace.get_tracer("example.console")
    with pgreuse.connect(f"host={args.socket_dir} port={args.port} dbname={args.dbname}") as conn:
        with tracer.start_as_current_span("GET /orders"), conn.transaction():
            conn.execute("select pg_sleep(0.01)")
        conn.execute("select 1")
        conn.commit()


if __name__ == "__main__":
    main()
