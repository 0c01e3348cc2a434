"""The PostgreSQL v3 protocol's numbers and its one error: size limits, request codes, field layouts.

Apart from the message code so that the typed framing (:mod:`pgreuse.wire.frames`), the untyped first
packet (:mod:`pgreuse.wire.first_packet`), the builders and the parsers share one definition, and the
proxy's scanners (:mod:`pgreuse.wire.scan`) take :data:`MAX_FRAME` without the rest.
"""

from __future__ import annotations

import struct

# The default cap on one typed message. PostgreSQL's own limit is 1 GiB (MaxAllocSize); the
# broker only reads small messages itself (startup, reset, health checks, frame headers in proxy
# mode), so a lower default bounds what one misbehaving peer can make it buffer. Readers take a max.
MAX_FRAME = 64 * 1024 * 1024

# PostgreSQL's MAX_STARTUP_PACKET_LENGTH: a longer first packet is rejected by the server too.
MAX_STARTUP = 10_000

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 1234 << 16 | 5680
CANCEL_REQUEST_CODE = 1234 << 16 | 5678

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_TWO_U32 = struct.Struct("!II")


class ProtocolError(ValueError):
    """The peer sent bytes that are not valid PostgreSQL protocol.

    The connection the bytes came from can no longer be trusted: close it and log the message.
    """
