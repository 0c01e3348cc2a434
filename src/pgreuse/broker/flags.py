"""The broker's command line: its flags (``python -m pgreuse.broker --help``), how argparse's values
become :class:`~pgreuse.broker.config.BrokerConfig`'s, and the refusal of a password in ``--dsn``
(the command line is public)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .config import (
    DEFAULT_CLIENT_LOGIN_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_SOCKET_DIR,
    POOL_MODES,
    ConfigError,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pgreuse.broker",
        description=(
            "Own a bounded set of PostgreSQL connections and lend them, one transaction at a time, "
            "to every pgreuse client on this host. Clients connect with "
            "host=<socket-dir> port=<port>."
        ),
    )
    p.add_argument(
        "--dsn",
        default=os.environ.get("PGREUSE_DSN", ""),
        help="libpq conninfo of the PostgreSQL the backends connect to "
        "(default: $PGREUSE_DSN). The password may also come from PGPASSWORD.",
    )
    p.add_argument(
        "--socket-dir",
        default=DEFAULT_SOCKET_DIR,
        help="directory for the broker's sockets and shared-memory table; its mode is set to 0700 "
        "(0711 or 0710 with --allow-uid/--allow-gid), created if missing (default: %(default)s)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="number in the socket names .s.PGSQL.<port> and .s.PGREUSE.<port>: what clients "
        "pass as port= (default: %(default)s)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=10,
        help="most backend connections open at once (default: %(default)s)",
    )
    p.add_argument(
        "--min-size",
        type=int,
        default=1,
        help="backends kept open even when idle (default: %(default)s)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=30.0,
        help="seconds a client may queue for a backend before it gets PoolTimeout (default: %(default)s)",
    )
    p.add_argument(
        "--idle-transaction-timeout",
        type=float,
        default=0.0,
        help="seconds a holder may sit idle inside a transaction before PostgreSQL ends the "
        "session and the broker replaces the backend; 0 leaves PostgreSQL's "
        "idle_in_transaction_session_timeout alone (default: %(default)s)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds to wait for lent backends to come back before closing them "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=0,
        help="exit when the process with this pid exits (set by the Gunicorn hooks)",
    )
    p.add_argument(
        "--pool-mode",
        default="transaction",
        choices=POOL_MODES,
        help="for proxied clients (psql, pgbench, any non-pgreuse client): 'transaction' lends a "
        "backend per transaction, 'session' for the whole client connection and resets it with "
        "--reset-query afterwards (default: %(default)s)",
    )
    p.add_argument(
        "--max-client-conn",
        type=int,
        default=0,
        help="most client connections (parked, proxied, admin, and those still in their startup) "
        "at once; a client over it gets SQLSTATE 53300. 0: no limit (default: %(default)s)",
    )
    p.add_argument(
        "--client-login-timeout",
        type=float,
        default=DEFAULT_CLIENT_LOGIN_TIMEOUT,
        help="seconds a new client connection has to send its startup packet (and to log in, on TCP "
        "with --auth-file) before the broker "
        "closes it (a FATAL error says why); 0: no limit (default: %(default)s)",
    )
    p.add_argument(
        "--listen-addr",
        default="",
        help="also accept PostgreSQL clients on this TCP host:port; loopback only unless "
        "--auth-file is given (off by default)",
    )
    p.add_argument(
        "--auth-file",
        default="",
        help='PgBouncer-style userlist.txt ("user" "password or SCRAM secret" per line): '
        "clients of --listen-addr must log in with SCRAM-SHA-256 as one of its users; "
        "then --listen-addr may bind any address",
    )
    p.add_argument(
        "--allow-uid",
        action="append",
        default=[],
        help="let this user (name or uid; repeat, or a comma list) use the Unix sockets besides "
        "the broker's own user and root; its transactions go through the proxy",
    )
    p.add_argument(
        "--allow-gid",
        action="append",
        default=[],
        help="let the members of this group (name or gid, primary or supplementary; repeat, or "
        "a comma list) use the Unix sockets, as --allow-uid",
    )
    p.add_argument(
        "--reset-query",
        default="DISCARD ALL",
        help="SQL that clears a backend's session state before it is lent again, after session "
        "mode or a lease that changed session state (default: %(default)s)",
    )
    p.add_argument(
        "--max-lease-time",
        type=float,
        default=0.0,
        help="seconds a client may hold one backend (one transaction, or one statement in "
        "autocommit); a longer lease is revoked: the broker closes that backend, PostgreSQL rolls "
        "back, the holder gets a lost-connection error (default: %(default)s, no limit)",
    )
    p.add_argument(
        "--max-lifetime",
        type=float,
        default=0.0,
        help="seconds a backend may stay open; an older one is closed and replaced when it is idle "
        "(never while lent), each at a random point of the last tenth of its lifetime so that they "
        "do not all go at once (default: %(default)s, never)",
    )
    p.add_argument(
        "--max-idle",
        type=float,
        default=0.0,
        help="seconds a backend may go unused; one unused longer is closed, down to --min-size "
        "(default: %(default)s, never)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=0,
        help="requests that may queue for a backend at once; one more gets TooManyRequests at "
        "once instead of waiting (default: %(default)s, no limit)",
    )
    p.add_argument(
        "--reset-every-lease",
        action="store_true",
        help="run --reset-query after every lease, not only after those that changed session "
        "state (for the cautious: costs one round trip in the broker per transaction)",
    )
    p.add_argument(
        "--no-handoff",
        action="store_true",
        help="pgreuse connections claim no backend in the shared table: every transaction goes "
        "through the broker's proxy (slower; for comparison, or to rule the handoff out)",
    )
    p.add_argument(
        "--config-file",
        "--config",
        default="",
        help="a TOML file of these settings (keys: the long flag names, e.g. max-size = 20), "
        "re-read on SIGHUP and on the admin console's RELOAD; a flag given on the command line "
        "wins over the file, and keeps its value across reloads (see docs/configuration.md)",
    )
    p.add_argument(
        "--supervise",
        action="store_true",
        help="run the broker in a child process and restart it if it dies",
    )
    return p


def from_parser(values: dict[str, Any]) -> dict[str, Any]:
    """BrokerConfig's values from argparse's: the log level in capitals, a repeated flag as one
    comma list."""
    if "log_level" in values:
        values["log_level"] = values["log_level"].upper()
    for name in ("allow_uid", "allow_gid"):
        if isinstance(values.get(name), list):
            values[name] = ",".join(values[name])
    return values


def check_command_line_dsn(dsn: str) -> None:
    """Refuse a password on the command line: ``ps`` shows it to every user of the machine."""
    if dsn != os.environ.get("PGREUSE_DSN", "") and _has_password(dsn):
        raise ConfigError(
            "--dsn holds a password, which every user of this machine could read with ps: pass "
            "the DSN in PGREUSE_DSN instead, or leave the password out of it and set PGPASSWORD"
        )


def _has_password(dsn: str) -> bool:
    try:
        return bool(conninfo_to_dict(dsn).get("password"))
    except psycopg.ProgrammingError:
        return False  # (not a conninfo: parse_target says why, with the value)
