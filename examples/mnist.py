"""Train the ADAG paper's MLP (784-1000-2000-1000-10, ReLU) on MNIST with asynchronous workers on the CPU.

    pip install -e ".[examples]"
    python examples/mnist.py --data-dir ~/data/mnist --algorithm adag --devices 4 --epochs 5

``--data-dir`` holds MNIST's four IDX files as distributed (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzipped or not); the 10,000
test images are the validation set, as in the paper. Workers train with Adam (lr 0.001, batches of 128, the
paper's settings); ``--algorithm`` picks the rule the server applies to their commits. It prints the validation
accuracy of the center variable, the model the parameter server holds and ``fit`` leaves in ``model``.

The model and the IDX reader are the benchmarks' own (``benchmarks/common.py``, ``benchmarks/convergence.py``),
so this trains exactly what BENCHMARKS.md measures; run it from a checkout of the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_adag
from lightning_adag.algorithms import ALGORITHMS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import BATCH, HIDDEN, Classifier, paper_mlp  # noqa: E402
from convergence import find_idx, load_mnist  # noqa: E402

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MNISTDataModule(L.LightningDataModule):
    """MNIST from its IDX files; pixels stay bytes until a batch reaches the model (4 workers holding the training
    set as float32 would spend 750 MiB on it)."""

    def __init__(self, data_dir: str, batch_size: int = BATCH) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        x_train, y_train, x_val, y_val = load_mnist(self.data_dir)
        self.train_set, self.val_set = TensorDataset(x_train, y_train), TensorDataset(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)


class MNISTClassifier(Classifier):
    """The benchmarks' classifier (softmax cross-entropy, Adam) with validation loss and accuracy."""

    def __init__(self, hidden: tuple[int, ...] = HIDDEN, lr: float = 1e-3) -> None:
        super().__init__(paper_mlp(hidden=hidden), lr)
        self.val_accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST's four IDX files (.gz or not)")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="adag")
    parser.add_argument("--devices", type=int, default=4, help="worker processes")
    parser.add_argument("--window", type=int, default=None, help="λ, local steps per commit (default: --devices)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN), help="hidden layer sizes")
    args = parser.parse_args()
    for stem in IDX_FILES:
        try:
            find_idx(Path(args.data_dir), stem)
        except FileNotFoundError as error:
            parser.error(f"{error}: --data-dir must hold MNIST's four IDX files ({', '.join(IDX_FILES)})")

    L.seed_everything(0)
    model, data = MNISTClassifier(hidden=tuple(args.hidden)), MNISTDataModule(args.data_dir, args.batch_size)
    trainer = L.Trainer(
        # λ = n kept ADAG's center stable in BENCHMARKS.md ("Which window for a given number of workers")
        strategy=lightning_adag.ADAGStrategy(window=args.window or args.devices, algorithm=args.algorithm),
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        print(f"center variable validation accuracy ({args.algorithm}): {metrics['val_acc']:.4f}")


if __name__ == "__main__":
    main()
