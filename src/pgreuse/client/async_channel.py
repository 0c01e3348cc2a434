"""The control channel of :class:`pgreuse.AsyncConnection`: one per process, event loop and broker.

The same channel as the sync one (``channel.py``), but for the Hello, which awaits the Welcome
instead of blocking the loop; the last connection of a loop to close closes it.
"""

from __future__ import annotations

import os
import socket
import weakref

from ..wire import control
from .channel import HELLO_TIMEOUT, ChannelBase

# Per event loop (weakly: a finished loop takes its channels with it), per path; reset at fork.
_async_channels: weakref.WeakKeyDictionary[object, dict[str, AsyncChannel]] = weakref.WeakKeyDictionary()


class AsyncChannel(ChannelBase):
    """The channel of :class:`pgreuse.AsyncConnection` (one per event loop): only its Hello awaits."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.sock.setblocking(False)
        # Connections using this channel: the last one to close closes it, since an event loop
        # gives no notice when it ends.
        self.users = 0

    def drop_user(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.close()

    async def hello(self) -> None:
        import anyio  # noqa: PLC0415 - the sync client never imports anyio

        self._send(control.Hello(control.VERSION, self.pid))
        with anyio.fail_after(HELLO_TIMEOUT):
            while (got := self._read_one()) is None:
                await _wait_readable(self.sock)
        self._welcome(self._hello_reply(got))


async def _wait_readable(sock: socket.socket) -> None:
    import anyio  # noqa: PLC0415

    wait = getattr(anyio, "wait_readable", None)  # anyio >= 4.7; older: wait_socket_readable
    if wait is not None:
        await wait(sock)
    else:
        await anyio.wait_socket_readable(sock)


async def async_channel_for(path: str) -> AsyncChannel:
    """This process's and this event loop's channel to the broker at ``path``."""
    import asyncio  # noqa: PLC0415 - psycopg's async API is asyncio-only

    per_loop = _async_channels.setdefault(asyncio.get_running_loop(), {})
    ch = per_loop.get(path)
    if ch is not None and not ch.dead and ch.pid == os.getpid():
        ch.users += 1
        return ch
    # A dead channel is not closed here: other tasks may still be reading it; its last user's
    # close() (drop_user) closes it.
    ch = AsyncChannel(path)
    try:
        await ch.hello()
    except BaseException:
        ch.close()
        raise
    per_loop[path] = ch
    ch.users += 1
    return ch


os.register_at_fork(after_in_child=_async_channels.clear)
