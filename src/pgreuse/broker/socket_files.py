"""The broker's socket files: one a killed broker left behind is removed by the next broker, or by
the supervisor when it stops (kept apart from ``server.py`` so the supervisor need not import it)."""

from __future__ import annotations

import contextlib
import os
import socket

from .config import BrokerConfig


def remove_if_stale(path: str, kind: int) -> bool:
    """Remove the socket file ``path`` if nobody listens on it (a broker that was killed left it).
    False: somebody does."""
    if not os.path.exists(path):
        return True
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        probe.close()
    return False


def remove_stale_sockets(config: BrokerConfig) -> None:
    """The socket files of a broker that was killed, if no broker listens on them now."""
    remove_if_stale(config.pg_socket, socket.SOCK_STREAM)
    remove_if_stale(config.control_socket, socket.SOCK_SEQPACKET)
