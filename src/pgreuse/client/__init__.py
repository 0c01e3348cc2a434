"""The worker side: the leasing psycopg connections (sync and asyncio) and the control channel."""

from .psycopg_version import check as _check_psycopg

_check_psycopg()  # before the modules that subclass psycopg's internals are even imported

from .async_connection import AsyncConnection, connect_async  # noqa: E402
from .connection import Connection, connect  # noqa: E402
from .held import Lease  # noqa: E402

__all__ = ["AsyncConnection", "Connection", "Lease", "connect", "connect_async"]
