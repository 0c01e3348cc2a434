"""SIGHUP and the admin console's ``RELOAD``: re-read the settings and apply what can change live,
without dropping a client.

What applies live (:data:`RELOADABLE`): sizes (``--max-size`` up to the slots the shared-memory table
was made with at start, ``--min-size``, ``--max-waiting``, ``--max-client-conn``), timeouts, the
reset query, the log level, ``--parent-pid`` (how the Gunicorn hook hands a broker over to the
new master of a ``USR2`` upgrade), and who is let in: ``--allow-uid``, ``--allow-gid`` and
``--auth-file``, whose users and passwords are read again at every reload (:mod:`.login_rules`),
for connections from then on. Everything else (the DSN, the socket directory, the port, the
listen address, the pool mode, handoff) is read once at start: a changed value is logged as
needing a restart, and the old one stays. A file that cannot be read or holds a bad value changes
nothing: the reload says why and the broker goes on with the settings it has.

:func:`plan` decides (pure: old and new settings in, the settings to apply and the messages out);
:func:`reload` reads the file and applies the plan to a running broker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs

from .config import BrokerConfig, ConfigError
from .login_rules import read_login_rules
from .password_login import PasswordLogin

if TYPE_CHECKING:
    from .server import Broker

logger = logging.getLogger("pgreuse.broker")

RELOADABLE = frozenset({
    "max_size", "min_size", "max_waiting", "max_client_conn",
    "wait_timeout", "idle_transaction_timeout", "max_lease_time", "max_lifetime", "max_idle",
    "client_login_timeout", "shutdown_timeout", "reset_query", "log_level", "parent_pid",
    "allow_uid", "allow_gid", "auth_file",
})  # fmt: skip


@attrs.frozen
class ReloadPlan:
    config: BrokerConfig  # the settings to run with from now on
    changed: tuple[tuple[str, object, object], ...]  # (field, old, new) applied
    kept: tuple[str, ...]  # why a changed setting keeps its old value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def plan(old: BrokerConfig, new: BrokerConfig, capacity: int) -> ReloadPlan:
    """What of ``new`` applies to a broker running ``old`` whose table has ``capacity`` slots.

    Raises:
        ConfigError: the settings that would apply do not go together (e.g. ``--min-size`` above a
            ``--max-size`` that must keep its old value); nothing of ``new`` applies then.
    """
    applied: dict[str, Any] = {}
    changed: list[tuple[str, object, object]] = []
    kept: list[str] = []
    for field in attrs.fields(BrokerConfig):
        name = field.name
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name not in RELOADABLE:
            shown = (before, after) if name != "dsn" else ("(the one in use)", "(a new one)")
            kept.append(
                f"{_flag(name)} changed from {shown[0]!r} to {shown[1]!r}: it needs a restart of "
                f"the broker; keeping {shown[0]!r}"
            )
            continue
        if name == "max_size" and isinstance(after, int) and after > capacity:
            kept.append(
                f"--max-size {after} is more than the {capacity} slots the broker's shared-memory "
                f"table was made with at start: growing past {capacity} needs a restart; keeping "
                f"--max-size {before}"
            )
            continue
        applied[name] = after
        changed.append((name, before, after))
    try:
        config = attrs.evolve(old, **applied)  # (validates them together)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; nothing was applied") from exc
    return ReloadPlan(config, tuple(changed), tuple(kept))


def _users_read(config: BrokerConfig, passwords: PasswordLogin | None) -> list[str]:
    """What a reload says of the auth file, read again even when its path is the same."""
    if passwords is None:
        return []
    return [f"--auth-file {config.auth_file} read again: {len(passwords.secrets)} users"]


def reload(broker: Broker) -> list[str]:
    """Re-read the broker's settings and apply what can change live; return what it did, for the
    log (done here) and the admin console.

    Raises:
        ConfigError: the settings file is bad; the broker keeps the settings it has.
    """
    source = broker.source
    if source is None or not source.file:
        said = [
            "the broker was started without --config-file, so its settings stay; restart it to "
            "change settings given on its command line"
        ]
        if broker.config.auth_file:
            # The users are read again all the same, as PgBouncer re-reads its auth_file.
            access, passwords = read_login_rules(broker.config)
            broker.apply_login_rules(access, passwords)
            said += _users_read(broker.config, passwords)
        for line in said:
            logger.info("reload: %s", line)
        return said
    new, notes = source.load_with_notes()
    pool = broker.pool
    assert pool is not None
    p = plan(broker.config, new, len(pool.slots))
    cfg = p.config
    # Read before anything applies: an auth file that cannot be read fails the whole reload.
    access, passwords = read_login_rules(cfg)
    broker.config = cfg
    broker.admission.limit = cfg.max_client_conn
    logging.getLogger().setLevel(cfg.log_level)
    if any(n == "parent_pid" for n, _, _ in p.changed):
        broker.watch_parent()
    pool.apply_settings(cfg)
    broker.apply_login_rules(access, passwords)
    notes += _users_read(cfg, passwords)
    done = [f"{_flag(n)} {b!r} -> {a!r}" for n, b, a in p.changed]
    for line in notes:
        logger.info("reload: %s", line)
    for line in p.kept:
        logger.warning("reload: %s", line)
    logger.info("reload of %s: %s", source.file, "; ".join(done) if done else "nothing changed")
    if any(n == "idle_transaction_timeout" for n, _, _ in p.changed):
        notes.append(
            "--idle-transaction-timeout applies to backends opened from now on (--max-lifetime "
            "turns the others over)"
        )
    return [*(["changed: " + "; ".join(done)] if done else ["nothing changed"]), *p.kept, *notes]
