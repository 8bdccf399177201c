"""Host time of ``ADAGCallback``'s per-step hooks: what every training step pays on any device.

    python benchmarks/hook_cost.py             # blocking and overlapped, λ = 32

A tiny model (Linear(16, 2), batch 4) trains for ``--steps`` steps as one worker on the CPU; the callback's
``on_train_batch_start`` and ``on_train_batch_end`` are timed with ``time.perf_counter``, and steps that commit are
reported apart from those that do not. The hooks run on the host and do the same work whatever the accelerator,
so their cost next to a GPU's step time predicts the per-step overhead without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_adag
from lightning_adag.callback import ADAGCallback


class Timed(ADAGCallback):
    """The strategy's callback, timing its own per-step hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.start_s: list[float] = []
        self.end_s: list[float] = []
        self.commit_end_s: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        began = time.perf_counter()
        super().on_train_batch_start(*args)
        self.start_s.append(time.perf_counter() - began)

    def on_train_batch_end(self, *args) -> None:
        commits, began = self.commits, time.perf_counter()
        super().on_train_batch_end(*args)
        (self.end_s if self.commits == commits else self.commit_end_s).append(time.perf_counter() - began)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def measure(window: int, overlap: bool, steps: int) -> Timed:
    hooks = Timed()
    data = TensorDataset(torch.randn(steps * 4, 16), torch.randint(0, 2, (steps * 4,)))
    trainer = L.Trainer(
        strategy=lightning_adag.ADAGStrategy(window=window, overlap=overlap),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[hooks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    return hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4096)
    args = parser.parse_args()
    us = lambda samples: f"{statistics.median(samples) * 1e6:.1f} / {statistics.mean(samples) * 1e6:.1f} µs"  # noqa: E731
    print(f"λ = {args.window}, {args.steps} steps; median / mean")
    for overlap in (False, True):
        hooks = measure(args.window, overlap, args.steps)
        print(
            f"{'overlapped' if overlap else 'blocking'}: step start {us(hooks.start_s)}; step end without commit"
            f" ({len(hooks.end_s)}) {us(hooks.end_s)}; step end with commit ({len(hooks.commit_end_s)})"
            f" {us(hooks.commit_end_s)}"
        )


if __name__ == "__main__":
    main()
