"""Which Django database settings cannot work when backends are shared per transaction.

Contract: :func:`settings_problems` looks only at a ``DATABASES`` entry and returns one message per
setting that would leave session state on a shared backend or hold a backend for longer than a
transaction; each message names the setting, its value, and what to set instead. An empty list means
the settings are fine. :func:`timezone_problem` does the same for the one check that needs the pool's
``TimeZone`` (known only after connecting). Pure functions: no I/O, no Django import.

Used by :class:`pgreuse.django.base.DatabaseWrapper` at each connect (``check_settings``), and by its
validation class, so ``manage.py check --database default`` reports them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: OPTIONS keys that belong to pgreuse; they are taken out before the rest reaches libpq.
PGREUSE_OPTIONS = frozenset({"lease_timeout"})

# PostgreSQL zone names for UTC: one of them as the pool's TimeZone satisfies Django's "UTC".
_UTC_NAMES = frozenset(
    name.lower()
    for base in ("UTC", "UCT", "Universal", "Zulu", "GMT", "GMT0", "GMT+0", "GMT-0", "Greenwich")
    for name in (base, f"Etc/{base}")
)


def settings_problems(alias: str, settings_dict: Mapping[str, Any]) -> list[str]:
    """Messages for the settings of ``DATABASES[alias]`` that cannot work in transaction mode."""
    where = f"DATABASES[{alias!r}]"
    options: Mapping[str, Any] = settings_dict.get("OPTIONS") or {}
    problems: list[str] = []
    if settings_dict.get("DISABLE_SERVER_SIDE_CURSORS") is not True:
        problems.append(
            f"{where}['DISABLE_SERVER_SIDE_CURSORS'] is "
            f"{settings_dict.get('DISABLE_SERVER_SIDE_CURSORS')!r}: outside atomic() Django's "
            "QuerySet.iterator() opens a WITH HOLD cursor, which stays on a backend that pgreuse "
            "lends to others after the statement. Set "
            f"{where}['DISABLE_SERVER_SIDE_CURSORS'] = True (iterator() then reads in chunks)."
        )
    if settings_dict.get("AUTOCOMMIT", True) is not True:
        problems.append(
            f"{where}['AUTOCOMMIT'] is {settings_dict.get('AUTOCOMMIT')!r}: a transaction, and the "
            "backend pgreuse lends for it, would stay open from the first query until you commit. "
            f"Remove {where}['AUTOCOMMIT'] (Django's default, True) and use transaction.atomic() "
            "or ATOMIC_REQUESTS."
        )
    if options.get("pool"):
        problems.append(
            f"{where}['OPTIONS']['pool'] is {options['pool']!r}: pgreuse is the pool (the broker "
            "shares its backends with every process); a psycopg_pool in each process would hold "
            f"pgreuse connections for nothing. Remove {where}['OPTIONS']['pool'] and size the "
            "broker with --max-size instead."
        )
    if options.get("assume_role"):
        problems.append(
            f"{where}['OPTIONS']['assume_role'] is {options['assume_role']!r}: Django would run "
            "SET ROLE on each new connection, and that role would stay on a backend that other "
            "processes use next. Remove it and connect as that role: user="
            f"{options['assume_role']} in the broker's --dsn (and {where}['USER'], or leave USER out)."
        )
    if options.get("prepare_threshold") is not None:
        problems.append(
            f"{where}['OPTIONS']['prepare_threshold'] is {options['prepare_threshold']!r}: "
            "psycopg names server-side prepared statements per connection, and the names would "
            "collide or vanish on shared backends. Remove it (Django's default, None, is what "
            "pgreuse needs)."
        )
    for key in PGREUSE_OPTIONS & set(options):
        if key == "lease_timeout" and not _positive_number(options[key]):
            problems.append(
                f"{where}['OPTIONS']['lease_timeout'] is {options[key]!r}: it is the longest a "
                "call waits for the broker's answer, in seconds; give a number > 0 (default 300)."
            )
    return problems


def _positive_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def same_zone(pool_timezone: str | None, wanted: str) -> bool:
    """Whether a pool whose backends report ``pool_timezone`` already is in zone ``wanted``.

    Exact names match; so do two names of UTC (PostgreSQL reports ``Etc/UTC`` where Django asks
    for ``UTC``): neither has an offset or daylight saving, so values come out the same.
    """
    if pool_timezone is None:
        return False
    if pool_timezone == wanted:
        return True
    return pool_timezone.lower() in _UTC_NAMES and wanted.lower() in _UTC_NAMES


def timezone_problem(
    alias: str,
    *,
    use_tz: bool,
    django_time_zone: str | None,
    database_time_zone: str | None,
    wanted: str | None,
    pool_timezone: str | None,
    dbname: str,
) -> str | None:
    """The message for a Django time zone that differs from the pool's ``TimeZone``, or ``None``.

    ``wanted`` is Django's ``connection.timezone_name``: the zone Django would ``SET TIME ZONE`` to on
    each new connection. On a shared backend that SET would reach other processes (or be put back
    by pgreuse after the statement), so the pool must already use that zone.
    """
    if not wanted or same_zone(pool_timezone, wanted):
        return None
    where = f"DATABASES[{alias!r}]"
    broker_fix = (
        f"or make the pool use {wanted!r}: add options='-c TimeZone={wanted}' to the broker's "
        f"--dsn, or run ALTER DATABASE {dbname} SET timezone TO '{wanted}' and restart the broker"
    )
    if not use_tz:
        return (
            f"settings.TIME_ZONE is {django_time_zone!r} with USE_TZ = False, so Django would run "
            f"SET TIME ZONE {wanted!r} on each new connection, but the pgreuse pool's backends use "
            f"TimeZone={pool_timezone!r} and are shared: a SET cannot stay on them. Set "
            f"TIME_ZONE = {pool_timezone!r} in settings, {broker_fix}."
        )
    setting = (
        f"{where}['TIME_ZONE'] is {database_time_zone!r}"
        if database_time_zone is not None
        else f"USE_TZ = True without {where}['TIME_ZONE']"
    )
    return (
        f"{setting}, so Django would run SET TIME ZONE {wanted!r} on each new connection, but the "
        f"pgreuse pool's backends use TimeZone={pool_timezone!r} and are shared: a SET cannot stay "
        f"on them. Set {where}['TIME_ZONE'] = {pool_timezone!r} (datetimes then come back aware "
        f"in that zone rather than in UTC), "
        f"{broker_fix}."
    )
