"""The pools this process reports on: one :class:`PoolTelemetry` per pool and database, in a
registry that the pool-wide instruments' callbacks walk when the SDK collects.

Apart from their registration (:mod:`.telemetry_reporter`), which needs the providers, because the
providers' instruments (:mod:`.telemetry_instruments`) read this registry: kept together, the two
would import each other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .telemetry_reporter import _TableReader


@attrs.define(eq=False)
class PoolTelemetry:
    """What a connection needs to report its leases, shared by every connection to one pool.

    ``name`` follows the conventions' fallback for pools without a name of their own:
    ``<address>:<port>/<database>``, here ``<socket dir>:<port>/<dbname>``.
    """

    name: str
    database: str
    table_path: str
    attributes: dict[str, str]  # on every metric point: the pool name
    span_attributes: dict[str, str | int]
    reader: _TableReader


_pools: dict[tuple[str, int, str], PoolTelemetry] = {}


def _after_fork_in_child() -> None:
    for pool in _pools.values():
        pool.reader.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def registered_pools() -> Sequence[PoolTelemetry]:
    """The pools this process reports on (for tests and diagnostics)."""
    return list(_pools.values())
