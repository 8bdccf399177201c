"""A center cut into parts, each held by a server process of its own (``ADAGStrategy(servers=k)``).

One server's bandwidth is every worker's payload in and center out: past one server's NIC, the center is cut into
``k`` contiguous parts and ``adag-server --part i/k`` holds part ``i``. A worker keeps one TCP connection per
part; an exchange sends every part's request, then receives every part's reply.

**Where the cuts fall.** Only inside the trainable region, at multiples of 8 elements; the last part also carries
the frozen parameters and buffers (the region that travels by value). So every part is a :class:`Layout` of its own
(trainable elements, then values), and each server runs the unchanged server core on it. And each part's commit
payload is one contiguous byte range of the whole payload, sent from the worker's mailbox without a copy: a cut
at a multiple of 8 elements falls at a multiple of 16 bytes of a 16-bit delta, so the delta a part ends with is
aligned for the 4- or 8-byte values that follow it, exactly as in the whole payload.

**What a pull sees.** Each part's server orders the commits on its own, so each part of a pull holds a whole
number of commits (never half of one), but different parts may hold different numbers, and not necessarily the
same commits: a pull may mix parts at different clocks. The receipt's clock is a
:class:`~lightning_adag.wire.PartClocks` (as a number the lowest part clock; it keeps every part's), a commit
names every part's pulled clock, and each part's server computes that part's staleness from its own; the
receipt reports the highest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_adag import wire
from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.server.core import DIVERGED, require_finite
from lightning_adag.transports.tcp import TcpClient
from lightning_adag.wire import PartClocks, Receipt

#: Cuts fall at multiples of this many elements (see the module's docstring).
ALIGNMENT = 8


@dataclass(frozen=True)
class Part:
    """Elements ``[start, stop)`` of a center, as part ``index`` of ``count``, with the layout its server holds."""

    index: int
    count: int
    start: int
    stop: int
    layout: Layout

    def payload_bytes(self, payload: CommitPayload) -> slice:
        """Where this part's commit payload lies in ``payload``'s bytes (of the whole center's layout)."""
        start = self.start * payload.dtype.itemsize
        return slice(start, start + CommitPayload(self.layout, payload.dtype).nbytes)


def split(layout: Layout, count: int) -> list[Part]:
    """Cut ``layout`` into ``count`` parts: the trainable region evenly, at multiples of :data:`ALIGNMENT`
    elements, and the values with the last part."""
    if count < 1:
        raise ValueError(f"a center is cut into at least 1 part, not {count}")
    if layout.trainable < ALIGNMENT * count:
        raise ValueError(
            f"the model has {layout.trainable} trainable elements, too few to cut into {count} parts of at least"
            f" {ALIGNMENT}: use fewer servers"
        )
    cuts = [layout.trainable * i // count // ALIGNMENT * ALIGNMENT for i in range(count)] + [layout.numel]
    parts = []
    for index, (start, stop) in enumerate(zip(cuts, cuts[1:])):
        digest = layout.digest if count == 1 else f"{layout.digest}:{index}/{count}"
        trainable = min(stop, layout.trainable) - start
        parts.append(Part(index, count, start, stop, Layout(stop - start, trainable, layout.dtype, digest)))
    return parts


class _PartClient(TcpClient):
    """The connection to one part's server; its mailbox is that part's view of the whole mailbox."""

    def __init__(self, mailbox: Tensor, *args, **kwargs) -> None:
        self._view = mailbox
        super().__init__(*args, **kwargs)

    def _open_mailbox(self, welcome: dict, layout: Layout) -> Tensor:
        return self._view

    def _gone(self, what: str, err: BaseException) -> wire.ServerGoneError:
        index, count = self.part
        return wire.ServerGoneError(
            f"{super()._gone(what, err)}. It held part {index} of a center cut into {count}; a run over several"
            " servers does not survive a part server yet: resume it from its last checkpoint"
        )


class ShardedClient:
    """A worker's link to ``k`` part servers (``addresses``, in part order), with the interface of a
    :class:`~lightning_adag.transports.base.Client` over the whole center: one ``mailbox`` of the whole layout,
    whose part ``i`` is the mailbox of connection ``i``.

    ``parallel`` sends and receives each part on a thread of its own (the socket calls release the GIL, so the
    copies through the kernel run side by side); otherwise one thread sends every part in turn, then receives
    every reply in turn (the servers work meanwhile). Either way every request is sent before any reply is
    received: with a 16-bit delta, part ``i``'s center overwrites bytes where part ``i + 1``'s delta lay.
    Dynamic data assignment asks part 0's server.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        rank: int,
        layout: Layout,
        algorithm_spec: dict,
        key: bytes,
        timeout: float,
        pin_memory: bool = False,
        parallel: bool = True,
    ) -> None:
        self.address = ",".join(addresses)
        self.layout = layout
        self.parts = split(layout, len(addresses))
        self.mailbox = torch.zeros(layout.numel, dtype=layout.dtype, pin_memory=pin_memory)
        self._links: list[_PartClient] = []
        self._one_request = threading.Lock()
        self._threads = (
            ThreadPoolExecutor(len(self.parts) - 1, "adag-part") if parallel and len(addresses) > 1 else None
        )
        try:
            for part, address in zip(self.parts, addresses):
                view = self.mailbox[part.start : part.stop]
                link = _PartClient(
                    view, address, rank, part.layout, algorithm_spec, key, timeout, part=(part.index, part.count)
                )
                self._links.append(link)
        except BaseException:
            self.close()
            raise

    def initialize(self, clock: int) -> Receipt:
        """Offer the mailbox as the initial center; each part's server keeps the part it holds, if any. ``clock``
        is a :class:`PartClocks` of as many parts (a checkpoint of a run with the same cut) or one clock for all."""
        clocks = clock.parts if isinstance(clock, PartClocks) and len(clock.parts) == len(self.parts) else None
        headers = self._exchange(
            lambda i: (wire.Kind.INIT, self._links[i].mailbox, None, {"clock": clock if clocks is None else clocks[i]}),
            wire.Kind.CENTER,
            lambda i: self._links[i].mailbox,
        )
        return Receipt(PartClocks([h.clock for h in headers]))

    def commit(self, pulled_clock: int, steps: int, payload: CommitPayload | None = None) -> Receipt:
        """Commit every part of the payload written at the start of the mailbox; ``pulled_clock`` is the receipt
        clock of the center the window started from (one number: the same for every part)."""
        payload = payload or CommitPayload(self.layout, self.layout.dtype)
        sent = self.mailbox.view(torch.uint8)
        self._refuse_unless_finite(payload.views(sent[: payload.nbytes]))
        pulled = self._part_clocks(pulled_clock)

        def request(i: int):
            fields = {"pulled_clock": pulled[i], "steps": steps}
            return wire.Kind.COMMIT, sent[self.parts[i].payload_bytes(payload)], payload.dtype, fields

        headers = self._exchange(request, wire.Kind.CENTER, lambda i: self._links[i].mailbox)
        return Receipt(PartClocks([h.clock for h in headers]), max(h.staleness for h in headers))

    def pull(self) -> Receipt:
        headers = self._exchange(
            lambda i: (wire.Kind.PULL, None, None, {}), wire.Kind.CENTER, lambda i: self._links[i].mailbox
        )
        return Receipt(PartClocks([h.clock for h in headers]))

    def get_state(self, index: int) -> Receipt:
        """Every part's algorithm state vector ``index`` into the mailbox's trainable region."""
        headers = self._exchange(
            lambda i: (wire.Kind.GET_STATE, None, None, {"index": index}), wire.Kind.STATE, self._trainable
        )
        return Receipt(PartClocks([h.clock for h in headers]))

    def put_state(self, index: int) -> bool:
        """Offer the mailbox's trainable region as the state vector ``index``, each part to its server; True when
        every server took its part."""
        headers = self._exchange(
            lambda i: (wire.Kind.PUT_STATE, self._trainable(i), None, {"index": index}),
            wire.Kind.STATE,
            self._trainable,
        )
        return all(h.taken for h in headers)

    def stats(self) -> dict:
        """Every part server's statistics, in part order."""
        with self._one_request:
            return {"parts": [link.stats() for link in self._links]}

    def take(self, request: dict) -> tuple[int, int]:
        with self._one_request:
            return self._links[0].take(request)

    def interrupt(self) -> None:
        for link in self._links:
            link.interrupt()

    def close(self) -> None:
        for link in self._links:
            link.close()
        if self._threads is not None:
            self._threads.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------- helpers
    def _trainable(self, i: int) -> Tensor:
        return self._links[i].mailbox[: self.parts[i].layout.trainable]

    def _refuse_unless_finite(self, vectors: tuple[Tensor, Tensor]) -> None:
        """Refuse a commit holding NaN or an infinity here, whole, as one server would: each part's server would
        refuse only its own part, and the other parts would take theirs."""
        try:
            for vector in vectors:
                require_finite(vector, "this worker's commit", DIVERGED)
        except ValueError as err:
            raise wire.ServerRefusedError(f"the commit was not sent to the part servers: {err}") from None

    def _part_clocks(self, clock: int) -> tuple[int, ...]:
        if isinstance(clock, PartClocks) and len(clock.parts) == len(self.parts):
            return clock.parts
        return (int(clock),) * len(self.parts)

    def _exchange(
        self,
        request: Callable[[int], tuple[wire.Kind, Tensor | None, torch.dtype | None, dict[str, int]]],
        expect: wire.Kind,
        received: Callable[[int], Tensor],
    ) -> list[wire.Header]:
        """Send ``request(i)`` (kind, vector, its dtype on the wire, header fields) to every part ``i``, then
        receive each ``expect`` reply into ``received(i)``."""

        def send(i: int) -> None:
            kind, vector, dtype, fields = request(i)
            self._links[i].send_request(kind, vector, dtype, **fields)

        def receive(i: int) -> wire.Header:
            return self._links[i].receive_reply(request(i)[0], expect, received(i))

        with self._one_request:
            if self._threads is None:
                for i in range(len(self._links)):
                    send(i)
                return [receive(i) for i in range(len(self._links))]
            sent = threading.Barrier(len(self._links))

            def both(i: int) -> wire.Header:
                try:
                    send(i)
                except BaseException:
                    sent.abort()
                    raise
                sent.wait()
                return receive(i)

            futures = [self._threads.submit(both, i) for i in range(1, len(self._links))]
            outcomes: list = []
            for call in (lambda: both(0), *(future.result for future in futures)):
                try:
                    outcomes.append(call())
                except threading.BrokenBarrierError as err:  # another part failed to send: raise its error
                    outcomes.append(err)
                except BaseException as err:
                    outcomes.append(err)
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures:
                raise next((f for f in failures if not isinstance(f, threading.BrokenBarrierError)), failures[0])
            return outcomes
