"""Broker <-> worker lease messages (control protocol, versioned). Performs no I/O.

The control channel is an ``AF_UNIX``/``SOCK_SEQPACKET`` socket, so the kernel keeps message boundaries
and an fd passed with ``SCM_RIGHTS`` rides on exactly the message it belongs to: one packet is one
message, ``encode()`` makes it and ``decode()`` reads it. Every message starts with a one-byte tag.

Conversation::

    worker -> broker  Hello(version, pid)          broker -> worker  Welcome(version, broker_pid, max_size,
                                                                          proxy_only)
                                                                   or Deny(0, BAD_REQUEST, why) if
                                                                      the versions differ
    worker -> broker  Acquire(request, parking)    broker -> worker  Grant(request, slot, generation,
                                                                        backend_pid, has_fd) [+ fd]
                                                                   or Deny(request, code, message)
    worker -> broker  Release(slot, generation, outcome)
    worker -> broker  Abandon(request)             (the waiter gave up: Ctrl-C, its own timeout)

The broker sends a slot's fd with a Grant only when that worker process does not hold the fd of the
slot's current generation yet; otherwise the worker reuses the fd it cached.

``proxy_only`` (version 2): the pool's backends use TLS, so no fd can be handed off; the worker's
connections send their queries on the parking connection instead, which the broker proxies, and
never Acquire.
"""

from __future__ import annotations

import enum
import struct

import attrs

VERSION = 2  # 2: Welcome.proxy_only
MAX_MESSAGE = 4096  # every message is small; a larger packet is a protocol violation


class ControlError(ValueError):
    """Bytes that are not a valid control message."""


class DenyCode(enum.IntEnum):
    TIMEOUT = 1  # waited longer than the broker's --wait-timeout
    UNAVAILABLE = 2  # PostgreSQL cannot be reached
    CLOSED = 3  # the broker is shutting down
    BAD_REQUEST = 4  # e.g. an unknown parking connection
    TOO_MANY = 5  # too many waiters


class Outcome(enum.IntEnum):
    CLEAN = 0  # back at ReadyForQuery 'I', nothing unread
    DIRTY = 1  # session state changed: reset before lending again
    BROKEN = 2  # the holder's libpq saw the connection fail


@attrs.frozen
class Hello:
    version: int
    pid: int


@attrs.frozen
class Welcome:
    version: int
    broker_pid: int
    max_size: int
    proxy_only: bool = False


@attrs.frozen
class Acquire:
    request: int
    parking: int  # the BackendKeyData pid the broker gave the worker's parking connection


@attrs.frozen
class Grant:
    request: int
    slot: int
    generation: int
    backend_pid: int
    has_fd: bool


@attrs.frozen
class Deny:
    request: int
    code: DenyCode
    message: str


@attrs.frozen
class Release:
    slot: int
    generation: int
    outcome: Outcome


@attrs.frozen
class Abandon:
    request: int


Message = Hello | Welcome | Acquire | Grant | Deny | Release | Abandon

_HELLO = struct.Struct("!HI")
_WELCOME = struct.Struct("!HIIB")
_ACQUIRE = struct.Struct("!II")
_GRANT = struct.Struct("!IHIIB")
_DENY = struct.Struct("!IB")
_RELEASE = struct.Struct("!HIB")
_ABANDON = struct.Struct("!I")


def encode(msg: Message) -> bytes:
    """Return the packet for ``msg``."""
    match msg:
        case Hello(version, pid):
            return b"H" + _HELLO.pack(version, pid)
        case Welcome(version, broker_pid, max_size, proxy_only):
            return b"W" + _WELCOME.pack(version, broker_pid, max_size, proxy_only)
        case Acquire(request, parking):
            return b"A" + _ACQUIRE.pack(request, parking)
        case Grant(request, slot, generation, backend_pid, has_fd):
            return b"G" + _GRANT.pack(request, slot, generation, backend_pid, has_fd)
        case Deny(request, code, message):
            return b"D" + _DENY.pack(request, code) + message.encode()[: MAX_MESSAGE - 16]
        case Release(slot, generation, outcome):
            return b"R" + _RELEASE.pack(slot, generation, outcome)
        case Abandon(request):
            return b"X" + _ABANDON.pack(request)
    raise TypeError(f"not a control message: {msg!r}")


def decode(packet: bytes) -> Message:
    """Parse one packet; raise :class:`ControlError` naming what is wrong."""
    if not packet:
        raise ControlError("empty control packet")
    if len(packet) > MAX_MESSAGE:
        raise ControlError(f"control packet of {len(packet)} bytes exceeds {MAX_MESSAGE}")
    tag, body = packet[:1], packet[1:]
    try:
        match tag:
            case b"H":
                return Hello(*_HELLO.unpack(body))
            case b"W":
                version, broker_pid, max_size, proxy_only = _WELCOME.unpack(body)
                return Welcome(version, broker_pid, max_size, bool(proxy_only))
            case b"A":
                return Acquire(*_ACQUIRE.unpack(body))
            case b"G":
                request, slot, generation, backend_pid, has_fd = _GRANT.unpack(body)
                return Grant(request, slot, generation, backend_pid, bool(has_fd))
            case b"D":
                request, code = _DENY.unpack_from(body)
                text = body[_DENY.size :].decode("utf-8", "replace")
                return Deny(request, DenyCode(code), text)
            case b"R":
                slot, generation, outcome = _RELEASE.unpack(body)
                return Release(slot, generation, Outcome(outcome))
            case b"X":
                return Abandon(*_ABANDON.unpack(body))
    except (struct.error, ValueError) as exc:
        raise ControlError(f"malformed control message {tag!r} ({len(body)} bytes): {exc}") from exc
    raise ControlError(f"unknown control message tag {tag!r}")
