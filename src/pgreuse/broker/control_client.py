"""One worker process's control channel, as the broker sees it: what it sends there, in order.

Messages the socket cannot take now (the worker is slow to read) wait in an outbox. The outbox is
bounded: a peer that stops reading while it keeps asking (a Hello or a Want answers with a message
each time) would otherwise grow the broker's memory without end — 100,000 requests took it from
45 to 72 MB, and 50 MB stayed after the peer left. Past :func:`outbox_limit` messages the channel is
closed with a logged reason, and its leases are taken back as for a dead worker (``control_listener.py``
does that when the channel ends, whatever ended it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Callable

from ..wire import control

logger = logging.getLogger("pgreuse.broker")

# Unread messages a channel may owe beyond one Fd per slot (the greeting sends every slot's fd at
# once, and the socket takes only a few hundred packets before the worker reads): a worker that
# reads nothing for this long is not coming back to it.
OUTBOX_SLACK = 1024


def outbox_limit(slots: int) -> int:
    """Messages a channel may have waiting before it is closed as a peer that never reads."""
    return OUTBOX_SLACK + 2 * slots


class OutboxFull(Exception):
    """A worker stopped reading its control channel while messages for it kept coming."""


class ControlClient:
    """One worker process's control channel."""

    in_process = False  # pool.Client: the worker gets the backend's fd

    def __init__(
        self,
        sock: socket.socket,
        pid: int,
        loop: asyncio.AbstractEventLoop,
        holder: int = 0,
        *,
        limit: int = OUTBOX_SLACK,
        on_overflow: Callable[[OutboxFull], None] | None = None,
    ) -> None:
        self.sock = sock
        self.pid = pid
        self.holder = holder  # its id in the slot words (slots.FIRST_WORKER and up); 0: no claims
        self.fds: dict[int, int] = {}  # slot -> generation of the fd sent to this process
        self._loop = loop
        self._outbox: deque[tuple[bytes, int | None]] = deque()
        self.limit = limit
        # Called (once) when the outbox passes ``limit``: the channel's owner ends it. Never the
        # pool's clean-up itself: send() runs inside the pool's own loops over its workers.
        self._on_overflow = on_overflow
        self.dead = False
        self.trusted = True  # False: another user let in by --allow-uid/gid, who gets no backend fds

    def __repr__(self) -> str:
        return f"<ControlClient pid={self.pid} holder={self.holder} fds={len(self.fds)}>"

    @property
    def backlog(self) -> int:
        """Messages waiting for the worker to read the channel."""
        return len(self._outbox)

    def send(self, msg: control.Message, fd: int | None = None) -> None:
        if self.dead:
            return
        if len(self._outbox) >= self.limit:
            self._overflow(msg)
            return
        # The queue owns a dup of the fd: if the message waits (the worker is slow to read) and
        # the backend is closed meanwhile, its fd number may be reused by the replacement — which
        # must never leave here labelled as the old generation.
        owned = os.dup(fd) if fd is not None else None
        self._outbox.append((control.encode(msg), owned))
        if len(self._outbox) == 1:
            self._flush()

    def _overflow(self, msg: control.Message) -> None:
        why = OutboxFull(
            f"{len(self._outbox)} messages wait unread on its control channel (the limit is "
            f"{self.limit}) and another ({type(msg).__name__}) came: it stopped reading; closing "
            "the channel and taking back what it holds"
        )
        logger.warning("control channel of pid %d: %s", self.pid, why)
        self.drop()
        if self._on_overflow is not None:
            self._on_overflow(why)

    def _flush(self) -> None:
        # Messages are tiny; the socket buffer fills only if the worker stopped reading. Keep order.
        outbox = self._outbox
        while outbox:
            data, fd = outbox[0]
            try:
                if fd is None:
                    self.sock.send(data)
                else:
                    socket.send_fds(self.sock, [data], [fd])
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._writable)
                return
            except OSError as exc:
                logger.info("control channel of pid %d: send failed: %s", self.pid, exc)
                self.drop()
                return
            outbox.popleft()
            if fd is not None:
                os.close(fd)

    def drop(self) -> None:
        """The channel is gone: forget what was still queued for it."""
        self.dead = True
        for _data, fd in self._outbox:
            if fd is not None:
                os.close(fd)
        self._outbox.clear()

    def _writable(self) -> None:
        self._loop.remove_writer(self.sock.fileno())
        self._flush()
