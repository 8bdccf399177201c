"""A node's aggregator: the server its local workers commit to, which hands their summed commits on to the server
above it (the global one) as one commit, and the center that commit brings back to each of them.

The workers of a node reach their aggregator over shared memory; only the aggregator crosses the network. Work goes
upstream in *rounds*: every commit and pull that arrives joins the open round, and a round leaves once every local
worker waits in it, or once its first request has waited ``gather`` seconds, whichever comes first, one round at a
time. A round with commits is one upstream commit holding the sum of their deltas (accumulated in the center's
dtype) and the buffers of the last of them; a round of pulls only is one upstream pull. Every request of the round
gets the center that comes back. So for a rule whose server adds commits (see ``Algorithm.unsummable``) the global
center receives exactly the sum of every worker's deltas, a commit still returns only once its delta is in the
global center (barriers, validation and the final center mean what they meant), and with n workers in step the
network carries one commit and one center per n worker commits.

Waiting for every local worker keeps the workers of a node in step (they all get the same reply at once, so the
next round fills again); the ``gather`` bound keeps a slow or idle worker (validating, or done with its epoch)
from holding the others for longer than that.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch
from torch import Tensor

from lightning_adag import wire
from lightning_adag.algorithms import server_rule
from lightning_adag.flat import Layout
from lightning_adag.plan import EpochPlan
from lightning_adag.server.core import WorkerRecord, check_agreement, commit_values, require_finite_commit
from lightning_adag.transports import connect
from lightning_adag.transports.base import Client
from lightning_adag.wire import Receipt

#: Seconds a round waits for the rest of a node's workers once its first request has arrived.
GATHER = 0.05


class UpstreamError(RuntimeError):
    """The server above the aggregator refused a round or is gone; every request of that round fails with it."""


def check_summable(algorithm_spec: dict) -> None:
    """Raise a ``ValueError`` unless the rule ``algorithm_spec`` names lets several commits travel as their sum."""
    reason = server_rule(algorithm_spec).unsummable
    if reason is not None:
        raise ValueError(f"node-local aggregation cannot run this algorithm ({algorithm_spec}): {reason}")


@dataclasses.dataclass
class _Round:
    """The requests that travel upstream together."""

    opened: float
    commits: int = 0
    pulls: int = 0
    pulled_clock: int = 0  # the oldest center the round's commits started from
    readers: int = 0  # requests that have not copied the reply yet
    receipt: Receipt | None = None
    error: UpstreamError | None = None

    @property
    def requests(self) -> int:
        return self.commits + self.pulls


class AggregatorCore:
    """What :class:`~lightning_adag.server.service.Service` serves in a node's aggregator, in place of a
    :class:`~lightning_adag.server.core.ServerCore`: the same requests, answered through the server at
    ``upstream`` (reached over TCP with ``key``, as worker ``rank``: the node's rank). ``workers`` is the number of
    local workers a round waits for, at most ``gather`` seconds.

    The first local worker's layout and algorithm open the upstream connection (a rule that cannot be summed is
    refused then); later workers must agree. Local workers see the global clock: a commit's staleness is the number
    of upstream commits (rounds, of every node) applied between the center its window started from and the round
    that carried it.
    """

    def __init__(
        self, upstream: str, key: bytes, rank: int, workers: int, gather: float = GATHER, timeout: float = 120.0
    ) -> None:
        if workers < 1:
            raise ValueError(f"an aggregator serves at least one local worker, got {workers}")
        self.upstream, self.rank, self.workers, self.gather = upstream, rank, workers, gather
        self._key, self._timeout = key, timeout
        self._changed = threading.Condition()
        self._round: _Round | None = None
        self._closed = False
        self._sending = False  # a round is upstream, or its requests still copy its reply
        self._link: Client | None = None
        self._sum: Tensor | None = None
        self._values: Tensor | None = None
        self.layout: Layout | None = None
        self.algorithm_spec: dict | None = None
        self.clock = 0
        self.initialized = False
        self.rounds = 0
        self.commits = 0
        self.local: dict[int, WorkerRecord] = {}

    # ------------------------------------------------------------------------------- what Service asks for
    def configure(self, layout: Layout, algorithm_spec: dict) -> bool:
        """The first local worker's layout and algorithm open the link upstream and are fixed from then on (True:
        the worker agrees with them)."""
        with self._changed:
            if self.layout is not None:
                check_agreement(self.layout, self.algorithm_spec, layout, algorithm_spec)
                return True
            check_summable(algorithm_spec)
            try:
                link = connect("tcp", self.upstream, self.rank, layout, algorithm_spec, self._key, self._timeout)
            except (wire.ServerGoneError, wire.ServerBusyError, wire.ServerRefusedError, wire.ProtocolError) as err:
                raise UpstreamError(f"the node's aggregator cannot join the server at {self.upstream}: {err}") from err
            self._link, self.layout, self.algorithm_spec = link, layout, dict(algorithm_spec)
            self._sum = torch.zeros(layout.trainable, dtype=layout.dtype)
            self._values = torch.zeros(layout.numel - layout.trainable, dtype=layout.dtype)
            threading.Thread(target=self._send_rounds, name="adag-upstream", daemon=True).start()
            return True

    def initialize(
        self, values: Tensor, clock: int, layout: Layout | None = None, algorithm_spec: dict | None = None
    ) -> Receipt:
        """Offer ``values`` upstream as the initial center (the server keeps its own if it holds one)."""
        with self._changed:
            self._require_layout()
            if layout is not None:
                check_agreement(self.layout, self.algorithm_spec, layout, algorithm_spec)
            while self._sending:  # the link's mailbox is the round's until its requests have copied the reply
                self._changed.wait()
            receipt = self._upstream(lambda link: self._offer(link, values, clock))
            self._seen(receipt)
            return receipt

    def recover(self, values: Tensor, clock: int, connection=None, layout=None, algorithm_spec=None) -> Receipt:
        """Refused: an aggregator never restarts under its workers, so no worker holds one of its centers."""
        raise ValueError("a node's aggregator holds no center of its own to recover")

    def commit(
        self,
        worker: int,
        delta: Tensor,
        pulled_clock: int,
        out: Tensor | None = None,
        values: Tensor | None = None,
        connection: int | None = None,  # noqa: ARG002 - ServerCore's signature: nothing is kept per connection
    ) -> Receipt:
        """Add ``worker``'s commit to the open round and wait for the center that round brings back (into
        ``out``). A non-finite commit is refused here, before it can spoil a sum that others share."""
        require_finite_commit(worker, delta, values)
        with self._changed:
            self._require_layout()
            values = commit_values(self.layout, self.clock, delta, pulled_clock, values)
            current = self._join()
            self._sum.add_(delta[: self.layout.trainable])
            self._values.copy_(values)
            current.pulled_clock = pulled_clock if not current.commits else min(current.pulled_clock, pulled_clock)
            current.commits += 1
            self._changed.notify_all()
        receipt = self._collect(current, out)
        staleness = receipt.clock - 1 - pulled_clock  # the round was applied at the clock before its receipt's
        with self._changed:
            self.local.setdefault(worker, WorkerRecord()).add(staleness)
        return Receipt(receipt.clock, staleness)

    def read(self, out: Tensor, connection: int | None = None) -> Receipt:  # noqa: ARG002 - ServerCore's signature
        """Pull the global center into ``out`` with the open round."""
        with self._changed:
            self._require_layout()
            current = self._join()
            current.pulls += 1
            self._changed.notify_all()
        return Receipt(self._collect(current, out).clock)

    def forget(self, connection: int) -> None:
        """Nothing is kept per connection here (the server above keeps its own per this node's link)."""

    def read_state(self, index: int, out: Tensor) -> Receipt:  # noqa: ARG002
        raise ValueError(f"{self.algorithm_spec} keeps no server-side state vector, not #{index}")

    def load_state(self, index: int, values: Tensor, layout=None, algorithm_spec=None) -> bool:  # noqa: ARG002
        raise ValueError(f"{self.algorithm_spec} keeps no server-side state vector, not #{index}")

    def take(self, run: str, epoch: int, worker: int, plan: EpochPlan) -> tuple[int, int]:
        """The next chunk of an epoch's samples, from the server above (it assigns the run's data)."""
        self._require_layout()
        request = {"run": run, "epoch": epoch, "worker": worker, "plan": dataclasses.asdict(plan)}
        return self._upstream(lambda link: link.take(request))

    def stats(self) -> dict:
        """The server's statistics above, and this node's: its workers' commits and staleness (global clock), and
        how many rounds carried them."""
        report = self._upstream(lambda link: link.stats()) if self._link is not None else {}
        with self._changed:
            report["node"] = {
                "rank": self.rank,
                "rounds": self.rounds,
                "commits": self.commits,
                "workers": {str(rank): record.to_json() for rank, record in sorted(self.local.items())},
            }
        return report

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._link is not None:
            self._link.close()

    # ------------------------------------------------------------------------------------------- rounds
    def _join(self) -> _Round:
        """The open round (the caller holds the lock)."""
        if self._round is None:
            self._round = _Round(time.monotonic())
        return self._round

    def _collect(self, current: _Round, out: Tensor | None) -> Receipt:
        """Wait for ``current``'s reply and copy it into ``out``; the next round waits until every request has."""
        with self._changed:
            while current.receipt is None and current.error is None:
                self._changed.wait()
        try:
            if current.error is not None:
                raise current.error
            if out is not None:
                out.copy_(self._link.mailbox)
            return current.receipt
        finally:
            with self._changed:
                current.readers -= 1
                self._changed.notify_all()

    def _due(self) -> float | None:
        """Seconds until the open round leaves (0: now), or None without one."""
        if self._round is None:
            return None
        if self._round.requests >= self.workers:
            return 0.0
        return max(0.0, self._round.opened + self.gather - time.monotonic())

    def _send_rounds(self) -> None:
        """The upstream link's thread: send each round when it is due, hand its reply to its requests, and wait
        until they have copied it before the next round overwrites it."""
        link, trainable = self._link, self.layout.trainable
        while True:
            with self._changed:
                while not self._closed and (due := self._due()) != 0.0:
                    self._changed.wait(due)
                if self._closed:
                    return
                current, self._round = self._round, None
                current.readers, self._sending = current.requests, True
                if current.commits:
                    link.mailbox[:trainable].copy_(self._sum)
                    link.mailbox[trainable:].copy_(self._values)
                    self._sum.zero_()
            try:
                receipt = self._upstream(lambda link, sent=current: self._send(link, sent))
            except Exception as err:  # whatever failed, the round's requests hear of it instead of waiting forever
                failure = (
                    err if isinstance(err, UpstreamError) else UpstreamError(f"a round failed to go upstream: {err}")
                )
                receipt, current.error = None, failure
            with self._changed:
                if receipt is not None:
                    self._seen(receipt)
                    self.rounds += bool(current.commits)
                    self.commits += current.commits
                current.receipt = receipt
                self._changed.notify_all()
                while current.readers:
                    self._changed.wait()
                self._sending = False
                self._changed.notify_all()

    # ------------------------------------------------------------------------------------------- helpers
    def _upstream(self, request):
        """``request(link)``, with the server's refusals and departure said as this node's aggregator sees them."""
        try:
            return request(self._link)
        except (wire.ServerGoneError, wire.ServerRefusedError, wire.ProtocolError) as err:
            raise UpstreamError(f"the node's aggregator lost its server at {self.upstream}: {err}") from err

    @staticmethod
    def _send(link: Client, sent: _Round) -> Receipt:
        """One upstream commit holding the round's sum (already in the link's mailbox), or a pull."""
        return link.commit(sent.pulled_clock, sent.commits) if sent.commits else link.pull()

    def _offer(self, link: Client, values: Tensor, clock: int) -> Receipt:
        link.mailbox.copy_(values)
        return link.initialize(clock)

    def _seen(self, receipt: Receipt) -> None:
        self.clock = max(self.clock, receipt.clock)
        self.initialized = True

    def _require_layout(self) -> None:
        if self.layout is None:
            raise RuntimeError("no worker has said hello yet: the aggregator does not know the model's layout")
