"""The benchmark's table: medians over rounds, per-round ratios, and the text report of a run
(``bench/coordinator.py`` measures; this turns its JSON into what it prints, also for ``--replot``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from _clients import BOUNCER, DEDICATED, HANDOFF, LEASE, PROXY


def _median(xs: Iterable[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return statistics.median(vals) if vals else math.nan


def _ratio(runs: list[dict[str, Any]], workload: str, num: str, den: str) -> float:
    """Median over rounds of the ratio of ``num``'s rate to ``den``'s within the round."""
    by = {(r["round"], r["target"]): r["rate"] for r in runs if r["workload"] == workload}
    rounds = sorted({rnd for rnd, _ in by})
    return _median(by[rnd, num] / by[rnd, den] for rnd in rounds if (rnd, num) in by and (rnd, den) in by)


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds per workload and target, and the per-round ratios' medians."""
    runs: list[dict[str, Any]] = data["runs"]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(r["workload"] for r in runs):
        mine = [r for r in runs if r["workload"] == key]
        cells = {}
        for name in dict.fromkeys(r["target"] for r in mine):
            rs = [r for r in mine if r["target"] == name]
            cells[name] = {
                f: _median(r[f] for r in rs) for f in ("rate", "median_us", "cpu_user_us", "cpu_sys_us")
            }
        norm = BOUNCER if BOUNCER in cells else DEDICATED
        out[key] = {
            "targets": cells,
            "handoff_per_pgbouncer": _ratio(runs, key, HANDOFF, BOUNCER),
            "handoff_per_dedicated": _ratio(runs, key, HANDOFF, DEDICATED),
            "proxy_per_pgbouncer": _ratio(runs, key, PROXY, BOUNCER),
            "normalized_to": norm,
            "normalized": {name: _ratio(runs, key, name, norm) for name in cells},
        }
    if data["lease"]:
        ls = data["lease"]
        out[LEASE] = {
            "dedicated_us": _median(x["dedicated_us"] for x in ls),
            "handoff_us": _median(x["handoff_us"] for x in ls),
            "difference_us": _median(x["handoff_us"] - x["dedicated_us"] for x in ls),
            "per_round_us": [round(x["handoff_us"] - x["dedicated_us"], 1) for x in ls],
            # (absent from runs before it was measured)
            "alone_us": _median(x.get("alone_us", math.nan) for x in ls),
        }
    return out


def _cell(summary: dict[str, Any], name: str, unit: str) -> str:
    c = summary["targets"].get(name)
    if c is None or math.isnan(c["rate"]):
        return "n/a"
    if not math.isnan(c["median_us"]):
        return f"{c['median_us']:.1f} µs, {c['rate']:,.0f} {unit}"
    return f"{c['rate']:,.0f} {unit}"


def _x(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.2f}x"


def report(data: dict[str, Any], summary: dict[str, Any]) -> str:
    meta, names = data["meta"], data["targets"]
    v = meta["versions"]
    lines = [
        f"PostgreSQL {v['postgresql']}, psycopg {v['psycopg']}, pgreuse {v['pgreuse_commit']}, "
        f"{v.get('pgbouncer', 'no PgBouncer')}; {meta['cpus']} CPUs; pool of {meta['pool_size']} "
        f"(psycopg_pool: {meta['psycopg_pool_size']} per process); {meta['duration']}s per run, "
        f"{meta['rounds']} round(s); medians over rounds, ratios per round then median",
        "",
        f"| workload | {' | '.join(names)} | handoff / PgBouncer | handoff / dedicated | proxy / PgBouncer |",
        "|---|" + "---:|" * (len(names) + 3),
    ]
    loads = meta["workloads"]
    for key, s in summary.items():
        if key == LEASE:
            continue
        cells = [_cell(s, n, loads[key]["unit"]) for n in names]
        ratios = [s["handoff_per_pgbouncer"], s["handoff_per_dedicated"], s["proxy_per_pgbouncer"]]
        lines.append(f"| {loads[key]['title']} | {' | '.join(cells)} | {' | '.join(map(_x, ratios))} |")
    if LEASE in summary:
        ls = summary[LEASE]
        lines += [
            "",
            f"lease + release (pgreuse-handoff - dedicated, client CPU per select 1, side by side): "
            f"{ls['difference_us']:+.1f} µs per transaction (dedicated {ls['dedicated_us']:.1f} µs, "
            f"handoff {ls['handoff_us']:.1f} µs; per round {ls['per_round_us']})",
            f"claim + release alone (no statement, client CPU): {ls['alone_us']:.1f} µs",
        ]
    poolers = [n for n in (BOUNCER, HANDOFF, PROXY) if n in names]
    cpu_rows = [
        f"| {loads[key]['title']} | "
        + " | ".join(
            "n/a"
            if n not in s["targets"]
            else f"{s['targets'][n]['cpu_user_us']:.1f} + {s['targets'][n]['cpu_sys_us']:.1f} µs"
            for n in poolers
        )
        + " |"
        for key, s in summary.items()
        if key != LEASE
    ]
    if poolers and cpu_rows:
        lines += [
            "",
            "Pooler CPU per transaction (per connection for connect), user + system, from /proc/<pid>/stat "
            "(the broker is one process for handoff and proxy)",
            "",
            f"| workload | {' | '.join(poolers)} |",
            "|---|" + "---:|" * len(poolers),
            *cpu_rows,
        ]
    return "\n".join(lines)
