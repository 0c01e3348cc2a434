"""Gunicorn settings for the ASGI example: pgreuse's hooks start the broker in the master."""

import os

from pgreuse.gunicorn import install

install(
    globals(),
    dsn=os.environ.get("PGREUSE_DSN", "host=/var/run/postgresql dbname=app"),
    socket_dir=os.environ.get("PGREUSE_SOCKET_DIR", "/tmp/pgreuse-asgi"),
    max_size=int(os.environ.get("PGREUSE_MAX_SIZE", "2")),
)

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = 3
worker_class = "uvicorn_worker.UvicornWorker"
