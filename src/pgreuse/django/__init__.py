"""Django database backend for pgreuse: ``DATABASES = {"default": {"ENGINE": "pgreuse.django", ...}}``.

Contract: a Django connection with this ENGINE is a :class:`pgreuse.Connection`, so it holds a
PostgreSQL backend only while a transaction is open: an autocommit statement leases one for that
statement, an ``atomic()`` block (savepoints included) holds one lease from ``BEGIN`` to
``COMMIT``/``ROLLBACK``. ``HOST`` is the broker's socket directory, ``PORT`` its port, ``NAME`` the
database of its ``--dsn``.

Settings that cannot work when backends are shared per transaction stop the first connection (and
``manage.py check --database <alias>``) with an ``ImproperlyConfigured`` that says what to set; see
:mod:`pgreuse.django.checks`. The test runner uses the broker's database as the test database
(``TEST = {"NAME": <NAME>}``) and never creates or drops it; see :mod:`pgreuse.django.creation`.

Importing this package does not import Django; Django loads :mod:`pgreuse.django.base` itself.
"""
