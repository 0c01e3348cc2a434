"""The worker side of the control channel: one per process and broker, shared by all its threads.

Any thread may ask for a lease; the replies come back on one socket, so the thread that happens to be
waiting reads for everyone (leader/follower): it reads one message, files it under its request id,
wakes the others, and the next waiter takes over reading. No background thread is started, so nothing
runs in a worker that the application did not call.

The channel also keeps the fds the broker sent, one per slot, tagged with the slot's generation: the
broker sends a slot's fd only once per process and generation.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import threading
import time

import attrs

from .. import errors
from ..wire import control

# How long past the broker's own wait timeout a worker waits for an answer before it decides the
# broker is wedged: the broker always answers first when it is alive.
ANSWER_GRACE = 5.0


@attrs.frozen
class Grant:
    slot: int
    generation: int
    backend_pid: int
    fd: int  # a dup owned by the caller: dup2 it into place, then close it


class Channel:
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
        self.sock = sock
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._replies: dict[int, tuple[control.Message, int | None]] = {}
        self._abandoned: set[int] = set()
        self._fds: dict[int, tuple[int, int]] = {}  # slot -> (generation, fd)
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._send(control.Hello(control.VERSION, self.pid))
        welcome, _ = self._recv(time.monotonic() + 10.0)
        if not isinstance(welcome, control.Welcome):
            raise errors.ProtocolMismatch(f"broker at {path} answered {welcome!r} to Hello")
        self.broker_pid = welcome.broker_pid
        self.max_size = welcome.max_size

    def __repr__(self) -> str:
        return f"<Channel {self.path} broker={self.broker_pid} fds={len(self._fds)}>"

    @property
    def dead(self) -> bool:
        return self._dead is not None

    def close(self) -> None:
        with self._cond:
            self._dead = self._dead or "closed"
            for _gen, fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
        self.sock.close()

    # -- requests ---------------------------------------------------------------------------------

    def acquire(self, parking: int, timeout: float) -> Grant:
        """Wait for a backend; raise the pgreuse error the broker's answer names."""
        request = next(self._ids)
        self._send(control.Acquire(request, parking))
        deadline = time.monotonic() + timeout
        try:
            msg, _ = self._wait_for(request, deadline)
        except BaseException:
            # Ctrl-C, our own timeout, a dead broker: tell the broker (best effort) and make sure a
            # grant that is already on its way is given back when it arrives.
            with self._cond:
                self._abandoned.add(request)
            with contextlib.suppress(OSError, errors.BrokerUnavailable):
                self._send(control.Abandon(request))
            raise
        if isinstance(msg, control.Deny):
            raise _deny_error(msg)
        assert isinstance(msg, control.Grant)
        with self._cond:
            cached = self._fds.get(msg.slot)
            if cached is None or cached[0] != msg.generation:
                raise errors.ProtocolMismatch(
                    f"broker granted slot {msg.slot} generation {msg.generation} without its fd"
                )
            # A private dup: another thread may replace the cached fd of this slot at any time.
            own = os.dup(cached[1])
        return Grant(msg.slot, msg.generation, msg.backend_pid, own)

    def release(self, slot: int, generation: int, outcome: control.Outcome) -> None:
        with contextlib.suppress(OSError, errors.BrokerUnavailable):
            # A dead broker has closed the backend already; nothing is lost by not telling it.
            self._send(control.Release(slot, generation, outcome))

    # -- I/O --------------------------------------------------------------------------------------

    def _send(self, msg: control.Message) -> None:
        if self._dead:
            raise errors.BrokerUnavailable(f"pgreuse broker at {self.path}: {self._dead}")
        data = control.encode(msg)
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self._dead = f"the control channel failed: {exc}"
                raise errors.BrokerUnavailable(f"pgreuse broker at {self.path} went away: {exc}") from exc

    def _wait_for(self, request: int, deadline: float) -> tuple[control.Message, int | None]:
        while True:
            with self._cond:
                while True:
                    if request in self._replies:
                        return self._replies.pop(request)
                    if self._dead:
                        raise errors.BrokerUnavailable(f"pgreuse broker at {self.path}: {self._dead}")
                    if not self._reading:
                        self._reading = True
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _no_answer(self.path)
                    self._cond.wait(remaining)
            try:
                msg, fd = self._recv(deadline)
            except BaseException:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()
                raise
            with self._cond:
                self._reading = False
                self._file(msg, fd)
                self._cond.notify_all()

    def _recv(self, deadline: float) -> tuple[control.Message, int | None]:
        """Read one message (blocking until ``deadline``); mark the channel dead on EOF."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _no_answer(self.path)
            if not poller.poll(remaining * 1000):
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.sock, control.MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
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
        """File one message for its waiter. Called with the condition held."""
        if isinstance(msg, control.Grant):
            if fd is not None:
                old = self._fds.get(msg.slot)
                if old is not None:
                    os.close(old[1])
                self._fds[msg.slot] = (msg.generation, fd)
            if msg.request in self._abandoned:
                self._abandoned.discard(msg.request)
                self.release(msg.slot, msg.generation, control.Outcome.CLEAN)
                return
        elif fd is not None:
            os.close(fd)
        request = getattr(msg, "request", None)
        if request is None:
            return
        if request in self._abandoned:
            self._abandoned.discard(request)
            return
        self._replies[request] = (msg, None)


def _deny_error(msg: control.Deny) -> Exception:
    kind: type[Exception] = {
        control.DenyCode.TIMEOUT: errors.PoolTimeout,
        control.DenyCode.UNAVAILABLE: errors.BackendUnavailable,
        control.DenyCode.CLOSED: errors.PoolClosed,
        control.DenyCode.TOO_MANY: errors.TooManyRequests,
        control.DenyCode.BAD_REQUEST: errors.BrokerUnavailable,
    }.get(msg.code, errors.BrokerUnavailable)
    return kind(msg.message)


def _no_answer(path: str) -> errors.BrokerUnavailable:
    return errors.BrokerUnavailable(
        f"pgreuse broker at {path} did not answer a lease request in time (it may be wedged: "
        "check its log, or 'python -m pgreuse stats')"
    )


_channels: dict[tuple[int, str], Channel] = {}
_channels_lock = threading.Lock()


def channel_for(path: str) -> Channel:
    """This process's channel to the broker at ``path``, opened on first use (after fork)."""
    key = (os.getpid(), path)
    with _channels_lock:
        ch = _channels.get(key)
        if ch is None or ch.dead:
            if ch is not None:
                ch.close()
            # Entries of a parent process (inherited through fork) are dropped, never used.
            for k in [k for k in _channels if k[0] != key[0]]:
                del _channels[k]
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
