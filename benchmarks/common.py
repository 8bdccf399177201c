"""What the benchmarks share: the paper's model, and the LightningModule that trains it."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

#: The paper's MLP: 784-1000-2000-1000-10 with ReLU (about 4.8M parameters), trained with batches of 128.
HIDDEN = (1000, 2000, 1000)
BATCH = 128


def paper_mlp(inputs: int = 784, hidden: tuple[int, ...] = HIDDEN, classes: int = 10) -> nn.Sequential:
    sizes = (inputs, *hidden)
    layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], classes))


def as_inputs(x: torch.Tensor) -> torch.Tensor:
    """A batch as the model's inputs: byte pixels scaled to [0, 1] (as the paper did), float pixels unchanged."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


class Classifier(L.LightningModule):
    """``net`` trained with softmax cross-entropy and Adam (the paper's workers), nothing else."""

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(as_inputs(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
