"""The one free-port helper of the tests and benchmarks.

Picking a port and handing it to another process races: between the check and that process's
bind, another may take it. What can bind port 0 and say which port it got should do that instead
(``cddrec-serve --port 0`` prints ``ready at http://HOST:PORT``); ``free_port`` is for what must be
told its port ahead (torch.distributed's ``MASTER_PORT``, Ray Serve's HTTP proxy). It picks below
the kernel's ephemeral range, so no outgoing connection is handed the port in between (a port 0
bind would draw it from that range), and Ray's own processes, which take theirs there, do not
collide with it.
"""

from __future__ import annotations

import random
import socket


def free_port(low: int = 20_000, high: int = 30_000, host: str = "127.0.0.1") -> int:
    """A port in [low, high) that nothing listens on now."""
    for port in random.sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high - 1}")
