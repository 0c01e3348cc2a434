"""Broker <-> worker lease messages (control protocol, versioned). Performs no I/O.

The control channel is an ``AF_UNIX``/``SOCK_SEQPACKET`` socket, so the kernel keeps message boundaries
and an fd passed with ``SCM_RIGHTS`` rides on exactly the message it belongs to: one packet is one
message, ``encode()`` makes it and ``decode()`` reads it. Every message starts with a one-byte tag.

Conversation::

    worker -> broker  Hello(version, pid)          broker -> worker  Welcome(version, broker_pid, max_size,
                                                                          proxy_only, holder)
                                                                   or Deny(0, BAD_REQUEST, why) if
                                                                      the versions differ
                                                   broker -> worker  Fd(slot, generation, backend_pid)
                                                                        + fd, for every open slot at
                                                                        once and every new one later
    worker -> broker  Want(slot)                   (it lacks the fd of that slot's generation)
    worker -> broker  Poke()                       (it gave a slot back while the proxy had waiters)
    worker -> broker  Release(slot, generation, outcome)   (a dirty or broken end)
    worker -> broker  Dirty(parking)               (a statement about to go through the proxy on
                                                    that parking connection leaves session state)

A worker never waits on this channel for a backend (DESIGN.md §4): it claims an idle slot in the
shared-memory table with a compare-and-swap, using its holder id from the Welcome, or sends its
transaction through the broker's proxy on its parking connection. ``proxy_only``: the pool's backends
use TLS, so no fd can be handed off, and ``holder`` is 0 (nothing may be claimed).

:class:`Deny` is also what the broker's pool answers its proxy sessions (inside the broker).
"""

from __future__ import annotations

import enum
import struct

import attrs

VERSION = 3  # 2: Welcome.proxy_only; 3: claims in the table (Welcome.holder, Fd, Want, Poke, Dirty)
MAX_MESSAGE = 4096  # every message is small; a larger packet is a protocol violation


class ControlError(ValueError):
    """Bytes that are not a valid control message."""


class DenyCode(enum.IntEnum):
    TIMEOUT = 1  # waited longer than the broker's --wait-timeout
    UNAVAILABLE = 2  # PostgreSQL cannot be reached
    CLOSED = 3  # the broker is shutting down
    BAD_REQUEST = 4  # e.g. an unknown parking connection
    TOO_MANY = 5  # too many waiters
    CANCELED = 6  # a CancelRequest arrived while the request waited for a backend


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
    holder: int = 0  # this channel's holder id in the slot words (0: it may claim nothing)


@attrs.frozen
class Deny:
    request: int
    code: DenyCode
    message: str


@attrs.frozen
class Fd:
    slot: int
    generation: int  # the slot's full generation (the slot word holds its low 24 bits)
    backend_pid: int


@attrs.frozen
class Want:
    slot: int


@attrs.frozen
class Poke:
    pass


@attrs.frozen
class Release:
    slot: int
    generation: int
    outcome: Outcome


@attrs.frozen
class Dirty:
    parking: int


Message = Hello | Welcome | Deny | Fd | Want | Poke | Release | Dirty

_HELLO = struct.Struct("!HI")
_WELCOME = struct.Struct("!HIIBI")
_DENY = struct.Struct("!IB")
_FD = struct.Struct("!HII")
_WANT = struct.Struct("!H")
_RELEASE = struct.Struct("!HIB")
_DIRTY = struct.Struct("!I")


def encode(msg: Message) -> bytes:
    """Return the packet for ``msg``."""
    match msg:
        case Hello(version, pid):
            return b"H" + _HELLO.pack(version, pid)
        case Welcome(version, broker_pid, max_size, proxy_only, holder):
            return b"W" + _WELCOME.pack(version, broker_pid, max_size, proxy_only, holder)
        case Deny(request, code, message):
            return b"D" + _DENY.pack(request, code) + message.encode()[: MAX_MESSAGE - 16]
        case Fd(slot, generation, backend_pid):
            return b"F" + _FD.pack(slot, generation, backend_pid)
        case Want(slot):
            return b"A" + _WANT.pack(slot)
        case Poke():
            return b"P"
        case Release(slot, generation, outcome):
            return b"R" + _RELEASE.pack(slot, generation, outcome)
        case Dirty(parking):
            return b"S" + _DIRTY.pack(parking)
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
                if len(body) == _WELCOME.size - 4:  # version 2's Welcome: its version tells
                    version, broker_pid, max_size, proxy_only = struct.unpack("!HIIB", body)
                    return Welcome(version, broker_pid, max_size, bool(proxy_only))
                version, broker_pid, max_size, proxy_only, holder = _WELCOME.unpack(body)
                return Welcome(version, broker_pid, max_size, bool(proxy_only), holder)
            case b"D":
                request, code = _DENY.unpack_from(body)
                text = body[_DENY.size :].decode("utf-8", "replace")
                return Deny(request, DenyCode(code), text)
            case b"F":
                return Fd(*_FD.unpack(body))
            case b"A":
                return Want(*_WANT.unpack(body))
            case b"P":
                if body:
                    raise ValueError("Poke has no body")
                return Poke()
            case b"R":
                slot, generation, outcome = _RELEASE.unpack(body)
                return Release(slot, generation, Outcome(outcome))
            case b"S":
                return Dirty(*_DIRTY.unpack(body))
    except (struct.error, ValueError) as exc:
        raise ControlError(f"malformed control message {tag!r} ({len(body)} bytes): {exc}") from exc
    raise ControlError(f"unknown control message tag {tag!r}")
