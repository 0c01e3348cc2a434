"""Broker settings: one frozen object, built from the command line (or by the Gunicorn hooks).

Validation lives here so that every bad value is refused before anything is opened, with a message
that names the flag, the value and what to do.
"""

from __future__ import annotations

import os

import attrs

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
