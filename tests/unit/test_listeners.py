"""The agent's HTTPS listener socket."""

from __future__ import annotations

import socket

from hvagent.api.listeners import bind_tcp


def test_https_connections_send_at_once() -> None:
    # Accepted connections inherit TCP_NODELAY from the listener; without it every HTTPS
    # answer (headers and body are two TLS records) waited ~40 ms for a delayed ACK.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = bind_tcp(f"127.0.0.1:{port}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()
