"""Free local ports for the test harness and the load-test runner.

Ports are drawn below Linux's ephemeral range (32768+), so an outgoing connection (k6's, Envoy's)
cannot take one between our choice and the bind. Nothing is bound between drawing a config's
ports and starting it, so the ports handed out are remembered: two draws in one process never
return the same port (a config with metrics_port == a backend's port is refused at load).
"""

from __future__ import annotations

import random
import socket

_HANDED_OUT: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int = 1) -> int:
    """A base port such that base..base+n-1 are free now and not handed out before."""
    for _ in range(500):
        base = random.randint(20000, 32700 - n)
        block = range(base, base + n)
        if _HANDED_OUT.intersection(block) or not all(_bindable(p) for p in block):
            continue
        _HANDED_OUT.update(block)
        return base
    raise RuntimeError("no free local port block")


def free_port() -> int:
    return free_port_block(1)
