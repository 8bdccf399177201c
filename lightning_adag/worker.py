"""A training process's side of the exchange: local parameters θ, the window's start θ⁰, and the server link."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from lightning_adag import kernels
from lightning_adag.algorithms import Algorithm
from lightning_adag.flat import FlatState
from lightning_adag.payload import CommitPayload
from lightning_adag.staging import Staging
from lightning_adag.wire import Receipt, ServerBusyError, ServerGoneError

log = logging.getLogger(__name__)


def check_overlappable(algorithm: Algorithm) -> None:
    """Raise a ``ValueError`` unless ``algorithm``'s exchanges can run in the background (see :class:`Worker`)."""
    if not algorithm.restarts_from_center:
        raise ValueError(
            f"overlap=True needs an algorithm that restarts every window from the center; {algorithm.name} keeps"
            " its own parameters: use overlap=False"
        )


class Worker:
    """Runs a worker's side of every exchange with the server, on a model laid out as a :class:`FlatState`: the
    algorithm says what to commit (:meth:`Algorithm.worker_delta`), the worker sends it and starts the next window.

    ``client`` is any transport client (see :mod:`lightning_adag.transports`). Between commits, the worker can
    *show* the center (for validation or a checkpoint) without losing its window: θ is stashed and put back
    before the next commit.

    ``compression`` (a 16-bit float dtype) sends each commit's delta in that dtype; the server still accumulates
    in the center's dtype. With ``error_feedback`` what the rounding drops is kept and added to the next commit.

    ``overlap`` runs each exchange on a background thread while the next window trains. The window's delta is taken
    at its end as usual, and the next window starts from the local θ (θ⁰ ← θ) instead of waiting for the center.
    When the center C arrives (checked by :meth:`poll`, which the callback calls after every optimizer step, and
    waited for at the latest at the next commit) it is folded in: θ ← θ + (C − θ⁰), θ⁰ ← C. The worker then stands
    on the center plus exactly the steps it took meanwhile, and its next delta measures those steps only. The price
    is delay: those steps started from θ as it stood at the commit, not from C (for ADAG they differ by
    (1 − 1/λ)(θ − θ⁰) of the committed window plus what other workers committed meanwhile), which a receipt's
    staleness, counted in commits, does not show. The values that travel by value (buffers such as running
    statistics) fold the same way against the values the commit sent, so the local updates made meanwhile are kept.
    Only algorithms that restart each window from the center can overlap (not AEASGD).

    Every exchange's receipt, once it has completed, is appended to :attr:`completed` (the callback drains it for
    its metrics).

    When the center's dtype is wider than the model's (16-bit "true" precision: a float32 center), the model can
    only show the center rounded; :meth:`show_center` then also keeps it exactly, on the CPU, in
    :attr:`exact_center` until :meth:`resume_window`, so that a checkpoint resumes from the center itself.

    ``reconnect`` (a function returning a new connected client) lets the worker survive its server: when the
    server is gone, the worker connects again, for up to ``patience`` seconds (a restarted server that every worker
    rejoins at once may turn some away as busy: they retry), and goes on. To a restarted server it offers the
    center it holds (θ⁰, the center of its last pull, with that pull's clock; see ``ServerCore.recover``), so the
    restarted server recovers the newest center any worker pulled. A commit that
    was not acknowledged is counted in :attr:`lost_commits` and not sent again (the old server may have applied
    it, and a center another worker pulled may hold it): its window's steps are dropped, and the worker goes on
    from the recovered center. With ``overlap`` the commit in flight is the one lost and the steps taken since are
    kept; its θ⁰ (θ as it committed) is then no center, so it offers it only as a server's first center (as INIT
    does), and AEASGD, whose workers never hold the center, offers θ the same way.
    """

    def __init__(
        self,
        flat: FlatState,
        client,
        algorithm: Algorithm,
        compression: torch.dtype | None = None,
        error_feedback: bool = True,
        overlap: bool = False,
        reconnect: Callable[[], object] | None = None,
        patience: float = 0.0,
    ) -> None:
        if overlap:
            check_overlappable(algorithm)
        self.flat = flat
        self.client = client
        self.algorithm = algorithm
        self.pulled_clock = 0
        self.shown_clock: int | None = None
        self.payload = CommitPayload(flat.layout, compression or flat.layout.dtype)
        self._theta0 = flat.trainable_region.clone()
        self._stash: Tensor | None = None
        self._staging = Staging(client.mailbox, self.payload, flat.vector.device)
        # Only the default exchange feeds a residual back (AEASGD rounds its elastic term before applying it).
        feeds_back = error_feedback and algorithm.restarts_from_center and self.payload.dtype != flat.layout.dtype
        self._residual = torch.zeros_like(self._theta0, dtype=torch.float32) if feeds_back else None
        self._background = ThreadPoolExecutor(1, thread_name_prefix="adag-exchange") if overlap else None
        self._values0 = flat.vector[flat.trainable :].clone() if overlap else None  # the values last sent
        self._in_flight: Future | None = None
        self.completed: list[Receipt] = []
        self.exact_center: Tensor | None = None
        self._reconnect, self._patience = reconnect, patience
        self.lost_commits = 0  # commits whose server died before it acknowledged them
        self.reconnections = 0

    def offer_initial_center(
        self, clock: int, server_state: dict[str, Tensor] | None = None, center: Tensor | None = None
    ) -> Receipt:
        """Propose this worker's parameters (or ``center``: a checkpoint's :attr:`exact_center`) as the center at
        ``clock``, with the algorithm's server-side state (all from a checkpoint, when resuming); the server keeps
        them only if it holds no center yet."""
        client = self._link()
        region = client.mailbox[: self.flat.trainable]
        for index, name in enumerate(self.algorithm.state_names):
            if server_state and name in server_state:
                region.copy_(server_state[name])
                client.put_state(index)
        client.mailbox.copy_(self.flat.vector if center is None else center)
        return client.initialize(clock)

    def server_state(self) -> tuple[int | None, dict[str, Tensor]]:
        """Copies (on the CPU) of the algorithm's server-side state vectors, all read at one clock, and that clock
        (``None`` when the algorithm keeps none, so they belong to any clock)."""
        self._link()
        while True:
            clocks, state = set(), {}
            try:
                for index, name in enumerate(self.algorithm.state_names):
                    clocks.add(self.client.get_state(index).clock)
                    state[name] = self.client.mailbox[: self.flat.trainable].clone()
            except ServerGoneError as err:
                self._recover(err)
                continue
            if len(clocks) <= 1:  # else a commit slipped in between two vectors: read them again
                return (clocks.pop() if clocks else None), state

    def reset_to_center(self) -> Receipt:
        """Pull the center and start a new window from it: θ ← C, θ⁰ ← C."""
        self.shown_clock = None
        return self.install(self.fetch())

    def commit(self, steps: int) -> Receipt | None:
        """End a window of ``steps`` local optimizer steps: commit what the algorithm says and, for rules that
        restart from the center, start the next window from the center the commit brings back (θ ← C, θ⁰ ← C).
        A rule that keeps its own parameters (AEASGD) measures its commit against the center pulled just before.
        Returns the receipt of the exchange that completed during the call: with ``overlap``, the previous one, if
        it had not been folded in yet (else None)."""
        self.resume_window()
        if self._background is not None:
            settled = self.settle()
            self._write_payload(self._theta0, steps)
            self._theta0.copy_(self.theta)  # until the center arrives, the next window starts here
            self._values0.copy_(self.flat.vector[self.flat.trainable :])
            self._in_flight = self._background.submit(self._exchange, self.pulled_clock, steps)
            return settled
        restarts = self.algorithm.restarts_from_center
        if restarts:
            self._write_payload(self._theta0, steps)
            clock = self.pulled_clock
        else:
            clock = self.fetch().clock
            self._write_payload(self.center, steps)
            self._staging.center_consumed()
        self._link()
        try:
            receipt = self._exchange(clock, steps)
        except ServerGoneError as err:
            receipt = self._lose_commit(err, exact=restarts)
        else:
            self.completed.append(receipt)
        if restarts:
            self.install(receipt)
        else:
            self.pulled_clock = receipt.clock
        return receipt

    def poll(self) -> Receipt | None:
        """With ``overlap``: fold in the center of the exchange in flight if it has arrived (never waits)."""
        if self._in_flight is not None and self._in_flight.done():
            return self.settle()
        return None

    def settle(self) -> Receipt | None:
        """Wait for the exchange in flight, if any, and fold its center into θ and θ⁰."""
        if self._in_flight is None:
            return None
        future, self._in_flight = self._in_flight, None
        try:
            receipt = future.result()
        except ServerGoneError as err:
            receipt = self._lose_commit(err, exact=False)  # θ⁰ holds θ as it was at the commit, not a center
        else:
            self.completed.append(receipt)
        center, trainable = self._staging.center_ready(), self.flat.trainable
        kernels.fold_center(center[:trainable], self.theta, self._theta0)
        kernels.fold_center(center[trainable:], self.flat.vector[trainable:], self._values0)
        self._staging.center_consumed()
        self.pulled_clock = receipt.clock
        return receipt

    @property
    def theta(self) -> Tensor:
        """The local trainable parameters θ (one flat view)."""
        return self.flat.trainable_region

    @property
    def theta0(self) -> Tensor:
        """θ⁰: the trainable parameters as pulled at the start of the window."""
        return self._theta0

    @property
    def residual(self) -> Tensor | None:
        """What rounding to the wire dtype has dropped so far (float32), or None without error feedback."""
        return self._residual

    @property
    def center(self) -> Tensor:
        """The trainable region of the center last fetched, on θ's device."""
        return self._staging.center_ready()[: self.flat.trainable]

    def fetch(self) -> Receipt:
        """Pull the center into :attr:`center` without touching θ."""
        try:
            receipt = self._link().pull()
        except ServerGoneError as err:
            return self._recover(err)
        self._staging.download()
        return receipt

    def take(self, request: dict) -> tuple[int, int]:
        """The next chunk of training samples (see ``Client.take``), through a server restart if need be."""
        try:
            return self.client.take(request)
        except ServerGoneError as err:
            self._recover(err)
            return self.client.take(request)

    def install(self, receipt: Receipt) -> Receipt:
        """Start a window from the center the last exchange brought: θ ← C, θ⁰ ← C (one fused pass)."""
        center, trainable = self._staging.center_ready(), self.flat.trainable
        kernels.install_center(center[:trainable], self.theta, self._theta0)
        self.flat.vector[trainable:].copy_(center[trainable:])
        self._staging.center_consumed()
        self.pulled_clock = receipt.clock
        return receipt

    def show_center(self) -> int:
        """Put the current center into the model, keeping θ aside until :meth:`resume_window`. Returns its clock."""
        receipt = self.fetch()  # first, so that an overlapped center is folded into θ before θ is stashed
        if self.shown_clock is None:
            if self._stash is None:
                self._stash = self.flat.vector.clone()
            else:
                self._stash.copy_(self.flat.vector)
        center = self._staging.center_ready()
        self.flat.vector.copy_(center)
        if center.dtype != self.flat.vector.dtype:
            self.exact_center = center.to("cpu", copy=True)
        self._staging.center_consumed()
        self.shown_clock = receipt.clock
        return receipt.clock

    def resume_window(self) -> None:
        """Put θ back after :meth:`show_center`; a no-op otherwise."""
        if self.shown_clock is not None:
            self.flat.vector.copy_(self._stash)
            self.shown_clock = None
            self.exact_center = None

    def close(self) -> None:
        if self._background is not None:
            self.client.interrupt()  # an exchange still in flight fails at once
            self._background.shutdown(wait=True)
        self.client.close()
        self._staging.close()

    # ------------------------------------------------------------------------------------------- helpers
    def _write_payload(self, reference: Tensor, steps: int) -> None:
        """A commit's payload: the algorithm's delta for the trainable region (see :meth:`Algorithm.worker_delta`),
        then the frozen parameters and floating-point buffers, which travel by value."""
        self.algorithm.worker_delta(self.theta, reference, steps, self._staging.delta, self._residual)
        self._staging.values.copy_(self.flat.vector[self.flat.trainable :])
        self._staging.payload_written()

    def _exchange(self, pulled_clock: int, steps: int) -> Receipt:
        """Upload the payload, commit it, and start bringing the center back (on the overlap thread, or not)."""
        self._staging.upload()
        receipt = self.client.commit(pulled_clock, steps, self.payload)
        self._staging.download()
        return receipt

    def _lose_commit(self, err: ServerGoneError, exact: bool) -> Receipt:
        self.lost_commits += 1
        return self._recover(err, exact)

    def _recover(self, err: ServerGoneError, exact: bool | None = None) -> Receipt:
        """Connect again (raising ``err`` without ``reconnect``, or once ``patience`` has passed), offer a restarted
        server the center this worker holds (``exact``: θ⁰ is the center of its last pull, as it is outside an
        overlapped exchange), and bring the server's center into the staging area. Returns its receipt."""
        if self._reconnect is None:
            raise err
        if exact is None:
            exact = self.algorithm.restarts_from_center and self._in_flight is None
        gone, deadline = self.client, time.monotonic() + self._patience
        gone.close()
        self._staging.close()
        log.warning("%s; connecting again for up to %.0f s", err, self._patience)
        while True:
            try:
                client = self._reconnect()
            except (ServerGoneError, ServerBusyError) as again:  # busy: up, with every worker rejoining at once
                if time.monotonic() > deadline:
                    if isinstance(again, ServerBusyError):
                        raise  # it says how long the server stayed busy, and what to raise
                    raise ServerGoneError(
                        f"{err}; it did not come back within server_timeout={self._patience:g} s ({again})"
                    ) from again
                time.sleep(0.2)
                continue
            try:
                if client.incarnation == gone.incarnation:  # the same server: only the connection broke
                    receipt = client.pull()
                else:
                    receipt = self._offer_center(client, exact)
                    log.warning("the parameter server restarted; it resumes at clock %d", receipt.clock)
                break
            except ServerGoneError:  # gone again already: try again
                client.close()
        self.client, self.reconnections = client, self.reconnections + 1
        self._staging = Staging(client.mailbox, self.payload, self.flat.vector.device)
        self._staging.download()
        return receipt

    def _offer_center(self, client, exact: bool) -> Receipt:
        """Offer θ⁰ (for AEASGD, θ) and the local values: as the center of the last pull when ``exact``, else only as
        a first center (in an overlapped exchange θ⁰ is θ as committed, so that the fold keeps the steps since)."""
        trainable = self.flat.trainable
        client.mailbox[trainable:].copy_(self.flat.vector[trainable:])
        client.mailbox[:trainable].copy_(self._theta0 if self.algorithm.restarts_from_center else self.theta)
        return client.recover(self.pulled_clock) if exact else client.initialize(self.pulled_clock)

    def _link(self):
        """The client, once nothing else uses the mailbox: no exchange in flight, no copy still reading it."""
        self.settle()
        self._staging.release_mailbox()
        return self.client
