"""A training process's side of the exchange: local parameters θ, the window's start θ⁰, and the server link."""

from __future__ import annotations

from torch import Tensor

from lightning_adag.algorithms import Algorithm
from lightning_adag.flat import FlatState
from lightning_adag.server.core import Receipt


class Worker:
    """Runs the worker half of the algorithm on a model laid out as a :class:`FlatState`.

    ``client`` is any transport client (see :mod:`lightning_adag.transports`). Between commits, the worker can
    *show* the center (for validation or a checkpoint) without losing its window: θ is stashed and put back
    before the next commit.
    """

    def __init__(self, flat: FlatState, client, algorithm: Algorithm) -> None:
        self.flat = flat
        self.client = client
        self.algorithm = algorithm
        self.pulled_clock = 0
        self.shown_clock: int | None = None
        self._theta0 = flat.trainable_region.clone()
        self._stash: Tensor | None = None
        mailbox = client.mailbox
        # The delta is computed straight into the mailbox on the CPU; from another device it is staged there first.
        self._outgoing = mailbox if mailbox.device == flat.vector.device else flat.vector.new_empty(mailbox.shape)

    def offer_initial_center(self, clock: int) -> Receipt:
        """Propose this worker's parameters as the center at ``clock`` (kept only if the server holds none)."""
        self.client.mailbox.copy_(self.flat.vector)
        return self.client.initialize(clock)

    def reset_to_center(self) -> Receipt:
        """Pull the center and start a new window from it: θ ← C, θ⁰ ← C."""
        self.shown_clock = None
        return self._install(self.client.pull())

    def commit(self, steps: int) -> Receipt:
        """Commit a window of ``steps`` local optimizer steps, then start the next window from the new center."""
        self.resume_window()
        trainable = self.flat.trainable
        self.algorithm.worker_delta(self.flat.trainable_region, self._theta0, steps, self._outgoing[:trainable])
        self._outgoing[trainable:].copy_(self.flat.vector[trainable:])
        if self._outgoing is not self.client.mailbox:
            self.client.mailbox.copy_(self._outgoing)
        return self._install(self.client.commit(self.pulled_clock, steps))

    def show_center(self) -> int:
        """Put the current center into the model, keeping θ aside until :meth:`resume_window`. Returns its clock."""
        if self.shown_clock is None:
            if self._stash is None:
                self._stash = self.flat.vector.clone()
            else:
                self._stash.copy_(self.flat.vector)
        receipt = self.client.pull()
        self.flat.vector.copy_(self.client.mailbox)
        self.shown_clock = receipt.clock
        return receipt.clock

    def resume_window(self) -> None:
        """Put θ back after :meth:`show_center`; a no-op otherwise."""
        if self.shown_clock is not None:
            self.flat.vector.copy_(self._stash)
            self.shown_clock = None

    def close(self) -> None:
        self.client.close()

    def _install(self, receipt: Receipt) -> Receipt:
        self.flat.vector.copy_(self.client.mailbox)
        self._theta0.copy_(self.flat.trainable_region)
        self.pulled_clock = receipt.clock
        return receipt
