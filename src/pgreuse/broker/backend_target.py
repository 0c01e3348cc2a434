"""Where and how the broker opens backends: a libpq-style conninfo parsed into a BackendTarget.

Contract: :func:`parse_target` turns a libpq-style conninfo (plus libpq's environment fallbacks)
into a :class:`BackendTarget`, refusing what the broker cannot do (several hosts, GSSAPI
encryption). Performs no I/O beyond reading the TLS certificate files the settings name (so a
missing one fails at parse time, naming the file).
"""

from __future__ import annotations

import getpass
import os
import ssl
from collections.abc import Mapping

import attrs
import psycopg
from psycopg.conninfo import conninfo_to_dict

from .tls import REQUIRED_MODES, SSLMODES, make_context

# libpq's compiled-in default on Debian/Ubuntu packages; other builds use /tmp.
DEFAULT_SOCKET_DIR = "/var/run/postgresql"
DEFAULT_PORT = 5432
# libpq waits forever without connect_timeout; a broker must not hang a pool slot, so it caps it.
DEFAULT_CONNECT_TIMEOUT = 10.0


class EncryptionNotSupported(ValueError):
    """The conninfo asks for GSSAPI encryption, which the broker does not implement."""


@attrs.frozen
class BackendTarget:
    """Where and how to open backend connections (from :func:`parse_target`)."""

    host: str  # Unix socket directory, host name or address
    port: int
    is_unix: bool
    user: str
    database: str
    password: str | None = attrs.field(repr=False)
    options: str | None
    application_name: str | None
    connect_timeout: float
    sslmode: str
    client_encoding: str | None = None
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    sslpassword: str | None = attrs.field(default=None, repr=False)
    # The name TLS checks the certificate against (and sends as SNI): ``host`` even when
    # ``hostaddr`` says where to connect, as in libpq.
    server_name: str | None = None

    @property
    def tls_possible(self) -> bool:
        """Backends may be encrypted (TCP, sslmode other than disable): handoff may be impossible."""
        return not self.is_unix and self.sslmode != "disable"

    @property
    def tls_required(self) -> bool:
        """Every backend is encrypted (sslmode require/verify-ca/verify-full over TCP)."""
        return not self.is_unix and self.sslmode in REQUIRED_MODES

    def ssl_context(self) -> ssl.SSLContext:
        """The SSL context for this target's settings; raises :class:`~.tls.TLSConfigError`."""
        return make_context(
            self.sslmode,
            sslrootcert=self.sslrootcert,
            sslcert=self.sslcert,
            sslkey=self.sslkey,
            sslpassword=self.sslpassword,
        )

    @property
    def socket_path(self) -> str:
        """The Unix socket file, named the way libpq and the postmaster name it."""
        return f"{self.host}/.s.PGSQL.{self.port}"

    def address(self) -> str:
        """``unix socket /dir/.s.PGSQL.5432`` or ``tcp host:port`` (IPv6 in brackets)."""
        if self.is_unix:
            return f"unix socket {self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp {host}:{self.port}"

    def describe(self) -> str:
        """Address, user and database, for error messages and logs (never the password)."""
        return f"{self.address()} (user {self.user}, database {self.database})"


def parse_target(conninfo: str, env: Mapping[str, str] = os.environ) -> BackendTarget:
    """Build a :class:`BackendTarget` from a conninfo string or URI, the way libpq would.

    Unset keys fall back to PGHOST, PGHOSTADDR, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE,
    PGSSLROOTCERT, PGSSLCERT, PGSSLKEY, PGGSSENCMODE, PGOPTIONS, PGCONNECT_TIMEOUT, PGAPPNAME,
    PGCLIENTENCODING, then to libpq's defaults (Unix socket in /var/run/postgresql, port 5432, the
    OS user, database = user, sslmode=prefer, certificates in ``~/.postgresql``).
    ``connect_timeout`` 0 or unset means 10 s rather than libpq's "forever".

    Raises:
        ValueError: unparsable conninfo, several hosts, bad port/timeout/sslmode.
        TLSConfigError: TLS settings that cannot work (a verifying sslmode without a root
            certificate, an unreadable certificate or key).
        EncryptionNotSupported: gssencmode=require (the broker does not do GSSAPI encryption).
    """
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"invalid backend conninfo: {exc}") from exc

    def get(key: str, envvar: str | None = None) -> str | None:
        value = given.get(key)
        text = None if value is None else str(value)
        if not text and envvar is not None:
            text = env.get(envvar)
        return text or None  # libpq treats an empty value as unset

    host = get("host", "PGHOST")
    hostaddr = get("hostaddr", "PGHOSTADDR")
    port_text = get("port", "PGPORT")
    for key, value in (("host", host), ("hostaddr", hostaddr), ("port", port_text)):
        if value is not None and "," in value:
            raise ValueError(
                f"{key}={value!r} lists several servers, which pgreuse does not support yet: "
                "give the broker one host (put a load balancer or an upstream pooler in front)"
            )
    try:
        port = int(port_text) if port_text is not None else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"invalid port {port_text!r}: expected an integer") from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}: expected 1 to 65535")

    server_name = host if host is not None and not host.startswith("/") else None
    if hostaddr is not None:
        # libpq connects to hostaddr and uses host only for authentication and TLS names.
        server_name = server_name or hostaddr
        host, is_unix = hostaddr, False
    else:
        host = host or DEFAULT_SOCKET_DIR
        is_unix = host.startswith("/")

    user = get("user", "PGUSER") or _login_name()
    database = get("dbname", "PGDATABASE") or user

    timeout_text = get("connect_timeout", "PGCONNECT_TIMEOUT")
    try:
        timeout = float(timeout_text) if timeout_text is not None else 0.0
    except ValueError:
        raise ValueError(f"invalid connect_timeout {timeout_text!r}: expected seconds") from None
    if timeout <= 0:
        timeout = DEFAULT_CONNECT_TIMEOUT

    sslmode = get("sslmode", "PGSSLMODE")
    if sslmode is None:
        sslmode = "require" if get("requiressl", "PGREQUIRESSL") == "1" else "prefer"
    if sslmode not in SSLMODES:
        raise ValueError(f"invalid sslmode {sslmode!r}: expected one of {', '.join(SSLMODES)}")
    sslrootcert = get("sslrootcert", "PGSSLROOTCERT")
    if sslrootcert == "system" and get("sslmode", "PGSSLMODE") is None:
        sslmode = "verify-full"  # libpq 16: the system's roots imply verify-full by default

    target = BackendTarget(
        host=host,
        port=port,
        is_unix=is_unix,
        user=user,
        database=database,
        password=get("password", "PGPASSWORD"),
        options=get("options", "PGOPTIONS"),
        application_name=get("application_name", "PGAPPNAME") or get("fallback_application_name"),
        connect_timeout=timeout,
        sslmode=sslmode,
        client_encoding=get("client_encoding", "PGCLIENTENCODING"),
        sslrootcert=sslrootcert,
        sslcert=get("sslcert", "PGSSLCERT"),
        sslkey=get("sslkey", "PGSSLKEY"),
        sslpassword=get("sslpassword"),
        server_name=server_name or (None if is_unix else host),
    )
    if (get("gssencmode", "PGGSSENCMODE") or "prefer") == "require":
        raise EncryptionNotSupported(
            f"{target.address()}: gssencmode=require asks for GSSAPI encryption, which the pgreuse "
            "broker does not implement: use sslmode=require (or verify-full) for an encrypted "
            "backend connection, or drop gssencmode"
        )
    if target.tls_possible:
        target.ssl_context()  # a missing or unreadable certificate fails now, naming the file
    return target


def _login_name() -> str:
    """libpq's default user: this process's login name."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no $LOGNAME/$USER (OSError from Python 3.13)
        raise ValueError(
            f"no user= given, and this process's uid {os.geteuid()} has no user name to default "
            "to (no passwd entry, no $USER); set user= in the DSN or PGUSER"
        ) from None
