"""The parameter-server process's connections: accept workers, authenticate them, and answer their frames.

One thread per connected worker, so a slow or stalled worker never blocks another's commits; commits themselves
are serialized by :class:`ServerCore`'s lock (the tensor arithmetic releases the GIL). A tensor payload is
received completely into the connection's own buffer before the core sees it, so a worker that dies in the middle
of a commit changes nothing. A connection that sends anything malformed gets an ERROR frame and is closed.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import selectors
import socket
import threading
import time
from dataclasses import dataclass

import torch

from lightning_adag import auth, wire
from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.plan import EpochPlan
from lightning_adag.server.assignment import Assignments
from lightning_adag.server.core import LayoutMismatchError, ServerCore
from lightning_adag.server.refusals import RefusalLog
from lightning_adag.transports.base import Channel, ChannelRefused, Listener

log = logging.getLogger("lightning_adag.server")

HANDSHAKE_TIMEOUT = 10.0  # seconds a peer has, in all, to authenticate and say hello
MAX_HANDSHAKES = 256  # connections allowed to be joining at once, by default (--max-handshakes)
#: Seconds after which a peer that has not authenticated may be turned away to make room for another: an honest
#: worker answers the challenge within milliseconds.
EVICTABLE_AFTER = 1.0
BUSY = b"the parameter server is busy: too many peers are joining at once; retry shortly"
_REFUSED = (
    wire.ProtocolError,
    auth.AuthenticationError,
    LayoutMismatchError,
    KeyError,
    TypeError,
    ValueError,
    ArithmeticError,
    RuntimeError,
    ChannelRefused,
)


@dataclass(eq=False)
class Handshake:
    """A connection that has not finished joining."""

    conn: socket.socket
    started: float
    authenticated: bool = False
    evicted: bool = False


@dataclass(eq=False)
class JoinedWorker:
    """A joined worker's connection: who it says it is, its number (what per-worker state is kept under), its
    model and algorithm, and whether the server's center is known to agree with them."""

    rank: int
    connection: int
    layout: Layout
    algorithm: dict
    agreed: bool


class Service:
    """Serves one :class:`ServerCore` through any number of transport listeners (see
    :mod:`lightning_adag.transports`); each connection gets its transport's channel. A node's aggregator serves
    its own core (see :mod:`lightning_adag.server.aggregator`) and hands data assignment on to the server above it
    (``assignments``: anything with :meth:`Assignments.take`)."""

    def __init__(
        self,
        core: ServerCore,
        key: bytes,
        assignments: Assignments | None = None,
        part: tuple[int, int] | None = None,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self.core = core
        self.assignments = assignments or Assignments()
        self.part = part  # (i, k): this server holds part i of a center cut into k
        self._key = key
        self._listeners: list[Listener] = []
        self._connections: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._max_handshakes = max_handshakes
        self._handshakes: dict[socket.socket, Handshake] = {}  # under _guard
        self._refusals = RefusalLog(log)
        self._connection_ids = itertools.count()
        self.incarnation = secrets.token_hex(8)  # workers tell a restarted server from the one they left

    def listen(self, listener: Listener) -> None:
        listener.socket.listen(256)
        self._listeners.append(listener)

    def serve(self, lifeline: int | None = None) -> None:
        """Accept workers until the owner is gone, or forever when there is none. The owner holds the write end
        of the ``lifeline`` pipe; end-of-file means it exited. Its children may have inherited that end by
        forking, so the parent pid is checked too. A signal handler that raises (SystemExit) stops it early."""
        owner = os.getppid()
        with selectors.DefaultSelector() as selector:
            for listener in self._listeners:
                selector.register(listener.socket, selectors.EVENT_READ, listener)
            if lifeline is not None:
                selector.register(lifeline, selectors.EVENT_READ, None)
            while True:
                self._refusals.flush()
                for key, _ in selector.select(timeout=1.0):
                    if key.data is None:
                        log.info("owner process is gone; shutting down")
                        return
                    self._accept(key.data)
                if lifeline is not None and os.getppid() != owner:
                    log.info("owner process is gone; shutting down")
                    return

    def _accept(self, listener: Listener) -> None:
        """Start a worker's thread. While ``max_handshakes`` peers are joining, make room by turning away the
        oldest that has not authenticated within :data:`EVICTABLE_AFTER` (a silent socket), or else turn this one
        away as busy: either way the one turned away is told so and retries. Never let an accept error (out of
        file descriptors, a peer that reset at once) stop the server."""
        try:
            conn, peer = listener.socket.accept()
        except OSError as err:
            self._refusals.warn("accept failed: %s", err)
            time.sleep(0.05)
            return
        with self._guard:
            admitted = len(self._handshakes) < self._max_handshakes or self._evict_stalest()
            if admitted:
                handshake = self._handshakes[conn] = Handshake(conn, time.monotonic())
        if not admitted:
            self._refusals.warn(
                "turning %s away: %d peers are joining at once", peer or "a peer", len(self._handshakes)
            )
            _turn_away(conn)
            return
        try:
            threading.Thread(target=self._serve_worker, args=(handshake, peer, listener), daemon=True).start()
        except RuntimeError as err:  # cannot start a thread
            self._refusals.warn("turning %s away: %s", peer or "a peer", err)
            self._end_handshake(handshake)
            _turn_away(conn)

    def _evict_stalest(self) -> bool:
        """Turn away the oldest joining peer that has not authenticated within :data:`EVICTABLE_AFTER` seconds, to
        make room (called under ``_guard``); False if there is none. Its own thread tells it and closes it."""
        now = time.monotonic()
        stale = [h for h in self._handshakes.values() if not h.authenticated and now - h.started > EVICTABLE_AFTER]
        if not stale:
            return False
        oldest = min(stale, key=lambda handshake: handshake.started)
        oldest.evicted = True
        del self._handshakes[oldest.conn]
        try:
            oldest.conn.shutdown(socket.SHUT_RD)  # wakes its thread, blocked reading the peer's answer
        except OSError:
            pass
        return True

    def _end_handshake(self, handshake: Handshake) -> None:
        with self._guard:
            self._handshakes.pop(handshake.conn, None)

    def close(self) -> None:
        """Close the listeners (removing what they created) and every worker connection (their threads then
        release their buffers)."""
        for listener in self._listeners:
            listener.close()
        with self._guard:
            for conn in list(self._connections):
                _shut(conn)

    def _serve_worker(self, handshake: Handshake, peer, listener: Listener) -> None:
        conn, worker = handshake.conn, None
        with self._guard:
            self._connections.add(conn)
        channel = None
        who = f"peer {peer or 'on the Unix socket'}"
        # One deadline for the whole handshake (a per-recv timeout lets a peer trickle a byte at a time).
        watchdog = threading.Timer(HANDSHAKE_TIMEOUT, _shut, args=(conn,))
        watchdog.start()
        try:
            try:
                auth.challenge(conn, self._key)
                handshake.authenticated = True
                hello = wire.recv(conn)
                if hello.kind is not wire.Kind.HELLO:
                    raise wire.ProtocolError(f"expected HELLO after authentication, got {hello.kind.name}")
                request = hello.json()
                rank, algorithm = int(request["rank"]), dict(request["algorithm"])
                layout = Layout.from_json(request["layout"])
                who = f"worker {rank} ({peer or 'shared memory'})"
                self._check_part(request.get("part"))
                agreed = self.core.configure(layout, algorithm)
                channel = listener.channel(conn, layout)
                worker = JoinedWorker(rank, next(self._connection_ids), layout, algorithm, agreed)
            finally:
                watchdog.cancel()
                self._end_handshake(handshake)
            welcome = {
                **channel.welcome,
                "initialized": self.core.initialized,
                "clock": self.core.clock,
                "incarnation": self.incarnation,
            }
            wire.send(conn, wire.Kind.WELCOME, payload=wire.json_payload(welcome))
            log.info("%s joined at clock %d", who, self.core.clock)
            max_payload = max(layout.nbytes, wire.MAX_CONTROL_PAYLOAD)
            header = wire.read_header(conn, max_payload)
            channel.attached()
            while True:
                self._answer(conn, worker, header, channel)
                header = wire.read_header(conn, max_payload)
        except EOFError:
            if handshake.evicted:
                self._refusals.warn("turned %s away: silent while other peers were waiting to join", who)
                _turn_away(conn)
        except _REFUSED as err:
            (log.warning if handshake.authenticated else self._refusals.warn)(
                "closing the connection of %s: %s", who, err
            )
            if not isinstance(err, auth.AuthenticationError):  # challenge() already told the peer
                try:
                    wire.send(conn, wire.Kind.ERROR, payload=str(err).encode("utf-8", "replace"))
                except OSError:
                    pass
        except OSError as err:
            log.info("%s dropped: %s", who, err)
        finally:
            if channel is not None:
                channel.close()
            if worker is not None:
                self.core.forget(worker.connection)
                log.info("%s left", who)
            with self._guard:
                self._connections.discard(conn)
            conn.close()

    def _check_part(self, asked: list | None) -> None:
        """Refuse a worker that expects another part of the center than this server holds (or a whole one)."""
        if asked is not None:
            if not isinstance(asked, list) or len(asked) != 2:
                raise wire.ProtocolError(f"HELLO's part must be [index, count], got {asked!r}")
            asked = (int(asked[0]), int(asked[1]))
        if asked == self.part:
            return
        if self.part is None:
            raise LayoutMismatchError(
                f"this server holds a whole center, but the worker asks for part {asked[0]} of {asked[1]}: start"
                f" {asked[1]} servers with --part i/{asked[1]}, or run the workers with servers=1"
            )
        index, count = self.part
        if asked is None:
            raise LayoutMismatchError(
                f"this server holds part {index} of a center cut into {count} (--part {index}/{count}): give the"
                f" workers all {count} servers' addresses, in part order"
            )
        raise LayoutMismatchError(
            f"this server holds part {index} of {count} (--part {index}/{count}), but the worker asks for part"
            f" {asked[0]} of {asked[1]}: list the servers' addresses in the order of their --part, and resume a"
            " server snapshot only with the same number of parts"
        )

    def _answer(self, conn: socket.socket, worker: JoinedWorker, header: wire.Header, channel: Channel) -> None:
        kind, buffer, connection = header.kind, channel.buffer, worker.connection
        trainable = buffer[: worker.layout.trainable]
        if kind in (wire.Kind.COMMIT, wire.Kind.PULL, wire.Kind.GET_STATE) and not worker.agreed:
            # it joined an empty server, which another worker's model may have filled since
            worker.agreed = self.core.configure(worker.layout, worker.algorithm)
        if kind is wire.Kind.COMMIT:
            payload = CommitPayload(worker.layout, wire.dtype_of(header))
            sent = buffer.view(torch.uint8)[: payload.nbytes]
            channel.receive(conn, header, sent, payload.dtype)
            if header.steps < 1:
                raise ValueError(f"a commit must cover at least one step, got {header.steps}")
            delta, values = payload.views(sent)
            receipt = self.core.commit(worker.rank, delta, header.pulled_clock, buffer, values, connection)
            channel.reply(conn, wire.Kind.CENTER, buffer, clock=receipt.clock, staleness=receipt.staleness)
        elif kind is wire.Kind.INIT or kind is wire.Kind.RECOVER:
            channel.receive(conn, header, buffer)
            if kind is wire.Kind.INIT:
                self.core.initialize(buffer, header.clock, worker.layout, worker.algorithm)
            else:
                self.core.recover(buffer, header.clock, connection, worker.layout, worker.algorithm)
            worker.agreed = True
            channel.reply(conn, wire.Kind.CENTER, buffer, clock=self.core.read(buffer, connection).clock)
        elif kind is wire.Kind.PUT_STATE:
            channel.receive(conn, header, trainable)
            taken = self.core.load_state(header.index, trainable, worker.layout, worker.algorithm)
            channel.reply(conn, wire.Kind.STATE, trainable, clock=self.core.clock, taken=int(taken))
        elif kind is wire.Kind.TAKE:
            if header.length > wire.MAX_CONTROL_PAYLOAD:
                raise wire.ProtocolError(f"a TAKE payload of {header.length} bytes exceeds {wire.MAX_CONTROL_PAYLOAD}")
            request = wire.read_payload(conn, header).json()
            plan = EpochPlan(**request["plan"])
            start, stop = self.assignments.take(
                str(request["run"]), int(request["epoch"]), int(request["worker"]), plan
            )
            wire.send(conn, wire.Kind.GIVEN, payload=wire.json_payload({"start": start, "stop": stop}))
        else:
            if header.length:  # refused before a byte of it is read or allocated
                raise wire.ProtocolError(f"{kind.name} carries no payload, this one announces {header.length} bytes")
            wire.read_payload(conn, header)  # checks that no tensor is announced either
            if kind is wire.Kind.PULL:
                channel.reply(conn, wire.Kind.CENTER, buffer, clock=self.core.read(buffer, connection).clock)
            elif kind is wire.Kind.GET_STATE:
                state_clock = self.core.read_state(header.index, trainable).clock
                channel.reply(conn, wire.Kind.STATE, trainable, clock=state_clock)
            elif kind is wire.Kind.STATS:
                wire.send(conn, wire.Kind.REPORT, payload=wire.json_payload(self.core.stats()))
            else:
                raise wire.ProtocolError(f"unexpected {kind.name} frame from a worker")


def _turn_away(conn: socket.socket) -> None:
    """Tell a peer that the server is busy (it retries), without ever blocking on it, and close it."""
    try:
        conn.setblocking(False)
        conn.send(wire.encode(wire.Kind.BUSY, payload=BUSY))
    except OSError:
        pass
    conn.close()


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
