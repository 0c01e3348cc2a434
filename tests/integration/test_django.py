"""Django on pgreuse (``ENGINE: "pgreuse.django"``).

Django's own test runner runs tests/integration/django_project/notes/tests.py against a broker (leases
per statement and per atomic(), savepoints, select_for_update, bulk_create, iterator, the admin);
settings that cannot work in transaction mode are refused with what to set; and the shop example
(examples/django) serves real HTTP requests under Gunicorn.

Each test gets a database of its own, because a broker serves one database and Django's test runner
uses it as the test database (see docs/django.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from pgreuse.django.checks import same_zone, settings_problems, timezone_problem

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.join(HERE, "django_project")
EXAMPLES = os.path.join(HERE, "..", "..", "examples")


@pytest.fixture
def database(pg) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh database; its DSN (the broker's --dsn)."""
    name = f"dj_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    yield pg.dsn(dbname=name)
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture
def django_broker(make_broker, database):  # type: ignore[no-untyped-def]
    return make_broker("--max-size", "2", dsn=database)


def manage(broker, *args: str, variant: str = "") -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = dict(
        os.environ,
        TEST_BROKER_DIR=broker.socket_dir,
        TEST_BROKER_PORT=str(broker.port),
        TEST_DBNAME=broker.dbname,
        TEST_SETTINGS_VARIANT=variant,
    )
    # -W error: a warning (e.g. Django falling back from the "postgres" database) fails the run.
    return subprocess.run(
        [sys.executable, "-W", "error", "manage.py", *args],
        check=False, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def test_djangos_test_runner_passes_on_pgreuse(django_broker):
    result = manage(django_broker, "test", "notes", "--noinput", "-v", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output + django_broker.log()
    assert "Ran 11 tests" in output and "\nOK" in output, output
    # migrate ran through the broker, on the broker's own database, which is kept.
    assert "Using existing test database for alias 'default'" in output, output
    assert "Applying notes.0001_initial... OK" in output, output
    assert "Preserving test database" in output, output
    with psycopg.connect(django_broker.dsn) as conn:
        assert conn.execute("select to_regclass('notes_note') is not null").fetchone() == (True,)


@pytest.mark.parametrize(
    ("variant", "command", "expected"),
    [
        (
            "server_side_cursors",
            ["check", "--database", "default"],
            "Set DATABASES['default']['DISABLE_SERVER_SIDE_CURSORS'] = True",
        ),
        ("pool", ["migrate"], "Remove DATABASES['default']['OPTIONS']['pool']"),
        ("test_name", ["test", "notes", "--noinput"], "DATABASES['default']['TEST'] = {'NAME': 'dj_"),
        ("timezone", ["migrate"], "Set TIME_ZONE = 'Etc/UTC' in settings"),
    ],
)
def test_settings_that_cannot_work_fail_with_what_to_set(django_broker, variant, command, expected):
    result = manage(django_broker, *command, variant=variant)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert expected in output, output


def test_settings_problems_name_the_setting_its_value_and_the_fix():
    good = {"DISABLE_SERVER_SIDE_CURSORS": True, "OPTIONS": {"lease_timeout": 5}}
    assert settings_problems("default", good) == []
    bad = {
        "DISABLE_SERVER_SIDE_CURSORS": False,
        "AUTOCOMMIT": False,
        "OPTIONS": {"pool": {"min_size": 2}, "assume_role": "app_owner", "prepare_threshold": 5,
                    "lease_timeout": -1},
    }  # fmt: skip
    problems = settings_problems("replica", bad)
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    assert "DATABASES['replica']['DISABLE_SERVER_SIDE_CURSORS'] is False" in text
    assert "DATABASES['replica']['AUTOCOMMIT'] is False" in text
    assert "['OPTIONS']['pool'] is {'min_size': 2}" in text and "--max-size" in text
    assert "['assume_role'] is 'app_owner'" in text and "user=app_owner in the broker's --dsn" in text
    assert "['prepare_threshold'] is 5" in text
    assert "['lease_timeout'] is -1" in text


def test_timezone_must_be_the_pools():
    assert same_zone("Etc/UTC", "UTC") and same_zone("UTC", "UTC") and same_zone("GMT", "Etc/UCT")
    assert not same_zone("Europe/Paris", "UTC") and not same_zone(None, "UTC")
    common = {"django_time_zone": "UTC", "database_time_zone": None, "dbname": "app"}
    assert timezone_problem("default", use_tz=True, wanted="UTC", pool_timezone="Etc/UTC", **common) is None
    message = timezone_problem("default", use_tz=True, wanted="UTC", pool_timezone="Europe/Paris", **common)
    assert message is not None
    assert "USE_TZ = True without DATABASES['default']['TIME_ZONE']" in message
    assert "DATABASES['default']['TIME_ZONE'] = 'Europe/Paris'" in message
    assert "options='-c TimeZone=UTC'" in message and "ALTER DATABASE app SET timezone TO 'UTC'" in message
    # USE_TZ = False and no TIME_ZONE: Django sets nothing, so any pool zone works.
    assert (
        timezone_problem("default", use_tz=False, wanted=None, pool_timezone="Asia/Tokyo", **common) is None
    )


def test_shop_example_through_gunicorn(pg, short_tmp):
    sys.path.insert(0, EXAMPLES)
    try:
        import run_examples  # noqa: PLC0415
    finally:
        sys.path.remove(EXAMPLES)
    dbname = f"ex_django_{uuid.uuid4().hex[:8]}"
    run_examples.create_database(pg.dsn(), dbname)
    try:
        summary = run_examples.run_django(pg.dsn(), pg.dsn(dbname=dbname), short_tmp)
    finally:
        run_examples.drop_database(pg.dsn(), dbname)
    assert summary["peak_backends"] <= run_examples.MAX_SIZE


def test_a_pool_already_in_djangos_time_zone_is_accepted(make_broker, database):
    # The fix the timezone message offers: the broker's --dsn puts its backends in Django's zone.
    chicago = psycopg.conninfo.make_conninfo(database, options="-c TimeZone=America/Chicago")
    broker = make_broker("--max-size", "2", dsn=chicago)
    result = manage(broker, "migrate", "-v", "0", variant="timezone")
    assert result.returncode == 0, result.stdout + result.stderr
