"""Settings of the shop example: Django's defaults, plus the database on a pgreuse broker.

The broker is the one ``gunicorn.conf.py`` starts: both read ``$PGREUSE_DSN`` (where the broker's
backends connect), ``$PGREUSE_SOCKET_DIR`` and ``$PGREUSE_PORT`` (where the broker listens), so
``manage.py`` and the Gunicorn workers use the same broker.
"""

import os

from psycopg.conninfo import conninfo_to_dict

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-do-not-deploy-this-key")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True  # the pool's TimeZone must then be UTC (pgreuse checks it on connect)
TIME_ZONE = "UTC"
ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "static/"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "orders",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

_BROKER_DSN = os.environ.get("PGREUSE_DSN", "host=/var/run/postgresql dbname=shop")
_DBNAME = str(conninfo_to_dict(_BROKER_DSN).get("dbname", "shop"))

DATABASES = {
    "default": {
        "ENGINE": "pgreuse.django",
        "HOST": os.environ.get("PGREUSE_SOCKET_DIR", "/run/pgreuse"),  # the broker's socket directory
        "PORT": os.environ.get("PGREUSE_PORT", "6432"),  # the broker's port
        "NAME": _DBNAME,  # the database of the broker's --dsn
        # Required by pgreuse: QuerySet.iterator() reads in chunks instead of a WITH HOLD cursor.
        "DISABLE_SERVER_SIDE_CURSORS": True,
        # Keep the connection between requests: parked, it holds no PostgreSQL backend.
        "CONN_MAX_AGE": None,
        # The broker serves one database, so tests use it (never point tests at production).
        "TEST": {"NAME": _DBNAME},
    }
}
