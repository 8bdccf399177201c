"""The parameter-server process: accepts workers, answers their frames, and shuts down cleanly.

One thread per connected worker, so a slow or stalled worker never blocks another's commits; the commits
themselves are serialized by :class:`ServerCore`'s lock (the tensor arithmetic releases the GIL).
A connection that sends anything malformed gets an ERROR frame and is closed; the center is untouched.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import socket
import threading
from pathlib import Path

from lightning_adag import wire
from lightning_adag.flat import Layout
from lightning_adag.server.core import LayoutMismatchError, ServerCore
from lightning_adag.transports import shm

log = logging.getLogger("lightning_adag.server")


class Service:
    """Serves one :class:`ServerCore` over a listening Unix socket, with a mailbox segment per worker named
    ``/dev/shm/<shm_prefix>-w<N>``."""

    def __init__(self, listener: socket.socket, shm_prefix: str, core: ServerCore | None = None) -> None:
        self.core = core or ServerCore()
        self._listener = listener
        self._shm_prefix = shm_prefix
        self._ids = itertools.count()
        self._connections: set[socket.socket] = set()
        self._guard = threading.Lock()

    def serve(self, lifeline: int | None = None) -> None:
        """Accept workers until the lifeline (a pipe whose write end the owner holds) reaches end-of-file,
        or forever when there is none. Raise SystemExit from a signal handler to stop early."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ, "accept")
            if lifeline is not None:
                selector.register(lifeline, selectors.EVENT_READ, "lifeline")
            while True:
                for key, _ in selector.select():
                    if key.data == "lifeline":
                        log.info("owner process is gone; shutting down")
                        return
                    conn, _ = self._listener.accept()
                    threading.Thread(target=self._serve_worker, args=(conn,), daemon=True).start()

    def close(self) -> None:
        """Stop serving: close the listener and every worker connection (their threads then release their
        mailboxes)."""
        self._listener.close()
        with self._guard:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve_worker(self, conn: socket.socket) -> None:
        with self._guard:
            self._connections.add(conn)
        mailbox_path = Path(shm.SHM_DIR, f"{self._shm_prefix}-w{next(self._ids)}")
        rank = None
        try:
            hello = wire.recv(conn)
            if hello.kind is not wire.Kind.HELLO:
                raise wire.ProtocolError(f"expected HELLO first, got {hello.kind.name}")
            request = hello.json()
            rank = int(request["rank"])
            layout = Layout.from_json(request["layout"])
            self.core.configure(layout, dict(request["algorithm"]))
            mailbox = shm.create_segment(mailbox_path, layout.numel, layout.dtype)
            log.info("worker %s joined (%d elements, clock %d)", rank, layout.numel, self.core.clock)
            welcome = {"mailbox": str(mailbox_path), "initialized": self.core.initialized, "clock": self.core.clock}
            wire.send(conn, wire.Kind.WELCOME, payload=wire.json_payload(welcome))
            frame = wire.recv(conn)
            shm.unlink_quietly(mailbox_path)  # both sides have it mapped now
            while True:
                self._answer(conn, rank, frame, mailbox)
                frame = wire.recv(conn)
        except EOFError:
            pass
        except (wire.ProtocolError, LayoutMismatchError, KeyError, TypeError, ValueError, RuntimeError) as err:
            log.warning("closing connection of worker %s: %s", rank, err)
            try:
                wire.send(conn, wire.Kind.ERROR, payload=str(err).encode("utf-8", "replace"))
            except OSError:
                pass
        except OSError as err:
            log.info("worker %s connection dropped: %s", rank, err)
        finally:
            shm.unlink_quietly(mailbox_path)
            with self._guard:
                self._connections.discard(conn)
            conn.close()
            if rank is not None:
                log.info("worker %s left", rank)

    def _answer(self, conn: socket.socket, rank: int, frame: wire.Frame, mailbox) -> None:
        if frame.payload:
            raise wire.ProtocolError(f"{frame.kind.name} carries no payload on the shared-memory transport")
        if frame.kind is wire.Kind.COMMIT:
            if frame.b < 1:
                raise ValueError(f"a commit must cover at least one step, got {frame.b}")
            receipt = self.core.commit(rank, mailbox, frame.a, out=mailbox)
            wire.send(conn, wire.Kind.CENTER, receipt.clock, receipt.staleness)
        elif frame.kind is wire.Kind.PULL:
            wire.send(conn, wire.Kind.CENTER, self.core.read(mailbox, rank).clock)
        elif frame.kind is wire.Kind.INIT:
            self.core.initialize(mailbox, frame.a)
            wire.send(conn, wire.Kind.CENTER, self.core.read(mailbox, rank).clock)
        elif frame.kind is wire.Kind.GET_STATE:
            receipt = self.core.read_state(frame.a, mailbox[: self.core.layout.trainable])
            wire.send(conn, wire.Kind.STATE, receipt.clock)
        elif frame.kind is wire.Kind.PUT_STATE:
            taken = self.core.load_state(frame.a, mailbox[: self.core.layout.trainable])
            wire.send(conn, wire.Kind.STATE, self.core.clock, int(taken))
        elif frame.kind is wire.Kind.STATS:
            wire.send(conn, wire.Kind.REPORT, payload=wire.json_payload(self.core.stats()))
        else:
            raise wire.ProtocolError(f"unexpected {frame.kind.name} frame from a worker")
