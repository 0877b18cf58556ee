"""Small helpers shared by tests."""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for starting test servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
