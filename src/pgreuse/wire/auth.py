"""Client-side authentication steps: md5 and SCRAM-SHA-256.

Contract: pure functions and a small state object; no I/O. Callers wrap the returned payloads in
PasswordMessage / SASLInitialResponse / SASLResponse (see :mod:`pgreuse.wire.frames`). A failure
about credentials or the server's proof raises :class:`AuthError`; nothing here logs secrets.

SCRAM uses the ``scramp`` library rather than hand-rolled crypto. Channel binding
(SCRAM-SHA-256-PLUS) is not offered: the broker only opens plaintext backends for now.
"""

from __future__ import annotations

import hashlib

# scramp ships no type information; its four calls used here are wrapped in typed methods.
import scramp  # type: ignore[import-untyped]

SCRAM_SHA_256 = "SCRAM-SHA-256"


class AuthError(Exception):
    """Authentication with a PostgreSQL server failed or cannot be attempted.

    The message says which method and user, and what to change.
    """


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The payload of a PasswordMessage answering AuthenticationMD5Password.

    ``"md5" + md5(md5(password + user).hexdigest() + salt).hexdigest()``, NUL not included.
    """
    if len(salt) != 4:
        raise AuthError(f"md5 salt must be 4 bytes, the server sent {len(salt)}")
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest().encode("ascii")
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")


class ScramSteps:
    """The three client steps of SCRAM-SHA-256 without channel binding.

    ``first()`` -> SASLInitialResponse data; ``final(server_first)`` -> SASLResponse data;
    ``verify(server_final)`` checks the server's signature, which proves the server knows the
    password (skipping it would let anyone impersonate the server).
    """

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        # PostgreSQL ignores the SCRAM user name and uses the one from the startup packet; scramp
        # refuses an empty or unpreparable name, so fall back to a placeholder in that case.
        try:
            self._client = scramp.ScramClient([SCRAM_SHA_256], user or "*", password)
        except scramp.ScramException:
            try:
                self._client = scramp.ScramClient([SCRAM_SHA_256], "*", password)
            except scramp.ScramException as exc:
                raise AuthError(f"cannot prepare the SCRAM-SHA-256 password of user {user!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"<ScramSteps user={self.user!r} stage={self._client.stage!r}>"

    def first(self) -> bytes:
        """The client-first message."""
        return str(self._client.get_client_first()).encode("utf-8")

    def final(self, server_first: bytes) -> bytes:
        """The client-final message (with the proof), given the server-first message.

        Raises:
            AuthError: the server-first message is malformed, echoes the wrong nonce, or asks for
                fewer iterations than scramp accepts (4096).
        """
        try:
            self._client.set_server_first(server_first.decode("utf-8"))
            return str(self._client.get_client_final()).encode("utf-8")
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise AuthError(
                f"SCRAM-SHA-256 for user {self.user!r}: bad server-first message "
                f"{server_first[:200]!r}: {exc}"
            ) from exc

    def verify(self, server_final: bytes) -> None:
        """Check the server-final message.

        Raises:
            AuthError: the server's signature does not match (it does not know the password, or
                something in between is impersonating it) or it reported an error.
        """
        try:
            self._client.set_server_final(server_final.decode("utf-8"))
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise AuthError(
                f"SCRAM-SHA-256 for user {self.user!r}: the server's final message "
                f"{server_final[:200]!r} failed verification ({exc}); the server did not prove it "
                "knows the password, so the connection is not trusted"
            ) from exc
