"""A to-do list on Flask, with its PostgreSQL connections shared through pgreuse.

* ``GET /todos``: every to-do (one autocommit SELECT: a backend for that statement only).
* ``POST /todos`` ``{"title": ...}``: add one; ``201`` with its id.
* ``POST /todos/<id>/done``: mark it done, in a transaction that locks the row; ``404`` if unknown.
* ``GET /stats``: how many are open and done, and which worker and backend answered.
* ``flask --app app init-db``: create the table (run once, through the same broker).

Each request gets its own pgreuse connection from ``get_db()``, opened lazily and given back when the
request ends; a backend is held only while a statement or a ``with db.transaction():`` block runs.
"""

import os
from typing import Any

from flask import Flask, abort, request
from psycopg.rows import dict_row

from pgreuse.flask import PgReuse, get_db

SCHEMA = """
create table if not exists todos (
    id serial primary key,
    title text not null,
    done boolean not null default false,
    created timestamptz not null default now()
)
"""

# PGREUSE_CONNINFO (the broker's address) comes from the environment: pgreuse.gunicorn exports it.
pgreuse_ext = PgReuse(row_factory=dict_row)


def create_app() -> Flask:
    app = Flask(__name__)
    pgreuse_ext.init_app(app)

    @app.cli.command("init-db")
    def init_db() -> None:
        """Create the todos table."""
        get_db().execute(SCHEMA)
        print("table todos is ready")

    @app.get("/todos")
    def list_todos() -> dict[str, Any]:
        rows = get_db().execute("select id, title, done from todos order by id").fetchall()
        return {"todos": rows, "worker": os.getpid()}

    @app.post("/todos")
    def add_todo() -> tuple[dict[str, Any], int]:
        title = (request.get_json(silent=True) or {}).get("title")
        if not isinstance(title, str) or not title:
            abort(400, description='send {"title": "..."}')
        row = get_db().execute("insert into todos (title) values (%s) returning id", [title]).fetchone()
        assert row is not None
        return {"id": row["id"], "worker": os.getpid()}, 201

    @app.post("/todos/<int:todo_id>/done")
    def finish_todo(todo_id: int) -> dict[str, Any]:
        db = get_db()
        with db.transaction():  # one backend from BEGIN to COMMIT
            row = db.execute("select done from todos where id = %s for update", [todo_id]).fetchone()
            if row is None:
                abort(404, description=f"no to-do {todo_id}")
            db.execute("update todos set done = true where id = %s", [todo_id])
            backend = db.execute("select pg_backend_pid() as pid").fetchone()
        assert backend is not None
        return {"id": todo_id, "was_done": row["done"], "backend": backend["pid"]}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        db = get_db()
        with db.transaction():
            row = db.execute(
                "select count(*) filter (where not done) as open, count(*) filter (where done) as done, "
                "pg_backend_pid() as backend from todos"
            ).fetchone()
        assert row is not None
        return {**row, "worker": os.getpid()}

    return app


app = create_app()
