"""The paper's convergence comparison on this machine: ADAG against DOWNPOUR, AEASGD, DynSGD and Lightning DDP.

    pip install -e ".[benchmarks]"
    python benchmarks/convergence.py --workers 4 8 16 --windows 10 20 --epochs 40 --out benchmarks/results/digits
    python benchmarks/convergence.py --dataset augmented --workers 32 --windows 32 --epochs 12 --seeds 0 1 2 \
        --out benchmarks/results/augmented-n4-n8-n16-n32

Every configuration trains the paper's MLP (784-1000-2000-1000-10, ReLU) with Adam workers (lr 0.001, batch 128)
from the same initialization on a fixed data budget (``--epochs`` passes over the training set in total, split
across the ``n`` workers by their shards), in its own process tree. Rank 0 evaluates the center variable on the
validation set every ``--probe-seconds`` of training (without stopping the other workers) and once at the end.
The driver writes ``runs/<name>.json`` per run and ``results.json``, ``table.md`` and ``accuracy_vs_time.png``
over every run in ``--out``; a run already there is not repeated, so sweeps can be resumed or extended into one
table (for example more seeds for some algorithms only).

Data (``--dataset``): real MNIST from the four IDX files in ``--mnist-dir`` (``train-images-idx3-ubyte`` etc.,
optionally ``.gz``); ``digits``: scikit-learn's 8x8 digits, resized bilinearly to 28x28 so the model keeps the
paper's 784 inputs (1,437 training and 360 validation images); ``augmented``: an MNIST-sized set (60,000 training,
10,000 validation 28x28 images) drawn from those digits by random affine distortions, training images from the
1,437 training digits only, validation images from the 360 held-out ones. It is generated once into IDX files
under ``--data-dir`` and read by the MNIST loader, so every worker process loads it in a second.

``--schedule round-robin`` runs the same configuration without processes or sockets: the project's ``Worker``,
``Algorithm`` and ``ServerCore`` classes in one process, the workers taking turns (λ steps, then one commit each),
as workers with one core each and equal speed interleave on the paper's cluster. Every worker reads the batches
it reads in the multi-process run (the same ``DistributedSampler`` shards and seed), so the two runs differ only
in the order in which commits reach the server. Both record every commit's staleness and its size against the
center.

Temporal efficiency (the paper's third measure) of run A against run B is the ratio of the areas under their
accuracy-over-time curves up to the shorter run's end; the table gives it for every run against AEASGD with the
same n, λ and seed, and against DDP with the same n and seed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
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
from common import Classifier, paper_mlp

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


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    """``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes())


def load_mnist(directory: Path) -> tuple[torch.Tensor, ...]:
    """MNIST's 60k training and 10k test images, flattened and kept as bytes: 32 workers holding the training set
    as float32 would spend 6 GiB on it. ``common.as_inputs`` scales a batch to [0, 1], as the paper did."""
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        parts += [torch.tensor(images.reshape(len(images), -1)), torch.tensor(labels, dtype=torch.int64)]
    return tuple(parts)


def digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits (offline) as images in [0, 1], split 80/20 by a seeded permutation."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def load_digits_784(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The digits resized to 28x28 so the paper's 784-input MLP applies."""
    x_train, y_train, x_val, y_val = digits_split(seed)
    resize = lambda x: F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)  # noqa: E731
    return resize(x_train), y_train, resize(x_val), y_val


def distort(
    digits: torch.Tensor, labels: torch.Tensor, count: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 28x28 byte images, each a random one of ``digits`` (N x 1 x 8 x 8 in [0, 1]) drawn as MNIST draws
    a digit (20x20 in the middle of the frame) under a random rotation (±15°), per-axis scale (0.8–1.2), shear
    (±0.3), shift (±3 px) and stroke weight (pixel gamma 0.6–1.6), and their labels."""
    canvas = F.pad(F.interpolate(digits, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    pick = torch.randint(len(digits), (count,), generator=generator)
    uniform = lambda low, high: low + (high - low) * torch.rand(count, generator=generator)  # noqa: E731
    angle, shear = torch.deg2rad(uniform(-15.0, 15.0)), uniform(-0.3, 0.3)
    scale_x, scale_y, gamma = uniform(0.8, 1.2), uniform(0.8, 1.2), uniform(0.6, 1.6)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid's matrix maps output to input coordinates (the frame spans [-1, 1], so 3 px = 3/14)
    theta = torch.stack(
        [
            torch.stack([scale_x * cos, scale_x * (shear * cos - sin), uniform(-3 / 14, 3 / 14)], 1),
            torch.stack([scale_y * sin, scale_y * (shear * sin + cos), uniform(-3 / 14, 3 / 14)], 1),
        ],
        1,
    )
    images = np.empty((count, 28, 28), dtype=np.uint8)
    for begin in range(0, count, 8192):
        chunk = slice(begin, begin + 8192)
        grid = F.affine_grid(theta[chunk], [len(theta[chunk]), 1, 28, 28], align_corners=False)
        drawn = F.grid_sample(canvas[pick[chunk]], grid, align_corners=False).clamp(0.0, 1.0)
        drawn = drawn ** gamma[chunk].view(-1, 1, 1, 1)
        images[chunk] = (drawn * 255.0).round().to(torch.uint8).squeeze(1).numpy()
    return images, labels[pick].numpy().astype(np.uint8)


def augmented_digits(directory: Path, train: int = 60_000, val: int = 10_000, seed: int = 0) -> Path:
    """Write the augmented digits as MNIST's four IDX files into ``directory`` (once per recipe); return it.

    Training images come from the digits' training split only and validation images from the held-out split, so
    validation accuracy measures digits of writers the model never saw."""
    recipe = {"train": train, "val": val, "seed": seed, "version": 1}
    marker = directory / "augmented-digits.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_val, y_val = digits_split()
    generator = torch.Generator().manual_seed(seed)
    for prefix, digits, labels, count in (("train", x_train, y_train, train), ("t10k", x_val, y_val, val)):
        images, chosen = distort(digits, labels, count, generator)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", chosen)
    marker.write_text(json.dumps(recipe))
    return directory


DATASETS = {
    "digits": "scikit-learn digits resized to 28x28 (1,437 training / 360 validation images)",
    "augmented": "augmented digits (60,000 training / 10,000 validation 28x28 images, from the 1,437 / 360 digits)",
    "mnist": "MNIST (IDX files)",
}


def load_data(dataset: str, directory: str | None) -> tuple[torch.Tensor, ...]:
    """``dataset``'s training and validation inputs and labels; IDX-file sets are read from ``directory``."""
    return load_digits_784() if dataset == "digits" else load_mnist(Path(directory))


# ------------------------------------------------------------------------------------------------------ one run
def run_one(config: dict) -> None:
    """Train one configuration; run by every rank of its process tree. Rank 0 writes ``config["result"]``, every
    rank its exchanges (see :class:`ExchangeLog`)."""
    if config.get("schedule") == "round-robin":
        return run_round_robin(config)
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_adag

    torch.set_num_threads(1)  # oversubscribed: one core's worth of threads per worker, as in the paper
    L.seed_everything(config["seed"], verbose=False)  # also seeds the DistributedSampler's shuffling
    x_train, y_train, x_val, y_val = load_data(config["dataset"], config["data_dir"])
    x_probe, y_probe = x_val[: config["probe_samples"]], y_val[: config["probe_samples"]]
    exchanges = ExchangeLog()

    class CenterProbe(Callback):
        """Rank 0 evaluates the center on the first ``probe_samples`` validation images every ``probe_seconds``;
        the other workers keep training meanwhile. The curve starts with the initial model at time 0."""

        def __init__(self) -> None:
            self.curve: list[tuple[float, float]] = []
            self.start = self.last = 0.0

        def on_train_start(self, trainer, pl_module):
            if trainer.global_rank == 0:
                self.curve.append((0.0, accuracy(pl_module, x_probe, y_probe)))
            self.start = self.last = time.perf_counter()
            worker = getattr(trainer.strategy, "worker", None)  # None under DDP: every replica is the model
            if worker is not None:
                exchanges.observe(worker.client, self.start)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if trainer.global_rank == 0 and now - self.last >= config["probe_seconds"]:
                worker = getattr(trainer.strategy, "worker", None)
                if worker is not None:
                    worker.show_center()
                self.curve.append((now - self.start, accuracy(pl_module, x_probe, y_probe)))
                if worker is not None:
                    worker.resume_window()
                self.last = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            """In every worker process, whatever started it: after the strategy's own on_train_end, every worker
            holds the final center (DDP: every replica is the model)."""
            elapsed = time.perf_counter() - self.start
            exchanges.save(config, trainer.global_rank)
            if trainer.global_rank == 0:
                result = {
                    **config,
                    "seconds": elapsed,
                    "val_acc": accuracy(pl_module, x_val, y_val),
                    "train_acc": accuracy(pl_module, x_train, y_train),
                    "curve": [*self.curve, (elapsed, accuracy(pl_module, x_probe, y_probe))],
                    "steps_per_worker": trainer.global_step,
                }
                Path(config["result"]).write_text(json.dumps(result))

    algorithm, n = config["algorithm"], config["workers"]
    start_method = config.get("start_method", "popen")
    if algorithm is None:
        strategy = DDPStrategy(start_method=start_method)
    else:
        strategy = lightning_adag.ADAGStrategy(
            window=config["window"], algorithm=algorithm, start_method=start_method, data=config.get("data", "static")
        )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=n,
        max_epochs=config["epochs"],
        callbacks=[CenterProbe()],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    model = paper_model(config, x_train.shape[1])
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=config["batch_size"], shuffle=True)
    trainer.fit(model, train_dataloaders=train_loader)


def paper_model(config: dict, inputs: int) -> Classifier:
    torch.manual_seed(config["seed"])  # identical initialization for every configuration with this seed
    return Classifier(paper_mlp(inputs, tuple(config["hidden"])), lr=config["lr"])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        chunks = zip(x.split(10_000), y.split(10_000))
        return sum(int((model(xs).argmax(1) == ys).sum()) for xs, ys in chunks) / len(x)


class ExchangeLog:
    """Every commit of one worker: when, the clock it produced, its staleness, and its size against the center
    (the L2 norms of the delta it sent and of the center it got back). Observes the worker's transport client,
    whose mailbox holds the payload when a commit is sent and the center when it returns."""

    def __init__(self) -> None:
        self.commits: list[tuple[float, int, int, float, float]] = []

    def observe(self, client, start: float) -> None:
        send = client.commit

        def commit(pulled_clock, steps, payload):
            delta, _ = payload.views(client.mailbox.view(torch.uint8))
            size = float(delta.float().norm())
            receipt = send(pulled_clock, steps, payload)
            center = float(client.mailbox[: delta.numel()].norm())
            self.commits.append((time.perf_counter() - start, receipt.clock, receipt.staleness, size, center))
            return receipt

        client.commit = commit

    def save(self, config: dict, rank: int) -> None:
        Path(f"{config['result']}.rank{rank}.exchanges.json").write_text(json.dumps(self.commits))


def exchange_summary(result_path: Path) -> dict:
    """What the ranks' exchange logs of one run say, together: commits (in all and per worker), the staleness
    distribution, and commit sizes relative to the center's norm. Removes the logs."""
    logs = sorted(result_path.parent.glob(f"{result_path.name}.rank*.exchanges.json"))
    per_worker = [json.loads(p.read_text()) for p in logs]
    for p in logs:
        p.unlink()
    commits = [c for worker in per_worker for c in worker]
    if not commits:
        return {}
    staleness = np.array([c[2] for c in commits])
    relative = np.array([c[3] / c[4] for c in commits if c[4] > 0])
    values, counts = np.unique(staleness, return_counts=True)
    return {
        "commits": len(commits),
        "commits_per_worker": [len(worker) for worker in per_worker],
        "staleness_mean": float(staleness.mean()),
        "staleness_percentiles": {str(q): float(np.percentile(staleness, q)) for q in (5, 50, 95)},
        "staleness_histogram": {str(int(v)): int(c) for v, c in zip(values, counts)},
        "commit_size_percentiles": {str(q): float(np.percentile(relative, q)) for q in (50, 95, 99)},
    }


class InProcessClient:
    """A worker's link to a ``ServerCore`` in the same process: what a transport client does, without a socket."""

    def __init__(self, core, rank: int) -> None:
        self.core, self.rank = core, rank
        self.mailbox = torch.zeros(core.layout.numel, dtype=core.layout.dtype)

    def initialize(self, clock: int):
        self.core.initialize(self.mailbox, clock)
        return self.pull()

    def pull(self):
        return self.core.read(self.mailbox, self.rank)

    def commit(self, pulled_clock: int, steps: int, payload):
        delta, values = payload.views(self.mailbox.view(torch.uint8))
        return self.core.commit(self.rank, delta, pulled_clock, out=self.mailbox, values=values)

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


def run_round_robin(config: dict) -> None:
    """The deterministic schedule: ``n`` workers in this process take turns, each running λ local steps and then
    committing once, until every worker's shard of the data budget is spent (the final window of each holds what
    is left). Writes the same record as a multi-process run."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_adag.algorithms import resolve_algorithm
    from lightning_adag.flat import FlatState
    from lightning_adag.server.core import ServerCore
    from lightning_adag.worker import Worker

    torch.set_num_threads(os.cpu_count() or 1)
    x_train, y_train, x_val, y_val = load_data(config["dataset"], config["data_dir"])
    x_probe, y_probe = x_val[: config["probe_samples"]], y_val[: config["probe_samples"]]
    dataset = TensorDataset(x_train, y_train)
    n, window = config["workers"], config["window"]
    algorithm = resolve_algorithm(config["algorithm"], window)
    core = ServerCore()
    exchanges = [ExchangeLog() for _ in range(n)]
    start = time.perf_counter()
    models, workers, optimizers, streams = [], [], [], []
    for rank in range(n):
        model = paper_model(config, x_train.shape[1])
        flat = FlatState(model)
        if rank == 0:
            core.configure(flat.layout, algorithm.spec())
        client = InProcessClient(core, rank)
        exchanges[rank].observe(client, start)
        worker = Worker(flat, client, algorithm)
        if rank == 0:
            worker.offer_initial_center(0)
        worker.reset_to_center()
        sampler = DistributedSampler(dataset, num_replicas=n, rank=rank, shuffle=True, seed=config["seed"])
        models.append(model)
        workers.append(worker)
        optimizers.append(model.configure_optimizers())
        streams.append(
            _batches(DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler), config["epochs"])
        )
    judge = paper_model(config, x_train.shape[1])
    judge_flat = FlatState(judge)

    def center_accuracy(x, y) -> float:
        judge_flat.vector.copy_(core.center)
        return accuracy(judge, x, y)

    curve = [(0.0, center_accuracy(x_probe, y_probe))]
    last_probe = time.perf_counter()
    active, steps_taken = list(range(n)), [0] * n
    while active:
        for rank in list(active):
            model, optimizer, steps = models[rank], optimizers[rank], 0
            for x, y in itertools.islice(streams[rank], window):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                steps += 1
            if steps:
                workers[rank].commit(steps)
                steps_taken[rank] += steps
            if steps < window:
                active.remove(rank)
        if time.perf_counter() - last_probe >= config["probe_seconds"]:
            curve.append((time.perf_counter() - start, center_accuracy(x_probe, y_probe)))
            last_probe = time.perf_counter()
    elapsed = time.perf_counter() - start
    for rank, log in enumerate(exchanges):
        log.save(config, rank)
    result = {
        **config,
        "seconds": elapsed,
        "val_acc": center_accuracy(x_val, y_val),
        "train_acc": center_accuracy(x_train, y_train),
        "curve": [*curve, (elapsed, center_accuracy(x_probe, y_probe))],
        "steps_per_worker": max(steps_taken),
    }
    Path(config["result"]).write_text(json.dumps(result))


def _batches(loader, epochs: int):
    """``loader``'s batches over ``epochs`` epochs, reshuffled per epoch as Lightning does (``set_epoch``)."""
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        yield from loader


# ------------------------------------------------------------------------------------------------------ measures
def area_until(curve: list[tuple[float, float]], end: float) -> float:
    """Area under the piecewise-linear accuracy-over-time ``curve`` from its first point to ``end``."""
    t, acc = np.asarray(curve, dtype=float).T
    inside = t < end
    t, acc = np.append(t[inside], end), np.append(acc[inside], np.interp(end, t, acc))
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(t)))


def temporal_efficiency(curve: list[tuple[float, float]], reference: list[tuple[float, float]]) -> float:
    """The paper's temporal efficiency of a run against a reference run: the ratio of the areas under their
    accuracy-over-time curves up to the shorter run's end. Above 1, the run was more accurate sooner."""
    end = min(curve[-1][0], reference[-1][0])
    return area_until(curve, end) / area_until(reference, end)


# ------------------------------------------------------------------------------------------------------ driver
def configurations(args: argparse.Namespace, dataset: str, data_dir: str | None) -> list[dict]:
    """Every run, seed by seed, so that an interrupted sweep has whole grids for its first seeds."""
    cells = args.cells or [(n, window) for n in args.workers for window in args.windows]
    suffix = "".join(
        (
            "-rr" if args.schedule == "round-robin" else "",
            "" if args.start_method == "popen" else f"-{args.start_method}",
            "" if args.data == "static" else f"-{args.data}",
        )
    )
    runs, names = [], set()
    for seed in args.seeds:
        for n, cell_window in cells:
            for key in args.algorithms:
                label, algorithm, rule = ALGORITHMS[key]
                if algorithm is None and args.schedule == "round-robin":
                    continue  # DDP has no commits to take turns with
                window = cell_window if rule == "grid" else rule
                name = f"{key}-n{n}" + (f"-w{window}" if window is not None else "") + f"{suffix}-s{seed}"
                if name not in names:
                    names.add(name)
                    runs.append(
                        {
                            "name": name,
                            "key": key,
                            "label": label + (" round-robin" if args.schedule == "round-robin" else ""),
                            "algorithm": algorithm,
                            "schedule": args.schedule,
                            "start_method": args.start_method,
                            "data": args.data,
                            "window": window,
                            "workers": n,
                            "seed": seed,
                            "epochs": args.epochs,
                            "batch_size": args.batch_size,
                            "lr": args.lr,
                            "hidden": args.hidden,
                            "probe_seconds": args.probe_seconds,
                            "probe_samples": args.probe_samples,
                            "dataset": dataset,
                            "data_dir": data_dir,
                            "result": str(Path(args.out, "runs", f"{name}.json")),
                        }
                    )
    return runs


def launch(config: dict, timeout: float) -> dict:
    """Run one configuration in its own process tree, sampling the memory of the tree every few seconds as the
    sum of its processes' proportional set sizes (a page shared by k processes counts 1/k in each, so pages the
    workers share are counted once, unlike a sum of RSS)."""
    import psutil

    spec = Path(config["result"]).with_suffix(".config.json")
    spec.write_text(json.dumps(config))
    log = open(Path(config["result"]).with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, __file__, "--run", str(spec)], stdout=log, stderr=subprocess.STDOUT)
    peak = [0]

    def tree_pss() -> int:
        total = 0
        try:
            root = psutil.Process(proc.pid)
            for member in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += member.memory_full_info().pss
        except psutil.Error:
            pass
        return total

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss())
            time.sleep(5.0)

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
        result = {**config, "error": f"exit {code}, see {result_path.with_suffix('.log')}"}
    else:
        result = {**json.loads(result_path.read_text()), "memory_gib": peak[0] / 2**30}
        result.update(exchange_summary(result_path))
    result_path.write_text(json.dumps(result))
    return result


def collect(out: Path) -> list[dict]:
    """Every run recorded under ``out`` (this invocation's and earlier ones'), in table order."""
    results = [json.loads(p.read_text()) for p in Path(out, "runs").glob("*.json") if ".config." not in p.name]
    order = list(ALGORITHMS)
    return sorted(
        results,
        key=lambda r: (r["workers"], order.index(r["key"]), r["window"] or 0, r.get("schedule", ""), r["seed"]),
    )


def efficiency_against(results: list[dict], run: dict, key: str, same_window: bool) -> float | None:
    """``run``'s temporal efficiency against the run of algorithm ``key`` with its n, seed and schedule (and λ)."""
    for other in results:
        if (
            other["key"] == key
            and "error" not in other
            and other["workers"] == run["workers"]
            and other["seed"] == run["seed"]
            and other.get("schedule") == run.get("schedule")
            and (not same_window or other["window"] == run["window"])
        ):
            return temporal_efficiency(run["curve"], other["curve"])
    return None


def table(results: list[dict], dataset: str) -> str:
    """One row per (n, algorithm, λ): medians over seeds, with the range of the final accuracy."""
    lines = [
        f"Dataset: {DATASETS[dataset]}. Center variable's final accuracy (median over seeds, [min, max]); time ="
        " training wall-clock after start-up; TE = temporal efficiency (median over seeds; > 1: more accurate"
        " sooner); memory = the peak of the run's processes' summed proportional set sizes.",
        "",
        "| n | algorithm | λ | seeds | val acc | train acc | time (s) | steps/worker | commits | staleness mean"
        " [p5, p95] | commit/center p50 | TE vs AEASGD | TE vs DDP | memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["workers"], r["key"], r["window"], r.get("schedule")), []).append(r)
    fmt = lambda values, f: "–" if not values else f(float(np.median(values)))  # noqa: E731
    for (n, key, window, _), runs in groups.items():
        done = [r for r in runs if "error" not in r]
        failed = [r["error"] for r in runs if "error" in r]
        val = [r["val_acc"] for r in done]

        te_aeasgd, te_ddp = (
            []
            if key == reference
            else [e for r in done if (e := efficiency_against(results, r, reference, same)) is not None]
            for reference, same in (("aeasgd", True), ("ddp", False))
        )
        val_text = fmt(val, lambda v: f"{100 * v:.2f} %")
        if len(val) > 1:
            val_text += f" [{100 * min(val):.2f}, {100 * max(val):.2f}]"
        lines.append(
            f"| {n} | {runs[0]['label']} | {'–' if window is None else window} | {len(done)}"
            + (f" ({len(failed)} failed: {'; '.join(failed)})" if failed else "")
            + f" | {val_text} | {fmt([r['train_acc'] for r in done], lambda v: f'{100 * v:.2f} %')}"
            f" | {fmt([r['seconds'] for r in done], lambda v: f'{v:.0f}')}"
            f" | {fmt([r['steps_per_worker'] for r in done], lambda v: f'{v:.0f}')}"
            f" | {fmt([r['commits'] for r in done if 'commits' in r], lambda v: f'{v:.0f}')}"
            f" | {staleness_text(done)}"
            f" | {fmt([r['commit_size_percentiles']['50'] for r in done if 'commits' in r], lambda v: f'{v:.2e}')}"
            f" | {fmt(te_aeasgd, lambda v: f'{v:.3f}')} | {fmt(te_ddp, lambda v: f'{v:.3f}')}"
            f" | {fmt([r['memory_gib'] for r in done], lambda v: f'{v:.1f}')} |"
        )
    return "\n".join(lines) + "\n"


def staleness_text(runs: list[dict]) -> str:
    """The first run's mean staleness and its 5th and 95th percentiles (runs of one group have the same n)."""
    measured = [r for r in runs if "staleness_mean" in r]
    if not measured:
        return "–"
    p = measured[0]["staleness_percentiles"]
    return f"{measured[0]['staleness_mean']:.1f} [{p['5']:.0f}, {p['95']:.0f}]"


def plot(results: list[dict], path: Path) -> None:
    """Center accuracy over time, one panel per n, one colour per (algorithm, λ), one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["workers"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], sizes):
        colours: dict[tuple, str] = {}
        for r in results:
            if r["workers"] != n or "error" in r:
                continue
            series = (r["key"], r["window"], r.get("schedule"))
            first = series not in colours
            colours.setdefault(series, f"C{len(colours) % 10}")
            t, acc = zip(*r["curve"])
            window = "" if r["window"] is None or "λ" in r["label"] else f" λ={r['window']}"
            label = f"{r['label']}{window}" if first else None
            ax.plot(t, acc, color=colours[series], alpha=1.0 if first else 0.4, label=label)
        ax.set(title=f"n = {n} workers", xlabel="training wall-clock (s)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("center validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cell(text: str) -> tuple[int, int]:
    n, _, window = text.partition(":")
    if not (n.isdigit() and window.isdigit()):
        raise argparse.ArgumentTypeError(f"a cell is n:λ, for example 20:10, not {text!r}")
    return int(n), int(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16, 32], help="values of n")
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20], help="the λ grid")
    parser.add_argument(
        "--cells",
        type=cell,
        nargs="+",
        help="(n, λ) pairs as n:λ (for example 10:10 30:20), instead of every --workers and --windows pair",
    )
    parser.add_argument(
        "--data",
        choices=["static", "dynamic"],
        default="static",
        help="each worker a fixed shard of the data (the paper's setup), or samples handed out as workers ask",
    )
    parser.add_argument(
        "--start-method",
        choices=["popen", "spawn", "fork", "forkserver"],
        default="popen",
        help="how Lightning starts the worker processes: fork shares the imported libraries' memory between them",
    )
    parser.add_argument(
        "--schedule",
        choices=["processes", "round-robin"],
        default="processes",
        help="workers as Lightning processes, or taking turns in one process (see the module's docstring)",
    )
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--epochs", type=int, default=40, help="data budget: passes over the training set in total")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="the workers' Adam learning rate")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1000, 2000, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="a run per seed (initialization, shuffle)")
    parser.add_argument("--probe-seconds", type=float, default=2.0, help="center evaluation interval (rank 0)")
    parser.add_argument("--probe-samples", type=int, default=1000, help="validation images each probe evaluates")
    parser.add_argument("--dataset", choices=["digits", "augmented"], default="digits", help="the offline data")
    parser.add_argument("--data-dir", default="benchmarks/data", help="where --dataset augmented is generated")
    parser.add_argument("--mnist-dir", help="directory with the four MNIST IDX files (overrides --dataset)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per configuration")
    parser.add_argument("--out", default="benchmarks/results/convergence")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one configuration, in its own processes
    args = parser.parse_args()
    if args.run:
        run_one(json.loads(Path(args.run).read_text()))
        return

    if args.mnist_dir:
        dataset, data_dir = "mnist", args.mnist_dir
    elif args.dataset == "augmented":
        dataset, data_dir = "augmented", str(augmented_digits(Path(args.data_dir)))
    else:
        dataset, data_dir = "digits", None
    Path(args.out, "runs").mkdir(parents=True, exist_ok=True)
    for config in configurations(args, dataset, data_dir):
        done = Path(config["result"])
        if done.exists() and "error" not in json.loads(done.read_text()):
            print(f"{config['name']}: already in {args.out}, not re-run", flush=True)
            continue
        started = time.perf_counter()
        result = launch(config, args.timeout)
        status = result.get("error") or f"val acc {result['val_acc']:.4f}"
        print(f"{config['name']}: {status} ({time.perf_counter() - started:.0f} s with start-up)", flush=True)
        report(Path(args.out), dataset)
    print(report(Path(args.out), dataset))


def report(out: Path, dataset: str) -> str:
    """Write ``results.json``, ``table.md`` and the plot over every run recorded in ``out``; return the table."""
    results = collect(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results, dataset)
    (out / "table.md").write_text(text)
    plot(results, out / "accuracy_vs_time.png")
    return text


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
