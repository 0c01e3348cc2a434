"""Session state in transaction mode: what a statement leaves behind on a shared backend. No I/O.

A backend is shared per transaction, so anything a holder leaves in the *session* (a ``SET``, a temp
table, a session advisory lock, a prepared statement...) would reach the next holder. Two detectors
feed one decision, "reset this backend before lending it again" (the broker runs ``DISCARD ALL``):

* :func:`classify_sql` looks at each statement psycopg sends (the final query bytes), at statement
  starts only, so ``UPDATE t SET x = 1`` is not mistaken for a ``SET``. It is a cheap guard, not a
  parser: it errs on the side of resetting.
* :func:`changed_parameters` compares the values PostgreSQL reports (ParameterStatus) with the ones
  the connection started with. These are also the values libpq caches and psycopg's adapters rely on
  (TimeZone, DateStyle, client_encoding...), so the client resets them while it still holds the
  backend, and its own cache is right again.

Features that cannot work at all across transactions (LISTEN) are refused before they are sent.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping

# Parameters PostgreSQL reports to the client (GUC_REPORT) that a session can change.
REPORTED_PARAMETERS = (
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "IntervalStyle",
    "is_superuser",
    "search_path",  # reported from PostgreSQL 18
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
)


class Verdict(enum.Enum):
    CLEAN = 0  # transaction-scoped: nothing outlives the transaction
    DIRTY = 1  # leaves session state: reset the backend before lending it again
    REFUSE = 2  # cannot work when backends are shared per transaction


_STATEMENT_START = rb"(?:^|;)\s*"
_DIRTY = re.compile(
    _STATEMENT_START
    + rb"(?:set\s+(?!local\b|transaction\b|constraints\b)"  # SET LOCAL/TRANSACTION end with it
    + rb"|reset\b|discard\b|prepare\b|deallocate\b|load\b"
    + rb"|create\s+(?:(?:global|local)\s+)?temp(?:orary)?\b"
    + rb"|declare\b[^;]*\bwith\s+hold\b)"
    + rb"|\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\("  # session-level: *_xact_lock is fine
    + rb"|\bset_config\s*\(",
    re.IGNORECASE,
)
_LISTEN = re.compile(_STATEMENT_START + rb"listen\b", re.IGNORECASE)

LISTEN_REFUSED = (
    "LISTEN cannot work through pgreuse: notifications are delivered to the backend that listened, "
    "which the next transaction may not get; use a plain psycopg connection to PostgreSQL for LISTEN"
)


def classify_sql(query: bytes) -> Verdict:
    """What ``query`` leaves in the session (remembered: applications send the same few queries)."""
    verdict = _verdicts.get(query)
    if verdict is None:
        if len(_verdicts) >= _MAX_REMEMBERED:
            _verdicts.clear()
        verdict = _verdicts[query] = _classify(query)
    return verdict


def _classify(query: bytes) -> Verdict:
    if _LISTEN.search(query):
        return Verdict.REFUSE
    if _DIRTY.search(query):
        return Verdict.DIRTY
    return Verdict.CLEAN


_MAX_REMEMBERED = 1024
_verdicts: dict[bytes, Verdict] = {}

# The verdict already given for a query, or None: one lookup, for the check every statement makes
# (the dict is cleared, never replaced, so this stays bound to it).
remembered_verdict = _verdicts.get


def changed_parameters(baseline: Mapping[str, str | None], current: Mapping[str, str | None]) -> list[str]:
    """Names whose reported value differs from the baseline, in a stable order."""
    return [name for name in REPORTED_PARAMETERS if baseline.get(name) != current.get(name)]
