"""Django's test database, when every connection goes through a broker that serves one database.

Contract: the test database is the broker's own database. ``DATABASES[alias]["TEST"]["NAME"]`` must
equal ``NAME``; the test runner then behaves as with ``--keepdb``: it never runs ``CREATE DATABASE``
or ``DROP DATABASE`` (the broker cannot reach another database, and the one it serves must exist
before the broker starts), it migrates that database and leaves it in place. Any other test name,
or ``--parallel`` (which clones one database per test process), fails with a message that says what
to set. Point the settings of a test run at a broker for a throwaway database: ``TransactionTestCase``
empties every table.
"""

from __future__ import annotations

from typing import Any

# Django ships no type hints, and `nox -s typecheck` may run without Django installed.
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped, import-not-found, unused-ignore]
from django.db.backends.postgresql.creation import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
    DatabaseCreation as PostgresCreation,
)


class DatabaseCreation(PostgresCreation):  # type: ignore[misc]  # Django's classes are untyped (Any)
    """Use the broker's database as the test database; never create, clone or drop one."""

    def _check_test_name(self) -> str:
        settings_dict = self.connection.settings_dict
        name = str(settings_dict["NAME"])
        test_name = settings_dict["TEST"].get("NAME")
        if test_name != name:
            alias = self.connection.alias
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['TEST']['NAME'] is {test_name!r}, but with ENGINE "
                f"'pgreuse.django' the test database must be the broker's own database, "
                f"{name!r}: the broker serves one database and cannot create another. Set "
                f"DATABASES[{alias!r}]['TEST'] = {{'NAME': {name!r}}} and run the tests against a "
                "broker whose --dsn names a throwaway database (tests empty its tables)."
            )
        return name

    def create_test_db(
        self, verbosity: int = 1, autoclobber: bool = False, serialize: bool = True, keepdb: bool = False
    ) -> str:
        self._check_test_name()
        # keepdb: the database exists (the broker is connected to it) and must outlive the run.
        name: str = super().create_test_db(verbosity, autoclobber, serialize, keepdb=True)
        return name

    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> str:
        # No _nodb_cursor(): it would try the "postgres" database, which the broker does not serve.
        return self._check_test_name()

    def destroy_test_db(
        self,
        old_database_name: str | None = None,
        verbosity: int = 1,
        keepdb: bool = False,
        suffix: str | None = None,
    ) -> None:
        super().destroy_test_db(old_database_name, verbosity, keepdb=True, suffix=suffix)

    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        raise ImproperlyConfigured(
            f"manage.py test --parallel clones the test database once per test process "
            f"(suffix {suffix!r}), but a pgreuse broker serves only its own database, "
            f"{self.connection.settings_dict['NAME']!r}. Run the tests with --parallel 1."
        )
