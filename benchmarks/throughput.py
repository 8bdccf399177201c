"""Training throughput of strategy="adag" against Lightning DDP, measured side by side in one invocation.

    python benchmarks/throughput.py --repeats 3                  # every section
    python benchmarks/throughput.py --sections comm straggler    # some of them

Sections (each prints a markdown table; every ratio compares runs made by this same invocation):

* ``comm``: the paper's MLP (784-1000-2000-1000-10, ~5.8M parameters), batch 128, Adam, 2 CPU workers: Lightning
  DDP (gloo), DDP with post-local SGD (``model_averaging_period=λ``), and ADAG with λ in {1, 8, 32} (and λ=8
  overlapped).
* ``straggler``: the same with worker 1 made 3x slower (it sleeps twice its compute time each step); each
  worker's rate relative to its rate in the ``comm`` runs.
* ``link``: two "nodes" in network namespaces joined by a veth pair shaped with ``tc tbf`` (1 Gbit/s and
  100 Mbit/s), over TCP: DDP vs ADAG λ in {8, 32}, and λ=8 overlapped, with and without a bf16 wire. Needs root
  and iproute2; skipped with a message otherwise.
* ``overhead``: one ADAG worker (λ=32) against plain single-process training of the same model.
* ``scaling``: commits per second one server sustains with 1, 4, 16, 32 client processes pushing a 5.8M-parameter
  vector over shm and tcp, next to the bound set by the server's own per-commit memory work.

Samples per second are counted after the first ``--warmup`` steps of each worker; a configuration's value is the
median over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN = (1000, 2000, 1000)
BATCH = 128
NETNS = ("adag-bench-a", "adag-bench-b")
NETNS_ADDRESSES = ("10.77.0.1", "10.77.0.2")  # inside this benchmark's own namespaces only


# ---------------------------------------------------------------------------------------------- worker mode
def run_worker(args: argparse.Namespace) -> None:
    """One training run (re-executed by Lightning's launcher in every worker process)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_adag

    class PaperMLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            sizes = (784, *HIDDEN, 10)
            layers = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.net = nn.Sequential(*layers[:-1])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def on_train_batch_start(self, batch, batch_idx):
            self._step_start = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_rank == args.slow_rank:  # a straggler: each step takes `slow_factor` times as long
                time.sleep((args.slow_factor - 1) * (time.perf_counter() - self._step_start))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class StepTimes(Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    world = args.devices * args.num_nodes
    data = TensorDataset(
        torch.randn(args.steps * BATCH * world, 784), torch.randint(0, 10, (args.steps * BATCH * world,))
    )
    if args.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    elif args.strategy == "post-local":
        from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as post_local

        state = post_local.PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=1)
        strategy = DDPStrategy(
            process_group_backend="gloo",
            ddp_comm_state=state,
            ddp_comm_hook=post_local.post_localSGD_hook,
            model_averaging_period=args.window,
        )
    elif args.strategy == "adag":
        strategy = lightning_adag.ADAGStrategy(window=args.window, overlap=args.overlap, compression=args.compression)
    else:
        strategy = "auto"
    timer = StepTimes()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_steps=args.steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(PaperMLP(), DataLoader(data, batch_size=BATCH, shuffle=True))
    timed = timer.times[args.warmup :]
    rate = (len(timed) - 1) * BATCH / (timed[-1] - timed[0])
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps({"rate": rate}))


# ---------------------------------------------------------------------------------------------- driver
def train(config: dict, args: argparse.Namespace, prefix: tuple[str, ...] = (), env: dict | None = None) -> list[float]:
    """Run one configuration once; per-worker samples/s, by rank. ``prefix`` wraps each node's command."""
    with tempfile.TemporaryDirectory() as out:
        nodes = config.get("num_nodes", 1)
        base = [
            sys.executable, __file__, "--worker", "--out", out, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--strategy", config["strategy"], "--window", str(config.get("window", 1)),
            "--devices", str(config.get("devices", 2 if nodes == 1 else 1)), "--num-nodes", str(nodes),
            "--slow-rank", str(config.get("slow_rank", -1)), "--slow-factor", str(config.get("slow_factor", 1.0)),
            *(["--overlap"] if config.get("overlap") else []),
            *(["--compression", config["compression"]] if config.get("compression") else []),
        ]  # fmt: skip
        procs = []
        for node in range(nodes):
            node_env = {**os.environ, **(env or {}), "NODE_RANK": str(node)}
            if nodes > 1:
                node_env["GLOO_SOCKET_IFNAME"] = f"veth{node}"
            command = [*prefix[node], *base] if prefix else base
            procs.append(subprocess.Popen(command, env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for proc in procs:
            _, err = proc.communicate(timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"{config} failed:\n{err.decode()[-3000:]}")
        ranks = sorted(Path(out).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        return [json.loads(p.read_text())["rate"] for p in ranks]


def measure(configs: dict[str, dict], args: argparse.Namespace, **kwargs) -> dict[str, list[list[float]]]:
    """Runs every configuration ``--repeats`` times, interleaved (A B C A B C ...) so drift hits all alike."""
    runs: dict[str, list[list[float]]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, config in configs.items():
            runs[name].append(train(config, args, **kwargs))
            print(f"  {name}: {[round(r) for r in runs[name][-1]]} samples/s per worker", file=sys.stderr, flush=True)
    return runs


def total(runs: list[list[float]]) -> float:
    return statistics.median(sum(r) for r in runs)


def per_worker(runs: list[list[float]], rank: int) -> float:
    return statistics.median(r[rank] for r in runs)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


COMM = {
    "DDP (gloo)": {"strategy": "ddp"},
    "DDP post-local SGD, period 8": {"strategy": "post-local", "window": 8},
    "ADAG λ=1": {"strategy": "adag", "window": 1},
    "ADAG λ=8": {"strategy": "adag", "window": 8},
    "ADAG λ=32": {"strategy": "adag", "window": 32},
    "ADAG λ=8, overlapped": {"strategy": "adag", "window": 8, "overlap": True},
}


def section_comm(args, results) -> None:
    runs = results.setdefault("comm", measure(COMM, args))
    ddp = total(runs["DDP (gloo)"])
    rows = [[name, f"{total(r):.0f}", f"{total(r) / ddp:.2f}"] for name, r in runs.items()]
    table("Comm-heavy: paper MLP, 2 CPU workers", ["configuration", "samples/s (both workers)", "vs DDP"], rows)


def section_straggler(args, results) -> None:
    solo = results.setdefault("comm", measure({k: COMM[k] for k in ("DDP (gloo)", "ADAG λ=8")}, args))
    slow = {"strategy": "ddp", "slow_rank": 1, "slow_factor": 3.0}
    runs = measure({"DDP (gloo)": slow, "ADAG λ=8": {**slow, "strategy": "adag", "window": 8}}, args)
    rows = []
    for name, r in runs.items():
        fast, slower = per_worker(r, 0), per_worker(r, 1)
        rows.append([
            name, f"{fast:.0f}", f"{fast / per_worker(solo[name], 0):.2f}", f"{slower:.0f}",
            f"{slower / per_worker(solo[name], 1):.2f}",
        ])  # fmt: skip
    header = ["configuration", "fast worker samples/s", "fast vs its solo rate", "slow worker", "slow vs solo"]
    table("Straggler: worker 1 made 3x slower", header, rows)


@contextlib.contextmanager
def shaped_link(rate: str, latency: str):
    """Two namespaces joined by a veth pair, each end shaped to ``rate`` with tbf (queueing at most ``latency``
    worth of bytes: 100ms at 1 Gbit/s is 12.5 MB, less than one float32 commit of the paper's MLP); removed on
    exit."""
    a, b = NETNS
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    try:
        for ns in NETNS:
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth1", "netns", b)
        for ns, dev, addr in ((a, "veth0", NETNS_ADDRESSES[0]), (b, "veth1", NETNS_ADDRESSES[1])):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                "burst", "1mb", "latency", latency)  # fmt: skip
        yield
    finally:
        for ns in NETNS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def section_link(args, results) -> None:
    if os.geteuid() != 0 or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        print("\n### Constrained link\n\nskipped: creating network namespaces needs root and iproute2 (`ip`, `tc`)")
        return
    configs = {
        "DDP (gloo)": {"strategy": "ddp", "num_nodes": 2},
        "ADAG λ=8": {"strategy": "adag", "window": 8, "num_nodes": 2},
        "ADAG λ=32": {"strategy": "adag", "window": 32, "num_nodes": 2},
        "ADAG λ=8, overlapped": {"strategy": "adag", "window": 8, "num_nodes": 2, "overlap": True},
        "ADAG λ=8, overlapped, bf16 wire": {
            "strategy": "adag", "window": 8, "num_nodes": 2, "overlap": True, "compression": "bf16"
        },
    }  # fmt: skip
    prefix = tuple(("ip", "netns", "exec", ns) for ns in NETNS)
    env = {"MASTER_ADDR": NETNS_ADDRESSES[0], "MASTER_PORT": "29531"}
    rows = []
    for rate in args.rates:
        with shaped_link(rate, args.tbf_latency):
            runs = measure(configs, args, prefix=prefix, env=env)
        ddp = total(runs["DDP (gloo)"])
        rows += [[rate, name, f"{total(r):.0f}", f"{total(r) / ddp:.2f}"] for name, r in runs.items()]
    table("Constrained link: 2 nodes in network namespaces, tbf-shaped veth, TCP", ["link", "configuration",
          "samples/s (both workers)", "vs DDP"], rows)  # fmt: skip


def section_overhead(args, results) -> None:
    runs = measure({"plain, 1 process": {"strategy": "single", "devices": 1},
                    "ADAG λ=32, 1 worker": {"strategy": "adag", "window": 32, "devices": 1}}, args)  # fmt: skip
    plain = total(runs["plain, 1 process"])
    rows = [[name, f"{total(r):.0f}", f"{total(r) / plain - 1:+.1%}"] for name, r in runs.items()]
    table("Overhead: one worker against plain training", ["configuration", "samples/s", "vs plain"], rows)


# ----------------------------------------------------------------------------------------- server scaling
def run_client(args: argparse.Namespace) -> None:
    """Commit as fast as possible from ``--start-at`` to ``--start-at + --seconds`` (the same window for every
    client, so their counts add up to the server's rate over it); write the count."""
    import torch

    from lightning_adag.flat import Layout
    from lightning_adag.transports import connect

    layout = Layout(numel=args.numel, trainable=args.numel, dtype=torch.float32, digest="bench")
    client = connect(args.transport, args.address, args.rank, layout, {"name": "adag"}, b"bench", timeout=600)
    client.mailbox.zero_()
    clock = client.initialize(0).clock
    time.sleep(max(0.0, args.start_at - time.time()))
    commits, end = 0, args.start_at + args.seconds
    while time.time() < end:
        clock = client.commit(clock, 1).clock
        commits += 1
    Path(args.out).write_text(json.dumps({"commits": commits}))


def section_scaling(args, results) -> None:
    import torch

    from lightning_adag.server.launch import ServerProcess

    numel = sum(a * b + b for a, b in zip((784, *HIDDEN), (*HIDDEN, 10)))
    torch.set_num_threads(1)
    center, delta, mailbox = torch.zeros(numel), torch.randn(numel), torch.empty(numel)
    center.add_(delta)  # warm-up: fault the pages in, as a running server has
    mailbox.copy_(center)
    start = time.perf_counter()
    for _ in range(20):
        center.add_(delta)
        mailbox.copy_(center)
    bound = 20 / (time.perf_counter() - start)
    rows = []
    # the default shards against one shard as large as the model: commits pipelined or serialized by one lock
    servers = {"pipelined": [], "one lock": ["--shard-mib", str(numel * 4 / 2**20 + 1)]}
    for transport, clients, (server_name, options) in itertools.product(("shm", "tcp"), args.clients, servers.items()):
        counts = []
        for _ in range(args.repeats):
            server = ServerProcess.start("bench", transport, options=options)
            try:
                address = server.wait_ready()
                start_at = time.time() + 20 + 5 * clients  # every client imported and connected by then
                with tempfile.TemporaryDirectory() as out:
                    procs = [
                        subprocess.Popen(
                            [
                                sys.executable,
                                __file__,
                                "--client",
                                "--transport",
                                transport,
                                "--address",
                                address,
                                "--rank",
                                str(i),
                                "--numel",
                                str(numel),
                                "--start-at",
                                str(start_at),
                                "--seconds",
                                str(args.seconds),
                                "--out",
                                f"{out}/{i}.json",
                            ]
                        )  # fmt: skip
                        for i in range(clients)
                    ]
                    for proc in procs:
                        proc.wait(600)
                    counts.append(
                        sum(json.loads(Path(out, f"{i}.json").read_text())["commits"] for i in range(clients))
                    )
            finally:
                server.stop()
        rate = statistics.median(counts) / args.seconds
        rows.append([transport, str(clients), server_name, f"{rate:.1f}", f"{rate / bound:.2f}"])
        print(f"  {transport} x{clients} {server_name}: {rate:.1f} commits/s", file=sys.stderr, flush=True)
    table(
        f"Server scaling: {numel / 1e6:.1f}M-parameter commits (bound: {bound:.1f}/s, the server's add + copy alone)",
        ["transport", "clients", "server", "commits/s", "vs bound"],
        rows,
    )


SECTIONS = {
    "comm": section_comm,
    "straggler": section_straggler,
    "link": section_link,
    "overhead": section_overhead,
    "scaling": section_scaling,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="training steps per worker and run")
    parser.add_argument("--warmup", type=int, default=5, help="steps per worker left out of the rate")
    parser.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"], help="link rates (tc syntax)")
    parser.add_argument("--tbf-latency", default="100ms", help="the shaper's queue, as time at the link rate")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="commit phase length in the scaling section")
    # internal: one training run, or one scaling client
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--num-nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--slow-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--slow-factor", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compression", help=argparse.SUPPRESS)
    parser.add_argument("--transport", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--numel", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    if args.client:
        return run_client(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind, so the network namespaces are removed
    print(
        f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    )
    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    results: dict = {}
    for name in args.sections:
        SECTIONS[name](args, results)


if __name__ == "__main__":
    main()
