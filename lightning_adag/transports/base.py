"""What every transport is made of: the worker's :class:`Client`, the server's :class:`Listener` and the
:class:`Channel` it opens per connection, named together by a :class:`Transport`.

A transport is one module that subclasses these three and one entry in ``lightning_adag.transports.TRANSPORTS``;
the server, the launcher and the command line only ask a transport to listen, to serve a connection, and to clean
up after a server that was killed.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_adag import auth, wire
from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.wire import Receipt


class Client:
    """A worker's connection to the server.

    ``mailbox`` is the flat vector exchanged with the server: write the outgoing vector into it before
    :meth:`initialize` or :meth:`commit`; after :meth:`initialize`, :meth:`commit` or :meth:`pull` returns, it holds
    the center at the clock the receipt names; before any of them, zeros. Subclasses say where the mailbox lives
    and how its bytes travel.
    """

    mailbox: Tensor

    def __init__(
        self,
        address: str,
        rank: int,
        layout: Layout,
        algorithm_spec: dict,
        key: bytes,
        timeout: float,
        pin_memory: bool = False,
        part: tuple[int, int] | None = None,
    ) -> None:
        """Connect to ``address`` (waiting at most ``timeout`` seconds for any answer), authenticate with ``key``
        and introduce the model. ``pin_memory`` asks for a page-locked mailbox (for a GPU worker) where the
        transport allocates it. ``part`` ``(i, k)`` says that ``layout`` is part ``i`` of a center cut into ``k``
        (see :mod:`lightning_adag.transports.sharded`): the server must hold that part."""
        self.address = address
        self.part = part
        self._pin_memory = pin_memory
        # One request at a time on the connection: a data loader may ask for samples while an overlapped
        # exchange is in flight on another thread.
        self._one_request = threading.Lock()
        self._join_when_not_busy(timeout, lambda: self._introduce(rank, layout, algorithm_spec, key))

    def initialize(self, clock: int) -> Receipt:
        """Offer the mailbox as the initial center at ``clock``; a server that holds a center keeps it. Either
        way the mailbox then holds the server's center."""
        return Receipt(self._exchange(wire.Kind.INIT, self.mailbox, wire.Kind.CENTER, self.mailbox, clock=clock).clock)

    def recover(self, clock: int) -> Receipt:
        """Offer the mailbox as the center at ``clock`` that this worker pulled from the server's previous
        incarnation (see ``ServerCore.recover``); the mailbox then holds the server's center."""
        return Receipt(
            self._exchange(wire.Kind.RECOVER, self.mailbox, wire.Kind.CENTER, self.mailbox, clock=clock).clock
        )

    def commit(self, pulled_clock: int, steps: int, payload: CommitPayload | None = None) -> Receipt:
        """Commit the ``payload`` written at the start of the mailbox (see :mod:`lightning_adag.payload`); by
        default the whole mailbox, a delta in the center's dtype."""
        payload = payload or CommitPayload(self.layout, self.layout.dtype)
        sent = self.mailbox.view(torch.uint8)[: payload.nbytes]
        reply = self._exchange(
            wire.Kind.COMMIT,
            sent,
            wire.Kind.CENTER,
            self.mailbox,
            sent_dtype=payload.dtype,
            pulled_clock=pulled_clock,
            steps=steps,
        )
        return Receipt(reply.clock, reply.staleness)

    def pull(self) -> Receipt:
        return Receipt(self._exchange(wire.Kind.PULL, None, wire.Kind.CENTER, self.mailbox).clock)

    def get_state(self, index: int) -> Receipt:
        """Copy the server's algorithm state vector number ``index`` into the mailbox's trainable region; the
        receipt names the clock it belongs to."""
        region = self.mailbox[: self.layout.trainable]
        return Receipt(self._exchange(wire.Kind.GET_STATE, None, wire.Kind.STATE, region, index=index).clock)

    def put_state(self, index: int) -> bool:
        """Offer the mailbox's trainable region as the server's algorithm state vector number ``index`` (from a
        checkpoint); the server takes it (True) only while it holds no center yet."""
        region = self.mailbox[: self.layout.trainable]
        return bool(self._exchange(wire.Kind.PUT_STATE, region, wire.Kind.STATE, region, index=index).taken)

    def stats(self) -> dict:
        return self._control(wire.Kind.STATS, b"", expect=wire.Kind.REPORT).json()

    def take(self, request: dict) -> tuple[int, int]:
        """The next chunk of an epoch's samples for this worker (see :mod:`lightning_adag.server.assignment`):
        positions ``[start, stop)`` of the epoch's order, empty when the epoch has none left for it."""
        given = self._control(wire.Kind.TAKE, wire.json_payload(request), expect=wire.Kind.GIVEN).json()
        return int(given["start"]), int(given["stop"])

    def interrupt(self) -> None:
        """Make a request blocked on this connection in another thread fail at once (then :meth:`close`)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.interrupt()
        self._sock.close()

    # --------------------------------------------------------------------------------- transport-specific
    def _connect(self, address: str, timeout: float) -> socket.socket:
        raise NotImplementedError

    def _open_mailbox(self, welcome: dict, layout: Layout) -> Tensor:
        raise NotImplementedError

    def _send(self, kind: wire.Kind, vector: Tensor | None, dtype: torch.dtype | None, fields: dict[str, int]) -> None:
        """Send a request with its named header ``fields``; ``vector`` (a view of the mailbox, or None) is what it
        carries to the server, as ``dtype`` (when its bytes hold another dtype than the view's)."""
        raise NotImplementedError

    def _receive(self, header: wire.Header, vector: Tensor) -> None:
        """Complete a reply whose vector belongs in ``vector`` (a view of the mailbox)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- helpers
    def _join_when_not_busy(self, timeout: float, introduce: Callable[[], None]) -> None:
        """Connect and ``introduce`` this worker; while the server turns it away as busy (too many peers joining at
        once), try again after a growing, jittered pause, for up to ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                self._sock = self._connect(self.address, timeout)
                try:
                    introduce()
                except BaseException:
                    self._sock.close()
                    raise
                return
            except wire.ServerBusyError as err:
                if time.monotonic() + delay > deadline:
                    raise wire.ServerBusyError(
                        f"the parameter server at {self.address} stayed busy for {timeout:.0f} s (server_timeout):"
                        f" {err}. Raise server_timeout, or the server's --max-handshakes"
                    ) from err
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: workers turned away together come back apart
            delay = min(delay * 2, 2.0)

    def _introduce(self, rank: int, layout: Layout, algorithm_spec: dict, key: bytes) -> None:
        try:
            auth.answer(self._sock, key)
        except wire.ServerBusyError:
            raise
        except (EOFError, OSError) as err:
            raise self._gone("its key", err) from err
        hello = {"rank": rank, "layout": layout.to_json(), "algorithm": algorithm_spec}
        if self.part is not None:
            hello["part"] = list(self.part)
        welcome = self._control(wire.Kind.HELLO, wire.json_payload(hello), expect=wire.Kind.WELCOME)
        welcome = welcome.json()
        self.mailbox = self._open_mailbox(welcome, layout)
        self.layout = layout
        #: Which run of the server process this connection reached: a restarted server has a new one.
        self.incarnation = str(welcome.get("incarnation", ""))

    def _exchange(
        self,
        kind: wire.Kind,
        sent: Tensor | None,
        expect: wire.Kind,
        received: Tensor,
        sent_dtype: torch.dtype | None = None,
        **fields: int,
    ) -> wire.Header:
        """One request carrying ``sent`` (or nothing) and the named header ``fields``, answered by an ``expect``
        frame whose vector lands in ``received``; returns that frame's header."""
        with self._one_request:
            self.send_request(kind, sent, sent_dtype, **fields)
            return self.receive_reply(kind, expect, received)

    def send_request(self, kind: wire.Kind, sent: Tensor | None, sent_dtype: torch.dtype | None = None, **fields: int):
        """The first half of an exchange: send the request. The caller holds the connection (nothing else is in
        flight on it) until :meth:`receive_reply`; a sharded client sends every part before it receives any."""
        try:
            self._send(kind, sent, sent_dtype, fields)
        except (EOFError, OSError) as err:
            raise self._gone(kind.name, err) from err

    def receive_reply(self, kind: wire.Kind, expect: wire.Kind, received: Tensor) -> wire.Header:
        """The second half of an exchange: the ``expect`` frame answering ``kind``, its vector received into
        ``received``; an ERROR frame raises :class:`~lightning_adag.wire.ServerRefusedError`."""
        try:
            header = wire.read_header(self._sock, max_payload=max(self.mailbox.nbytes, wire.MAX_CONTROL_PAYLOAD))
            if header.kind is expect:
                self._receive(header, received)
                return header
            frame = wire.read_payload(self._sock, header)
        except (EOFError, OSError) as err:
            raise self._gone(kind.name, err) from err
        raise self._unexpected(kind, frame, expect)

    def _control(self, kind: wire.Kind, payload: bytes, *, expect: wire.Kind) -> wire.Frame:
        try:
            with self._one_request:
                wire.send(self._sock, kind, payload=payload)
                frame = wire.recv(self._sock)
        except (EOFError, OSError) as err:
            raise self._gone(kind.name, err) from err
        wire.check_not_busy(frame)
        if frame.kind is not expect:
            raise self._unexpected(kind, frame, expect)
        return frame

    def _unexpected(self, kind: wire.Kind, frame: wire.Frame, expect: wire.Kind) -> Exception:
        if frame.kind is wire.Kind.ERROR:
            return wire.ServerRefusedError(
                f"the parameter server refused {kind.name}: {frame.payload.decode(errors='replace')}"
            )
        return wire.ProtocolError(f"expected {expect.name} in answer to {kind.name}, got {frame.kind.name}")

    def _gone(self, what: str, err: BaseException) -> wire.ServerGoneError:
        return wire.ServerGoneError(
            f"the parameter server at {self.address} is gone ({type(err).__name__}: {err}) while this worker"
            f" sent {what}; it has probably died, see its log"
        )


class ChannelRefused(Exception):
    """A transport cannot open a channel for this connection (for example, no memory for its buffer)."""


class Channel:
    """The server's side of one worker's connection: ``buffer``, the flat vector requests are received into and
    replies sent from (the worker's mailbox, or a buffer of the server's), and what the WELCOME frame tells the
    worker about it."""

    buffer: Tensor
    welcome: dict

    def attached(self) -> None:
        """The worker sent its first frame after WELCOME (so it has set up its side of the buffer)."""

    def receive(
        self, sock: socket.socket, header: wire.Header, vector: Tensor, dtype: torch.dtype | None = None
    ) -> None:
        """Complete a request whose vector belongs in ``vector``, a view of :attr:`buffer` (its bytes hold
        ``dtype`` when that is given: a commit payload)."""
        raise NotImplementedError

    def reply(self, sock: socket.socket, kind: wire.Kind, vector: Tensor, **fields: int) -> None:
        """Answer with ``vector`` (a view of :attr:`buffer`) and the named header ``fields``."""
        raise NotImplementedError

    def close(self) -> None:
        """The connection ended: release the buffer."""


class Listener:
    """A server's listening socket for one transport, bound at ``where`` (an address in the transport's own
    terms), and the channel each accepted connection gets."""

    def __init__(self, where: str) -> None:
        self.socket: socket.socket
        self.address: str  # what workers connect to
        raise NotImplementedError

    def channel(self, conn: socket.socket, layout: Layout) -> Channel:
        raise NotImplementedError

    def close(self) -> None:
        """Stop listening and remove what this listener created."""
        self.socket.close()

    @staticmethod
    def default_where() -> str:
        """Where a training run's own server listens, when the run does not say."""
        raise NotImplementedError

    @staticmethod
    def clean_up(where: str, pid: int) -> None:
        """Remove what the server process ``pid``, told to listen at ``where``, leaves behind when it is killed
        before it can; never what another process made there (a live server at the same address)."""


@dataclass(frozen=True)
class Transport:
    """One way for workers to reach a server, as the registry names it."""

    name: str
    client: type[Client]
    listener: type[Listener]
    #: Whether every worker must run on the server's machine.
    local_only: bool = False
