"""Settings: one database, reached through the pgreuse broker the test started.

``TEST_BROKER_DIR``, ``TEST_BROKER_PORT`` and ``TEST_DBNAME`` name the broker and its database. The
test database is the broker's database (``TEST["NAME"] == NAME``): a broker serves one database.
``TEST_SETTINGS_VARIANT`` switches on one bad setting, for the tests that check pgreuse refuses it.
"""

import os

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_KEY = "pgreuse-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "djproject.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# The default hasher takes ~0.5 s per login on purpose; tests do not need that.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "notes",
]
MIDDLEWARE = [
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

_NAME = os.environ["TEST_DBNAME"]
DATABASES = {
    "default": {
        "ENGINE": "pgreuse.django",
        "HOST": os.environ["TEST_BROKER_DIR"],  # the broker's --socket-dir
        "PORT": os.environ["TEST_BROKER_PORT"],  # the broker's --port
        "NAME": _NAME,  # the database of the broker's --dsn
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "CONN_MAX_AGE": None,
        "TEST": {"NAME": _NAME},
    }
}

_variant = os.environ.get("TEST_SETTINGS_VARIANT", "")
if _variant == "server_side_cursors":
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = False
elif _variant == "pool":
    DATABASES["default"]["OPTIONS"] = {"pool": True}
elif _variant == "test_name":
    DATABASES["default"]["TEST"] = {}
elif _variant == "timezone":
    USE_TZ = False  # Django would SET TIME ZONE 'America/Chicago' on each new connection
    TIME_ZONE = "America/Chicago"
elif _variant:
    raise ValueError(f"TEST_SETTINGS_VARIANT={_variant!r} is not one this project knows")
