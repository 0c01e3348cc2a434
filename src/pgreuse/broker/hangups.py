"""Hang-up watch: notice a client connection that was reset, on any event loop.

Contract: a socket given to :meth:`HangupWatch.watch` gets its callback called, on the loop, with
the socket error (``ECONNRESET``, ``EPIPE``, ``ETIMEDOUT``...) when one is pending on it, however the
session's own reader is registered; until :meth:`HangupWatch.unwatch`, which must come before the
socket is closed.

Why (issue 13): a client that closes with data unread (the broker's startup reply, an answer) makes
its peer's socket report ``EPOLLERR`` while the client's last bytes are still queued. asyncio keeps
calling the reader, which reads them and then gets ``ConnectionResetError``; uvloop does not: libuv
stops and closes a poll handle that reports ``POLLERR`` (uvloop runs the reader once more, then never
again). The session then waited forever for the rest of a message, holding its backend.

So every client socket is also registered, edge-triggered and with no event of its own (epoll
always reports ``EPOLLERR`` and ``EPOLLHUP``), in one epoll set the broker owns, which is itself one
reader on the loop: no cost per message, one ``epoll_ctl`` when a client comes and one when it goes.
A hang-up without an error (``EPOLLHUP`` after an orderly close) is left to the reader, which sees
end-of-file on both loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
from collections.abc import Callable

logger = logging.getLogger("pgreuse.broker")

_EVENTS = 256  # per wake-up; the set's own fd is level-triggered, so the rest come on the next one


class HangupWatch:
    """One epoll set of client sockets; calls ``on_error(OSError)`` for a socket with an error."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[socket.socket, Callable[[OSError], None]]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def __repr__(self) -> str:
        return f"<HangupWatch sockets={len(self._watched)}>"

    def watch(self, sock: socket.socket, on_error: Callable[[OSError], None]) -> None:
        fd = sock.fileno()
        # An error already pending is reported at once: epoll checks the socket when it is added.
        self._epoll.register(fd, select.EPOLLET)
        self._watched[fd] = (sock, on_error)

    def unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._watched.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._watched.clear()

    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0, _EVENTS):
            entry = self._watched.get(fd)
            if entry is None:
                continue
            sock, on_error = entry
            # Reading SO_ERROR clears it: the socket is being given up for it.
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not code:
                continue  # an orderly hang-up (the reader sees EOF), or the reader took the error
            try:
                on_error(OSError(code, os.strerror(code)))
            except Exception:  # one session's failure must not stop the watch for the others
                logger.exception("closing client fd %d after a connection error failed", fd)
