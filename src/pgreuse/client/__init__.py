"""The worker side: the leasing psycopg connection and its control channel."""

from .connection import Connection, Lease, connect

__all__ = ["Connection", "Lease", "connect"]
