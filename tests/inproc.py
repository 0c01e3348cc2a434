"""A broker's Pool and ProxySessions on the running loop, over socketpairs: for tests that drive the
proxy's callbacks by hand (no broker process, no PostgreSQL: what is tested is how the broker cuts and
forwards the byte streams it is given)."""

from __future__ import annotations

import asyncio
import socket

from pgreuse.broker.backend_target import parse_target
from pgreuse.broker.config import BrokerConfig
from pgreuse.broker.pool import Backend, Pool
from pgreuse.broker.proxy import ProxySession, ProxyStats, PyProxySession, PyProxyStats
from pgreuse.shm import Table, table_path
from pgreuse.wire.states import SlotState


def in_process_pool(
    d: str, port: int, wait_timeout: float = 5.0, max_size: int = 1, reset_every_lease: bool = False
) -> Pool:
    """A Pool on the running loop, no backend open, over a fresh table (``pool.table``)."""
    config = BrokerConfig(dsn=f"host={d} port=1", socket_dir=d, port=port, max_size=max_size,
                          min_size=0, wait_timeout=wait_timeout,
                          reset_every_lease=reset_every_lease)  # fmt: skip
    table = Table.create(table_path(d, port), max_size=max_size, min_size=0, wait_timeout=wait_timeout,
                         database="t", user="t")  # fmt: skip
    return Pool(config, parse_target(f"host={d} port=1 user=t dbname=t"), table, asyncio.get_running_loop())


def open_fake_backend(pool: Pool, index: int = 0) -> tuple[Backend, socket.socket]:
    """Make slot ``index`` an idle backend whose server end is the returned socket."""
    server, backend_end = socket.socketpair()
    server.setblocking(False)
    b = pool.slots[index]
    b.generation, b.sock, b.pid = 1, server, 4242 + index
    pool._transition(b, SlotState.CONNECTING, "test")
    pool._transition(b, SlotState.IDLE, "test")
    pool._make_idle(b)
    return b, backend_end


def in_process_session(
    pool: Pool, *, key: int = 1, reference: bool = False, session_mode: bool = False
) -> tuple[PyProxySession, socket.socket]:
    """A started ProxySession on ``pool`` (``reference``: the pure-Python one even where the C core
    runs), and the client's end of its socket."""
    inner, outer = socket.socketpair()
    inner.setblocking(False)
    cls, stats = (PyProxySession, PyProxyStats()) if reference else (ProxySession, ProxyStats())
    session = cls(
        inner, pool, parking_key=key, peer_pid=1, session_mode=session_mode, stats=stats,
        user="t", database="t", application_name="", addr="unix",
    )  # fmt: skip
    session.start(b"")
    return session, outer
