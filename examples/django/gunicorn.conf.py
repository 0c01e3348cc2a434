"""Gunicorn settings for the shop: the master starts pgreuse's broker, 16 threads share 4 backends.

The broker's settings come from the environment (``PGREUSE_DSN``, ``PGREUSE_SOCKET_DIR``,
``PGREUSE_PORT``; see README.md); ``shop/settings.py`` reads the same variables.
"""

from pgreuse.gunicorn import install

install(globals(), max_size=4)

wsgi_app = "shop.wsgi:application"
bind = "127.0.0.1:8000"
workers = 4
worker_class = "gthread"
threads = 4
