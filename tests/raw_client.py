"""A bare protocol-3 client on a broker's PostgreSQL socket, built on pgreuse's own sans-IO framing:
for what psycopg's blocking API cannot show (pipelined queries, cut messages, Terminate racing an
answer)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

from pgreuse.wire import frames


class RawClient:
    def __init__(self, broker) -> None:  # type: ignore[no-untyped-def]
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(15)
        self.sock.connect(os.path.join(broker.socket_dir, f".s.PGSQL.{broker.port}"))
        self.sock.sendall(frames.startup_message({"user": "postgres", "database": broker.dbname}))
        self.reader = frames.FrameReader()
        assert self.until_ready(1)[-1][0] == b"Z"

    def until_ready(self, count: int) -> list[tuple[bytes, bytes]]:
        """Every message up to the ``count``-th ReadyForQuery, as (type, body)."""
        got: list[tuple[bytes, bytes]] = []
        while count:
            msg = self.reader.next_message()
            if msg is None:
                data = self.sock.recv(65536)
                assert data, "the broker closed the connection"
                self.reader.feed(data)
                continue
            got.append((msg.type, bytes(msg.body)))
            count -= msg.type == b"Z"
        return got

    def close(self) -> None:
        self.sock.close()


def messages(sock: socket.socket) -> Iterator[frames.Message]:
    """Each message the peer sends, read as needed, until it closes the connection."""
    reader = frames.FrameReader()
    while True:
        while (msg := reader.next_message()) is not None:
            yield msg
        data = sock.recv(65536)
        if not data:
            return
        reader.feed(data)
