"""A training process's side of the exchange: local parameters θ, the window's start θ⁰, and the server link."""

from __future__ import annotations

from torch import Tensor

from lightning_adag import kernels
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

    def offer_initial_center(self, clock: int, server_state: dict[str, Tensor] | None = None) -> Receipt:
        """Propose this worker's parameters as the center at ``clock``, with the algorithm's server-side state
        (both from a checkpoint, when resuming); the server keeps them only if it holds no center yet."""
        region = self.client.mailbox[: self.flat.trainable]
        for index, name in enumerate(self.algorithm.state_names):
            if server_state and name in server_state:
                region.copy_(server_state[name])
                self.client.put_state(index)
        self.client.mailbox.copy_(self.flat.vector)
        return self.client.initialize(clock)

    def server_state(self) -> tuple[int | None, dict[str, Tensor]]:
        """Copies (on the CPU) of the algorithm's server-side state vectors, all read at one clock, and that clock
        (``None`` when the algorithm keeps none, so they belong to any clock)."""
        region = self.client.mailbox[: self.flat.trainable]
        while True:
            clocks, state = set(), {}
            for index, name in enumerate(self.algorithm.state_names):
                clocks.add(self.client.get_state(index).clock)
                state[name] = region.clone()
            if len(clocks) <= 1:  # else a commit slipped in between two vectors: read them again
                return (clocks.pop() if clocks else None), state

    def reset_to_center(self) -> Receipt:
        """Pull the center and start a new window from it: θ ← C, θ⁰ ← C."""
        self.shown_clock = None
        return self.install(self.client.pull())

    def commit(self, steps: int) -> Receipt:
        """End a window of ``steps`` local optimizer steps with the algorithm's exchange (for most algorithms:
        commit, then start the next window from the new center)."""
        self.resume_window()
        return self.algorithm.exchange(self, steps)

    # The primitives an algorithm's exchange is made of.
    @property
    def theta(self) -> Tensor:
        """The local trainable parameters θ (one flat view)."""
        return self.flat.trainable_region

    @property
    def theta0(self) -> Tensor:
        """θ⁰: the trainable parameters as pulled at the start of the window."""
        return self._theta0

    @property
    def outgoing(self) -> Tensor:
        """The trainable region of the outgoing vector, on θ's device: write the tensor to commit here. After
        :meth:`fetch` it holds the center."""
        return self._outgoing[: self.flat.trainable]

    def fetch(self) -> Receipt:
        """Pull the center into :attr:`outgoing` without touching θ."""
        receipt = self.client.pull()
        self._stage_center()
        return receipt

    def send(self, pulled_clock: int, steps: int) -> Receipt:
        """Commit :attr:`outgoing` (with this worker's frozen parameters and buffers, which travel by value) as a
        window of ``steps`` steps that started from the center at ``pulled_clock``. Afterwards the mailbox holds
        the new center; θ is untouched until :meth:`install`."""
        trainable = self.flat.trainable
        self._outgoing[trainable:].copy_(self.flat.vector[trainable:])
        if self._outgoing is not self.client.mailbox:
            self.client.mailbox.copy_(self._outgoing)
        return self.client.commit(pulled_clock, steps)

    def install(self, receipt: Receipt) -> Receipt:
        """Start a window from the center in the mailbox: θ ← C, θ⁰ ← C (one fused pass on a GPU)."""
        center, trainable = self._stage_center(), self.flat.trainable
        kernels.install_center(center[:trainable], self.theta, self._theta0)
        self.flat.vector[trainable:].copy_(center[trainable:])
        self.pulled_clock = receipt.clock
        return receipt

    def _stage_center(self) -> Tensor:
        """The center in the mailbox, on θ's device (staged through :attr:`outgoing` when that is not the CPU)."""
        if self._outgoing is not self.client.mailbox:
            self._outgoing.copy_(self.client.mailbox)
        return self._outgoing

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
