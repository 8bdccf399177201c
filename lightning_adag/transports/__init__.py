"""How workers reach the parameter server: ``shm`` (shared memory, one machine) or ``tcp`` (any machine).

Each transport is one module holding both halves (see :mod:`lightning_adag.transports.base`): the worker's client
and the server's listener with its per-connection channel, named together by the module's ``TRANSPORT``.
"""

from __future__ import annotations

from typing import Any

from lightning_adag.transports import shm, tcp
from lightning_adag.transports.base import Client, Transport

TRANSPORTS: dict[str, Transport] = {transport.name: transport for transport in (shm.TRANSPORT, tcp.TRANSPORT)}


def connect(transport: str, *args: Any, **kwargs: Any) -> Client:
    """A connected client of ``transport``; the other arguments are :class:`~lightning_adag.transports.base.Client`'s
    (address, rank, layout, algorithm_spec, key, timeout, pin_memory)."""
    return TRANSPORTS[transport].client(*args, **kwargs)
