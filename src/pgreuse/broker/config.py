"""Broker settings: one frozen object, built from the command line (or by the Gunicorn hooks).

Validation lives here so that every bad value is refused before anything is opened, with a message
that names the flag, the value and what to do.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
from psycopg.conninfo import conninfo_to_dict

from .access import parse_gids, parse_uids
from .authfile import read_userlist

DEFAULT_PORT = 6432
DEFAULT_SOCKET_DIR = "/run/pgreuse"
# sun_path is 108 bytes including the NUL; the longest name we put in the directory is
# ".s.PGREUSE.<port>" (17 bytes for a 5-digit port) plus the slash.
MAX_SOCKET_DIR = 107 - len("/.s.PGREUSE.65535")


POOL_MODES = ("transaction", "session")
# Without --auth-file the TCP listener does not authenticate clients (the Unix socket checks
# SO_PEERCRED), so it may only bind loopback addresses: anything else would lend backends to the network.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


# Upper bounds: the pool keeps these as 64-bit integers (nanoseconds, counts), and a deadline is a
# sum of the clock and the timeout.
MAX_WAIT_TIMEOUT = 365 * 86400.0
MAX_WAITING = 2**31 - 1
# A real client sends its StartupMessage the moment it connects (libpq does, after at most an
# SSLRequest the broker answers at once): seconds of silence mean a stuck or hostile peer, which holds
# a descriptor and a --max-client-conn place meanwhile. PgBouncer's client_login_timeout is 60 s, but
# it waits for a password typed at a prompt; libpq asks for one before it connects, so here only the
# round trips of a SCRAM login (--auth-file) count.
DEFAULT_CLIENT_LOGIN_TIMEOUT = 15.0


class ConfigError(ValueError):
    """A broker setting is out of range; the message names it and says what to do."""


def parse_listen_addr(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) of the TCP listener; raise :class:`ConfigError`."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"--listen-addr {text!r} is not host:port; e.g. --listen-addr 127.0.0.1:6432")
    return host, int(port_text)


@attrs.frozen
class BrokerConfig:
    dsn: str
    socket_dir: str = DEFAULT_SOCKET_DIR
    port: int = DEFAULT_PORT
    max_size: int = 10
    min_size: int = 1
    wait_timeout: float = 30.0
    idle_transaction_timeout: float = 0.0  # 0: PostgreSQL's own setting applies
    shutdown_timeout: float = 10.0
    log_level: str = "INFO"
    parent_pid: int = 0  # exit when this process exits (the Gunicorn master)
    # Proxy mode (DESIGN.md §5): how long a proxied client keeps its backend.
    pool_mode: str = "transaction"
    max_client_conn: int = 0  # 0: no limit besides the open-files limit
    client_login_timeout: float = DEFAULT_CLIENT_LOGIN_TIMEOUT  # to send a startup packet; 0: none
    listen_addr: str = ""  # "host:port" for a TCP listener; "" (default): Unix socket only
    reset_query: str = "DISCARD ALL"
    reset_every_lease: bool = False  # run reset_query after every lease, not only dirty ones
    no_handoff: bool = False  # workers claim nothing: every transaction goes through the proxy
    max_waiting: int = 0  # requests allowed to queue for a backend at once; 0: no limit
    max_lease_time: float = 0.0  # a lease held longer is revoked; 0: no limit
    max_lifetime: float = 0.0  # a backend open longer is replaced while idle (with jitter); 0: never
    max_idle: float = 0.0  # a backend unused longer is closed, down to min_size; 0: never
    # Access control (broker/access.py, broker/authfile.py): comma lists of names or numbers.
    allow_uid: str = ""  # other users let in on the Unix sockets
    allow_gid: str = ""  # other groups (primary or supplementary) let in on the Unix sockets
    auth_file: str = ""  # PgBouncer userlist.txt: TCP clients must log in with a password in it
    # A TOML file of these settings, re-read on SIGHUP and admin RELOAD (settings_file.py, reload.py)
    config_file: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.dsn:
            raise ConfigError(
                "no PostgreSQL DSN: pass --dsn 'host=... dbname=... user=...' or set PGREUSE_DSN"
            )
        if not os.path.isabs(self.socket_dir):
            raise ConfigError(
                f"--socket-dir {self.socket_dir!r} must be an absolute path (libpq treats a host "
                "that starts with '/' as a socket directory)"
            )
        if len(self.socket_dir) > MAX_SOCKET_DIR:
            raise ConfigError(
                f"--socket-dir {self.socket_dir!r} is {len(self.socket_dir)} bytes; Unix socket "
                f"paths must fit in 107 bytes, so use a directory of at most {MAX_SOCKET_DIR} bytes"
            )
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is not a port number (1-65535)")
        if not 1 <= self.max_size <= 65535:
            raise ConfigError(f"--max-size {self.max_size} must be between 1 and 65535")
        if not 0 <= self.min_size <= self.max_size:
            raise ConfigError(
                f"--min-size {self.min_size} must be between 0 and --max-size ({self.max_size})"
            )
        if not 0 < self.wait_timeout <= MAX_WAIT_TIMEOUT:
            raise ConfigError(
                f"--wait-timeout {self.wait_timeout} must be > 0 seconds and at most "
                f"{MAX_WAIT_TIMEOUT:.0f} (a year)"
            )
        if self.idle_transaction_timeout < 0:
            raise ConfigError(
                f"--idle-transaction-timeout {self.idle_transaction_timeout} must be >= 0 seconds "
                "(0 disables it)"
            )
        if self.shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout {self.shutdown_timeout} must be >= 0 seconds")
        if self.pool_mode not in POOL_MODES:
            raise ConfigError(
                f"--pool-mode {self.pool_mode!r}: use 'transaction' (a backend per transaction) or "
                "'session' (a backend for the whole client connection)"
            )
        if self.max_lease_time < 0:
            raise ConfigError(f"--max-lease-time {self.max_lease_time} must be >= 0 seconds (0: no limit)")
        for flag, value in (("--max-lifetime", self.max_lifetime), ("--max-idle", self.max_idle)):
            if not 0 <= value <= MAX_WAIT_TIMEOUT:
                raise ConfigError(
                    f"{flag} {value} must be between 0 (never) and {MAX_WAIT_TIMEOUT:.0f} seconds"
                )
        if not 0 <= self.max_waiting <= MAX_WAITING:
            raise ConfigError(
                f"--max-waiting {self.max_waiting} must be between 0 (no limit) and {MAX_WAITING}"
            )
        if self.max_client_conn < 0:
            raise ConfigError(f"--max-client-conn {self.max_client_conn} must be >= 0 (0: no limit)")
        if not 0 <= self.client_login_timeout <= MAX_WAIT_TIMEOUT:
            raise ConfigError(
                f"--client-login-timeout {self.client_login_timeout} must be between 0 (no limit) "
                f"and {MAX_WAIT_TIMEOUT:.0f} seconds"
            )
        for flag, text, parse in (("--allow-uid", self.allow_uid, parse_uids),
                                  ("--allow-gid", self.allow_gid, parse_gids)):  # fmt: skip
            try:
                parse(text)
            except ValueError as exc:
                raise ConfigError(f"{flag} {text!r}: {exc}") from None
        if self.auth_file:
            try:
                read_userlist(self.auth_file)
            except ValueError as exc:
                raise ConfigError(f"--auth-file: {exc}") from None
        if self.listen_addr:
            host, _port = parse_listen_addr(self.listen_addr)
            if host not in LOOPBACK_HOSTS and not self.auth_file:
                raise ConfigError(
                    f"--listen-addr {self.listen_addr!r}: without --auth-file the TCP listener does "
                    f"not authenticate clients, so it binds loopback addresses only "
                    f"({', '.join(LOOPBACK_HOSTS)}); give an --auth-file of users and passwords, or "
                    "use the Unix socket for access control by uid"
                )
        if not self.reset_query.strip():
            raise ConfigError(
                "--reset-query is empty: give the SQL that clears session state (default DISCARD ALL)"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level {self.log_level!r}: use one of DEBUG, INFO, WARNING, ERROR")

    @property
    def pg_socket(self) -> str:
        return os.path.join(self.socket_dir, f".s.PGSQL.{self.port}")

    @property
    def control_socket(self) -> str:
        return os.path.join(self.socket_dir, f".s.PGREUSE.{self.port}")

    def to_argv(self) -> list[str]:
        """The command-line flags that rebuild this config (used to spawn a broker process).

        Every field but ``dsn`` (it may hold a password: it travels in ``PGREUSE_DSN``) becomes its
        flag, so a new setting cannot be forgotten here.
        """
        argv: list[str] = []
        for field in attrs.fields(BrokerConfig):
            if field.name == "dsn":
                continue
            flag = "--" + field.name.replace("_", "-")
            value = getattr(self, field.name)
            if isinstance(value, bool):
                argv += [flag] if value else []
            else:
                argv += [flag, str(value)]
        return argv


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


def parse_argv(argv: Sequence[str] | None = None) -> tuple[BrokerConfig, bool]:
    """Parse the command line (and the ``--config-file`` it names); return the config and whether
    to supervise."""
    from .settings_file import SettingsSource  # noqa: PLC0415 - it builds on this module

    source = SettingsSource.from_argv(argv)
    return source.load(), source.supervise


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
