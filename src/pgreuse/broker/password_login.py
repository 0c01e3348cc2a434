"""The TCP listener's password check: a SCRAM-SHA-256 exchange with a client after its StartupMessage.

Contract: :class:`PasswordLogin` holds the secrets of ``--auth-file``; :meth:`PasswordLogin.check`
runs one client's exchange (:mod:`pgreuse.wire.scram_server` does the protocol, this module only the
reads and writes) within what is left of ``--client-login-timeout``, and returns the bytes the
client sent after its last message. A client that cannot log in gets the FATAL answer PostgreSQL
gives — ``password authentication failed for user "..."`` (SQLSTATE 28P01), whether the password
was wrong or the user unknown — then the connection is closed; the log says which, and never a
password. A client that hangs up instead of answering (libpq without a password does) is logged.
"""

from __future__ import annotations

import asyncio
import os
import socket

from ..wire import frames
from ..wire.scram_server import (
    NONCE_BYTES,
    ScramExchange,
    ScramRefused,
    ScramSecret,
    auth_sasl,
    auth_sasl_continue,
    auth_sasl_final,
    mock_salt,
    parse_sasl_initial_response,
)
from .authfile import load_secrets
from .login import StartupRefused

# A SASL message is a few hundred bytes; a larger one is not a client logging in.
MAX_SASL_MESSAGE = 8192
_RECV = 8192
_MOCK_KEY_BYTES = 32


class ClientLeft(Exception):
    """The client closed the connection in the middle of the exchange."""


class PasswordLogin:
    """The password check of one broker's TCP listener."""

    def __init__(self, secrets: dict[str, ScramSecret]) -> None:
        self.secrets = secrets
        # The salt an unknown user is offered is derived from this key: stable for a user while
        # the broker runs, unguessable from outside.
        self._mock_key = os.urandom(_MOCK_KEY_BYTES)

    @classmethod
    def from_file(cls, path: str) -> PasswordLogin:
        """Raises ValueError naming the file and line that are wrong (see :mod:`.authfile`)."""
        return cls(load_secrets(path))

    def __repr__(self) -> str:
        return f"<PasswordLogin users={len(self.secrets)}>"

    async def check(
        self, sock: socket.socket, user: str, pending: bytes, timeout: float, *, limit: float | None = None
    ) -> bytes:
        """Authenticate ``user`` on ``sock``; the bytes that came after its last SASL message.

        ``timeout``: seconds for the whole exchange; 0 or less: no limit. ``limit``: the setting the
        error names when it runs out (``timeout`` is what is left of it), ``timeout`` by default.

        Raises:
            StartupRefused: 28P01 (wrong password, unknown user), 08P01 (a protocol violation, or no
                answer within ``timeout``); ``why`` says which for the log.
            ClientLeft: the client hung up (libpq does when it has no password to give).
            OSError: the socket failed.
        """
        loop = asyncio.get_running_loop()
        exchange = ScramExchange(
            self.secrets.get(user),
            server_nonce=os.urandom(NONCE_BYTES),
            salt_if_unknown=mock_salt(user, self._mock_key),
        )
        reader = frames.FrameReader(max_frame=MAX_SASL_MESSAGE)
        reader.feed(pending)
        try:
            async with asyncio.timeout(timeout if timeout > 0 else None):
                await loop.sock_sendall(sock, auth_sasl())
                body = await _password_message(loop, sock, reader)
                try:
                    mechanism, data = parse_sasl_initial_response(body)
                except frames.ProtocolError as exc:
                    raise _violation(f"malformed SASLInitialResponse: {exc}") from None
                await loop.sock_sendall(sock, auth_sasl_continue(exchange.server_first(mechanism, data)))
                body = await _password_message(loop, sock, reader)
                await loop.sock_sendall(sock, auth_sasl_final(exchange.server_final(body)))
        except TimeoutError:
            raise StartupRefused(
                "08P01",
                f"pgreuse broker: password authentication not done within --client-login-timeout "
                f"({timeout if limit is None else limit:g} s); closing the connection",
                why="authentication timed out",
            ) from None
        except ScramRefused as exc:
            if exc.sqlstate == "28P01":
                raise StartupRefused(
                    "28P01", f'password authentication failed for user "{user}"', why=exc.reason
                ) from None
            raise StartupRefused(exc.sqlstate, str(exc), why=exc.reason) from None
        return reader.rest()


async def _password_message(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, reader: frames.FrameReader
) -> bytes:
    """The body of the client's next message, which must be a SASL response (``p``)."""
    while True:
        try:
            msg = reader.next_message()
        except frames.ProtocolError as exc:
            raise _violation(f"invalid message during authentication: {exc}") from None
        if msg is not None:
            if msg.type != b"p":
                raise _violation(f"expected a SASL response, got message type {msg.type!r}")
            return msg.body
        data = await loop.sock_recv(sock, _RECV)
        if not data:
            raise ClientLeft("the client closed the connection during password authentication")
        reader.feed(data)


def _violation(message: str) -> StartupRefused:
    return StartupRefused("08P01", message, why=message)
