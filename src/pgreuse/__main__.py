"""``python -m pgreuse stats``: the pool as the broker's shared-memory table shows it.

The table is read directly (``mmap``, read-only): no message is sent to the broker, so the view works
when the broker is busy, wedged, or already gone (it then shows the last state the broker wrote, and
says the process is not running). ``--json`` prints one JSON object (one per refresh, one per line,
with ``--watch``); ``--watch [SECONDS]`` redraws the view in place until Ctrl-C.

Exit status: 0 when the table was read, 1 when there is no table at the path (or it is not a table of
this pgreuse version), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from .broker.config import DEFAULT_PORT, DEFAULT_SOCKET_DIR
from .shm import Table, TableError, table_path
from .stats import Clock, render, summarize

# Home the cursor and clear to the end of the screen: redraws in place without scrolling.
_REDRAW = "\x1b[H\x1b[J"


class NoTable(Exception):
    """No readable table at the path; the message says how to get one."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgreuse", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "stats",
        help="show the pool: slots, holders, wait times, counters",
        description="Read the broker's shared-memory table and print the pool's state.",
    )
    s.add_argument(
        "--socket-dir",
        default=os.environ.get("PGREUSE_SOCKET_DIR", DEFAULT_SOCKET_DIR),
        help="the broker's --socket-dir (default: $PGREUSE_SOCKET_DIR or %(default)s)",
    )
    s.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="the broker's --port (default: %(default)s)"
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) until Ctrl-C",
    )
    return p


def open_table(socket_dir: str, port: int) -> Table:
    """Map the table of the broker at ``socket_dir``/``port``; raise :class:`NoTable` with advice."""
    path = table_path(socket_dir, port)
    try:
        return Table.open(path)
    except FileNotFoundError:
        raise NoTable(
            f"no pgreuse table at {path}: no broker runs with --socket-dir {socket_dir} --port {port} "
            f"(check both values; they must match the broker's). Start one with "
            f"'python -m pgreuse.broker --socket-dir {socket_dir} --port {port} --dsn ...'"
        ) from None
    except PermissionError:
        raise NoTable(
            f"cannot read {path}: permission denied; run as the broker's user (the socket directory "
            f"is private to it)"
        ) from None
    except (TableError, OSError) as exc:
        raise NoTable(str(exc)) from None


def _alive(pid: int) -> bool | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _same_file(table: Table) -> bool:
    """False once the broker replaced the table (a restarted broker writes a new file)."""
    try:
        return os.stat(table.path).st_ino == table.inode
    except OSError:
        return False


def show(table: Table, *, as_json: bool, out: TextIO) -> None:
    snap = table.snapshot()
    summary = summarize(snap, Clock.now(), path=table.path, broker_alive=_alive(snap.broker_pid))
    if as_json:
        out.write(json.dumps(summary) + "\n")
    else:
        out.write(render(summary))


def stats(
    socket_dir: str,
    port: int,
    *,
    as_json: bool,
    watch: float | None,
    out: TextIO,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the table once, or every ``watch`` seconds until Ctrl-C; raise :class:`NoTable`."""
    table = open_table(socket_dir, port)
    if watch is None:
        try:
            show(table, as_json=as_json, out=out)
        finally:
            table.close()
        return 0
    redraw = out.isatty() and not as_json
    try:
        while True:
            if not _same_file(table):
                # The broker restarted (new table) or stopped (file removed): follow it, and keep
                # watching for a new one rather than exit in the middle of an incident.
                try:
                    new = open_table(socket_dir, port)
                except NoTable as exc:
                    out.write((_REDRAW if redraw else "") + f"{exc}\n")
                    out.flush()
                    sleep(watch)
                    continue
                table.close()
                table = new
            if redraw:
                out.write(_REDRAW)
            show(table, as_json=as_json, out=out)
            out.flush()
            sleep(watch)
    except KeyboardInterrupt:
        return 0
    finally:
        table.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        print(f"pgreuse stats: --watch {args.watch:g} must be a positive number of seconds", file=sys.stderr)
        return 2
    try:
        return stats(args.socket_dir, args.port, as_json=args.json, watch=args.watch, out=sys.stdout)
    except NoTable as exc:
        print(f"pgreuse stats: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `... | head`: the reader left; nothing more to say.
        return 0


if __name__ == "__main__":
    sys.exit(main())
