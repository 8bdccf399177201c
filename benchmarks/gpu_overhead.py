"""Per-step time of one GPU worker under ``ADAGStrategy(window=λ)`` against plain single-GPU training.

On a GPU machine with torch, lightning and triton installed::

    pip install --no-deps -e . && python benchmarks/gpu_overhead.py
    python benchmarks/gpu_overhead.py --windows 1 8 32 --overlap-windows 1 32 --bf16-windows 1 --repeats 5

The model is the paper's MLP (784-1000-2000-1000-10, ~5.8M parameters), batch 128, Adam, on synthetic data. ADAG
adds, every λ steps, a commit and a pull: the window's delta is computed on the GPU, staged to the host mailbox,
applied by the server, and the center comes back. The per-step time is the mean over the timed steps (a multiple of
every λ, after ``--warmup`` steps), so the commits are in it; each configuration runs ``--repeats`` times in a fresh
process, interleaved, and the median is reported. ``--accelerator cpu`` runs the same comparison on the CPU (a smoke
test of this script, not a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import BATCH, HIDDEN, table


def run_one(args: argparse.Namespace) -> None:
    """One training run in this process; writes the mean seconds per timed step to ``--out``."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_adag

    class PaperMLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            sizes = (784, *HIDDEN, 10)
            layers = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
            self.net = nn.Sequential(*layers[:-1])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class StepEnds(Callback):
        """Wall-clock time at the end of each step, after the device finished it."""

        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.accelerator == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    steps = args.warmup + args.steps
    data = TensorDataset(torch.randn(steps * BATCH, 784), torch.randint(0, 10, (steps * BATCH,)))
    strategy = "auto"
    if args.window:
        strategy = lightning_adag.ADAGStrategy(window=args.window, overlap=args.overlap, compression=args.compression)
    ends = StepEnds()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=1,
        max_steps=steps,
        callbacks=[ends],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(PaperMLP(), DataLoader(data, batch_size=BATCH))
    timed = ends.times[args.warmup - 1 :]  # the end of the last warm-up step starts the clock
    Path(args.out).write_text(json.dumps({"step_s": (timed[-1] - timed[0]) / (len(timed) - 1)}))


def step_seconds(options: list[str], args: argparse.Namespace) -> float:
    """Mean seconds per step of one run in a fresh process with ``options`` (no ``--window``: plain training)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "result.json")
        command = [
            sys.executable, __file__, "--run", "--out", str(out), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--accelerator", args.accelerator, *options,
        ]  # fmt: skip
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"{command} failed:\n{done.stderr.decode()[-3000:]}")
        return json.loads(out.read_text())["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 8, 32], help="λ values to compare")
    parser.add_argument("--steps", type=int, default=640, help="timed steps per run (make it a multiple of every λ)")
    parser.add_argument("--warmup", type=int, default=32, help="steps per run before the clock starts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accelerator", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--overlap-windows", type=int, nargs="*", default=[32], help="λ values also run overlapped")
    parser.add_argument("--bf16-windows", type=int, nargs="*", default=[], help="λ values also run with a bf16 wire")
    # internal: one training run
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compression", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run_one(args)

    import torch

    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_overhead.py measures a GPU worker: no CUDA device here, nothing to do.")
        return
    device = torch.cuda.get_device_name() if args.accelerator == "cuda" else "CPU (smoke run)"
    print(f"device: {device}; torch {torch.__version__}")
    print(f"command: python benchmarks/gpu_overhead.py {' '.join(sys.argv[1:])}")
    configs = {
        "plain, 1 device": [],
        **{f"ADAG λ={w}, 1 worker": ["--window", str(w)] for w in args.windows},
        **{f"ADAG λ={w}, overlapped": ["--window", str(w), "--overlap"] for w in args.overlap_windows},
        **{f"ADAG λ={w}, bf16 wire": ["--window", str(w), "--compression", "bf16"] for w in args.bf16_windows},
    }
    runs: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved, so drift hits every configuration alike
        for name, options in configs.items():
            runs[name].append(step_seconds(options, args))
            print(f"  {name}: {runs[name][-1] * 1e3:.2f} ms/step", file=sys.stderr, flush=True)
    plain = statistics.median(runs["plain, 1 device"])
    rows = []
    for name, samples in runs.items():
        median = statistics.median(samples)
        rows.append([name, f"{median * 1e3:.2f}", f"{median / plain - 1:+.1%}"])
    title = f"One worker against plain training on {device} (paper MLP, batch 128)"
    table(title, ["configuration", "ms/step", "vs plain"], rows)


if __name__ == "__main__":
    main()
