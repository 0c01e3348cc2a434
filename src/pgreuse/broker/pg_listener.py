"""The PostgreSQL-protocol listener: a client connection from accept to its end.

``<socket-dir>/.s.PGSQL.<port>`` (and ``--listen-addr``, TCP) speaks the PostgreSQL protocol. On the
Unix socket a client is let in by its uid (:mod:`.access`); on TCP (loopback only, or any address with
``--auth-file``) it logs in with a password of ``--auth-file`` when there is one
(:mod:`.password_login`). It sends its startup within ``--client-login-timeout`` and counts toward
``--max-client-conn`` from its accept (:mod:`.login`). Its startup is checked against the pool
(:mod:`.parking`); then it parks, or has its queries proxied (:mod:`.proxy`), until it leaves. The
database ``pgreuse`` is the admin console (:mod:`.admin`), for the broker's own user and root, on the
Unix socket only.

Malformed input closes that client with a log line; it never takes the broker or a backend down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, cast

from ..wire import frames
from . import admin
from .access import Peer
from .broker_fields import BrokerFields
from .login import (
    OVER_LIMIT_GRACE,
    LoginTimeout,
    StartupRefused,
    login_timeout_error,
    read_startup,
    startup_failure,
)
from .parking import Parking
from .password_login import ClientLeft
from .proxy import ProxySession, PyProxySession

if TYPE_CHECKING:
    from .server import Broker

logger = logging.getLogger("pgreuse.broker")


class PgListener(BrokerFields):
    """Mixin of :class:`pgreuse.broker.server.Broker`."""

    def _allowed(self, sock: socket.socket, what: str) -> tuple[Peer | None, str]:
        """The peer, or None and what to tell it."""
        peer, uid = self.access.check(sock)
        if peer is None:
            why = self.access.refusal(uid)
            logger.warning("%s from uid %d refused: %s", what, uid, why)
            return None, why
        return peer, ""

    async def _serve_pg_tcp(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self._serve_pg(sock, tcp=True)

    async def _serve_pg(self, sock: socket.socket, tcp: bool = False) -> None:
        loop = asyncio.get_running_loop()
        parking: Parking | None = None
        session: PyProxySession | None = None
        is_admin = False
        peer_pid: int | None = None
        trusted = False  # the broker's own user or root, on the Unix socket
        starting = self.admission.admit(len(self.parkings) + self.admin_sessions)
        admitted = starting

        def started() -> None:
            nonlocal starting
            if starting:
                starting = False
                self.admission.started()

        try:
            if tcp:
                # Loopback only (config refuses other addresses); no peer credentials on TCP.
                peer_pid = 0
                host, port = sock.getpeername()[:2]
                addr = f"{host}:{port}"
            else:
                peer, why = self._allowed(sock, "connection")
                if peer is None:
                    await loop.sock_sendall(sock, frames.error_response("28000", why, severity="FATAL"))
                    return
                peer_pid, trusted = peer.pid, peer.trusted
                addr = "unix"
            timeout = self.config.client_login_timeout
            login_deadline = loop.time() + timeout
            if not admitted:
                timeout = min(timeout or OVER_LIMIT_GRACE, OVER_LIMIT_GRACE)
            try:
                first = await read_startup(sock, timeout, self._cancel)
            except LoginTimeout as exc:
                if admitted:
                    logger.info("connection from pid %s closed: %s", peer_pid, exc)
                # Best effort, never waiting: the peer may not be reading.
                with contextlib.suppress(OSError):
                    sock.send(login_timeout_error(timeout) if admitted else self._client_limit_error())
                return
            if first is None:
                return
            packet, pending = first
            if not admitted:  # a second chance: someone may have left since the accept
                starting = admitted = self.admission.admit(len(self.parkings) + self.admin_sessions)
            try:
                if not admitted:
                    raise self._client_limit_refusal()
                if packet.params.get("database") == admin.ADMIN_DATABASE:
                    if tcp:
                        # TCP peers cannot be identified (no SO_PEERCRED): PAUSE and SHUTDOWN
                        # stay with the users the Unix socket lets in.
                        raise StartupRefused(
                            "28000",
                            "the pgreuse admin console is not served over TCP",
                            hint=f"connect over the Unix socket: psql -h {self.config.socket_dir} "
                            f"-p {self.config.port} {admin.ADMIN_DATABASE}",
                        )
                    if not trusted:
                        raise StartupRefused(
                            "28000",
                            "the pgreuse admin console is for the broker's own user and root only",
                            hint="--allow-uid and --allow-gid let other users in as clients, not "
                            "as administrators",
                        )
                    is_admin = True
                    self.admin_sessions += 1
                    started()
                    broker = cast("Broker", self)  # (this mixin is always part of one)
                    await loop.sock_sendall(sock, admin.startup_reply(
                        broker, packet.params.get("application_name", "")))  # fmt: skip
                    await admin.serve(broker, sock, pending)
                    return
                authenticated = False
                if tcp and self.passwords is not None:
                    # --client-login-timeout covers the startup and the password exchange together.
                    left = max(login_deadline - loop.time(), 0.001) if self.config.client_login_timeout else 0
                    user = packet.params.get("user", "")
                    pending = await self.passwords.check(
                        sock, user, pending, left, limit=self.config.client_login_timeout
                    )
                    authenticated = True
                reply, parking = await self._startup(packet, peer_pid, authenticated)
                started()
            except ClientLeft as exc:
                logger.info("client %s: %s (user %r)", addr, exc, packet.params.get("user", ""))
                return
            except StartupRefused as exc:
                who = addr if tcp else f"pid {peer_pid}"
                user = packet.params.get("user", "")
                why = f" ({exc.why})" if exc.why else ""
                logger.info("startup from %s (user %r) refused: %s%s", who, user, exc.message, why)
                await loop.sock_sendall(sock, frames.error_response(
                    exc.sqlstate, exc.message, severity="FATAL", hint=exc.hint))  # fmt: skip
                return
            await loop.sock_sendall(sock, reply)
            assert self.pool is not None
            params = packet.params
            session = ProxySession(
                sock,
                self.pool,
                parking_key=parking.key,
                peer_pid=peer_pid,
                session_mode=self.config.pool_mode == "session",
                stats=self.proxy_stats,
                user=params.get("user", ""),
                database=params.get("database", params.get("user", "")),
                application_name=parking.application_name,
                addr=addr,
            )
            self.sessions[parking.key] = session
            assert self.hangups is not None
            self.hangups.watch(sock, session.connection_error)
            session.start(pending)
            await session.done
        except (frames.ProtocolError, ConnectionError) as exc:
            logger.info("client connection dropped: %s", exc)
            if self.table is not None:
                self.table.add("protocol_errors")
        except Exception as exc:
            # A bug, or a resource the startup could not get (the open-files limit): this client is
            # told why, and the broker serves the others.
            logger.error("client connection from pid %s failed: %s", peer_pid, exc, exc_info=True)
            if session is None and not is_admin:
                with contextlib.suppress(OSError):
                    sock.send(startup_failure(exc))
        finally:
            started()
            if session is not None:
                session.close()  # before sock.close(): it unregisters the fd from the loop
                assert self.hangups is not None
                self.hangups.unwatch(sock)
            if is_admin:
                self.admin_sessions -= 1
            if parking is not None:
                self.parkings.pop(parking.key, None)
                self.sessions.pop(parking.key, None)
                assert self.table is not None
                self.table.set("parked", len(self.parkings))
            sock.close()

    def _client_limit_refusal(self) -> StartupRefused:
        limit = self.config.max_client_conn
        starting = self.admission.starting
        clients = len(self.parkings) + self.admin_sessions + starting
        return StartupRefused(
            "53300",
            f"no more connections allowed (max_client_conn): {clients} clients are connected "
            f"({starting} of them still starting up) and --max-client-conn is {limit}",
            hint="close idle connections, or restart the broker with a higher --max-client-conn",
        )

    def _client_limit_error(self) -> bytes:
        refusal = self._client_limit_refusal()
        return frames.error_response(refusal.sqlstate, refusal.message, severity="FATAL", hint=refusal.hint)
