"""The chart of ``bench/coordinator.py``: each target's throughput relative to PgBouncer's (or to
dedicated connections' without PgBouncer), grouped by workload, from the run's summary.
"""

from __future__ import annotations

import math
import os
from typing import Any

from _clients import BOUNCER, DEDICATED, HANDOFF, LEASE, POOLED, PROXY


def chart(data: dict[str, Any], summary: dict[str, Any], path: str) -> None:
    import matplotlib  # noqa: PLC0415 -- only needed here, and only with --png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    keys = [k for k in summary if k != LEASE]
    if not keys:
        return
    names, loads, meta = data["targets"], data["meta"]["workloads"], data["meta"]
    norm = summary[keys[0]]["normalized_to"]
    norm = "PgBouncer" if norm == BOUNCER else norm
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    width = 0.8 / len(names)
    pool = meta["pool_size"]
    styles = {  # name: (legend label, colour)
        DEDICATED: ("dedicated (off-budget: a backend per thread)", "#9e9e9e"),
        BOUNCER: (f"PgBouncer (transaction mode, pool {pool})", "#1f77b4"),
        HANDOFF: (f"pgreuse handoff (broker --max-size {pool})", "#d62728"),
        PROXY: ("pgreuse proxy (same broker)", "#ff7f0e"),
        POOLED: (f"psycopg_pool (off-budget: {meta['psycopg_pool_size']} per process)", "#2ca02c"),
    }
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, key in enumerate(keys):
            y = summary[key]["normalized"].get(name, math.nan)
            if not math.isnan(y):
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(y)
        label, color = styles.get(name, (name, None))
        bars = ax.bar(xs, ys, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{loads[k]['title']}\n({loads[k]['unit']})" for k in keys], fontsize=8)
    ax.set_ylabel(f"throughput relative to {norm} (= 1.0; higher is better)")
    title = (
        f"Throughput relative to {norm} (median of per-round ratios, "
        f"{meta['rounds']} round(s) x {meta['duration']:g}s per run)"
    )
    if LEASE in summary:
        ls = summary[LEASE]
        title += (
            f"\npgreuse's client CPU per select 1 over a dedicated connection: {ls['difference_us']:+.1f} µs"
            f"; a claim and its release alone: {ls['alone_us']:.1f} µs"
        )
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    v = meta["versions"]
    fig.text(
        0.01,
        0.01,
        ", ".join(
            [f"PostgreSQL {v['postgresql']}"]
            + ([v["pgbouncer"]] if "pgbouncer" in v else [])
            + [f"pgreuse {v['pgreuse_commit']}", f"pool of {meta['pool_size']}"]
            + [f"{meta['cpus']} CPUs", meta["started"]]
        ),
        fontsize=7,
        color="#555555",
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
