"""What a pgreuse connection checks in psycopg's API, and adds to it.

* :func:`broker_socket_dir_and_port` and :func:`check_prepare_threshold`: the arguments of
  ``connect()`` (the broker's socket directory and port; no server-side prepared statements, whose
  names psycopg keeps per connection and which would collide on shared backends).
* :class:`StatementGuard`: the cursor mixin that hands every statement's final bytes to the
  connection before it is sent, which notes what it leaves in the session (``session.py``);
  :func:`guarded` puts it in front of any cursor class an application or framework installs.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg

from .. import errors
from .session import Verdict, remembered_verdict

_CLEAN = Verdict.CLEAN


def broker_socket_dir_and_port(params: dict[str, Any]) -> tuple[str, int]:
    host = str(params.get("host") or os.environ.get("PGHOST", ""))
    port = str(params.get("port") or os.environ.get("PGPORT", "") or "5432")
    if not host.startswith("/") or "," in host:
        raise psycopg.ProgrammingError(
            f"pgreuse.connect() needs host=<the broker's socket directory> (an absolute path), got "
            f"host={host!r}; e.g. pgreuse.connect('host=/run/pgreuse port=6432 dbname=app')"
        )
    try:
        return host, int(port)
    except ValueError:
        raise psycopg.ProgrammingError(f"port={port!r} is not a number") from None


def check_prepare_threshold(value: int | None) -> None:
    if value is not None:
        raise errors.NotSupported(
            f"prepare_threshold={value!r}: server-side prepared statements cannot follow a "
            "connection across shared backends; leave prepare_threshold=None"
        )


WITH_HOLD_REFUSED = (
    "WITH HOLD cursors outlive their transaction, and the backend goes to another client at "
    "commit; fetch the rows inside the transaction instead (withhold=False)"
)


class StatementGuard:
    """Cursor mixin: note what each statement leaves in the session (see ``session.py``)."""

    _conn: Any

    def _convert_query(self, *args: Any, **kwargs: Any) -> Any:
        # Every way of sending a statement (execute, executemany, stream, copy, a server cursor's
        # DECLARE) goes through here, and the result holds the final query bytes, whatever form
        # the query was written in.
        pgq = super()._convert_query(*args, **kwargs)  # type: ignore[misc]
        query = pgq.query
        if remembered_verdict(query) is not _CLEAN:  # (most statements: seen before, and clean)
            note = getattr(self._conn, "_note_statement", None)  # a pgreuse connection's (LeaseCore)
            if note is not None:
                note(query)
        return pgq


class ServerCursorGuard(StatementGuard):
    """A server-side cursor's guard: WITH HOLD is refused when the cursor is made (not in
    ``Connection.cursor()``, which then costs nothing extra for the usual client-side cursors)."""

    def __init__(self, *args: Any, withhold: bool = False, **kwargs: Any) -> None:
        if withhold:
            self._closed = True  # (psycopg's __del__ looks: nothing was opened)
            raise errors.NotSupported(WITH_HOLD_REFUSED)
        super().__init__(*args, withhold=withhold, **kwargs)  # type: ignore[call-arg]


_guarded_classes: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def guarded(cursor_class: type[Any], guard: type[StatementGuard] = StatementGuard) -> type[Any]:
    """``cursor_class`` with ``guard`` (:class:`StatementGuard` or :class:`ServerCursorGuard`)
    first in its MRO (one class per input)."""
    if issubclass(cursor_class, guard):
        return cursor_class
    made = _guarded_classes.get((cursor_class, guard))
    if made is None:
        made = type(f"Guarded{cursor_class.__name__}", (guard, cursor_class), {})
        made = _guarded_classes.setdefault((cursor_class, guard), made)
    return made
