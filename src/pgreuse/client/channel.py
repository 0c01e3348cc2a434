"""The worker side of the control channel: one per process and broker, shared by all its connections.

A worker never waits on this channel for a backend (DESIGN.md §4): it claims slots in the
shared-memory table, or waits for one there (``claims.py``), with the holder id the broker gave this
channel in its ``Welcome``.

The broker sends every open slot's fd when the channel opens and each new generation's fd later
(``Fd`` messages). Nothing reads the channel in the background: a claim that finds an idle slot whose
generation it has no fd for reads what has arrived (:meth:`ChannelBase._drain_locked`), and asks for
the fd once (``Want``) if it is still missing. What a worker tells the broker (a dirty or broken end,
a poke, a proxied statement that leaves session state) are small packets sent without blocking; one
the socket cannot take now waits in an outbox, sent before the next one.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import select
import socket
import threading
import time

from .. import errors, shm, slots
from ..credentials import peer_credentials, trusted_uids
from ..wire import control
from .claims import TableClaims

HELLO_TIMEOUT = 10.0
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)  # room for a few fds: extra ones are closed
MAX_OUTBOX = 10_000  # packets a broker that reads nothing may owe us before the channel is given up
SEND_TIMEOUT = 30.0  # a broker that reads nothing from a (sync) worker for this long is wedged


class ChannelBase(TableClaims):
    """Socket set-up, the fd cache and the messages to the broker; claims come from
    :class:`TableClaims`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
        except PermissionError as exc:
            sock.close()
            raise errors.BrokerUnavailable(
                f"the pgreuse broker at {path} does not let this user (uid {os.geteuid()}) in: "
                f"{exc.strerror or exc} (its socket directory is open to its own user only); start "
                f"it with --allow-uid {os.geteuid()} or --allow-gid <one of this user's groups>"
            ) from exc
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
        # The broker's backends use TLS: every transaction goes through its proxy (DESIGN.md §3
        # rule 10), and nothing is claimed.
        self.proxy_only = False
        self.holder = 0  # this channel's holder id in the slot words; 0: claim nothing
        self.table: shm.Table | None = None
        # Guards the fd cache and reads of the socket: a claim swaps in a cached fd, which a read
        # of a newer generation's fd would close.
        self._lock = threading.Lock()
        self._gens: list[int] = []  # per slot: the low 24 bits of the cached fd's generation
        self._full: list[int] = []  # per slot: that generation, whole (as Release names it)
        self._fds: list[int] = []  # per slot: the cached fd, or -1
        self._pids: list[int] = []  # per slot: the backend's pid
        self._given_back: list[int] = []  # per slot: when this process last gave it back clean (ns)
        self._wanted: set[tuple[int, int]] = set()
        self._start = 0  # where this process starts its scan of the slots
        self._outbox: collections.deque[bytes] = collections.deque()
        self._dead: str | None = None

    def __repr__(self) -> str:
        held = sum(1 for fd in self._fds if fd >= 0)
        return f"<{type(self).__name__} {self.path} broker={self.broker_pid} holder={self.holder} fds={held}>"

    @property
    def dead(self) -> bool:
        return self._dead is not None

    @property
    def claims(self) -> bool:
        """Connections of this channel may claim slots."""
        return self.table is not None and self._dead is None

    def close(self) -> None:
        with self._lock:
            self._dead = self._dead or "closed"
            self._forget_fds()
        self.sock.close()
        # Not table.close(): a thread of this process may still wait in its queue (without the
        # GIL), or a connection's C hot path hold its words; the mapping goes when the last of them
        # lets go of it (pgreuse._slots.Slots holds it while it lives).
        self.table = None

    def _forget_fds(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd >= 0:
                # (forgotten before it is closed: os.close() lets go of the GIL, and a number
                # closed but still listed could be swapped in by another thread once reused)
                self._fds[i] = -1
                self._gens[i] = slots.NOT_HELD
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- the Welcome ------------------------------------------------------------------------------

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
        n = msg.max_size
        self._gens = [slots.NOT_HELD] * n
        self._full = [0] * n
        self._fds = [-1] * n
        self._pids = [0] * n
        self._given_back = [0] * n
        # Processes start their scans at different slots, so they do not all race for slot 0.
        self._start = self.pid % n if n else 0
        if msg.holder >= slots.FIRST_WORKER and not msg.proxy_only and slots.ATOMIC:
            self._open_table()
            self.holder = msg.holder if self.table is not None else 0

    def report(self, slot: int, generation: int, outcome: control.Outcome) -> None:
        """A dirty or broken end: the broker resets or replaces the backend (the slot stays ours
        in the table until it does)."""
        with contextlib.suppress(errors.BrokerUnavailable):
            # A dead broker has closed the backend already; nothing is lost by not telling it.
            self._send(control.Release(slot, generation, outcome))

    def dirty(self, parking: int) -> None:
        """The next statement of parking connection ``parking`` goes through the proxy and leaves
        session state: the broker resets that backend before lending it again."""
        self._send(control.Dirty(parking))

    def drop_user(self) -> None:
        """A connection of this channel closed for good (the sync channel stays open for the
        process's next connection; the asyncio one closes with its last)."""

    def notice_end(self) -> None:
        """Read what waits on the channel (an fd, or the broker's end) without blocking."""
        if select.select([self.sock], [], [], 0)[0]:
            with self._lock:
                self._drain_locked()

    # -- reading ----------------------------------------------------------------------------------

    def _drain_locked(self) -> None:
        with contextlib.suppress(errors.BrokerUnavailable, errors.ProtocolMismatch):
            while (got := self._read_one()) is not None:
                self._file(*got)

    def _read_one(self) -> tuple[control.Message, int | None] | None:
        """One non-blocking read: a message, or None when nothing is there yet."""
        try:
            # Not socket.recv_fds(): on Python 3.11 it drops its flags argument, and MSG_DONTWAIT
            # with it (a blocking socket then blocks here).
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                control.MAX_MESSAGE, _FD_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
            )
            fds = _fds_of(ancdata)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._died(f"the control channel failed: {exc}")
            raise errors.BrokerUnavailable(f"pgreuse broker at {self.path} went away: {exc}") from exc
        if not data:
            for fd in fds:
                os.close(fd)
            self._died("the broker closed the control channel (it stopped or restarted)")
            raise self.dead_error()
        for extra in fds[1:]:  # a broker sends one fd per message at most
            os.close(extra)
        try:
            return control.decode(data), (fds[0] if fds else None)
        except control.ControlError as exc:
            for fd in fds:
                os.close(fd)
            self._died(f"the broker sent a malformed message: {exc}")
            raise errors.ProtocolMismatch(str(exc)) from exc

    def _died(self, why: str) -> None:
        # (the caller holds _lock, or no claim can run yet)
        self._dead = why
        self._forget_fds()  # the backends were the dead broker's: never claim them again

    def _file(self, msg: control.Message, fd: int | None) -> None:
        if not isinstance(msg, control.Fd) or fd is None or not 0 <= msg.slot < len(self._fds):
            if fd is not None:
                os.close(fd)
            return
        i = msg.slot
        if self._fds[i] >= 0:
            os.close(self._fds[i])  # an older generation's: its backend is closed
        self._fds[i] = fd
        self._gens[i] = msg.generation & slots.GEN_MASK
        self._full[i] = msg.generation
        self._pids[i] = msg.backend_pid

    # -- writing ----------------------------------------------------------------------------------

    def _send(self, msg: control.Message) -> None:
        """Send one small packet without blocking; keep it (in order) when the socket is full."""
        if self._dead:
            raise self.dead_error()
        data = control.encode(msg)
        outbox = self._outbox
        if outbox:
            self._flush()
        if outbox or not self._try_send(data):
            if len(outbox) >= MAX_OUTBOX:
                self._dead = f"the broker read nothing from this process for {MAX_OUTBOX} messages"
                raise self.dead_error()
            outbox.append(data)
            self._stuck()

    def _stuck(self) -> None:
        """The socket is full (the broker reads nothing for now): the outbox waits. The async
        channel sends it with its next packet or claim; the sync one waits here (bounded)."""

    def _flush(self) -> None:
        outbox = self._outbox
        while outbox and self._try_send(outbox[0]):
            outbox.popleft()

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

    def dead_error(self) -> errors.BrokerUnavailable:
        return errors.BrokerUnavailable(f"pgreuse broker at {self.path}: {self._dead}")

    def _hello_reply(self, got: tuple[control.Message, int | None]) -> control.Message:
        msg, fd = got
        if fd is not None:
            os.close(fd)
        return msg


class Channel(ChannelBase):
    """The channel of :class:`pgreuse.Connection` (any thread)."""

    waits_in_table = True

    def _stuck(self) -> None:
        # A thread may wait: a Release that sat in the outbox while this process went quiet would
        # keep its backend out of the pool.
        deadline = time.monotonic() + SEND_TIMEOUT
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLOUT)
        while self._outbox:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._dead = f"the broker read nothing from this process for {SEND_TIMEOUT:g}s"
                raise self.dead_error()
            poller.poll(min(remaining, 1.0) * 1000)
            self._flush()

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            self._send(control.Hello(control.VERSION, self.pid))
            deadline = time.monotonic() + HELLO_TIMEOUT
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            while (got := self._read_one()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _no_answer(self.path)
                poller.poll(remaining * 1000)
            self._welcome(self._hello_reply(got))
        except BaseException:
            self.close()
            raise


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


def _no_answer(path: str) -> errors.BrokerUnavailable:
    return errors.BrokerUnavailable(
        f"pgreuse broker at {path} did not answer this worker's Hello in time (it may be wedged: "
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
_channels_lock = threading.Lock()


def channel_for(path: str) -> Channel:
    """This process's channel to the broker at ``path``, opened on first use (after fork)."""
    key = (os.getpid(), path)
    with _channels_lock:
        ch = _channels.get(key)
        if ch is not None and not ch.dead:
            ch.notice_end()  # (a broker that restarted since: its channel ended unread)
        if ch is None or ch.dead:
            if ch is not None:
                ch.close()
            ch = _channels[key] = Channel(path)
        return ch


def _reset_after_fork() -> None:
    # The child must never read or write the parent's channel sockets, only forget them (their
    # fds stay open: closing a copy would not hurt the parent, but a message sent on it would). The
    # lock may have been held by another thread of the parent at fork time.
    global _channels_lock  # noqa: PLW0603
    _channels_lock = threading.Lock()
    _channels.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
