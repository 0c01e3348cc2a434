"""Sans-IO startup of a backend connection: the broker acting as a PostgreSQL client.

Contract: send :meth:`BackendStartup.initial_bytes`, then hand every chunk received to
:meth:`BackendStartup.feed` and send back whatever it returns, until :attr:`BackendStartup.done`.
No I/O and no clock here; the driver owns the socket and the timeout.

Failures raise, and the connection must then be closed:

* :class:`StartupFailed` - the server sent an ErrorResponse (wrong password, unknown database,
  too many clients ...); it carries the parsed :class:`ErrorFields`;
* :class:`~pgreuse.wire.auth.AuthError` - we cannot or will not authenticate (method not supported,
  no password given, the server failed to prove it knows the SCRAM password);
* :class:`~pgreuse.wire.frames.ProtocolError` - the server sent something that is not valid here.

Only protocol 3.0 is requested, and only plaintext methods: trust, password, md5, SCRAM-SHA-256.

Transition table (message type / auth code -> next state)::

    AUTH        R0 -> AUTHED   R3/R5 -> AUTH (password sent)   R10 -> SASL_CONT   v -> AUTH
    SASL_CONT   R11 -> SASL_FINAL
    SASL_FINAL  R12 -> SASL_OK
    SASL_OK     R0 -> AUTHED
    AUTHED      S, K -> AUTHED   Z -> READY
    any         E -> StartupFailed   N -> collected in notices
"""

from __future__ import annotations

import enum

from pgreuse.wire import frames
from pgreuse.wire.auth import SCRAM_SHA_256, AuthError, ScramSteps, md5_password
from pgreuse.wire.frames import ErrorFields, Message, ProtocolError

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_UNSUPPORTED_METHODS = {
    AUTH_KERBEROS_V5: "Kerberos V5",
    AUTH_GSS: "GSSAPI",
    AUTH_GSS_CONTINUE: "GSSAPI",
    AUTH_SSPI: "SSPI",
}


class StartupFailed(Exception):
    """The server refused the connection with an ErrorResponse; ``fields`` holds what it said."""

    def __init__(self, fields: ErrorFields) -> None:
        super().__init__(fields.summary())
        self.fields = fields


class _State(enum.Enum):
    AUTH = "waiting for an authentication request"
    SASL_CONT = "waiting for SASLContinue"
    SASL_FINAL = "waiting for SASLFinal"
    SASL_OK = "waiting for AuthenticationOk after SASLFinal"
    AUTHED = "waiting for ReadyForQuery"
    READY = "ready for query"


class BackendStartup:
    """Drive one backend connection from StartupMessage to the first ReadyForQuery.

    ``params`` are the StartupMessage parameters (``user`` is required; ``database``, ``options``,
    ``application_name`` ... as wanted). ``password`` is used only if the server asks for one.
    """

    def __init__(self, params: dict[str, str], password: str | None) -> None:
        if not params.get("user"):
            raise ValueError(f"startup parameters need a non-empty 'user', got {params!r}")
        self.params = dict(params)
        self.user = params["user"]
        self._password = password
        self._reader = frames.FrameReader()
        self._state = _State.AUTH
        self._scram: ScramSteps | None = None
        self.parameters: dict[str, str] = {}
        self.notices: list[ErrorFields] = []
        self.backend_pid = 0
        self.backend_secret = 0
        self.transaction_status = b""
        # Which request the server made: the driver logs it, tests assert it.
        self.auth_method = "trust"

    def __repr__(self) -> str:
        return f"<BackendStartup user={self.user!r} state={self._state.name} auth={self.auth_method}>"

    @property
    def done(self) -> bool:
        """True once ReadyForQuery arrived: the connection is usable."""
        return self._state is _State.READY

    def initial_bytes(self) -> bytes:
        """The StartupMessage to send first."""
        return frames.startup_message(self.params)

    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the server; return the bytes to send back (often ``b""``).

        Raises:
            StartupFailed: the server sent an ErrorResponse.
            AuthError: unsupported or impossible authentication, or a bad SCRAM proof.
            ProtocolError: malformed or out-of-order messages.
        """
        self._reader.feed(data)
        out: list[bytes] = []
        while not self.done:
            msg = self._reader.next_message()
            if msg is None:
                break
            out.append(self._handle(msg))
        return b"".join(out)

    def leftover(self) -> bytes:
        """Bytes received after ReadyForQuery (normally none: the server waits for a query)."""
        return self._reader.rest()

    def _handle(self, msg: Message) -> bytes:
        if msg.type == b"E":
            raise StartupFailed(ErrorFields.from_body(msg.body))
        if msg.type == b"N":
            self.notices.append(ErrorFields.from_body(msg.body))
            return b""
        state = self._state
        if msg.type == b"R" and state is not _State.AUTHED:
            return self._auth(*frames.parse_auth(msg.body))
        if msg.type == b"v" and state is _State.AUTH:
            self._negotiate(msg.body)
            return b""
        if state is _State.AUTHED:
            if msg.type == b"S":
                name, value = frames.parse_parameter_status(msg.body)
                self.parameters[name] = value
                return b""
            if msg.type == b"K":
                self.backend_pid, self.backend_secret = frames.parse_backend_key_data(msg.body)
                return b""
            if msg.type == b"Z":
                if msg.body not in (b"I", b"T", b"E"):
                    raise ProtocolError(f"ReadyForQuery with invalid status {msg.body!r}")
                self.transaction_status = msg.body
                self._state = _State.READY
                return b""
        raise ProtocolError(f"unexpected message type {msg.type!r} during startup ({state.value})")

    def _negotiate(self, body: bytes) -> None:
        # Sent when the server is older than the minor version we asked for, or does not know a
        # _pq_ option. We ask for 3.0 with no options, so minor 0 is the only acceptable answer.
        if len(body) < 8:
            raise ProtocolError(f"NegotiateProtocolVersion body has {len(body)} bytes (minimum 8)")
        version = int.from_bytes(body[:4], "big")
        if version != frames.PROTOCOL_3_0:
            raise ProtocolError(f"server negotiated protocol {version >> 16}.{version & 0xFFFF}, we need 3.0")

    def _need_password(self, method: str) -> str:
        if self._password is None:
            raise AuthError(
                f"server asked for a password for user {self.user!r} ({method}) and none was "
                "given: put password=... in the DSN or PGPASSWORD"
            )
        return self._password

    def _auth(self, code: int, payload: bytes) -> bytes:
        state = self._state
        if code == AUTH_OK:
            if state is _State.SASL_CONT or state is _State.SASL_FINAL:
                # Accepting this would skip the server's proof: a fake server could get here
                # without knowing the password (libpq refuses it the same way).
                raise AuthError(
                    f"server sent AuthenticationOk for user {self.user!r} before completing "
                    "SCRAM-SHA-256, so it never proved it knows the password"
                )
            self._state = _State.AUTHED
            return b""
        if state is _State.SASL_CONT and code == AUTH_SASL_CONTINUE:
            assert self._scram is not None  # set when entering SASL_CONT
            self._state = _State.SASL_FINAL
            return frames.sasl_response(self._scram.final(payload))
        if state is _State.SASL_FINAL and code == AUTH_SASL_FINAL:
            assert self._scram is not None
            self._scram.verify(payload)
            self._state = _State.SASL_OK
            return b""
        if state is not _State.AUTH or code in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL):
            raise ProtocolError(f"unexpected authentication request {code} ({state.value})")
        if code == AUTH_CLEARTEXT:
            self.auth_method = "password"
            password = self._need_password("password")
            return frames.password_message(password.encode("utf-8") + b"\0")
        if code == AUTH_MD5:
            self.auth_method = "md5"
            password = self._need_password("md5")
            return frames.password_message(md5_password(self.user, password, payload) + b"\0")
        if code == AUTH_SASL:
            self.auth_method = "scram-sha-256"
            mechanisms = _sasl_mechanisms(payload)
            if SCRAM_SHA_256 not in mechanisms:
                raise AuthError(
                    f"server offers SASL mechanisms {mechanisms} for user {self.user!r}; pgreuse "
                    f"only supports {SCRAM_SHA_256} (without channel binding): allow "
                    "scram-sha-256 for the broker's role in pg_hba.conf"
                )
            self._scram = ScramSteps(self.user, self._need_password(SCRAM_SHA_256))
            self._state = _State.SASL_CONT
            return frames.sasl_initial_response(SCRAM_SHA_256, self._scram.first())
        if code in _UNSUPPORTED_METHODS:
            raise AuthError(
                f"server asks for {_UNSUPPORTED_METHODS[code]} authentication (code {code}) for "
                f"user {self.user!r}, which pgreuse does not support: use trust, password, md5 or "
                "scram-sha-256 in pg_hba.conf for the broker's connections"
            )
        raise AuthError(f"server asks for unknown authentication method code {code}")


def _sasl_mechanisms(payload: bytes) -> list[str]:
    # A list of NUL-terminated names ended by an empty one.
    names: list[str] = []
    pos = 0
    while True:
        raw, pos = frames.read_cstring(payload, pos, "SASL mechanism name")
        if not raw:
            return names
        names.append(raw.decode("utf-8", "replace"))
