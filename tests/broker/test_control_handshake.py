"""The control channel's version handshake against a real broker."""

from __future__ import annotations

import socket

from pgreuse.wire import control


def test_a_worker_of_another_version_is_told_why(broker):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(broker.control_socket)
        s.send(control.encode(control.Hello(control.VERSION - 1, 1)))
        reply = control.decode(s.recv(control.MAX_MESSAGE))
        assert isinstance(reply, control.Deny)
        assert f"speaks control protocol {control.VERSION - 1}" in reply.message
        assert "same pgreuse version" in reply.message
        assert s.recv(control.MAX_MESSAGE) == b""  # then the broker closes the channel
