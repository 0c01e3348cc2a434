"""A new connection on the PostgreSQL listener, before it is a session: bounded in time and in number.

Contract:

* :func:`read_startup` reads a connection's first packets up to its StartupMessage within a
  deadline counted from the call: ``--client-login-timeout``, or :data:`OVER_LIMIT_GRACE` for a
  connection over ``--max-client-conn`` (it is only read to answer it properly, or to serve its
  cancel). A peer that sends nothing, or a packet a byte at a second, holds its descriptor no
  longer. SSLRequest and GSSENCRequest are answered ``N`` once each (``StartupReader`` refuses a
  repeat, so a peer that never reads cannot fill its socket with answers); a CancelRequest goes to
  the broker.
* :class:`Admission` counts the connections still in their startup, so that they count toward
  ``--max-client-conn`` with the parked, proxied and admin ones (issue 13: 500 silent connections held
  500 descriptors for good, and counted nowhere).
* :class:`StartupRefused` is a startup the broker refuses (its SQLSTATE and message, what to do);
  :func:`startup_failure` is the FATAL answer to a startup that failed inside the broker.
* :func:`os_user` and friends give login names, or None where there is none to be had.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import logging
import os
import pwd
import socket
from collections.abc import Callable

from ..wire import frames

logger = logging.getLogger("pgreuse.broker")

# Seconds a connection over --max-client-conn has to send its first packet: a CancelRequest is still
# served at the limit (it comes on a connection of its own), and a StartupMessage gets its 53300
# answer after it is read (an answer sent before it, then a close, could reach the client as a
# reset instead). Short, because these connections are the ones the limit is meant to bound.
OVER_LIMIT_GRACE = 2.0
_RECV = 16384  # bytes per read of a startup (MAX_STARTUP is 10000)


class LoginTimeout(Exception):
    """No StartupMessage before the deadline."""


class StartupRefused(Exception):
    """A startup the broker answers with a FATAL ErrorResponse; ``why``: more for the log only."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None, *, why: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint
        self.why = why


class Admission:
    """The connections of the PostgreSQL listener still in their startup (``starting``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # --max-client-conn; 0: no limit
        self.starting = 0

    def admit(self, others: int) -> bool:
        """Count a new connection, given ``others`` (parked, proxied, admin); False if over the limit.

        A connection that is not admitted is not counted: it is answered and closed.
        """
        if self.limit and others + self.starting >= self.limit:
            return False
        self.starting += 1
        return True

    def started(self) -> None:
        """An admitted connection left its startup (it is counted elsewhere now, or closed)."""
        self.starting -= 1


async def read_startup(
    sock: socket.socket, timeout: float, cancel: Callable[[int, int], None]
) -> tuple[frames.StartupMessage, bytes] | None:
    """The StartupMessage and the bytes pipelined behind it; None if the connection is done with.

    None: end-of-file, or a CancelRequest (given to ``cancel``). ``timeout`` 0: no deadline.

    Raises:
        LoginTimeout: nothing complete came within ``timeout`` seconds.
        frames.ProtocolError: a malformed packet, or an encryption request sent twice.
    """
    loop = asyncio.get_running_loop()
    reader = frames.StartupReader()
    packet: frames.StartupPacket | None = None
    # Most clients send their StartupMessage as they connect, and it is often here already: then it
    # is taken without the deadline's timer and the wait's future and reader registration below,
    # which cost more than the rest of a startup.
    try:
        data = sock.recv(_RECV)
    except BlockingIOError:
        pass
    else:
        if not data:
            return None
        reader.feed(data)
        packet = reader.next_packet()
        if isinstance(packet, frames.StartupMessage):
            return packet, reader.rest()
    try:
        async with asyncio.timeout(timeout or None):
            while True:
                if packet is None:
                    packet = reader.next_packet()
                if packet is None:
                    data = await loop.sock_recv(sock, _RECV)
                    if not data:
                        return None
                    reader.feed(data)
                    continue
                if isinstance(packet, frames.SSLRequest | frames.GSSENCRequest):
                    await loop.sock_sendall(sock, b"N")
                    packet = None
                    continue
                if isinstance(packet, frames.CancelRequest):
                    cancel(packet.pid, packet.secret)
                    return None
                assert isinstance(packet, frames.StartupMessage)
                return packet, reader.rest()
    except TimeoutError:
        raise LoginTimeout(f"no startup packet within {timeout:g} s") from None


def login_timeout_error(timeout: float) -> bytes:
    return frames.error_response(
        "08P01",
        f"pgreuse broker: no startup packet within --client-login-timeout ({timeout:g} s); "
        "closing the connection",
        severity="FATAL",
    )


def startup_failure(exc: Exception) -> bytes:
    """The FATAL ErrorResponse for a startup that failed inside the broker."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return frames.error_response(
            "53000",
            f"pgreuse broker: out of file descriptors while starting this session: {exc}",
            severity="FATAL",
            hint="retry later; the broker's open-files limit (ulimit -n) may need raising",
        )
    return frames.error_response(
        "XX000",
        f"pgreuse broker: internal error while starting this session: {exc!r}",
        severity="FATAL",
        hint="the broker's log has the details; other clients are not affected",
    )


def os_user(uid: int) -> str | None:
    """The login name of ``uid``; None if there is none to be had.

    None when the uid has no passwd entry (a container run with an arbitrary uid) or the lookup
    failed (NSS could not open its files at the open-files limit): ``pwd`` raises KeyError for both.
    """
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def own_user() -> str | None:
    """This process's user name: its passwd entry, else ``$LOGNAME``/``$USER`` if set."""
    name = os_user(os.geteuid())
    if name is None:
        with contextlib.suppress(KeyError, OSError):  # getpass falls back to pwd (OSError from 3.13)
            name = getpass.getuser()
    return name


def os_user_of(pid: int) -> str | None:
    """The login name of the process ``pid`` (a peer on the Unix socket); None if unknown."""
    if pid <= 0:
        return None  # TCP: no peer process
    try:
        return os_user(os.stat(f"/proc/{pid}").st_uid)
    except OSError:
        return None
