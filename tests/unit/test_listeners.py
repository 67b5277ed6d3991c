"""The agent's HTTPS listener socket."""

from __future__ import annotations

import socket

from hvagent.api.listeners import bind_tcp


def test_https_connections_send_at_once() -> None:
    # Accepted connections inherit TCP_NODELAY from the listener; without it every HTTPS
    # answer (headers and body are two TLS records) waited ~40 ms for a delayed ACK.
    listener = bind_tcp("127.0.0.1:0")
    try:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()
