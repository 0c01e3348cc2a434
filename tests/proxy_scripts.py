"""The random scripts of tests/broker/test_proxy_core.py: what two clients send and a server
answers, one transaction at a time, and where the streams are cut on the way.

An exchange is (client bytes, server answer, needs a backend): one round trip, of one of the kinds
a proxied client makes (simple and extended queries, pipelines, errors, a SET, a Flush, a
Terminate, a named Parse the broker refuses), with results of random sizes.
"""

from __future__ import annotations

import random

from pgreuse.wire.frames import frame

NOTICE = frame(b"N", b"SNOTICE\0C00000\0Mafter the transaction\0\0")


def _rows(rng: random.Random) -> bytes:
    big = rng.random() < 0.1  # larger than the 256 KiB receive buffer: a message spans reads
    size = 300_000 if big else rng.randrange(0, 40)
    rows = b"".join(
        frame(b"D", b"\0\x01" + size.to_bytes(4, "big") + rng.randbytes(size))
        for _ in range(rng.randrange(4))
    )
    return frame(b"T", b"\0\x01a\0" + b"\0" * 6 + b"\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0") + rows


def _exchange(rng: random.Random, status: bytes, named: bool = True) -> tuple[bytes, bytes, bool]:
    """(client bytes, server answer, needs a backend) for one round trip ending at ``status``
    (``named``: the exchange may be one that takes no backend)."""
    kinds = ("simple", "big query", "extended", "pipelined", "error", "set", "flush", "quit behind",
             "terminate", "named")  # fmt: skip
    # The last two take no backend; a transaction ends with a ReadyForQuery, which terminate has not.
    kind = rng.choice(
        [k for k in kinds if (named or k not in kinds[-2:]) and (status == b"T" or k != "terminate")]
    )
    ready = frame(b"Z", status)
    if kind == "terminate":  # alone (a forked child's on a shared socket): no answer, and more follows
        return frame(b"X", b""), b"", True
    if kind == "quit behind":  # Terminate in the query's write (the client stays: a forked child's)
        return frame(b"Q", b"select 6\0") + frame(b"X", b""), frame(b"C", b"SELECT 1\0") + ready, True
    if kind == "simple":
        return frame(b"Q", b"select x\0"), _rows(rng) + frame(b"C", b"SELECT 1\0") + ready, True
    if kind == "big query":  # more than a small socket buffer takes: forwarded in several sends
        text = b"select '" + rng.randbytes(50_000).replace(b"\0", b"x") + b"'\0"
        return frame(b"Q", text), frame(b"C", b"SELECT 1\0") + ready, True
    if kind == "extended":
        client = (frame(b"P", b"\0select $1\0\0\0") + frame(b"B", b"\0\0\0\0\0\0\0\0")
                  + frame(b"D", b"P\0") + frame(b"E", b"\0\0\0\0\0") + frame(b"S", b""))  # fmt: skip
        answer = frame(b"1", b"") + frame(b"2", b"") + _rows(rng) + frame(b"C", b"SELECT 1\0") + ready
        return client, answer, True
    if kind == "pipelined":  # two sync points in one write: two answers
        client = frame(b"Q", b"select 1\0") + frame(b"Q", b"select 2\0")
        answer = frame(b"C", b"SELECT 1\0") + frame(b"Z", b"T" if status == b"T" else b"I")
        return client, answer + frame(b"C", b"SELECT 1\0") + ready, True
    if kind == "error":
        return frame(b"Q", b"oops\0"), frame(b"E", b"SERROR\0C42601\0Msyntax\0\0") + ready, True
    if kind == "set":  # changes a reported parameter: the backend goes back dirty
        answer = frame(b"S", b"DateStyle\0German\0") + frame(b"C", b"SET\0") + ready
        return frame(b"Q", b"set datestyle = german\0"), answer, True
    if kind == "flush":  # Flush then a query: the Flush alone needs no backend
        return frame(b"H", b"") + frame(b"Q", b"select 3\0"), frame(b"C", b"SELECT 1\0") + ready, True
    # A named Parse: refused by the broker outside a transaction (answered at Sync), forwarded inside.
    client = frame(b"P", b"s1\0select 1\0\0\0") + frame(b"S", b"")
    return client, frame(b"1", b"") + ready, False


def transaction(rng: random.Random, alone: bool, notice: bool) -> list[tuple[bytes, bytes, bool]]:
    """Exchanges up to ReadyForQuery ``I``. Not ``alone`` (another client queues behind it): the
    first one takes the backend (a refused one would leave it to the other client)."""
    n = rng.choice((1, 1, 1, 2, 3))
    txs = [_exchange(rng, b"T" if i < n - 1 else b"I", named=alone or i > 0) for i in range(n)]
    if rng.random() < 0.15:
        # The next statement's Parse sent along with this one's Sync: at ReadyForQuery 'I' the
        # backend is still needed (what the client sent after the Sync is on it), until its Sync.
        client, answer, needs_backend = txs[-1]
        ahead = frame(b"P", b"\0select 2\0\0\0")
        rest = frame(b"B", b"\0\0\0\0\0\0\0\0") + frame(b"E", b"\0\0\0\0\0") + frame(b"S", b"")
        txs[-1] = (client + ahead, answer, needs_backend)
        txs.append(
            (rest, frame(b"1", b"") + frame(b"2", b"") + frame(b"C", b"SELECT 1\0") + frame(b"Z", b"I"), True)
        )
    if notice and rng.random() < 0.15:
        # A notice after the last ReadyForQuery, cut from it (never exactly at the boundary: the
        # backend would go back before the notice, and the pool's idle watch close it; so not
        # with small buffers either, where a send may stop there).
        client, answer, needs_backend = txs[-1]
        txs[-1] = (client, answer + NOTICE, needs_backend)
    return txs


def cuts(rng: random.Random, data: bytes, most: int, avoid: int = -1) -> list[bytes]:
    """``data`` in up to ``most`` + 1 pieces, never cut at ``avoid``."""
    points = [p for p in range(1, len(data)) if p != avoid]
    chosen = sorted(rng.sample(points, min(len(points), rng.randrange(0, most + 1))))
    return [data[a:b] for a, b in zip([0, *chosen], [*chosen, len(data)], strict=True)]
