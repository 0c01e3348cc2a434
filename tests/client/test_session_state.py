"""Session state never leaks from one holder of a backend to the next (DESIGN.md §6)."""

from __future__ import annotations

import datetime

import psycopg
import pytest

import pgreuse
from pgreuse.client.session import Verdict, classify_sql


@pytest.fixture(params=["claimed", "proxied"])
def one_backend(make_broker, request, lease_path):  # type: ignore[no-untyped-def]
    """Every connection shares the same single backend: a leak would show at once. Each test runs
    with transactions that claim it, and with transactions that go through the broker's proxy
    (the pgreuse client tells the broker what leaves session state before it sends it), and with
    the C hot path of the lease and without it (``lease_path``)."""
    return make_broker("--max-size", "1", *(["--no-handoff"] if request.param == "proxied" else []))


def _same_backend(a: pgreuse.Connection, b: pgreuse.Connection) -> None:
    (pa,) = a.execute("select pg_backend_pid()").fetchone()
    a.commit()
    (pb,) = b.execute("select pg_backend_pid()").fetchone()
    b.commit()
    assert pa == pb


def test_set_search_path_does_not_reach_the_next_holder(one_backend):
    with one_backend.connect(autocommit=True) as a, one_backend.connect(autocommit=True) as b:
        default = b.execute("show search_path").fetchone()
        a.execute("create schema if not exists leak_s")
        before = one_backend.snapshot().counters["resets"]
        a.execute("set search_path to leak_s, public")
        assert b.execute("show search_path").fetchone() == default
        assert one_backend.snapshot().counters["resets"] == before + 1  # one DISCARD ALL
        _same_backend(a, b)


def test_set_time_zone_is_undone_for_everyone(one_backend):
    with one_backend.connect(autocommit=True) as a, one_backend.connect(autocommit=True) as b:
        pool_tz = b.info.timezone.key
        a.execute("set time zone 'America/New_York'")
        # libpq's cache of the holder that changed it is back to the pool's value too, so psycopg
        # keeps parsing timestamptz values with the zone the backend really uses.
        assert a.info.timezone.key == pool_tz
        assert b.execute("show timezone").fetchone() == (pool_tz,)
        assert a.execute("show timezone").fetchone() == (pool_tz,)


def test_temp_table_does_not_reach_the_next_holder(one_backend):
    with one_backend.connect() as a, one_backend.connect(autocommit=True) as b:
        with a.transaction():  # a temp table lives as long as the transaction that made it
            a.execute("create temp table leaky (x int)")
            a.execute("insert into leaky values (1)")
            assert a.execute("select count(*) from leaky").fetchone() == (1,)
        (n,) = b.execute(
            "select count(*) from pg_class where relname = 'leaky' and relpersistence = 't'"
        ).fetchone()
        assert n == 0
        _same_backend(a, b)


def test_session_advisory_lock_is_released_for_the_next_holder(one_backend):
    with one_backend.connect(autocommit=True) as a, one_backend.connect(autocommit=True) as b:
        a.execute("select pg_advisory_lock(4242)")
        (n,) = b.execute("select count(*) from pg_locks where locktype = 'advisory'").fetchone()
        assert n == 0


def test_transaction_scoped_settings_cost_no_reset(one_backend):
    with one_backend.connect() as a:
        before = one_backend.snapshot().counters["resets"]
        with a.transaction():
            a.execute("set local statement_timeout = '5s'")
            a.execute("update pg_catalog.pg_class set relname = relname where false")
        assert one_backend.snapshot().counters["resets"] == before


def test_listen_notifies_and_with_hold_fail_clearly(one_backend):
    with one_backend.connect(autocommit=True) as conn:
        with pytest.raises(pgreuse.NotSupported, match="LISTEN cannot work"):
            conn.execute("listen events")
        with pytest.raises(pgreuse.NotSupported, match="LISTEN cannot work"):
            next(conn.notifies(timeout=0.1))
        with pytest.raises(pgreuse.NotSupported, match="WITH HOLD"):
            conn.cursor("held", withhold=True)
        assert conn.execute("select 1").fetchone() == (1,)  # still usable
        assert isinstance(pgreuse.NotSupported("x"), psycopg.NotSupportedError)


@pytest.mark.parametrize(
    ("sql", "verdict"),
    [
        (b"select 1", Verdict.CLEAN),
        (b"UPDATE t SET x = 1", Verdict.CLEAN),
        (b"set local search_path = x", Verdict.CLEAN),
        (b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Verdict.CLEAN),
        (b"select pg_advisory_xact_lock(1)", Verdict.CLEAN),
        (b"SET search_path = x", Verdict.DIRTY),
        (b"select 1; set role app", Verdict.DIRTY),
        (b"  create TEMPORARY table t (x int)", Verdict.DIRTY),
        (b"create global temp table t (x int)", Verdict.DIRTY),
        (b"select pg_advisory_lock(1)", Verdict.DIRTY),
        (b"select set_config('a.b', '1', false)", Verdict.DIRTY),
        (b"PREPARE p AS select 1", Verdict.DIRTY),
        (b"declare c cursor with hold for select 1", Verdict.DIRTY),
        (b"LISTEN x", Verdict.REFUSE),
    ],
)
def test_classify_sql(sql, verdict):
    assert classify_sql(sql) is verdict


def test_reset_every_lease_resets_even_clean_transactions(make_broker):
    broker = make_broker("--max-size", "1", "--reset-every-lease")
    with broker.connect(autocommit=True) as conn:
        for _ in range(3):
            conn.execute("select 1")
        broker.wait_for(lambda s: s.counters["resets"] == 3, what="one reset per lease")


def test_an_application_cursor_class_keeps_the_guard(one_backend):
    # psycopg's connect(cursor_factory=...) replaces the cursor class; the guard must stay in front.
    with one_backend.connect(autocommit=True, cursor_factory=psycopg.ClientCursor) as a:
        assert issubclass(a.cursor_factory, psycopg.ClientCursor)
        a.execute("set search_path to pg_catalog")
        with one_backend.connect(autocommit=True) as b:
            assert b.execute("show search_path").fetchone() != ("pg_catalog",)


def test_reported_parameters_are_put_back_in_libpqs_cache(one_backend):
    """A SET of a parameter PostgreSQL reports changes libpq's cache, which psycopg reads to parse
    values (DateStyle, TimeZone...): it is put back too, also when the backend that ran the SET was
    reset before the statement that puts it back (through the proxy, another transaction's turn)."""
    with one_backend.connect(autocommit=True) as a, one_backend.connect(autocommit=True) as b:
        app_name = b.info.parameter_status("application_name")
        a.execute("set application_name = 'leaky'")
        assert a.info.parameter_status("application_name") == app_name
        a.execute("set datestyle = 'SQL, DMY'")
        assert a.info.parameter_status("DateStyle") == b.info.parameter_status("DateStyle")
        assert a.execute("select '2024-01-31'::date").fetchone() == (datetime.date(2024, 1, 31),)
        assert b.execute("show application_name").fetchone() == (app_name,)
