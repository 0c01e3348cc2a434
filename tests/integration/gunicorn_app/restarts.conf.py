# Gunicorn restarting under load (test_gunicorn_restarts.py): workers recycled after a few requests,
# and the broker's size read from a file, so that a HUP of the master can change it.
import os

from pgreuse.gunicorn import install

with open(os.environ["TEST_MAX_SIZE_FILE"]) as f:
    _max_size = int(f.read())

install(globals(), dsn=os.environ["TEST_PG_DSN"], socket_dir=os.environ["TEST_SOCKET_DIR"],
        port=6432, max_size=_max_size, min_size=1)  # fmt: skip

bind = os.environ["TEST_BIND"]
pidfile = os.environ["TEST_PIDFILE"]
workers = 3
worker_class = "gthread"
threads = 2
max_requests = 25
max_requests_jitter = 10
graceful_timeout = 20
