"""Gunicorn with pgreuse's broker and an OpenTelemetry SDK in every worker.

    PGREUSE_DSN="host=/var/run/postgresql dbname=app" PGREUSE_SOCKET_DIR=/tmp/pgreuse \
        gunicorn -c examples/otel/gunicorn.conf.py --chdir examples/otel app:app
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from otel_setup import setup

from pgreuse.gunicorn import install

workers = int(os.environ.get("WEB_CONCURRENCY", "2"))


def post_fork(server, worker):
    # In each worker, after fork: the SDK's export threads must start in the process that uses them.
    setup(service_name="pgreuse-example", export_interval=float(os.environ.get("OTEL_EXPORT_SECONDS", "5")))


install(globals())  # pgreuse's hooks run first, then the post_fork above (chained)
