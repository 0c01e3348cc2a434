"""The ``DatabaseWrapper`` Django loads for ``ENGINE: "pgreuse.django"``.

Contract: Django's own PostgreSQL backend in every respect except three.

* ``get_new_connection`` returns a :class:`pgreuse.Connection` (leased per transaction from the
  broker named by ``HOST``/``PORT``) instead of a ``psycopg.Connection``; pgreuse's own OPTIONS keys
  (``lease_timeout``) are taken out of the connection parameters before the rest reaches libpq.
* ``check_settings`` (run by Django before every connect) refuses the settings listed in
  :mod:`pgreuse.django.checks` with ``ImproperlyConfigured``; the validation class reports the same
  problems to ``manage.py check --database <alias>``.
* Django's per-connection session setup is never sent: ``SET TIME ZONE`` is replaced by a check that
  the pool's ``TimeZone`` already is Django's zone (else ``ImproperlyConfigured``, and the new
  connection is closed), and ``SET ROLE`` cannot be configured.

Django's ``psycopg`` module stays ``DatabaseWrapper.Database``: errors are psycopg's (pgreuse's
errors subclass them), so ``django.db.utils`` maps them as usual.
"""

from __future__ import annotations

from typing import Any

# Django ships no type hints, and `nox -s typecheck` may run without Django installed: every Django
# import carries the same ignore, so its names are Any either way.
from django.conf import settings  # type: ignore[import-untyped, import-not-found, unused-ignore]
from django.core import checks as django_checks  # type: ignore[import-untyped, import-not-found, unused-ignore]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped, import-not-found, unused-ignore]
from django.db.backends.base.validation import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
    BaseDatabaseValidation,
)
from django.db.backends.postgresql.base import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
    DatabaseWrapper as PostgresDatabaseWrapper,
)
from psycopg import IsolationLevel

import pgreuse

from .checks import PGREUSE_OPTIONS, settings_problems, timezone_problem
from .creation import DatabaseCreation


class DatabaseValidation(BaseDatabaseValidation):  # type: ignore[misc]  # Django's classes are untyped (Any)
    """``manage.py check --database <alias>`` lists the settings pgreuse cannot work with."""

    def check(self, **kwargs: Any) -> list[django_checks.CheckMessage]:
        errors: list[django_checks.CheckMessage] = list(super().check(**kwargs))
        wrapper = self.connection
        for n, problem in enumerate(settings_problems(wrapper.alias, wrapper.settings_dict), 1):
            errors.append(django_checks.Error(problem, id=f"pgreuse.E{n:03d}"))
        return errors


class DatabaseWrapper(PostgresDatabaseWrapper):  # type: ignore[misc]  # Django's classes are untyped (Any)
    """Django's PostgreSQL backend on a pgreuse broker: one backend per transaction, not per thread."""

    connection: Any  # the pgreuse.Connection, or None; set by Django's connect() and close()
    display_name = "PostgreSQL (pgreuse)"
    creation_class = DatabaseCreation
    validation_class = DatabaseValidation

    def check_settings(self) -> None:
        """Refuse settings that cannot work on backends shared per transaction.

        Raises:
            ImproperlyConfigured: the message names each bad setting and what to set instead.
        """
        super().check_settings()
        problems = settings_problems(self.alias, self.settings_dict)
        if problems:
            raise ImproperlyConfigured(
                "pgreuse.django cannot work with these settings:\n- " + "\n- ".join(problems)
            )

    def get_connection_params(self) -> dict[str, Any]:
        params: dict[str, Any] = super().get_connection_params()
        # Django copies every OPTIONS key into the libpq parameters: take pgreuse's own out first.
        for key in PGREUSE_OPTIONS:
            params.pop(key, None)
        # Django passes its own cursor class; the pgreuse connection puts its session guard (it
        # notes each statement's final bytes, DESIGN.md §6) in front of it (client.guard.guarded).
        return params

    # Not @async_unsafe like Django's: its only caller, connect(), is.
    def get_new_connection(self, conn_params: dict[str, Any]) -> pgreuse.Connection:
        # As Django's: self.isolation_level is known before autocommit is set.
        options = self.settings_dict["OPTIONS"]
        isolation_level_value = options.get("isolation_level")
        if isolation_level_value is None:
            self.isolation_level = IsolationLevel.READ_COMMITTED
        else:
            try:
                self.isolation_level = IsolationLevel(isolation_level_value)
            except ValueError:
                raise ImproperlyConfigured(
                    f"DATABASES[{self.alias!r}]['OPTIONS']['isolation_level'] is "
                    f"{isolation_level_value!r}: use one of the psycopg.IsolationLevel values"
                ) from None
        extra: dict[str, Any] = {k: options[k] for k in PGREUSE_OPTIONS if k in options}
        connection = pgreuse.connect(**conn_params, **extra)
        if isolation_level_value is not None:
            # Per transaction (BEGIN ISOLATION LEVEL ...), not a session SET: safe on shared backends.
            connection.isolation_level = self.isolation_level
        return connection

    def init_connection_state(self) -> None:
        try:
            super().init_connection_state()
        except ImproperlyConfigured:
            # The connection is open but not set up as Django wants it: do not keep it.
            self.connection.close()
            self.connection = None
            raise

    def ensure_timezone(self) -> bool:
        # Django 4.2 checks (and SETs) the zone here; 5.x moved that into _configure_timezone.
        if self.connection is None:
            return False
        return self._configure_timezone(self.connection)

    def _configure_timezone(self, connection: pgreuse.Connection) -> bool:
        # Django would SET TIME ZONE when the connection's zone is not its own. A SET does not stay
        # on a shared backend, so the pool must already be in Django's zone.
        problem = timezone_problem(
            self.alias,
            use_tz=settings.USE_TZ,
            django_time_zone=settings.TIME_ZONE,
            database_time_zone=self.settings_dict["TIME_ZONE"],
            wanted=self.timezone_name,
            pool_timezone=connection.info.parameter_status("TimeZone"),
            dbname=str(self.settings_dict["NAME"]),
        )
        if problem:
            raise ImproperlyConfigured(problem)
        return False

    def _configure_role(self, connection: pgreuse.Connection) -> bool:
        # check_settings() refuses OPTIONS["assume_role"]: SET ROLE would outlive the lease.
        return False
