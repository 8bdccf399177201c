"""Asynchronous optimizers: what a worker commits, and how the server folds a commit into the center.

Each algorithm is one small class with a worker half and a server half, both pure math. The worker half says what
a worker commits at the end of a window (:meth:`Algorithm.worker_delta`); the worker (:mod:`lightning_adag.worker`)
runs the exchange. The server half applies a commit to the center under the server's lock
(:meth:`Algorithm.server_apply`) and keeps whatever state the rule needs. Nothing else in the package knows which
algorithm runs. The formulas are those of ``PAPER.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_adag import kernels


@dataclass(frozen=True)
class Commit:
    """What the server knows about a commit when it applies it: who sent it, the clock of the center that worker
    started its window from, the server's clock now (before applying), and the connection it came on."""

    worker: int
    pulled_clock: int
    clock: int
    #: What the server keeps per-worker state under: the connection, not the rank a worker claims (two runs sharing
    #: a server both have a worker 0).
    connection: int | None = None

    @property
    def staleness(self) -> int:
        """Commits applied since the worker pulled (τ)."""
        return self.clock - self.pulled_clock


class Algorithm:
    """Base class. ``window`` is the number of local optimizer steps between two commits (λ); ``None`` lets the
    strategy pick :func:`suggested_window` once it knows the model and the number of workers.

    Subclasses set ``name`` and implement the worker half (:meth:`worker_delta`) and the server half
    (:meth:`server_apply`).
    Server-side state that must survive a checkpoint is returned by :meth:`server_state`: trainable-sized vectors,
    named in :attr:`state_names` on both sides so that they travel by index.
    """

    name: ClassVar[str]
    #: Whether every window starts from the center its commit brought back (θ ← C, θ⁰ ← C). A rule whose workers
    #: keep their own parameters instead (AEASGD) measures its commit against the center pulled just before it, and
    #: its exchanges cannot overlap training.
    restarts_from_center: ClassVar[bool] = True

    def __init__(self, window: int | None = None) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an integer >= 1 (local optimizer steps per commit), got {window!r}")
        self.window = window

    # ------------------------------------------------------------------------------------------ worker half
    def worker_delta(
        self, theta: Tensor, reference: Tensor, steps: int, out: Tensor, residual: Tensor | None = None
    ) -> None:
        """Write what a worker commits at the end of a window of ``steps`` local steps into ``out`` (in the wire
        dtype), from its parameters ``theta`` and ``reference``: θ⁰, the center the window started from, for rules
        that restart from the center; the center just pulled for the others, which may also move ``theta``.
        ``residual``: error feedback for a narrow wire dtype (see :func:`kernels.window_delta`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ server half
    def server_apply(self, center: Tensor, delta: Tensor, commit: Commit) -> None:
        """Fold one commit into ``center`` (the trainable region) in place. Called under the server's lock."""
        raise NotImplementedError

    def server_pulled(self, connection: int, clock: int, center: Tensor) -> None:
        """The worker on ``connection`` received ``center`` (the trainable region) at ``clock``; called under the
        server's lock. Only rules that need the pulled center keep it."""

    def server_forget(self, connection: int) -> None:
        """``connection`` closed: drop whatever was kept for it. Called under the server's lock."""

    def server_admit(self, commit: Commit) -> None:
        """Raise a ``ValueError`` if ``commit`` cannot be applied, before the server counts it."""

    def step_bound(self, largest: float) -> float:
        """An upper bound on how far the next commit, whose delta's largest magnitude is ``largest``, moves any
        element of the center, and on any element of the rule's state after it. Called once per commit in the
        order they are applied (under the server's entry lock), so a rule may account the commit in a bound it
        keeps of its own state. The server checks a commit for overflow only when this bound cannot rule it out."""
        return largest

    @property
    def elementwise(self) -> bool:
        """Whether :meth:`server_apply` treats every element on its own and keeps no state, so that the server may
        apply a commit one shard at a time (and pipeline commits, see ``ServerCore``)."""
        return not self.state_names

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the server-side vectors :meth:`server_state` returns, in a fixed order."""
        return ()

    @property
    def unsummable(self) -> str | None:
        """Why several workers' commits cannot reach the server as one commit holding their sum (node-local
        aggregation), or None when they can: the server half must add a commit, scaled by a constant at most, with
        no state and nothing that depends on the worker or the commit's staleness, and the worker half must not
        need a fresh center before each commit."""
        return f"{self.name} does not declare that the server may apply the sum of several commits at once"

    def server_state(self) -> dict[str, Tensor]:
        """The server-side vectors that a checkpoint keeps (live tensors; copy them before the lock is released).
        A name of :attr:`state_names` that is missing has not been created yet and reads as zeros."""
        return {}

    def load_server_state(self, name: str, values: Tensor) -> None:
        """Restore one vector of :meth:`server_state` (from a checkpoint)."""
        raise ValueError(f"{self.name} keeps no server state named {name!r}")

    # ------------------------------------------------------------------------------------------ identity
    def spec(self) -> dict[str, Any]:
        """What the server needs to run the server half (sent in the handshake, as JSON): the name and the
        server-side hyperparameters, from which :func:`server_rule` rebuilds the rule."""
        return {"name": self.name, **self._server_params()}

    def _server_params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        params = {"window": self.window, **self._server_params(), **self._worker_params()}
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in params.items())})"

    def _worker_params(self) -> dict[str, Any]:
        return {}


class NesterovOuter:
    """A server-side outer optimizer, as DiLoCo applies to the averaged pseudo-gradient: Nesterov momentum on the
    committed deltas. With ``g = −Δ`` as the gradient, SGD with Nesterov momentum gives ``m ← μ m + Δ`` and
    ``C ← C + η (Δ + μ m)``. The momentum buffer lives in the server and in checkpoints."""

    def __init__(self, momentum: float, lr: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 < lr < math.inf:
            raise ValueError(f"outer_lr must be a positive, finite number, got {lr!r}")
        self.momentum, self.lr = float(momentum), float(lr)
        self.buffer: Tensor | None = None
        self._buffer_bound = 0.0  # an upper bound on |m|

    def step_bound(self, largest: float) -> float:
        """``|m'| ≤ μ |m| + |Δ|`` and ``|η (Δ + μ m')| ≤ η (|Δ| + μ |m'|)``, elementwise."""
        if not self.momentum:
            return self.lr * largest
        self._buffer_bound = self.momentum * self._buffer_bound + largest
        return max(self.lr * (largest + self.momentum * self._buffer_bound), self._buffer_bound)

    def load(self, values: Tensor) -> None:
        self.buffer = values.clone()
        self._buffer_bound = float(values.abs().max()) if values.numel() else 0.0

    def apply(self, center: Tensor, delta: Tensor) -> None:
        if not self.momentum:  # C ← C + η Δ: elementwise and stateless, so the server applies it shard by shard
            center.add_(delta, alpha=self.lr)
            return
        if self.buffer is None:
            self.buffer = torch.zeros_like(center)
        self.buffer.mul_(self.momentum).add_(delta)
        center.add_(delta, alpha=self.lr).add_(self.buffer, alpha=self.lr * self.momentum)


class DOWNPOUR(Algorithm):
    """DOWNPOUR (Dean et al., 2012): the worker commits its whole window difference ``Δ = θ − θ⁰`` and the server
    adds it. With one worker this is exactly local training.

    ``outer_momentum`` (μ) turns on a server-side Nesterov outer optimizer on the committed deltas
    (:class:`NesterovOuter`, with learning rate ``outer_lr``); off (0) by default.
    """

    name = "downpour"

    def __init__(self, window: int | None = None, outer_momentum: float = 0.0, outer_lr: float = 1.0) -> None:
        super().__init__(window)
        self._outer = NesterovOuter(outer_momentum, outer_lr)
        self._outer_on = outer_momentum > 0.0 or outer_lr != 1.0

    def worker_delta(
        self, theta: Tensor, theta0: Tensor, steps: int, out: Tensor, residual: Tensor | None = None
    ) -> None:
        kernels.window_delta(theta, theta0, 1.0, out, residual)

    def server_apply(self, center: Tensor, delta: Tensor, commit: Commit) -> None:
        self._add(center, delta)

    def _add(self, center: Tensor, delta: Tensor) -> None:
        if self._outer_on:
            self._outer.apply(center, delta)
        else:
            center.add_(delta)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("outer_momentum",) if self._outer.momentum > 0.0 else ()

    def step_bound(self, largest: float) -> float:
        return self._outer.step_bound(largest) if self._outer_on else largest

    def server_state(self) -> dict[str, Tensor]:
        if not self.state_names or self._outer.buffer is None:
            return {}
        return {"outer_momentum": self._outer.buffer}

    def load_server_state(self, name: str, values: Tensor) -> None:
        if name not in self.state_names:
            super().load_server_state(name, values)
        self._outer.load(values)

    @property
    def unsummable(self) -> str | None:
        if self._outer.momentum > 0.0:
            return (
                "outer_momentum folds every commit into a momentum buffer, so one commit holding a sum moves the center"
                " differently from its parts: set outer_momentum=0 (outer_lr alone is fine)"
            )
        return None

    def _server_params(self) -> dict[str, Any]:
        if not self._outer_on:
            return {}
        return {"outer_momentum": self._outer.momentum, "outer_lr": self._outer.lr}


class ADAG(DOWNPOUR):
    """Accumulated Gradient Normalization (Hermans et al., 2017).

    The worker commits the parameter difference of its window divided by the number of steps in it,
    ``Δ = (θ − θ⁰) / steps``; the server adds it to the center. Using the parameter difference rather than summed
    gradients keeps it correct for any local optimizer, and dividing by the window keeps each commit about one
    step long however many workers there are.

    ``gamma`` (γ > 0) turns on the thesis' per-element staleness scaling: the server multiplies the delta by
    ``1 / (γ⁻¹ (C − C_pulled)² + 1)``, damping weights that moved a lot since the worker pulled. The server then
    keeps each worker's pulled center. ``outer_momentum`` / ``outer_lr`` as for :class:`DOWNPOUR`.
    """

    name = "adag"

    def __init__(
        self,
        window: int | None = None,
        gamma: float | None = None,
        outer_momentum: float = 0.0,
        outer_lr: float = 1.0,
    ) -> None:
        super().__init__(window, outer_momentum, outer_lr)
        if gamma is not None and not (isinstance(gamma, (int, float)) and 0.0 < gamma < math.inf):
            raise ValueError(f"gamma must be a positive, finite number (the thesis used 1e-4), got {gamma!r}")
        self.gamma = None if gamma is None else float(gamma)
        self._pulled: PulledCenters | None = PulledCenters() if self.gamma is not None else None

    def worker_delta(
        self, theta: Tensor, theta0: Tensor, steps: int, out: Tensor, residual: Tensor | None = None
    ) -> None:
        kernels.window_delta(theta, theta0, 1.0 / steps, out, residual)

    def server_apply(self, center: Tensor, delta: Tensor, commit: Commit) -> None:
        if self._pulled is not None:
            delta = delta * staleness_scale(center, self._pulled.take(commit), self.gamma)
        self._add(center, delta)

    def server_pulled(self, connection: int, clock: int, center: Tensor) -> None:
        if self._pulled is not None:
            self._pulled.remember(connection, clock, center)

    def server_forget(self, connection: int) -> None:
        if self._pulled is not None:
            self._pulled.forget(connection)

    def server_admit(self, commit: Commit) -> None:
        if self._pulled is not None:
            self._pulled.check(commit)

    @property
    def elementwise(self) -> bool:
        return self._pulled is None and super().elementwise

    @property
    def unsummable(self) -> str | None:
        if self._pulled is not None:
            return (
                "gamma scales each commit by how far the center moved since its own worker pulled, which a sum of"
                " several workers' commits no longer has: set gamma=None"
            )
        return super().unsummable

    def _server_params(self) -> dict[str, Any]:
        gamma = {} if self.gamma is None else {"gamma": self.gamma}
        return {**gamma, **super()._server_params()}


def staleness_scale(center: Tensor, pulled: Tensor, gamma: float) -> Tensor:
    """The thesis' per-element factor ``1 / (γ⁻¹ (C − C_pulled)² + 1)``: 1 where a weight has not moved since the
    worker pulled, towards 0 the more it moved."""
    return torch.sub(center, pulled).square_().div_(gamma).add_(1.0).reciprocal_()


class PulledCenters:
    """The centers each connection pulled, by clock, for rules that compare a commit with its worker's pulled
    center; a connection's are dropped when it closes.

    A worker may pull more than once per window (to show the center for validation) while its commit still names
    the clock its window started from, so a few centers are kept per connection; a commit consumes its own and
    every older one.
    """

    def __init__(self) -> None:
        self._by_connection: dict[int | None, dict[int, Tensor]] = {}

    def remember(self, connection: int, clock: int, center: Tensor) -> None:
        self._by_connection.setdefault(connection, {})[clock] = center.clone()

    def forget(self, connection: int) -> None:
        self._by_connection.pop(connection, None)

    def check(self, commit: Commit) -> None:
        if commit.pulled_clock not in self._by_connection.get(commit.connection, {}):
            raise ValueError(
                f"worker {commit.worker} commits from clock {commit.pulled_clock}, but the server never handed it"
                " that center"
            )

    def take(self, commit: Commit) -> Tensor:
        self.check(commit)
        centers = self._by_connection[commit.connection]
        pulled = centers[commit.pulled_clock]
        for old in [c for c in centers if c <= commit.pulled_clock]:
            del centers[old]
        return pulled


class DynSGD(DOWNPOUR):
    """DynSGD (Jiang et al., 2017): DOWNPOUR's unnormalized delta, scaled by the server by its staleness,
    ``C ← C + Δ / (τ + 1)``, so that a commit computed on an old center counts less."""

    name = "dynsgd"

    def __init__(self, window: int | None = None) -> None:
        super().__init__(window)

    def server_apply(self, center: Tensor, delta: Tensor, commit: Commit) -> None:
        center.add_(delta, alpha=1.0 / (commit.staleness + 1))

    @property
    def unsummable(self) -> str | None:
        return "dynsgd scales each commit by its own staleness, which a sum of several workers' commits no longer has"


class AEASGD(Algorithm):
    """Asynchronous elastic averaging SGD (Zhang et al., 2015).

    Every window the worker pulls ``C``, computes the elastic difference ``E = α (θ − C)`` with
    ``α = rho · elastic_lr``, moves itself towards the center (``θ ← θ − E``) and commits ``E``; the server adds it.
    The worker keeps its own parameters: it is never reset to the center (except to hand the final center back).
    ``E`` is rounded to the wire dtype before the worker subtracts it, so a compressed commit needs no error
    feedback: with float32 parameters, worker and center move by the same rounded amount (16-bit parameters round
    ``θ − E`` once more).
    """

    name = "aeasgd"
    restarts_from_center = False

    def __init__(self, window: int | None = None, rho: float = 5.0, elastic_lr: float = 0.01) -> None:
        super().__init__(window)
        if not 0.0 < rho < math.inf:
            raise ValueError(f"rho must be a positive, finite number, got {rho!r}")
        if not 0.0 < elastic_lr < math.inf:
            raise ValueError(f"elastic_lr must be a positive, finite number, got {elastic_lr!r}")
        if not rho * elastic_lr <= 1.0:
            raise ValueError(f"rho * elastic_lr (the elastic coefficient α) must be at most 1, got {rho * elastic_lr}")
        self.rho, self.elastic_lr = float(rho), float(elastic_lr)

    @property
    def alpha(self) -> float:
        return self.rho * self.elastic_lr

    def worker_delta(
        self, theta: Tensor, reference: Tensor, steps: int, out: Tensor, residual: Tensor | None = None
    ) -> None:
        """``out = E = α (θ − C)`` and ``θ ← θ − E``, with ``reference`` the center ``C`` just pulled."""
        kernels.elastic_exchange(theta, reference, self.alpha, out)

    def server_apply(self, center: Tensor, delta: Tensor, commit: Commit) -> None:
        center.add_(delta)

    @property
    def unsummable(self) -> str | None:
        return (
            "aeasgd pulls the center before every commit to measure its elastic term against it: each of those"
            " pulls would still cross to the server, or measure against an older center"
        )

    def _worker_params(self) -> dict[str, Any]:
        return {"rho": self.rho, "elastic_lr": self.elastic_lr}


def suggested_window(workers: int, module: nn.Module) -> int:
    """The thesis' heuristic λ ≈ (n + number of layers) / 2, counting as layers the modules that own trainable
    parameters directly."""
    layers = sum(1 for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))
    return max(1, round((workers + layers) / 2))


ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (ADAG, DOWNPOUR, AEASGD, DynSGD)}


def resolve_algorithm(algorithm: str | Algorithm, window: int | None) -> Algorithm:
    """An ``Algorithm`` instance from a name (with ``window``) or an instance (whose own window wins)."""
    if isinstance(algorithm, Algorithm):
        if window is not None and window != algorithm.window:
            raise ValueError(
                f"window={window} conflicts with {algorithm!r}: set the window on the algorithm instance only"
            )
        return algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)} or pass an instance")
    return ALGORITHMS[algorithm](window)


def server_rule(spec: dict[str, Any]) -> Algorithm:
    """The server-side algorithm a handshake describes: its name and server-side hyperparameters."""
    params = dict(spec)
    name = params.pop("name", None)
    if name not in ALGORITHMS:
        raise ValueError(f"this server does not know algorithm {name!r}; it knows {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](**params)
