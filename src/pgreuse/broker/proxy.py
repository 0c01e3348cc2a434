"""Proxy mode: one client connection on the PG-protocol listener, forwarded to leased backends.

Contract (DESIGN.md §5). After startup every client of ``.s.PGSQL.<port>`` gets a
:class:`ProxySession`. A pgreuse connection parks there and never sends anything but Terminate; any
other client (psql, pgbench, a Go service) sends queries, and then:

* the first message that needs a server leases a backend from the :class:`~.pool.Pool` *in process*
  (the session is the pool's ``Client``; the lease carries the parking key, so a CancelRequest with
  that key reaches this backend);
* client bytes go to the backend and backend bytes to the client unchanged; only frame headers are
  parsed, to count sync points (Query, Sync, FunctionCall: each gets exactly one ReadyForQuery) and
  to read ReadyForQuery's status byte;
* in transaction mode the backend goes back at ReadyForQuery ``I`` once every sync point sent was
  answered and no message is half sent (so COPY, open transactions and pipelined batches keep it);
  in session mode it stays until the client leaves, and is then reset (``Outcome.DIRTY``);
* a backend that reports a ParameterStatus while lent changed session state (``SET``): it goes back
  ``DIRTY`` and the pool resets it before lending it again;
* a client that leaves while its backend is not idle (mid-transaction, mid-COPY, a query running)
  returns it ``BROKEN``: the pool closes it, PostgreSQL rolls back, it is never reused;
* a backend that fails or is revoked mid-lease gets the client a FATAL ErrorResponse, then the client
  is closed (its transaction is gone);
* a request the pool denies (``--wait-timeout``, PostgreSQL down) answers the waiting query with an
  ErrorResponse and ReadyForQuery, exactly as a server error would, and the session goes on.

Named prepared statements are per backend, so in transaction mode a Parse with a statement name
that would start a transaction (the client holds no backend) is answered by the broker with an
ErrorResponse (SQLSTATE 0A000) naming the statement, then ReadyForQuery at the client's Sync: a
statement prepared there would be unknown to the next transaction's backend, and left behind on this
one (``pgbench -M prepared`` stops with that message). Inside a transaction such a Parse is
forwarded — the statement works until the transaction ends — and the backend is reset before it is
lent again. Unnamed statements (``-M extended``, psycopg) always work; session mode allows names.

All of this runs as callbacks on the broker's loop thread: readers and writers registered with
``add_reader``/``add_writer`` on non-blocking sockets, no task per message.

:class:`~.proxy_session.PyProxySession` is the reference (its parts: :mod:`.proxy_session`,
:mod:`.proxy_client`, :mod:`.proxy_lease`, :mod:`.proxy_backend`, :mod:`.proxy_fields`). Where
``pgreuse.broker._proxycore`` is built, the broker runs :data:`ProxySession`, which takes the methods
every transaction runs from that C module and the rest from the reference (see the end of this
module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _cmodule
from ..wire import control
from ..wire.states import TRANSITIONS, SlotState
from .proxy_fields import _MAX_PENDING, PyProxyStats
from .proxy_session import PyProxySession

# The C core (pgreuse.broker._proxycore, optional like the C scanners): a base type that holds the hot fields
# as struct members and overrides the methods every transaction runs (the read callbacks, _interest,
# _idle, _lease, granted) with C versions that handle the usual case and call the reference's for
# the rest; its _lease and clean release also do the pool's part for the usual cases (an idle
# backend and nobody waiting; a handover to the next proxy client). PGREUSE_PURE_PYTHON=1 runs the
# reference alone. CORE says which one runs.
ProxySession: type[PyProxySession] = PyProxySession
ProxyStats: type[PyProxyStats] = PyProxyStats
CORE = "python"
if TYPE_CHECKING:
    from . import _proxycore
else:
    _proxycore = _cmodule.load("broker._proxycore")  # None: not built, or PGREUSE_PURE_PYTHON=1
if _proxycore is not None:
    # The C core also lends and takes back backends in the usual cases (pool.Pool's request
    # and give_back, see _lending.h), through the slot transitions checked here.
    _idle, _lent = SlotState.IDLE, SlotState.LENT
    if not (
        _lent in TRANSITIONS[_idle]
        and SlotState.RESETTING in TRANSITIONS[_lent]
        and _idle in TRANSITIONS[SlotState.RESETTING]
    ):  # pragma: no cover
        raise ImportError("pgreuse.broker._proxycore takes slot transitions states.TRANSITIONS forbids")
    _proxycore.setup(PyProxySession, control.Outcome.CLEAN, _MAX_PENDING, SlotState.CLOSED, _idle, _lent,
                     SlotState.SHARED)  # fmt: skip

    class _CProxySession(_proxycore.SessionCore, PyProxySession):
        __slots__ = ()

    ProxySession = _CProxySession
    ProxyStats = _proxycore.ProxyCounters  # type: ignore[assignment]  # same fields
    CORE = "c"


__all__ = ["CORE", "ProxySession", "ProxyStats", "PyProxySession", "PyProxyStats"]
