"""The server's socket, bound before the model loads: a port in use or out of range is a one-line
error at once (not after minutes of loading), and "serving on" is printed only once it is bound.
uvicorn is handed the bound socket and starts listening on it."""

import errno
import socket

from moerun.errors import MoerunError


def bind_socket(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise MoerunError(f"--port must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    sock = socket.socket(family, socket.SOCK_STREAM)
    # as uvicorn does: a port whose last connections are in TIME_WAIT is free to bind
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MoerunError(f"port {port} on {host} is already in use") from None
        raise MoerunError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock
