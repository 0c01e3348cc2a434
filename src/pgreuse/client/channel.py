"""The worker side of the control channel: one per process and broker, shared by all its connections.

Any thread (or task) may ask for a lease; the answers come back on one socket. One waiter at a time
reads for everyone: it reads one message, files it under its request id and wakes the others, and
the owner of that answer takes it while someone else reads on. No background thread or task is
started, so nothing runs in a worker that the application did not call.

The channel also keeps the fds the broker sent, one per slot, tagged with the slot's generation: the
broker sends a slot's fd only once per process and generation. Bookkeeping (answers, abandoned
requests, the fd cache) is shared by the sync :class:`Channel` and the :class:`AsyncChannel` (anyio);
only the waiting differs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import threading
import time
import weakref

import anyio
import attrs
import psycopg

from .. import errors
from ..credentials import peer_credentials, trusted_uids
from ..wire import control

HELLO_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0  # a broker that reads nothing from a worker for this long is wedged


@attrs.frozen
class Grant:
    slot: int
    generation: int
    backend_pid: int
    fd: int  # a dup owned by the caller: dup2 it into place, then close it


class ChannelBase:
    """Socket set-up, bookkeeping and message filing, without any waiting."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise errors.BrokerUnavailable(
                f"no pgreuse broker answers at {path}: {exc.strerror or exc}; start one with "
                f"'python -m pgreuse.broker --socket-dir {os.path.dirname(path)} "
                f"--port {path.rsplit('.', 1)[-1]} --dsn ...'"
            ) from exc
        _, uid, _ = peer_credentials(sock)
        if uid not in trusted_uids():
            sock.close()
            raise errors.BrokerUnavailable(
                f"the process listening at {path} runs as uid {uid}, not as this user "
                f"(uid {os.geteuid()}) or root: it is not trusted with leases; check who owns "
                f"{os.path.dirname(path)} and run the broker as the application's user"
            )
        self.sock = sock
        self.broker_pid = 0
        self.max_size = 0
        # The broker's backends use TLS: its connections send queries through the broker's proxy
        # on their parking socket, and never lease (DESIGN.md §3 rule 10).
        self.proxy_only = False
        # Guards answers, abandoned requests and the fd cache; never held across I/O. Reentrant:
        # the sync channel's condition uses it too, and files messages while holding it.
        self._book = threading.RLock()
        self._replies: dict[int, control.Message] = {}
        self._abandoned: set[int] = set()
        self._fds: dict[int, tuple[int, int]] = {}  # slot -> (generation, fd)
        self._ids = itertools.count(1)
        self._dead: str | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} broker={self.broker_pid} fds={len(self._fds)}>"

    @property
    def dead(self) -> bool:
        return self._dead is not None

    def close(self) -> None:
        with self._book:
            self._dead = self._dead or "closed"
            for _gen, fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
        self.sock.close()

    def release(self, slot: int, generation: int, outcome: control.Outcome) -> None:
        with contextlib.suppress(OSError, errors.BrokerUnavailable):
            # A dead broker has closed the backend already; nothing is lost by not telling it.
            self._send(control.Release(slot, generation, outcome))

    def _send(self, msg: control.Message) -> None:
        """Send one message; wait (bounded) while the broker's queue for this channel is full."""
        data = self._encode(msg)
        deadline = time.monotonic() + SEND_TIMEOUT
        while not self._try_send(data):
            # A SEQPACKET socket queues only a few messages (net.unix.max_dgram_qlen) until the
            # broker reads them: a burst of requests waits here, it is not a failure.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._send_timed_out()
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLOUT)
            poller.poll(min(remaining, 1.0) * 1000)

    def _encode(self, msg: control.Message) -> bytes:
        if self._dead:
            raise errors.BrokerUnavailable(f"pgreuse broker at {self.path}: {self._dead}")
        return control.encode(msg)

    def _try_send(self, data: bytes) -> bool:
        """Send ``data`` if the socket takes it now; False when it is full (EAGAIN)."""
        try:
            # One small SEQPACKET message: the kernel sends it whole or not at all, so senders
            # need no lock.
            self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._dead = f"the control channel failed: {exc}"
            raise errors.BrokerUnavailable(f"pgreuse broker at {self.path} went away: {exc}") from exc
        return True

    def _send_timed_out(self) -> None:
        self._dead = f"the broker read nothing from this process for {SEND_TIMEOUT:g}s"
        raise errors.BrokerUnavailable(
            f"pgreuse broker at {self.path}: {self._dead} (it may be wedged: check its log, or "
            "'python -m pgreuse stats')"
        )

    def _next_request(self) -> int:
        # Request ids are 32-bit on the wire; wrap rather than overflow after 2**32 leases.
        return next(self._ids) & 0xFFFFFFFF

    def _welcome(self, msg: control.Message) -> None:
        if isinstance(msg, control.Deny):
            raise errors.ProtocolMismatch(f"broker at {self.path} refused this worker: {msg.message}")
        if not isinstance(msg, control.Welcome):
            raise errors.ProtocolMismatch(f"broker at {self.path} answered {msg!r} to Hello")
        if msg.version != control.VERSION:
            raise errors.ProtocolMismatch(
                f"broker at {self.path} speaks control protocol {msg.version}, this pgreuse "
                f"{control.VERSION}: run the same pgreuse version in the broker and the application"
            )
        self.broker_pid = msg.broker_pid
        self.max_size = msg.max_size
        self.proxy_only = msg.proxy_only

    def _read_one(self) -> tuple[control.Message, int | None] | None:
        """One non-blocking read: a message, or None when nothing is there yet."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                self.sock, control.MAX_MESSAGE, 1, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return None
        except OSError as exc:
            self._dead = f"the control channel failed: {exc}"
            raise errors.BrokerUnavailable(f"pgreuse broker at {self.path} went away: {exc}") from exc
        if not data:
            self._dead = "the broker closed the control channel (it stopped or restarted)"
            raise errors.BrokerUnavailable(f"pgreuse broker at {self.path}: {self._dead}")
        try:
            return control.decode(data), (fds[0] if fds else None)
        except control.ControlError as exc:
            self._dead = f"the broker sent a malformed message: {exc}"
            raise errors.ProtocolMismatch(str(exc)) from exc

    def _file(self, msg: control.Message, fd: int | None) -> None:
        """File one message for its waiter (caller holds the read turn)."""
        release: control.Grant | None = None
        with self._book:
            if isinstance(msg, control.Grant):
                if fd is not None:
                    old = self._fds.get(msg.slot)
                    if old is not None:
                        os.close(old[1])
                    self._fds[msg.slot] = (msg.generation, fd)
            elif fd is not None:
                os.close(fd)
            request = getattr(msg, "request", None)
            if request is None:
                return
            if request in self._abandoned:
                self._abandoned.discard(request)
                release = msg if isinstance(msg, control.Grant) else None
            else:
                self._replies[request] = msg
        if release is not None:
            self.release(release.slot, release.generation, control.Outcome.CLEAN)

    def _take(self, request: int) -> control.Message | None:
        with self._book:
            return self._replies.pop(request, None)

    def _abandon(self, request: int) -> None:
        """The waiter gave up (Ctrl-C, cancellation, its own timeout): never leak a late grant."""
        with self._book:
            msg = self._replies.pop(request, None)
            if msg is None:
                self._abandoned.add(request)
        if isinstance(msg, control.Grant):
            self.release(msg.slot, msg.generation, control.Outcome.CLEAN)
        elif msg is None:
            with contextlib.suppress(errors.BrokerUnavailable):
                self._send(control.Abandon(request))

    def _grant(self, msg: control.Message) -> Grant:
        if isinstance(msg, control.Deny):
            raise _deny_error(msg)
        assert isinstance(msg, control.Grant)
        try:
            with self._book:
                cached = self._fds.get(msg.slot)
                if cached is None or cached[0] != msg.generation:
                    raise _fd_lost(msg)
                # A private dup: another thread may replace the cached fd of this slot any time.
                own = os.dup(cached[1])
        except BaseException:
            # Never keep a grant we cannot use: the broker closes that backend (BROKEN) and sends
            # the replacement's fd with its next grant.
            self.release(msg.slot, msg.generation, control.Outcome.BROKEN)
            raise
        return Grant(msg.slot, msg.generation, msg.backend_pid, own)

    def _dead_error(self) -> errors.BrokerUnavailable:
        return errors.BrokerUnavailable(f"pgreuse broker at {self.path}: {self._dead}")


class Channel(ChannelBase):
    """The blocking channel, for :class:`pgreuse.Connection` (threads take turns reading)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        # Waiters sleep on this condition; whoever reads wakes them all after filing a message. (A
        # plain lock handed around would starve: the reader re-takes it before the owner of the
        # answer it just filed wakes up, and that owner's backend sits unused.)
        self._cond = threading.Condition(self._book)
        self._reading = False
        self._send(control.Hello(control.VERSION, self.pid))
        self._welcome(self._recv(time.monotonic() + HELLO_TIMEOUT)[0])

    def acquire(self, parking: int, timeout: float) -> Grant:
        """Wait for a backend; raise the pgreuse error the broker's answer names."""
        request = self._next_request()
        self._send(control.Acquire(request, parking))
        deadline = time.monotonic() + timeout
        try:
            msg = self._wait_for(request, deadline)
        except BaseException:
            self._abandon(request)
            raise
        return self._grant(msg)

    def _wait_for(self, request: int, deadline: float) -> control.Message:
        while True:
            with self._cond:
                while True:
                    msg = self._replies.pop(request, None)
                    if msg is not None:
                        return msg
                    if self._dead:
                        raise self._dead_error()
                    if not self._reading:
                        self._reading = True
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _no_answer(self.path)
                    self._cond.wait(remaining)
            got: tuple[control.Message, int | None] | None = None
            try:
                got = self._recv(deadline)
            finally:
                with self._cond:
                    self._reading = False
                    if got is not None:
                        self._file(*got)
                    self._cond.notify_all()

    def _recv(self, deadline: float) -> tuple[control.Message, int | None]:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            got = self._read_one()
            if got is not None:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _no_answer(self.path)
            poller.poll(remaining * 1000)


class AsyncChannel(ChannelBase):
    """The channel for :class:`pgreuse.AsyncConnection`, waiting with anyio (one per event loop)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.sock.setblocking(False)
        self._read_turn = anyio.Lock()
        self._write_turn = anyio.Lock()
        # Connections using this channel: the last one to close closes it, since an event loop
        # gives no notice when it ends.
        self.users = 0

    def drop_user(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.close()

    async def _send_async(self, msg: control.Message) -> None:
        """Send one message, awaiting (bounded) while the broker's queue for us is full."""
        data = self._encode(msg)
        if self._try_send(data):
            return
        try:
            with anyio.fail_after(SEND_TIMEOUT):
                # anyio lets one task at a time wait for a socket to become writable.
                async with self._write_turn:
                    while not self._try_send(data):
                        await _wait_writable(self.sock)
        except TimeoutError:
            self._send_timed_out()

    async def hello(self) -> None:
        await self._send_async(control.Hello(control.VERSION, self.pid))
        with anyio.fail_after(HELLO_TIMEOUT):
            self._welcome((await self._recv())[0])

    async def acquire(self, parking: int, timeout: float) -> Grant:
        request = self._next_request()
        await self._send_async(control.Acquire(request, parking))
        try:
            with anyio.fail_after(timeout):
                msg = await self._wait_for(request)
        except TimeoutError:
            self._abandon(request)
            raise _no_answer(self.path) from None
        except BaseException:
            self._abandon(request)  # cancelled (a request timeout, a client that went away)
            raise
        return self._grant(msg)

    async def _wait_for(self, request: int) -> control.Message:
        while True:
            msg = self._take(request)
            if msg is not None:
                return msg
            if self._dead:
                raise self._dead_error()
            async with self._read_turn:
                if request in self._replies:
                    continue
                self._file(*(await self._recv()))

    async def _recv(self) -> tuple[control.Message, int | None]:
        while True:
            got = self._read_one()
            if got is not None:
                return got
            await _wait_readable(self.sock)


async def _wait_writable(sock: socket.socket) -> None:
    wait = getattr(anyio, "wait_writable", None)  # anyio >= 4.7; older: wait_socket_writable
    if wait is not None:
        await wait(sock)
    else:
        await anyio.wait_socket_writable(sock)


async def _wait_readable(sock: socket.socket) -> None:
    wait = getattr(anyio, "wait_readable", None)  # anyio >= 4.7; older: wait_socket_readable
    if wait is not None:
        await wait(sock)
    else:
        await anyio.wait_socket_readable(sock)


def _deny_error(msg: control.Deny) -> Exception:
    kind: type[Exception] = {
        control.DenyCode.TIMEOUT: errors.PoolTimeout,
        control.DenyCode.UNAVAILABLE: errors.BackendUnavailable,
        control.DenyCode.CLOSED: errors.PoolClosed,
        control.DenyCode.TOO_MANY: errors.TooManyRequests,
        control.DenyCode.BAD_REQUEST: errors.BrokerUnavailable,
    }.get(msg.code, errors.BrokerUnavailable)
    return kind(msg.message)


def _fd_lost(msg: control.Grant) -> psycopg.OperationalError:
    import resource  # noqa: PLC0415

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return psycopg.OperationalError(
        f"the broker granted slot {msg.slot} but its socket did not arrive: this process is "
        f"probably at its open-files limit (ulimit -n = {soft}); close files or raise the limit"
    )


def _no_answer(path: str) -> errors.BrokerUnavailable:
    return errors.BrokerUnavailable(
        f"pgreuse broker at {path} did not answer a lease request in time (it may be wedged: "
        "check its log, or 'python -m pgreuse stats')"
    )


def broker_accepts(path: str) -> bool:
    """True if a broker accepts connections on the control socket ``path`` (a readiness probe)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


_channels: dict[tuple[int, str], Channel] = {}
# Per event loop (weakly: a finished loop takes its channels with it), per path; reset at fork.
_async_channels: weakref.WeakKeyDictionary[object, dict[str, AsyncChannel]] = weakref.WeakKeyDictionary()
_channels_lock = threading.Lock()


def channel_for(path: str) -> Channel:
    """This process's channel to the broker at ``path``, opened on first use (after fork)."""
    key = (os.getpid(), path)
    with _channels_lock:
        ch = _channels.get(key)
        if ch is None or ch.dead:
            if ch is not None:
                ch.close()
            ch = _channels[key] = Channel(path)
        return ch


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


def _reset_after_fork() -> None:
    # The child must never read or write the parent's channel sockets, only forget them (their
    # fds stay open: closing a copy would not hurt the parent, but a message sent on it would). The
    # lock may have been held by another thread of the parent at fork time.
    global _channels_lock  # noqa: PLW0603
    _channels_lock = threading.Lock()
    _channels.clear()
    _async_channels.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
