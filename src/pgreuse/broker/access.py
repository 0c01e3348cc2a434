"""Who may use the broker over its Unix sockets, and the file modes that follow from it.

Contract:

* :func:`parse_uids` / :func:`parse_gids` read ``--allow-uid`` / ``--allow-gid`` values (user or group
  names, or numbers; comma lists) and raise ``ValueError`` naming the entry that is wrong.
* :class:`Access` decides for a connected peer (``SO_PEERCRED``, and ``SO_PEERGROUPS`` for its
  supplementary groups): the broker's own user and root are *trusted*; a peer whose uid, primary
  gid or a supplementary gid is allowed is *admitted*; anyone else is refused, told which uid it is
  and which setting would let it in.
* An admitted peer is a PostgreSQL client of the broker, nothing more: its transactions go through
  the proxy, and it gets no backend sockets (whoever holds a backend's fd can read and write that
  session at any time, whoever it is lent to) and no admin console (``SHUTDOWN``, ``PAUSE``).
* The socket directory is the broker's: its mode follows these settings. Nothing allowed: ``0700``,
  as before. Something allowed: others need the search bit to reach the sockets, never the read bit:
  ``0710`` when every allowance is a group and the directory belongs to one of them, else ``0711``.
  The socket files are ``0600``, or ``0666`` once someone else is allowed (the directory decides who
  reaches them, the broker's credential check who is served, as PostgreSQL's socket is ``0777`` and
  pg_hba decides). The shared-memory table stays ``0600`` (:mod:`pgreuse.shm`) in every case.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable

import attrs

from ..credentials import peer_credentials, trusted_uids

# Linux's SO_PEERGROUPS (4.13+); the socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GROUPS_FIRST_TRY = 64  # groups read at once; a peer in more is asked again with room for all
_NGROUPS_MAX = 65536
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel: not an id


@attrs.frozen
class Peer:
    """The process at the other end of a Unix socket, once let in."""

    pid: int
    uid: int
    trusted: bool  # the broker's own user or root: may hold backend fds and use the console


def parse_uids(text: str) -> frozenset[int]:
    """The uids of ``--allow-uid`` (``"www-data,1001"``); raise ValueError naming a bad entry."""
    return _parse_ids(text, "user", _uid_of)


def parse_gids(text: str) -> frozenset[int]:
    """The gids of ``--allow-gid`` (``"webapps,1001"``); raise ValueError naming a bad entry."""
    return _parse_ids(text, "group", _gid_of)


def _parse_ids(text: str, kind: str, lookup: Callable[[str], int]) -> frozenset[int]:
    ids: set[int] = set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            # A number needs no passwd/group entry: a container may run with an arbitrary id.
            if int(entry) > MAX_ID:
                raise ValueError(f"{kind} id {entry} is out of range (0-{MAX_ID})")
            ids.add(int(entry))
            continue
        try:
            ids.add(lookup(entry))
        except KeyError:
            raise ValueError(
                f"no {kind} named {entry!r} on this machine; give an existing {kind} name or a number"
            ) from None
    return frozenset(ids)


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The supplementary groups of a Unix socket's peer (as they were when it connected); () if the
    kernel cannot tell (before Linux 4.13)."""
    size = _GROUPS_FIRST_TRY
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _NGROUPS_MAX:
                size = _NGROUPS_MAX
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return ()
            raise
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


class Access:
    """The Unix-socket access rule of one broker (see the module docstring)."""

    def __init__(self, uids: frozenset[int] = frozenset(), gids: frozenset[int] = frozenset()) -> None:
        self.trusted = trusted_uids()
        self.uids = uids
        self.gids = gids

    def __repr__(self) -> str:
        return f"<Access uids={sorted(self.uids)} gids={sorted(self.gids)}>"

    @property
    def others_allowed(self) -> bool:
        return bool(self.uids - self.trusted or self.gids)

    def check(self, sock: socket.socket) -> tuple[Peer | None, int]:
        """(the peer, or None if refused; its uid)."""
        pid, uid, gid = peer_credentials(sock)
        if uid in self.trusted:
            return Peer(pid, uid, trusted=True), uid
        if uid in self.uids or (self.gids and self._group_allowed(sock, gid)):
            return Peer(pid, uid, trusted=False), uid
        return None, uid

    def _group_allowed(self, sock: socket.socket, gid: int) -> bool:
        return gid in self.gids or not self.gids.isdisjoint(peer_groups(sock))

    def refusal(self, uid: int) -> str:
        """What a refused peer is told: who it is, who is let in, and the setting that would help."""
        name = _name_of(uid)
        allowed = "the broker's user and root" + (", and the uids and gids of --allow-uid/--allow-gid"
                                                   if self.others_allowed else "")  # fmt: skip
        return (
            f"pgreuse broker: uid {uid}{name} may not use this broker (user {os.geteuid()}"
            f"{_name_of(os.geteuid())}); it lets in {allowed}. Start the broker with "
            f"--allow-uid {uid} (or --allow-gid with one of your groups) to let this user in"
        )

    def dir_mode(self, dir_gid: int) -> int:
        """The permission bits the socket directory must have (see the module docstring)."""
        if not self.others_allowed:
            return 0o700
        if not (self.uids - self.trusted) and dir_gid in self.gids:
            return 0o710
        return 0o711

    @property
    def socket_mode(self) -> int:
        return 0o666 if self.others_allowed else 0o600

    def secure_dir(self, path: str, st: os.stat_result) -> tuple[int, int] | None:
        """Give the socket directory the mode these settings need; (old, new) if it changed."""
        old = stat.S_IMODE(st.st_mode)
        new = (old & 0o7000) | self.dir_mode(st.st_gid)
        if new == old:
            return None
        os.chmod(path, new)
        return old, new


def _name_of(uid: int) -> str:
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""
