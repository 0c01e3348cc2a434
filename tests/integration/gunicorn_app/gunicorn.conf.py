import os

from pgreuse.gunicorn import install

install(globals(), dsn=os.environ["TEST_PG_DSN"], socket_dir=os.environ["TEST_SOCKET_DIR"],
        port=6432, max_size=int(os.environ.get("TEST_MAX_SIZE", "2")))  # fmt: skip

bind = os.environ["TEST_BIND"]
workers = 4
