"""Asynchronous optimizers: what a worker commits, and how the server folds a commit into the center.

Each algorithm is one small class. The worker side turns a window of local progress into the tensor it sends;
the server side applies that tensor to the center. Nothing else in the package knows which algorithm runs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Algorithm:
    """Base class. ``window`` is the number of local optimizer steps between two commits (λ); ``None`` lets the
    strategy pick :func:`suggested_window` once it knows the model and the number of workers."""

    name: ClassVar[str]

    def __init__(self, window: int | None = None) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an integer >= 1 (local optimizer steps per commit), got {window!r}")
        self.window = window

    def worker_delta(self, theta: Tensor, theta0: Tensor, steps: int, out: Tensor) -> None:
        """Write the tensor to commit into ``out``, from the local parameters ``theta``, the parameters ``theta0``
        pulled at the start of the window, and the number of local ``steps`` the window actually holds."""
        raise NotImplementedError

    def server_apply(self, center: Tensor, delta: Tensor, staleness: int) -> None:
        """Fold one commit into ``center`` in place. The server calls this under its lock, so it is atomic."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """What the server needs to know to run the server side (sent in the handshake, as JSON)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window})"


class ADAG(Algorithm):
    """Accumulated Gradient Normalization (Hermans et al., 2017).

    The worker commits the parameter difference of its window divided by the number of steps in it,
    ``Δ = (θ − θ⁰) / steps``; the server adds it to the center. Using the parameter difference rather than summed
    gradients keeps it correct for any local optimizer, and dividing by the window keeps each commit about one
    step long however many workers there are.
    """

    name = "adag"

    def worker_delta(self, theta: Tensor, theta0: Tensor, steps: int, out: Tensor) -> None:
        torch.sub(theta, theta0, out=out)
        out.div_(steps)

    def server_apply(self, center: Tensor, delta: Tensor, staleness: int) -> None:
        center.add_(delta)


def suggested_window(workers: int, module: nn.Module) -> int:
    """The thesis' heuristic λ ≈ (n + number of layers) / 2, counting as layers the modules that own trainable
    parameters directly."""
    layers = sum(1 for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))
    return max(1, round((workers + layers) / 2))


ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (ADAG,)}


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
    """The server-side algorithm named in a handshake."""
    name = spec.get("name")
    if name not in ALGORITHMS:
        raise ValueError(f"this server does not know algorithm {name!r}; it knows {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]()
