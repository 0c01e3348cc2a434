"""Who is at the other end of a Unix socket (``SO_PEERCRED``), for both ends of pgreuse.

The broker lets in only processes of its own user (and root); a worker talks only to a broker of
its own user (or root), so that a socket planted by someone else is never trusted with a lease.
"""

from __future__ import annotations

import os
import socket
import struct

_PEERCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def trusted_uids() -> frozenset[int]:
    """The users a pgreuse process trusts at the other end: itself, and root."""
    return frozenset({os.geteuid(), 0})
