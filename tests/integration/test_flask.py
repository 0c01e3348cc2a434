"""pgreuse.flask: a connection per app context, opened lazily and given back at teardown.

Flask's test client against a real broker, then the to-do example (examples/flask) under Gunicorn
with real HTTP requests.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from psycopg.rows import dict_row

import pgreuse
from pgreuse.flask import PgReuse, get_db
from pgreuse.wire.states import SlotState

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def make_app(conninfo: str, ext: PgReuse | None = None, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(PGREUSE_CONNINFO=conninfo, **config)
    (ext or PgReuse()).init_app(app)

    @app.get("/nodb")
    def nodb() -> str:
        return "no database used"

    @app.get("/ids")
    def ids() -> dict[str, Any]:
        first, second = get_db(), get_db()
        first.execute("select 1")
        return {"same": first is second, "id": id(first), "lease_after_statement": first.lease is None}

    @app.post("/write/<name>")
    def write(name: str) -> dict[str, Any]:
        db = get_db()
        with db.transaction():
            db.execute("insert into flask_items (name) values (%s)", [name])
            row = db.execute("select pg_backend_pid() as pid").fetchone()
            backend = row["pid"] if isinstance(row, dict) else row[0]
        return {"backend": backend, "lease_after": db.lease is None and not db.proxied}

    @app.post("/forget-commit/<name>")
    def forget_commit(name: str) -> dict[str, Any]:
        db = get_db()
        db.autocommit = False  # a view may change it; the next context gets the configured value back
        db.execute("insert into flask_items (name) values (%s)", [name])
        return {"leased": db.lease is not None or db.proxied}

    @app.post("/fail/<name>")
    def fail(name: str) -> str:
        db = get_db()
        db.autocommit = False
        db.execute("insert into flask_items (name) values (%s)", [name])
        raise RuntimeError("the view fails mid-transaction")

    @app.get("/dict-rows")
    def dict_rows() -> dict[str, Any]:
        db = get_db()
        db.row_factory = dict_row  # type: ignore[assignment]
        return {"row": db.execute("select 1 as one").fetchone()}

    @app.get("/row")
    def row() -> dict[str, Any]:
        return {"row": list(get_db().execute("select 1 as one").fetchone() or ())}

    return app


@pytest.fixture
def table(pg) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists flask_items; create table flask_items (name text)")
    yield pg.dsn()


def given_back(broker: Any) -> None:
    """The broker sees every backend back (releases reach it asynchronously)."""
    broker.wait_for(lambda snap: snap.count(SlotState.LENT) == 0, what="every backend given back")


def names(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("select name from flask_items order by name")]


@pytest.fixture
def ext() -> PgReuse:
    return PgReuse()


def test_a_connection_is_opened_on_first_use_and_reused_by_the_next_context(broker, ext):
    app = make_app(broker.conninfo, ext)
    client = app.test_client()
    try:
        assert client.get("/nodb").status_code == 200
        assert app.extensions["pgreuse"].idle == []  # nothing was opened for a view without SQL
        first = client.get("/ids").get_json()
        assert first["same"] is True  # one connection per app context
        assert first["lease_after_statement"] is True  # autocommit: the backend went back
        assert len(app.extensions["pgreuse"].idle) == 1  # parked at teardown
        assert client.get("/ids").get_json()["id"] == first["id"]  # the next context reuses it
        given_back(broker)
    finally:
        ext.close_idle(app)


def test_a_transaction_holds_one_backend_and_commits(broker, ext, table):
    app = make_app(broker.conninfo, ext)
    try:
        answer = app.test_client().post("/write/a").get_json()
        assert answer["backend"] is not None and answer["lease_after"] is True
        assert names(table) == ["a"]
    finally:
        ext.close_idle(app)


def test_teardown_rolls_back_what_a_view_did_not_commit_and_returns_the_backend(broker, ext, table):
    app = make_app(broker.conninfo, ext)
    client = app.test_client()
    try:
        assert client.post("/forget-commit/lost").get_json() == {"leased": True}
        given_back(broker)  # at teardown
        (parked,) = app.extensions["pgreuse"].idle
        assert parked.lease is None and parked.autocommit is True  # the configured value is back
        client.post("/write/kept")
        assert names(table) == ["kept"]
    finally:
        ext.close_idle(app)


def test_a_failing_view_rolls_back_and_the_connection_stays_usable(broker, ext, table):
    app = make_app(broker.conninfo, ext)
    app.testing = False  # let Flask answer 500 instead of raising into the test
    client = app.test_client()
    try:
        assert client.post("/fail/boom").status_code == 500
        given_back(broker)
        assert client.post("/write/after").status_code == 200
        assert names(table) == ["after"]
    finally:
        ext.close_idle(app)


def test_settings_a_view_changed_do_not_reach_the_next_context(broker, ext):
    app = make_app(broker.conninfo, ext)
    client = app.test_client()
    try:
        assert client.get("/dict-rows").get_json() == {"row": {"one": 1}}
        assert client.get("/row").get_json() == {"row": [1]}
    finally:
        ext.close_idle(app)


def test_connect_kwargs_and_config_reach_every_connection(broker):
    ext = PgReuse(row_factory=dict_row)
    app = make_app(broker.conninfo, ext, PGREUSE_AUTOCOMMIT=False, PGREUSE_MAX_IDLE=0)
    try:
        with app.app_context():
            db = get_db()
            assert db.autocommit is False
            assert db.execute("select 2 as two").fetchone() == {"two": 2}
            assert db.lease is not None or db.proxied  # a transaction began at the first statement
        assert db.closed  # PGREUSE_MAX_IDLE=0: closed at teardown, after the rollback
        given_back(broker)
    finally:
        ext.close_idle(app)


def test_threads_get_their_own_connections_and_share_two_backends(broker, ext, table):
    app = make_app(broker.conninfo, ext, PGREUSE_MAX_IDLE=8)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            client = app.test_client()
            for j in range(10):
                assert client.post(f"/write/t{i}-{j}").status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(names(table)) == 60
        assert 1 <= len(app.extensions["pgreuse"].idle) <= 6
    finally:
        ext.close_idle(app)


def test_the_gunicorn_conninfo_is_the_default(broker, ext, monkeypatch):
    monkeypatch.setenv("PGREUSE_CONNINFO", broker.conninfo)
    app = Flask(__name__)
    ext.init_app(app)
    try:
        with app.app_context():
            assert isinstance(get_db(), pgreuse.Connection)
            assert ext.connection is get_db()
    finally:
        ext.close_idle(app)


def test_no_broker_configured_says_what_to_set(ext, monkeypatch):
    monkeypatch.delenv("PGREUSE_CONNINFO", raising=False)
    app = Flask(__name__)
    ext.init_app(app)
    with app.app_context(), pytest.raises(RuntimeError, match=r"set app.config\['PGREUSE_CONNINFO'\]"):
        get_db()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"PGREUSE_CONINFO": "host=/x"}, "PGREUSE_CONINFO, which pgreuse.flask does not know"),
        ({"PGREUSE_AUTOCOMMIT": "yes"}, r"app.config\['PGREUSE_AUTOCOMMIT'\] is 'yes': give True or False"),
        ({"PGREUSE_MAX_IDLE": -1}, r"PGREUSE_MAX_IDLE'\] is -1"),
        ({"PGREUSE_LEASE_TIMEOUT": 0}, r"PGREUSE_LEASE_TIMEOUT'\] is 0: give seconds"),
    ],
)
def test_bad_config_is_refused_at_init_app(config, message):
    app = Flask(__name__)
    app.config.update(config)
    with pytest.raises(ValueError, match=message):
        PgReuse(app)


def test_init_app_twice_and_connect_kwargs_that_belong_in_config_are_refused():
    app = Flask(__name__)
    PgReuse(app)
    with pytest.raises(RuntimeError, match="already has a pgreuse extension"):
        PgReuse(app)
    with pytest.raises(TypeError, match="PGREUSE_AUTOCOMMIT"):
        PgReuse(autocommit=True)
    with Flask(__name__).app_context(), pytest.raises(RuntimeError, match="has no pgreuse extension"):
        get_db()


def test_todo_example_through_gunicorn(pg, short_tmp):
    sys.path.insert(0, EXAMPLES)
    try:
        import run_examples  # noqa: PLC0415
    finally:
        sys.path.remove(EXAMPLES)
    dbname = f"ex_flask_{uuid.uuid4().hex[:8]}"
    run_examples.create_database(pg.dsn(), dbname)
    try:
        summary = run_examples.run_flask(pg.dsn(), pg.dsn(dbname=dbname), short_tmp)
    finally:
        run_examples.drop_database(pg.dsn(), dbname)
    assert summary["peak_backends"] <= run_examples.MAX_SIZE
