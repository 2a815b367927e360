"""Addresses and ports on this machine: one loopback address per cluster, free ports handed out once."""

from __future__ import annotations

import socket


def cluster_address(index: int) -> str:
    """The loopback address of the index-th cluster (0-based): 127.0.1.1, 127.0.2.1, ..."""
    return f"127.0.{index + 1}.1"


def free_port(address: str, taken: set[int] | None = None) -> int:
    """A port nobody listens on at `address` now (and not handed out by us before)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
            port = int(s.getsockname()[1])
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port
    raise RuntimeError(f"no free port on {address}")


def port_is_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def preferred_port(address: str, port: object, taken: set[int]) -> int:
    """`port` again if it is an int that is still free (stable URLs across restarts), else a new one."""
    if isinstance(port, int) and port > 0 and port not in taken and port_is_free(address, port):
        taken.add(port)
        return port
    return free_port(address, taken)
