"""Train a small MLP on scikit-learn's handwritten digits with 4 asynchronous ADAG workers on the CPU.

    pip install -e ".[examples]"
    python examples/digits.py

The 1,797 8x8 digit images ship with scikit-learn, so this runs offline. It prints the validation accuracy of the
center variable, the model the parameter server holds and ``fit`` leaves in ``model``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_adag


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits, pixels scaled to [0, 1], a fixed 80/20 split."""

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        split = int(0.8 * len(x))
        self.train_set = TensorDataset(x[order[:split]], y[order[:split]])
        self.val_set = TensorDataset(x[order[split:]], y[order[split:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(L.LightningModule):
    """A 64-128-10 MLP trained with Adam; validation accuracy is a torchmetrics metric synced across workers."""

    def __init__(self, hidden: int = 128, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.val_accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    L.seed_everything(0)
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer = L.Trainer(
        strategy=lightning_adag.ADAGStrategy(window=args.window),
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        print(f"center variable validation accuracy: {metrics['val_acc']:.4f}")


if __name__ == "__main__":
    main()
