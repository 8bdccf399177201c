"""TCP transport: the vector travels inside the frames, for workers on other machines.

A commit is one COMMIT frame whose payload is the delta's raw bytes, sent from the worker's mailbox; the server
receives it with ``recv_into`` straight into that connection's preallocated buffer, applies it, and answers with a
CENTER frame carrying the new center, which the worker receives straight into its mailbox. A connection that
breaks in the middle of a frame is dropped before its commit is applied.
"""

from __future__ import annotations

import socket
import time

import torch
from torch import Tensor

from lightning_adag import wire
from lightning_adag.flat import Layout
from lightning_adag.transports.base import Channel, Client, Listener, Transport


def split_address(address: str, allow_any_port: bool = False) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> (host, port), with an error that says what is expected. Port 0
    (any free port) is an address to listen on, not to connect to."""
    host, sep, port = address.rpartition(":")
    lowest = 0 if allow_any_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError(f"server address must look like 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


def tune(sock: socket.socket) -> None:
    """No Nagle delay on the small frames that follow a large payload."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpClient(Client):
    """A worker's connection to a server at ``host:port``."""

    def _connect(self, address: str, timeout: float) -> socket.socket:
        sock = _connect(address, timeout)
        tune(sock)
        return sock

    def _open_mailbox(self, welcome: dict, layout: Layout) -> Tensor:
        return torch.zeros(layout.numel, dtype=layout.dtype, pin_memory=self._pin_memory)

    def _send(self, kind: wire.Kind, vector: Tensor | None, dtype: torch.dtype | None, fields: dict[str, int]) -> None:
        if vector is None:
            wire.send(self._sock, kind, **fields)
        else:
            wire.send_tensor(self._sock, kind, vector, dtype, **fields)

    def _receive(self, header: wire.Header, vector: Tensor) -> None:
        wire.read_tensor_into(self._sock, header, vector)


def keep_alive(sock: socket.socket, idle: int = 60, interval: int = 10, probes: int = 6) -> None:
    """Have the kernel probe an idle connection and drop it after about ``idle + interval * probes`` seconds of
    silence from a peer that vanished."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", probes)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _connect(address: str, timeout: float) -> socket.socket:
    """Connect, retrying while nothing listens yet (a standalone server may still be starting) for up to
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return socket.create_connection(split_address(address), timeout=timeout)
        except ConnectionRefusedError as err:
            if time.monotonic() + delay > deadline:
                raise wire.ServerGoneError(f"nothing listens at {address} (waited {timeout:.0f} s): {err}") from err
        except OSError as err:
            raise wire.ServerGoneError(f"cannot reach the parameter server at {address}: {err}") from err
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


class TcpChannel(Channel):
    """The server's side of one TCP connection: a receive buffer the size of the model."""

    def __init__(self, layout: Layout) -> None:
        self.buffer = torch.empty(layout.numel, dtype=layout.dtype)
        self.welcome: dict = {}

    def attached(self) -> None:
        pass

    def receive(
        self, sock: socket.socket, header: wire.Header, vector: Tensor, dtype: torch.dtype | None = None
    ) -> None:
        """Receive the vector a request carries into ``vector``, a view of this connection's buffer (its bytes
        hold ``dtype`` when that is given: a commit payload)."""
        wire.read_tensor_into(sock, header, vector, dtype)

    def reply(self, sock: socket.socket, kind: wire.Kind, vector: Tensor, **fields: int) -> None:
        wire.send_tensor(sock, kind, vector, **fields)


class TcpListener(Listener):
    """A TCP socket at ``where``, ``"host:port"`` (port 0 picks a free one)."""

    def __init__(self, where: str) -> None:
        host, port = split_address(where, allow_any_port=True)
        self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        host, port = self.socket.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def channel(self, conn: socket.socket, layout: Layout) -> TcpChannel:
        tune(conn)
        keep_alive(conn)  # a worker whose machine vanished (no FIN) is dropped, and its buffer freed
        return TcpChannel(layout)

    @staticmethod
    def default_where() -> str:
        return "127.0.0.1:0"


TRANSPORT = Transport("tcp", TcpClient, TcpListener)
