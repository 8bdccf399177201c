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

import itertools
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from lightning_adag import wire
from lightning_adag.flat import Layout
from lightning_adag.transports.base import Channel, ChannelRefused, Client, Listener, Transport

SHM_DIR = Path("/dev/shm")


class SharedMemoryFullError(ChannelRefused, MemoryError):
    """/dev/shm has no room for another mailbox."""


def create_segment(path: Path, numel: int, dtype: torch.dtype) -> Tensor:
    """Create a new shared-memory file (never reusing an existing one) and map it as a tensor.

    The memory is reserved up front: a sparse file would only find out that /dev/shm is full at the first write,
    as a SIGBUS that kills the process.
    """
    nbytes = numel * dtype.itemsize
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        os.close(fd)
        unlink_quietly(path)
        free = shutil.disk_usage(SHM_DIR).free
        raise SharedMemoryFullError(
            f"cannot reserve {nbytes / 2**20:.0f} MiB in {SHM_DIR} ({free / 2**20:.0f} MiB free: {err.strerror}):"
            " enlarge it (docker run --shm-size=...) or use transport='tcp'"
        ) from err
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


class ShmClient(Client):
    """A worker's connection to a server on the same machine, at the path of its Unix socket."""

    def _connect(self, address: str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BlockingIOError as err:  # the listening socket's queue is full: the server is busy accepting
            sock.close()
            raise wire.ServerBusyError(f"its queue of connections is full ({err})") from err
        except OSError as err:
            sock.close()
            raise wire.ServerGoneError(f"cannot reach the parameter server at {address}: {err}") from err
        return sock

    def _open_mailbox(self, welcome: dict, layout: Layout) -> Tensor:
        # the server's segment; a GPU worker's staging page-locks it in place (pin_memory is not needed here)
        return map_segment(Path(welcome["mailbox"]), layout.numel, layout.dtype)

    def _send(self, kind: wire.Kind, vector: Tensor | None, dtype: torch.dtype | None, fields: dict[str, int]) -> None:
        # the vector is already in the shared mailbox; the frame only says what it holds
        wire.send(self._sock, kind, dtype=None if vector is None else dtype or vector.dtype, **fields)

    def _receive(self, header: wire.Header, vector: Tensor) -> None:
        if header.length:
            raise wire.ProtocolError(f"a {header.kind.name} frame over shared memory carries no payload")


class ShmChannel(Channel):
    """The server's side of one shared-memory connection: the mailbox segment it created for that worker."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path = path
        self.buffer = create_segment(path, layout.numel, layout.dtype)
        self.welcome = {"mailbox": str(path)}

    def attached(self) -> None:
        """The worker sent a frame after WELCOME, so it has mapped the mailbox: the name is no longer needed."""
        unlink_quietly(self.path)

    def receive(
        self, sock: socket.socket, header: wire.Header, vector: Tensor, dtype: torch.dtype | None = None
    ) -> None:
        """The vector a request carries is already in ``vector``, a view of the mailbox; the frame must announce
        its dtype (or ``dtype``, for a commit payload's bytes)."""
        if header.length:
            raise wire.ProtocolError(f"{header.kind.name} carries no payload on the shared-memory transport")
        if header.dtype != wire.DTYPE_CODES[dtype or vector.dtype]:
            raise wire.ProtocolError(
                f"{header.kind.name} announces dtype code {header.dtype}, expected {dtype or vector.dtype}"
            )

    def reply(self, sock: socket.socket, kind: wire.Kind, vector: Tensor, **fields: int) -> None:
        wire.send(sock, kind, **fields)

    def close(self) -> None:
        unlink_quietly(self.path)


class ShmListener(Listener):
    """A Unix socket at the path ``where``, created mode 0600 so that only this user's processes connect. Each
    connection gets a mailbox segment named after the socket file and this process (``<stem>-<pid>-w<N>``).

    A socket file already at the path is replaced only if nothing answers on it (a server that was killed left
    it); a live server's is left alone, and closing removes the file only if it is still the one this bound."""

    def __init__(self, where: str) -> None:
        path = Path(where)
        _remove_if_stale(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o077)
        try:
            self.socket.bind(str(path))
        except OSError:
            self.socket.close()
            raise
        finally:
            os.umask(umask)
        self.address = str(path)
        self._bound = path.stat().st_ino
        self._prefix = f"{path.stem}-{os.getpid()}"
        self._ids = itertools.count()

    def channel(self, conn: socket.socket, layout: Layout) -> ShmChannel:
        return ShmChannel(SHM_DIR / f"{self._prefix}-w{next(self._ids)}", layout)

    def close(self) -> None:
        self.socket.close()
        path = Path(self.address)
        try:
            if path.stat().st_ino == self._bound:
                unlink_quietly(path)
        except FileNotFoundError:
            pass
        remove_segments(self._prefix)

    @staticmethod
    def default_where() -> str:
        return str(Path(tempfile.gettempdir(), f"adag-{os.getpid()}-{secrets.token_hex(4)}.sock"))

    @staticmethod
    def clean_up(where: str, pid: int) -> None:
        _remove_if_stale(Path(where))
        remove_segments(f"{Path(where).stem}-{pid}")


def _remove_if_stale(path: Path) -> None:
    """Unlink a Unix socket file that nothing answers on; leave a live one (binding then fails)."""
    if not path.is_socket():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a live server with a full queue answers EAGAIN at once: it is left alone
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        unlink_quietly(path)
    except OSError:
        pass
    finally:
        probe.close()


TRANSPORT = Transport("shm", ShmClient, ShmListener, local_only=True)
