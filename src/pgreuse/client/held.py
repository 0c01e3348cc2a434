"""What a connection holds during a transaction: :class:`Lease`, the public view (``conn.lease``),
and ``_Held``, the claim itself as the lease code keeps it."""

from __future__ import annotations

import attrs

from .. import telemetry


@attrs.frozen
class Lease:
    """The backend a connection holds right now (``conn.lease``; ``None`` at rest)."""

    slot: int
    generation: int
    backend_pid: int  # the real PostgreSQL backend pid; conn.info.backend_pid is the parking key
    waited: float  # seconds it waited in the table's queue (0: it found one idle)
    started: float  # time.monotonic() when claimed


@attrs.define(slots=True)
class _Held:
    """The claim held now (``Lease`` is built from it only when asked: it is per transaction)."""

    slot: int
    generation: int
    backend_pid: int
    started: float
    fd_number: int  # libpq's socket fd, now pointing at the backend
    waited: float = 0.0  # seconds in the table's queue (telemetry.LeaseInfo); 0 for a claim
    bucket: int = 0  # the wait's bucket in the table's histogram
    watched: bool = False  # telemetry records this lease (asked once, at the grant)
    span: telemetry.LeaseSpan | None = None
