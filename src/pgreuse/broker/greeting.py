"""What an accepted startup on the PostgreSQL listener is answered, encoded once per pool.

Contract: :meth:`Greeting.reply` returns the bytes a client whose StartupMessage was accepted gets —
NegotiateProtocolVersion (protocol 3.1 and up), AuthenticationOk, a ParameterStatus for each of the
pool's parameters in their order (``application_name`` shows the client's own), BackendKeyData with
its parking key and secret, ReadyForQuery ``I`` — the same bytes as encoding each message anew.
:meth:`ParkingSecrets.next` draws a cancel secret.

Why: every connect-per-request client goes through this answer, and the pool's parameters (a dozen
ParameterStatus messages) never change once the first backend reported them (``Pool.parameters`` is
set once and never mutated); encoding them per connection was a tenth of the broker's CPU per
connection. The encoding is kept for the parameters dict it was made from, and made anew for another.
"""

from __future__ import annotations

import os

from ..wire import frames

_READY = frames.ready_for_query(b"I")
_AUTH_OK = frames.auth_ok()
_SECRET_BYTES = 4


class Greeting:
    """The startup answer for one pool's parameters, encoded once (see the module docstring)."""

    def __init__(self) -> None:
        self._params: dict[str, str] | None = None
        # AuthenticationOk and the ParameterStatus before application_name, and those after it.
        self._head = b""
        self._tail = b""
        self._has_app_name = False

    def reply(
        self,
        pool_params: dict[str, str],
        application_name: str,
        key: int,
        secret: int,
        negotiate: bytes = b"",
    ) -> bytes:
        """The answer to an accepted StartupMessage; ``negotiate``: its NegotiateProtocolVersion."""
        if pool_params is not self._params:
            self._encode(pool_params)
        app = frames.parameter_status("application_name", application_name) if self._has_app_name else b""
        return b"".join(
            (negotiate, self._head, app, self._tail, frames.backend_key_data(key, secret), _READY)
        )

    def _encode(self, pool_params: dict[str, str]) -> None:
        head: list[bytes] = [_AUTH_OK]
        tail: list[bytes] = []
        part = head
        self._has_app_name = False
        for name, value in pool_params.items():
            if name == "application_name":
                self._has_app_name = True
                part = tail
                continue
            part.append(frames.parameter_status(name, value))
        self._head, self._tail = b"".join(head), b"".join(tail)
        self._params = pool_params


class ParkingSecrets:
    """Random 31-bit cancel secrets, drawn from the kernel a few hundred at a time.

    ``secrets.randbits(31)`` reads ``os.urandom`` (a system call) for each secret; these come from
    the same source in blocks, each byte used once.
    """

    def __init__(self, block: int = 4096) -> None:
        self._block = block
        self._buf = b""
        self._pos = 0

    def next(self) -> int:
        if self._pos + _SECRET_BYTES > len(self._buf):
            self._buf = os.urandom(self._block)
            self._pos = 0
        pos = self._pos
        self._pos = pos + _SECRET_BYTES
        return int.from_bytes(self._buf[pos : pos + _SECRET_BYTES], "big") >> 1
