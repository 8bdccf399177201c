"""How workers reach the parameter server: ``shm`` (shared memory, one machine) or ``tcp`` (any machine).

Each transport module holds both halves: the worker's client (a :class:`~lightning_adag.transports.client.Client`:
``mailbox``, ``initialize``, ``commit``, ``pull``, ``get_state``, ``put_state``, ``stats``, ``close``) and the
server's per-connection channel.
"""

from __future__ import annotations

from typing import Any

from lightning_adag.transports.client import Client
from lightning_adag.transports.shm import ShmClient
from lightning_adag.transports.tcp import TcpClient

CLIENTS: dict[str, type[Client]] = {"shm": ShmClient, "tcp": TcpClient}


def connect(transport: str, *args: Any, **kwargs: Any) -> Client:
    """A connected client of ``transport``; the other arguments are :class:`~lightning_adag.transports.client.Client`'s
    (address, rank, layout, algorithm_spec, key, timeout, pin_memory)."""
    return CLIENTS[transport](*args, **kwargs)
