"""The psycopg versions pgreuse's handoff hook is tested on (DESIGN.md §3 rule 11).

The hook rests on psycopg internals (``Connection.wait`` being the one door to the network, the names
of its state-only generators, ``Cursor._convert_query``). Outside the tested range pgreuse refuses to
import rather than risk a swap at the wrong moment.
"""

from __future__ import annotations

import psycopg

OLDEST = (3, 2, 0)
NEWEST_MINOR = (3, 3)  # any 3.3.x


def parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check(version: str = psycopg.__version__) -> None:
    """Raise ImportError naming the installed version and the supported range."""
    v = parse(version)
    if v < OLDEST or v[:2] > NEWEST_MINOR:
        raise ImportError(
            f"pgreuse supports psycopg {'.'.join(map(str, OLDEST))} to "
            f"{'.'.join(map(str, NEWEST_MINOR))}.x, and psycopg {version} is installed: "
            "install a supported psycopg ('pip install \"psycopg>=3.2,<3.4\"') or a pgreuse "
            "release that supports yours"
        )
