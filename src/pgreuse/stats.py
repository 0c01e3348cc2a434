"""What ``python -m pgreuse stats`` shows: pure functions of a :class:`~pgreuse.snapshot.Snapshot`.

:func:`summarize` turns a snapshot into plain data (the ``--json`` output, stable keys); :func:`render`
turns the same data into the text table. Neither reads a clock, a file or a process: the caller passes
``now`` (both clocks) and whether the broker process is alive, so tests build a snapshot by hand and
compare strings.

Wait-time quantiles come from the table's histogram, so they are bucket upper bounds ("p99 <= 25 ms"),
not exact values; the mean wait is exact (total queued time / number of leases that queued).
"""

from __future__ import annotations

import math
import time
from typing import Any

import attrs

from .shm import COUNTERS
from .snapshot import WAIT_BUCKETS, Snapshot, histogram_quantile
from .wire.states import SlotState

QUANTILES = (0.5, 0.9, 0.99)
# What an operator looks at first: how many are free, how many are out.
_STATE_ORDER = (SlotState.IDLE, SlotState.LENT, SlotState.CONNECTING, SlotState.RESETTING, SlotState.CLOSED)


@attrs.frozen
class Clock:
    """The two clocks a view needs: slots record lease starts in CLOCK_MONOTONIC ns (the same in every
    process), the header records the broker's start in epoch seconds."""

    monotonic_ns: int
    wall: float

    @classmethod
    def now(cls) -> Clock:
        return cls(time.monotonic_ns(), time.time())


def summarize(
    snap: Snapshot, clock: Clock, *, path: str = "", broker_alive: bool | None = None
) -> dict[str, Any]:
    """The snapshot as JSON-ready data: header, slot counts, per-slot rows, counters, wait quantiles."""
    c = snap.counters
    by_state = {s.name.lower(): snap.count(s) for s in _STATE_ORDER}
    slots = []
    for s in snap.slots:
        lent = s.state is SlotState.LENT and s.lease_started_ns > 0
        slots.append(
            {
                "slot": s.index,
                "state": s.state.name.lower(),
                "generation": s.generation,
                "backend_pid": s.backend_pid or None,
                "holder_pid": s.holder_pid or None,
                "held_seconds": max(0, clock.monotonic_ns - s.lease_started_ns) / 1e9 if lent else None,
                "leases": s.leases,
                "use_seconds": s.use_ns / 1e9,
                "opened_at": s.opened_at or None,
                "dirty": s.dirty,
                "last_close_reason": s.close_reason.name.lower() if s.close_reason else None,
            }
        )
    waits = c["waits"]
    opened = c["backends_opened"]
    return {
        "path": path,
        "broker_pid": snap.broker_pid,
        "broker_alive": broker_alive,
        "generation": snap.generation,
        "database": snap.database,
        "user": snap.user,
        "started_at": snap.started_at,
        "uptime_seconds": max(0.0, clock.wall - snap.started_at),
        "max_size": snap.max_size,
        "min_size": snap.min_size,
        "wait_timeout": snap.wait_timeout,
        "slots_by_state": by_state,
        "counters": {name: c[name] for name in COUNTERS},
        "closed_by_reason": dict(snap.closed_by_reason),
        "wait": {
            "quantiles": {
                f"p{round(q * 100)}": _finite(histogram_quantile(snap.wait_histogram, q)) for q in QUANTILES
            },
            "mean_queued_seconds": c["wait_ns"] / waits / 1e9 if waits else 0.0,
            "histogram": [
                {"le": _finite(b), "count": n}
                for b, n in zip((*WAIT_BUCKETS, math.inf), snap.wait_histogram, strict=True)
            ],
        },
        "mean_use_seconds": c["use_ns"] / c["leases"] / 1e9 if c["leases"] else 0.0,
        "mean_connect_seconds": c["connect_ns"] / opened / 1e9 if opened else 0.0,
        "slots": slots,
    }


def _finite(x: float) -> float | None:
    # JSON has no infinity: the open-ended bucket is written as null ("more than the last bound").
    return None if math.isinf(x) else x


def render(summary: dict[str, Any]) -> str:
    """The text view of :func:`summarize`'s result (what a terminal shows, refreshed by ``--watch``)."""
    s = summary
    c = s["counters"]
    alive = {True: "", False: " (NOT RUNNING: this table is what it left)", None: ""}[s["broker_alive"]]
    lines = [
        f"pgreuse broker pid {s['broker_pid']}{alive}  up {fmt_duration(s['uptime_seconds'])}  "
        f"db {s['database']!r} user {s['user']!r}",
        f"table {s['path'] or '-'}",
        f"pool  max {s['max_size']}  min {s['min_size']}  wait-timeout {s['wait_timeout']:g}s  "
        f"pending {c['pending']} (peak {c['max_pending']})  "
        f"clients {c['clients']}  parked {c['parked']}",
        "slots " + "  ".join(f"{name} {n}" for name, n in s["slots_by_state"].items()),
        "",
        f"{'SLOT':>4}  {'STATE':<10} {'GEN':>4} {'BACKEND':>8} {'HOLDER':>8} {'HELD':>9} "
        f"{'LEASES':>8} {'IN USE':>9}  NOTE",
    ]
    for row in s["slots"]:
        note = []
        if row["dirty"]:
            note.append("dirty")
        if row["state"] == "closed" and row["last_close_reason"]:
            note.append(f"closed: {row['last_close_reason']}")
        held = fmt_duration(row["held_seconds"]) if row["held_seconds"] is not None else "-"
        lines.append(
            f"{row['slot']:>4}  {row['state']:<10} {row['generation']:>4} "
            f"{row['backend_pid'] or '-':>8} {row['holder_pid'] or '-':>8} {held:>9} "
            f"{row['leases']:>8} {fmt_duration(row['use_seconds']):>9}  {', '.join(note)}".rstrip()
        )
    w = s["wait"]
    quantiles = "  ".join(f"{name} {fmt_bound(v)}" for name, v in w["quantiles"].items())
    waited = c["waits"]
    share = f" ({100 * waited / c['leases']:.1f}%)" if c["leases"] else ""
    closed = ", ".join(f"{r} {n}" for r, n in s["closed_by_reason"].items() if n) or "none"
    lines += [
        "",
        f"leases   {c['leases']} granted, {waited} queued first{share}, {c['timeouts']} timed out, "
        f"{c['unavailable']} denied (PostgreSQL unreachable)",
        f"wait     {quantiles}  mean when queued {fmt_duration(w['mean_queued_seconds'])}",
        f"use      mean {fmt_duration(s['mean_use_seconds'])} per lease",
        f"backends {c['backends_opened']} opened (mean connect {fmt_duration(s['mean_connect_seconds'])}), "
        f"{c['backends_closed']} closed, {c['connect_failures']} connect failures, "
        f"{c['resets']} resets, {c['protocol_errors']} clients dropped for bad input",
        f"closed   {closed}",
    ]
    return "\n".join(lines) + "\n"


def fmt_duration(seconds: float) -> str:
    """A short human duration: ``850us``, ``12.3ms``, ``4.2s``, ``3m07s``, ``2h05m``, ``3d04h``."""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, sec = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_bound(seconds: float | None) -> str:
    """A histogram bucket bound; ``None`` is the open-ended bucket past the last bound."""
    if seconds is None:
        return f">{fmt_duration(WAIT_BUCKETS[-1])}"
    return f"<={fmt_duration(seconds)}"
