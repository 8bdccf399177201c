"""Shared-memory transport: one mailbox segment per worker, a tiny control frame per commit.

The server creates each worker's mailbox in ``/dev/shm`` and maps it; the worker maps it too. A commit is the
worker writing its delta into the mailbox and sending a 32-byte COMMIT frame over a Unix socket; the server folds
the mailbox into the center and copies the new center back into the same mailbox before it answers. So a commit
and a pull each cost the worker one memory copy, and nothing on the data path is serialized.

As soon as the worker has mapped its mailbox (its first frame after WELCOME) the server unlinks the segment's
name: the memory lives on while both sides map it and is freed by the kernel when both are gone, so no crash can
leave a segment behind.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import Tensor

from lightning_adag import wire
from lightning_adag.flat import Layout
from lightning_adag.server.core import Receipt

SHM_DIR = Path("/dev/shm")


def create_segment(path: Path, numel: int, dtype: torch.dtype) -> Tensor:
    """Create a new shared-memory file (never reusing an existing one) and map it as a tensor."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    return map_segment(path, numel, dtype)


def map_segment(path: Path, numel: int, dtype: torch.dtype) -> Tensor:
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_segments(prefix: str) -> list[str]:
    """Unlink every segment named ``<prefix>-*`` (clean-up after a server that was killed)."""
    removed = []
    for path in SHM_DIR.glob(f"{prefix}-*"):
        unlink_quietly(path)
        removed.append(path.name)
    return removed


class ShmClient:
    """A worker's connection to a server on the same machine.

    ``mailbox`` is the shared vector: write the outgoing delta into it before :meth:`commit`; after
    :meth:`commit` or :meth:`pull` returns, it holds the center at the clock the receipt names.
    """

    def __init__(self, address: str, rank: int, layout: Layout, algorithm_spec: dict, timeout: float) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(address)
        except OSError as err:
            self._sock.close()
            raise wire.ServerGoneError(f"cannot reach the parameter server at {address}: {err}") from err
        welcome = self._request(
            wire.Kind.HELLO,
            payload=wire.json_payload({"rank": rank, "layout": layout.to_json(), "algorithm": algorithm_spec}),
            expect=wire.Kind.WELCOME,
        ).json()
        self.mailbox = map_segment(Path(welcome["mailbox"]), layout.numel, layout.dtype)

    def initialize(self, clock: int) -> Receipt:
        """Offer the mailbox's contents as the initial center at ``clock``; the server keeps the center it
        already holds, if any. The receipt names the clock of the server's center either way."""
        return Receipt(self._request(wire.Kind.INIT, a=clock, expect=wire.Kind.CENTER).a)

    def commit(self, pulled_clock: int, steps: int) -> Receipt:
        frame = self._request(wire.Kind.COMMIT, a=pulled_clock, b=steps, expect=wire.Kind.CENTER)
        return Receipt(frame.a, frame.b)

    def pull(self) -> Receipt:
        return Receipt(self._request(wire.Kind.PULL, expect=wire.Kind.CENTER).a)

    def get_state(self, index: int) -> Receipt:
        """Copy the server's algorithm state vector number ``index`` into the mailbox's trainable region; the
        receipt names the clock it belongs to."""
        return Receipt(self._request(wire.Kind.GET_STATE, a=index, expect=wire.Kind.STATE).a)

    def put_state(self, index: int) -> bool:
        """Offer the mailbox's trainable region as the server's algorithm state vector number ``index`` (from a
        checkpoint); the server takes it (True) only while it holds no center yet."""
        return bool(self._request(wire.Kind.PUT_STATE, a=index, expect=wire.Kind.STATE).b)

    def stats(self) -> dict:
        return self._request(wire.Kind.STATS, expect=wire.Kind.REPORT).json()

    def close(self) -> None:
        self._sock.close()

    def _request(self, kind: wire.Kind, a: int = 0, b: int = 0, payload: bytes = b"", *, expect: wire.Kind):
        try:
            wire.send(self._sock, kind, a, b, payload)
            frame = wire.recv(self._sock)
        except (EOFError, ConnectionError, TimeoutError) as err:
            raise wire.ServerGoneError(
                f"the parameter server at {self.address} is gone ({type(err).__name__}: {err}) while this worker"
                f" sent {kind.name}; it has probably died, see its log above"
            ) from err
        if frame.kind is wire.Kind.ERROR:
            raise wire.ServerRefusedError(f"the parameter server refused {kind.name}: {frame.payload.decode()}")
        if frame.kind is not expect:
            raise wire.ProtocolError(f"expected {expect.name} in answer to {kind.name}, got {frame.kind.name}")
        return frame
