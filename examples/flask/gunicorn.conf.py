"""Gunicorn settings for the to-do app: the master starts pgreuse's broker, 16 threads share 4 backends.

The broker's settings come from the environment (``PGREUSE_DSN``, ``PGREUSE_SOCKET_DIR``,
``PGREUSE_PORT``; see README.md). The hooks export ``PGREUSE_CONNINFO`` to the workers, which is where
``pgreuse.flask`` finds the broker.
"""

from pgreuse.gunicorn import install

install(globals(), max_size=4)

wsgi_app = "app:app"
bind = "127.0.0.1:8000"
workers = 4
worker_class = "gthread"
threads = 4
