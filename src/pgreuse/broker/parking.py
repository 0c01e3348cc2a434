"""A client's startup checked against the pool, and the parking it gets; cancel requests by parking key.

A StartupMessage is accepted when its user, database and parameters are those every shared backend
was opened with (a parameter that changes how values are encoded must equal the pool's: DESIGN.md
§3 rule 7). The client then *parks*: it is answered with the pool's parameters and a parking key
and secret (:mod:`.greeting`), and a CancelRequest naming that key and secret is forwarded to the
backend the connection holds at that moment (:meth:`~.pool.Pool.cancel`).
"""

from __future__ import annotations

import logging

from ..wire import frames
from .broker_fields import BrokerFields
from .connector import BackendConnectError
from .login import StartupRefused, os_user_of

logger = logging.getLogger("pgreuse.broker")

# Startup parameters a client may send that do not change how values are encoded (accepted, shown in
# the stats) — everything else must match the pool or is refused.
HARMLESS_PARAMETERS = frozenset({"application_name", "fallback_application_name"})
# Startup parameters that change encoding/parsing: must equal the pool's (DESIGN.md §3 rule 7).
MATCHED_PARAMETERS = ("client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
                      "standard_conforming_strings")  # fmt: skip
PARKING_KEY_BASE = 1 << 30  # above any real pid (pid_max <= 2**22): a parking key is never a pid


class Parking:
    """A parked libpq connection: what its CancelRequests may name."""

    def __init__(self, key: int, secret: int, peer_pid: int, application_name: str) -> None:
        self.key = key
        self.secret = secret
        self.peer_pid = peer_pid
        self.application_name = application_name


class Parkings(BrokerFields):
    """Mixin of :class:`pgreuse.broker.server.Broker`."""

    async def _startup(
        self, packet: frames.StartupMessage, peer_pid: int, authenticated: bool = False
    ) -> tuple[bytes, Parking]:
        """``authenticated``: the client logged in with a password of --auth-file, as any user in it."""
        assert self.pool is not None
        if packet.version_major != 3:
            raise StartupRefused("0A000", f"unsupported protocol version {packet.version_major}")
        params = packet.params
        pool_user, pool_db = self.target.user, self.target.database
        user = params.get("user", "")
        # libpq's default user is the client's OS user name: accepted too (the pool's user is used).
        if not authenticated and user not in (pool_user, self.os_user) and user != os_user_of(peer_pid):
            raise StartupRefused(
                "28000",
                f'user "{user}" does not match this broker\'s pool (user "{pool_user}")',
                hint=f"connect with user={pool_user}, or leave user out",
            )
        database = params.get("database", user)
        if database != pool_db:
            raise StartupRefused(
                "3D000",
                f'database "{database}" is not served by this broker (its pool is database "{pool_db}")',
                hint=f"connect with dbname={pool_db}",
            )
        if params.get("replication"):
            raise StartupRefused("0A000", "replication connections cannot go through pgreuse")
        try:
            pool_params = await self.pool.wait_parameters(self.config.wait_timeout)
        except BackendConnectError as exc:
            raise StartupRefused("08006", f"pgreuse broker cannot reach PostgreSQL: {exc}") from exc
        for name, value in params.items():
            if name in ("user", "database") or name in HARMLESS_PARAMETERS:
                continue
            if name == "options":
                if value.strip():
                    raise StartupRefused(
                        "0A000",
                        f"startup options {value!r} cannot be honoured: backends are shared "
                        "and were opened with the pool's settings",
                        hint="remove options= (or PGOPTIONS) from the client, or set them on "
                        "the broker's --dsn",
                    )
                continue
            if name == "extra_float_digits" and _shortest_floats(value, pool_params):
                continue  # JDBC sends 3; from PostgreSQL 12 every value > 0 means the same output
            if name.startswith("_pq_."):
                continue  # protocol options: answered with NegotiateProtocolVersion below
            matched = next((m for m in MATCHED_PARAMETERS if m.lower() == name.lower()), None)
            if matched is not None:
                have = pool_params.get(matched, "")
                if _norm(value) != _norm(have):
                    raise StartupRefused(
                        "0A000",
                        f"{matched}={value!r} differs from the pool's {matched}={have!r}; "
                        "backends are shared, so every client must use the pool's value",
                        hint=f"remove {matched} from the client's settings, or set it on the "
                        "broker's --dsn (options='-c ...')",
                    )
                continue
            raise StartupRefused(
                "0A000",
                f"startup parameter {name}={value!r} cannot be honoured: backends are shared",
                hint="set it with SET inside each transaction, or on the broker's --dsn",
            )
        self._next_key += 1
        parking = Parking(
            self._next_key,
            self.parking_secrets.next(),
            peer_pid,
            params.get("application_name", ""),
        )
        self.parkings[parking.key] = parking
        assert self.table is not None
        self.table.set("parked", len(self.parkings))
        negotiate = b""
        if packet.version_minor > 0:
            unrecognized = [k for k in params if k.startswith("_pq_.")]
            negotiate = frames.negotiate_protocol_version(0, unrecognized)
        reply = self.greeting.reply(
            pool_params, parking.application_name, parking.key, parking.secret, negotiate
        )
        return reply, parking

    def _cancel(self, key: int, secret: int) -> None:
        assert self.pool is not None
        parking = self.parkings.get(key)
        if parking is None or parking.secret != secret:
            logger.info("cancel request with an unknown key %d ignored", key)
            return
        self.pool.cancel(key)


def _shortest_floats(value: str, pool_params: dict[str, str]) -> bool:
    """True if ``extra_float_digits=value`` gives the output every backend already gives.

    From PostgreSQL 12, any value above 0 selects the shortest exact float output, which is the
    default (1): a client asking for 2 or 3 (JDBC) sees no difference on a shared backend.
    """
    try:
        digits = int(value)
        major = int(pool_params.get("server_version", "0").split(".")[0].split(" ")[0])
    except ValueError:
        return False
    return digits > 0 and major >= 12


def _norm(value: str) -> str:
    return value.replace(" ", "").replace("-", "").replace("_", "").lower()
