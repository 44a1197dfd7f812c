"""Ports a cluster node keeps across restarts come from outside the kernel's ephemeral range."""

from __future__ import annotations

import socket

from interlock.core.natsserver import _ephemeral_range, stable_port


def test_stable_ports_are_free_and_outside_the_ephemeral_range() -> None:
    low, high = _ephemeral_range()
    for _ in range(20):
        port = stable_port()
        assert not low <= port <= high, port
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: it binds
