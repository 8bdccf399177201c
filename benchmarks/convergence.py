"""The paper's convergence comparison on this machine: ADAG against DOWNPOUR, AEASGD, DynSGD and Lightning DDP.

    pip install -e ".[benchmarks]"
    python benchmarks/convergence.py --workers 4 8 16 --windows 10 20 --epochs 40 --out benchmarks/results

Every configuration trains the paper's MLP (784-1000-2000-1000-10, ReLU) with Adam workers (lr 0.001, batch 128)
from the same initialization on a fixed data budget (``--epochs`` passes over the training set in total, split
across the ``n`` workers by their shards), in its own process tree. Rank 0 evaluates the center variable on the
validation set every ``--probe-seconds`` of training (without stopping the other workers) and once at the end.
The driver writes ``results.json``, ``table.md`` and ``accuracy_vs_time.png`` into ``--out``.

Data: real MNIST from the four IDX files in ``--mnist-dir`` (``train-images-idx3-ubyte`` etc., optionally
``.gz``); otherwise scikit-learn's 8x8 digits, resized bilinearly to 28x28 so the model keeps the paper's 784
inputs (1,437 training and 360 validation images).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (label, strategy algorithm, window rule): "grid" takes each --windows value, an integer is a fixed window.
ALGORITHMS = {
    "adag": ("ADAG", "adag", "grid"),
    "downpour": ("DOWNPOUR", "downpour", "grid"),
    "downpour1": ("DOWNPOUR λ=1", "downpour", 1),
    "aeasgd": ("AEASGD", "aeasgd", "grid"),
    "dynsgd": ("DynSGD", "dynsgd", "grid"),
    "ddp": ("DDP (sync)", None, None),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ------------------------------------------------------------------------------------------------------ data
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic 0x0000 | dtype code | number of dimensions, then big-endian u32
    sizes and the data), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=IDX_DTYPES[code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values, its header says {shape}")
    return array.reshape(shape)


def find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem.replace("-idx", ".idx"), f"{stem}.gz", f"{stem.replace('-idx', '.idx')}.gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}")


def load_mnist(directory: Path) -> tuple[torch.Tensor, ...]:
    """MNIST's 60k training and 10k test images as the paper used them: pixels scaled to [0, 1], flattened."""
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        parts += [torch.tensor(images.reshape(len(images), -1), dtype=torch.float32) / 255.0, torch.tensor(labels)]
    return tuple(parts)


def load_digits_784(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits (offline), resized to 28x28 so the paper's 784-input MLP applies; 80/20 split."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def load_data(mnist_dir: str | None) -> tuple[str, tuple[torch.Tensor, ...]]:
    if mnist_dir:
        return "MNIST (IDX files)", load_mnist(Path(mnist_dir))
    return "scikit-learn digits resized to 28x28", load_digits_784()


# ------------------------------------------------------------------------------------------------------ one run
def run_one(config: dict) -> None:
    """Train one configuration; run by every rank of its process tree. Rank 0 writes ``config["result"]``."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_adag

    torch.set_num_threads(1)  # oversubscribed: one core's worth of threads per worker, as in the paper
    _, (x_train, y_train, x_val, y_val) = load_data(config["mnist_dir"])

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(config["seed"])  # identical initialization for every configuration
            sizes = [x_train.shape[1], *config["hidden"]]
            layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
            self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=config["lr"])

    def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    class CenterProbe(Callback):
        """Rank 0 evaluates the center every ``probe_seconds``; the other workers keep training meanwhile."""

        def __init__(self) -> None:
            self.curve: list[tuple[float, float]] = []
            self.start = self.last = 0.0

        def on_train_start(self, trainer, pl_module):
            self.start = self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if trainer.global_rank == 0 and now - self.last >= config["probe_seconds"]:
                worker = getattr(trainer.strategy, "worker", None)  # None under DDP: every replica is the model
                if worker is not None:
                    worker.show_center()
                self.curve.append((now - self.start, accuracy(pl_module, x_val, y_val)))
                if worker is not None:
                    worker.resume_window()
                self.last = time.perf_counter()

    algorithm, n = config["algorithm"], config["workers"]
    strategy = "ddp" if algorithm is None else lightning_adag.ADAGStrategy(window=config["window"], algorithm=algorithm)
    probe = CenterProbe()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=n,
        max_epochs=config["epochs"],
        callbacks=[probe],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    model = MLP()
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=config["batch_size"], shuffle=True)
    trainer.fit(model, train_dataloaders=train_loader)
    elapsed = time.perf_counter() - probe.start
    if trainer.global_rank == 0:
        val = accuracy(model, x_val, y_val)  # after fit every worker holds the final center
        result = {
            **config,
            "seconds": elapsed,
            "val_acc": val,
            "train_acc": accuracy(model, x_train, y_train),
            "curve": [*probe.curve, (elapsed, val)],
            "steps_per_worker": trainer.global_step,
        }
        Path(config["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------------ driver
def configurations(args: argparse.Namespace) -> list[dict]:
    runs = []
    for n in args.workers:
        for key in args.algorithms:
            label, algorithm, rule = ALGORITHMS[key]
            windows = args.windows if rule == "grid" else [rule]
            for window in windows:
                name = f"{key}-n{n}" + (f"-w{window}" if window is not None else "")
                runs.append(
                    {
                        "name": name,
                        "label": label,
                        "algorithm": algorithm,
                        "window": window,
                        "workers": n,
                        "epochs": args.epochs,
                        "batch_size": args.batch_size,
                        "lr": args.lr,
                        "hidden": args.hidden,
                        "seed": args.seed,
                        "probe_seconds": args.probe_seconds,
                        "mnist_dir": args.mnist_dir,
                        "result": str(Path(args.out, "runs", f"{name}.json")),
                    }
                )
    return runs


def launch(config: dict, timeout: float) -> dict:
    """Run one configuration in its own process tree, sampling the tree's resident memory once a second."""
    import psutil

    spec = Path(config["result"]).with_suffix(".config.json")
    spec.write_text(json.dumps(config))
    log = open(Path(config["result"]).with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, __file__, "--run", str(spec)], stdout=log, stderr=subprocess.STDOUT)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    sampler.join()
    log.close()
    result_path = Path(config["result"])
    if code != 0 or not result_path.exists():
        return {**config, "error": f"exit {code}, see {result_path.with_suffix('.log')}"}
    return {**json.loads(result_path.read_text()), "peak_rss_gib": peak[0] / 2**30}


def table(results: list[dict], dataset: str) -> str:
    lines = [
        f"Dataset: {dataset}. Center variable's final accuracy; time = training wall-clock (after start-up).",
        "",
        "| n | algorithm | λ | val acc | train acc | time (s) | steps/worker | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        window = "–" if r["window"] is None else r["window"]
        if "error" in r:
            lines.append(f"| {r['workers']} | {r['label']} | {window} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['workers']} | {r['label']} | {window} | {100 * r['val_acc']:.2f} % | {100 * r['train_acc']:.2f} %"
            f" | {r['seconds']:.1f} | {r['steps_per_worker']} | {r['peak_rss_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["workers"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], sizes):
        for r in results:
            if r["workers"] == n and "error" not in r:
                t, acc = zip(*r["curve"])
                window = "" if r["window"] is None or "λ" in r["label"] else f" λ={r['window']}"
                ax.plot(t, acc, marker=".", label=f"{r['label']}{window}")
        ax.set(title=f"n = {n} workers", xlabel="training wall-clock (s)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("center validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16, 32], help="values of n")
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20], help="the λ grid")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--epochs", type=int, default=40, help="data budget: passes over the training set in total")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="the workers' Adam learning rate")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1000, 2000, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-seconds", type=float, default=2.0, help="center evaluation interval (rank 0)")
    parser.add_argument("--mnist-dir", help="directory with the four MNIST IDX files; default: offline digits")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per configuration")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one configuration, in its own processes
    args = parser.parse_args()
    if args.run:
        run_one(json.loads(Path(args.run).read_text()))
        return

    dataset, _ = load_data(args.mnist_dir)
    Path(args.out, "runs").mkdir(parents=True, exist_ok=True)
    results = []
    for config in configurations(args):
        started = time.perf_counter()
        results.append(launch(config, args.timeout))
        status = results[-1].get("error") or f"val acc {results[-1]['val_acc']:.4f}"
        print(f"{config['name']}: {status} ({time.perf_counter() - started:.0f} s with start-up)", flush=True)
        Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
        Path(args.out, "table.md").write_text(table(results, dataset))
        plot(results, Path(args.out, "accuracy_vs_time.png"))
    print(table(results, dataset))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
