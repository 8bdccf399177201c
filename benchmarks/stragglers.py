"""Does one slow worker slow the whole run? Wall-clock of E epochs with uneven workers, against the same run with
even workers, for ADAG with dynamic data assignment, ADAG with static shards, and Lightning DDP.

    pip install -e ".[benchmarks]"
    python benchmarks/stragglers.py --repeats 3 --out benchmarks/results/stragglers

Four CPU workers train a small MLP (784-256-10, Adam, batch 128) for ``--epochs`` epochs with validation at the end
of each, on an MNIST-sized set (``--mnist-dir`` for real MNIST; by default the augmented digits that
``convergence.py`` generates offline). Every worker sleeps ``--step-seconds`` times its speed factor after each
step, standing for the compute of a device of its own (so that the 2 cores of a small machine do not decide the
result): ``--speeds 1 1 1 3`` makes worker 3 three times slower than the others. The time of a run is the
training wall-clock of ``fit`` on rank 0, from the start of training to its end; its ratio to the run of the same
strategy with even workers is what a straggler costs. With perfect work-following the ratio is
``n / sum(1 / speed)`` (1.20 for one 3x-slow worker among 4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {
    "ADAG, dynamic data": ("adag", "dynamic"),
    "ADAG, static shards": ("adag", "static"),
    "DDP": ("ddp", None),
}


def run_worker(args: argparse.Namespace) -> None:
    """One training run (re-executed by Lightning's launcher in every worker process)."""
    import lightning as L
    import torch
    from common import Classifier, paper_mlp
    from convergence import accuracy, augmented_digits, load_mnist
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_adag

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    directory = Path(args.mnist_dir) if args.mnist_dir else augmented_digits(Path(args.data_dir))
    x_train, y_train, x_val, y_val = load_mnist(directory)

    class Timeline(Callback):
        """Rank 0's clock: the start and end of training, and the center's accuracy after every epoch."""

        def __init__(self) -> None:
            self.start, self.curve = 0.0, []

        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(args.step_seconds * args.speeds[trainer.global_rank])

        def on_validation_end(self, trainer, pl_module):
            if trainer.global_rank == 0 and not trainer.sanity_checking:
                self.curve.append((time.perf_counter() - self.start, accuracy(pl_module, x_val, y_val)))

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    class Validated(Classifier):
        def validation_step(self, batch, batch_idx):
            pass  # the accuracy is measured on the whole validation set by Timeline, on the center

    if args.strategy == "ddp":
        strategy = "ddp"
    else:
        strategy = lightning_adag.ADAGStrategy(window=args.window, data=args.data)
    timeline = Timeline()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=len(args.speeds),
        max_epochs=args.epochs,
        callbacks=[timeline],
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    torch.manual_seed(0)
    model = Validated(paper_mlp(x_train.shape[1], (256,)), lr=1e-3)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=128, shuffle=True)
    trainer.fit(model, train, DataLoader(TensorDataset(x_val[:128], y_val[:128]), batch_size=128))
    if trainer.global_rank == 0:
        final = accuracy(model, x_val, y_val)
        Path(args.out).write_text(json.dumps({"seconds": timeline.seconds, "curve": timeline.curve, "val_acc": final}))


def train(strategy: str, data: str | None, speeds: list[float], args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "result.json")
        command = [
            sys.executable, __file__, "--worker", "--out", str(out), "--strategy", strategy, "--data", str(data),
            "--epochs", str(args.epochs), "--window", str(args.window), "--step-seconds", str(args.step_seconds),
            "--data-dir", args.data_dir, "--speeds", *map(str, speeds),
            *(["--mnist-dir", args.mnist_dir] if args.mnist_dir else []),
        ]  # fmt: skip
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600)
        if done.returncode:
            raise RuntimeError(f"{command} failed:\n{done.stderr.decode()[-3000:]}")
        return json.loads(out.read_text())


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names, profiles = list(dict.fromkeys(n for n, _ in runs)), list(dict.fromkeys(p for _, p in runs))
    for (name, profile), repeats in runs.items():
        t, acc = zip(*[(0.0, 0.1), *repeats[0]["curve"]])  # the first repeat; chance is 0.1
        style = ["-", "--", ":"][profiles.index(profile) % 3]
        ax.plot(t, acc, style, marker="o", color=f"C{names.index(name)}", label=f"{name}, speeds {profile}")
    ax.set(xlabel="training wall-clock (s)", ylabel="validation accuracy (ADAG: the center)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=0.02, help="a speed-1 worker's sleep after each step")
    parser.add_argument("--profiles", nargs="+", default=["1,1,1,3", "1,1,2,4"], help="uneven worker speeds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mnist-dir", help="the four MNIST IDX files; default: generated augmented digits")
    parser.add_argument("--data-dir", default="benchmarks/data", help="where the augmented digits are generated")
    parser.add_argument("--out", default="benchmarks/results/stragglers")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--speeds", type=float, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    profiles = {"even": [1.0] * 4, **{p: [float(s) for s in p.split(",")] for p in args.profiles}}
    runs: dict[tuple[str, str], list[dict]] = {(n, p): [] for n in STRATEGIES for p in profiles}
    for _ in range(args.repeats):  # interleaved, so that drift of the machine hits every configuration alike
        for (name, profile), repeats in runs.items():
            strategy, data = STRATEGIES[name]
            repeats.append(train(strategy, data, profiles[profile], args))
            print(f"  {name}, speeds {profile}: {repeats[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({f"{n} | {p}": r for (n, p), r in runs.items()}, indent=1))
    lines = [
        f"machine: {os.cpu_count()} cores; command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}",
        "",
        "| strategy | speeds | fit time (s), median | / even run | ideal | val acc, median |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (name, profile), repeats in runs.items():
        seconds = statistics.median(r["seconds"] for r in repeats)
        even = statistics.median(r["seconds"] for r in runs[(name, "even")])
        ideal = len(profiles[profile]) / sum(1 / s for s in profiles[profile])
        accuracy = statistics.median(r["val_acc"] for r in repeats)
        lines.append(f"| {name} | {profile} | {seconds:.1f} | {seconds / even:.2f} | {ideal:.2f} | {accuracy:.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(runs, out / "accuracy_vs_time.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
