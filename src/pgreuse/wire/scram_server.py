"""The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it.

Contract: pure functions and a small state object; no I/O, no clock, no randomness of its own (the
caller gives the server nonce), nothing logged. :class:`ScramSecret` is a password's verifier in
PostgreSQL's ``rolpassword`` format (``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``),
parsed or derived from a plaintext password. :class:`ScramExchange` checks one client:
``server_first(initial_response)`` then ``server_final(response)``; a failure raises
:class:`ScramRefused`, which says whether the client broke the protocol (08P01) or failed to prove
the password (28P01) and, for the log only, why.

Why not ``scramp``'s server (the client steps in :mod:`.auth` use scramp): PostgreSQL's exchange
differs from plain RFC 5802 where it matters here. The SCRAM user name is ignored (libpq sends
``n=``; the user is the startup packet's); an unknown user is run through the whole exchange with a
made-up salt and refused only at the proof, as PostgreSQL does, so that a client cannot learn which
users exist; and a failure is an ErrorResponse, not a server-final ``e=`` attribute. Channel binding
(SCRAM-SHA-256-PLUS) is not offered: the broker's client listeners are plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import stringprep
import struct
import unicodedata

import attrs

from . import frames
from .auth import SCRAM_SHA_256

# PostgreSQL's scram_iterations default: the cost of deriving a secret from a plaintext password.
DEFAULT_ITERATIONS = 4096
MIN_ITERATIONS = 1  # PostgreSQL accepts any positive count in a stored secret
SALT_BYTES = 16
NONCE_BYTES = 18
_KEY_BYTES = 32  # SHA-256

_AUTH_SASL = 10
_AUTH_SASL_CONTINUE = 11
_AUTH_SASL_FINAL = 12
_I32 = struct.Struct("!i")


class ScramRefused(Exception):
    """The client is refused: ``sqlstate`` 08P01 (a protocol violation) or 28P01 (no proof).

    ``str()`` is for the client when it is a protocol violation; ``reason`` is for the log only (a
    client told "no such user" would learn which users exist).
    """

    def __init__(self, sqlstate: str, message: str, reason: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.reason = reason


@attrs.frozen
class ScramSecret:
    """What the server keeps of a password: enough to check a proof, not to make one."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return f"<ScramSecret iterations={self.iterations}>"  # the keys stay out of logs

    @classmethod
    def parse(cls, text: str) -> ScramSecret:
        """A secret in PostgreSQL's format (``SELECT rolpassword FROM pg_authid``).

        Raises:
            ValueError: not that format; the message says which part is wrong, never the keys.
        """
        try:
            method, params, keys = text.split("$")
            iterations_text, salt_text = params.split(":")
            stored_text, server_text = keys.split(":")
        except ValueError:
            raise ValueError(
                "not a SCRAM secret: expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
            ) from None
        if method != SCRAM_SHA_256:
            raise ValueError(f"secret method {method!r} is not {SCRAM_SHA_256}")
        if not iterations_text.isdigit() or int(iterations_text) < MIN_ITERATIONS:
            raise ValueError(f"iteration count {iterations_text!r} is not a positive number")
        try:
            salt = base64.b64decode(salt_text, validate=True)
            stored_key = base64.b64decode(stored_text, validate=True)
            server_key = base64.b64decode(server_text, validate=True)
        except binascii.Error:
            raise ValueError("its salt or keys are not valid base64") from None
        if not salt or len(stored_key) != _KEY_BYTES or len(server_key) != _KEY_BYTES:
            raise ValueError(f"its salt is empty or its keys are not {_KEY_BYTES} bytes each")
        return cls(int(iterations_text), salt, stored_key, server_key)

    @classmethod
    def from_password(cls, password: str, salt: bytes, iterations: int = DEFAULT_ITERATIONS) -> ScramSecret:
        """The secret PostgreSQL would store for ``password`` with this salt and iteration count."""
        salted = hashlib.pbkdf2_hmac("sha256", _prepared(password), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))

    def encode(self) -> str:
        """The secret in PostgreSQL's format."""
        b64 = _b64
        return (
            f"{SCRAM_SHA_256}${self.iterations}:{b64(self.salt)}"
            f"${b64(self.stored_key)}:{b64(self.server_key)}"
        )


def mock_salt(user: str, mock_key: bytes) -> bytes:
    """The salt offered for an unknown ``user``: the same on every try (a random one would tell that
    the user does not exist), unguessable without ``mock_key`` (the broker draws it at start)."""
    return hashlib.sha256(mock_key + user.encode("utf-8", "surrogateescape")).digest()[:SALT_BYTES]


class ScramExchange:
    """One client's SCRAM-SHA-256 exchange. ``secret`` None: an unknown user, refused at the proof."""

    def __init__(self, secret: ScramSecret | None, *, server_nonce: bytes, salt_if_unknown: bytes) -> None:
        self._secret = secret
        self._salt = secret.salt if secret is not None else salt_if_unknown
        self._iterations = secret.iterations if secret is not None else DEFAULT_ITERATIONS
        self._server_nonce = _b64(server_nonce)
        self._nonce = ""  # client nonce + server nonce, once the client-first message is read
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""

    def __repr__(self) -> str:
        stage = "final" if self._server_first else "first"
        return f"<ScramExchange known={self._secret is not None} stage={stage}>"

    def server_first(self, mechanism: str, client_first: bytes) -> bytes:
        """The server-first message, given the client's SASLInitialResponse.

        Raises:
            ScramRefused: another mechanism, channel binding asked for, or a malformed message.
        """
        if mechanism != SCRAM_SHA_256:
            raise _violation(
                f"client selected an invalid SASL authentication mechanism {mechanism!r} "
                f"(this server offers {SCRAM_SHA_256} only)"
            )
        text = _decode(client_first)
        flag, sep, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not sep or not sep2:
            raise _violation("malformed SCRAM message: no GS2 header")
        if flag.startswith("p="):
            raise _violation(
                "channel binding was asked for, but this server does not offer SCRAM-SHA-256-PLUS"
            )
        if flag not in ("n", "y"):  # y: the client could bind, and we did not offer it: fine
            raise _violation(f"malformed SCRAM message: unexpected channel-binding flag {flag[:20]!r}")
        if authzid:
            raise _violation("client uses an authorization identity, which is not supported")
        attrs_ = bare.split(",")
        if len(attrs_) < 2 or not attrs_[0].startswith("n=") or not attrs_[1].startswith("r="):
            raise _violation("malformed SCRAM message: expected n=<user>,r=<nonce>")
        client_nonce = attrs_[1][2:]
        if not client_nonce or not all(0x21 <= ord(c) <= 0x7E and c != "," for c in client_nonce):
            raise _violation("malformed SCRAM message: the client nonce is empty or not printable")
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64(self._salt)},i={self._iterations}"
        return self._server_first.encode("ascii")

    def server_final(self, client_final: bytes) -> bytes:
        """The server-final message (``v=<ServerSignature>``) for a client that proved the password.

        Raises:
            ScramRefused: 28P01 for a wrong proof or an unknown user, 08P01 for a malformed message
                or one that does not follow the client-first message.
        """
        if not self._server_first:
            raise _violation("SCRAM client-final message before the client-first message")
        text = _decode(client_final)
        without_proof, sep, proof_text = text.rpartition(",p=")
        parts = without_proof.split(",")
        if not sep or len(parts) < 2 or not parts[0].startswith("c=") or not parts[1].startswith("r="):
            raise _violation("malformed SCRAM message: expected c=<binding>,r=<nonce>,p=<proof>")
        if parts[0][2:] != _b64(self._gs2_header.encode("ascii")):
            raise _violation("SCRAM channel binding check failed")
        if parts[1][2:] != self._nonce:
            raise _violation("SCRAM nonce mismatch")
        try:
            proof = base64.b64decode(proof_text, validate=True)
        except binascii.Error:
            proof = b""
        if len(proof) != _KEY_BYTES:
            raise _violation("malformed SCRAM message: the proof is not 32 bytes of base64")
        secret = self._secret
        if secret is None:
            raise ScramRefused("28P01", "password authentication failed", "no such user")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(secret.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), secret.stored_key):
            raise ScramRefused("28P01", "password authentication failed", "wrong password")
        return f"v={_b64(_hmac(secret.server_key, auth_message))}".encode("ascii")


# -- the messages around the exchange -------------------------------------------------------------


def auth_sasl() -> bytes:
    """AuthenticationSASL offering SCRAM-SHA-256 (no -PLUS: the listener is plaintext)."""
    return frames.frame(b"R", _I32.pack(_AUTH_SASL) + SCRAM_SHA_256.encode() + b"\0\0")


def auth_sasl_continue(data: bytes) -> bytes:
    """AuthenticationSASLContinue carrying the server-first message."""
    return frames.frame(b"R", _I32.pack(_AUTH_SASL_CONTINUE) + data)


def auth_sasl_final(data: bytes) -> bytes:
    """AuthenticationSASLFinal carrying the server-final message."""
    return frames.frame(b"R", _I32.pack(_AUTH_SASL_FINAL) + data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """(mechanism, client-first message) of a SASLInitialResponse body.

    Raises:
        frames.ProtocolError: not a SASLInitialResponse.
    """
    raw, pos = frames.read_cstring(body, 0, "SASL mechanism")
    if len(body) < pos + 4:
        raise frames.ProtocolError(f"SASLInitialResponse of {len(body)} bytes has no data length")
    (length,) = _I32.unpack_from(body, pos)
    data = body[pos + 4 :]
    if length != len(data):
        raise frames.ProtocolError(
            f"SASLInitialResponse says its data is {length} bytes, and {len(data)} follow"
        )
    return raw.decode("utf-8", "replace"), data


# -- helpers ---------------------------------------------------------------------------------------


def saslprep(text: str) -> str:
    """SASLprep (RFC 4013) of a password; raise ValueError for one it prohibits.

    Mapping: non-ASCII spaces to a space, "commonly mapped to nothing" characters dropped; then
    NFKC; then the prohibited and bidirectional checks of RFC 3454.
    """
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    norm = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
        stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
        stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
    )  # fmt: skip
    for c in norm:
        if any(table(c) for table in prohibited) or stringprep.in_table_a1(c):
            raise ValueError(f"character U+{ord(c):04X} is prohibited by SASLprep")
    if any(stringprep.in_table_d1(c) for c in norm):
        if any(stringprep.in_table_d2(c) for c in norm):
            raise ValueError("mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(norm[0]) and stringprep.in_table_d1(norm[-1])):
            raise ValueError("right-to-left text must start and end with a right-to-left character")
    return norm


def _prepared(password: str) -> bytes:
    # As PostgreSQL (pg_saslprep) and libpq: a password SASLprep refuses is used as it is.
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        return password.encode("utf-8", "surrogateescape")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _violation("malformed SCRAM message: not UTF-8") from None


def _violation(message: str) -> ScramRefused:
    return ScramRefused("08P01", message, message)
