"""How many commits per second can a server take, and how does that grow with its connections and its cores?

    python benchmarks/loadgen.py --connections 1 4 16 64 256 --seconds 5 --out benchmarks/results/server-load

One process drives the server alone, without a Trainer or a Python process per worker: it opens N authenticated
connections (one thread each) that commit a prebuilt payload and receive the new center, as fast as the server
answers, for ``--seconds`` after all have connected. Reported per connection count: commits per second (all
connections together), bytes per second (payload sent plus center received) and the median time of one exchange.

Configurations (``--configs``): ``one lock`` (one server whose center is one shard, so commits are applied one at
a time), ``pipelined`` (one server, the default 4 MiB shards: commits pipelined through the shards), and
``k servers`` (the center cut into ``--servers`` parts, each held by its own server process, ``adag-server --part
i/k``, every commit sent to all of them by a :class:`~lightning_adag.transports.sharded.ShardedClient`, one
thread per part, as ``ADAGStrategy(servers=k)`` does); ``k servers, one thread`` sends every part in turn from
one thread, then receives every reply. Each point is measured ``--repeats`` times, the configurations taking
turns within each round so that they see the same load; the tables report medians.

On a small machine the servers and this process share the cores and loopback, so the absolute rates say little
about a cluster; the ratios between configurations, and how each grows with connections, are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from lightning_adag.flat import Layout
from lightning_adag.payload import CommitPayload
from lightning_adag.server.launch import start_parts
from lightning_adag.transports import connect
from lightning_adag.transports.sharded import ShardedClient

KEY = "loadgen"
ALGORITHM = {"name": "adag"}


def exchanges_per_second(
    addresses: list[str], transport: str, layout: Layout, connections: int, seconds: float, parallel: bool = True
):
    """Commits per second and exchange times of ``connections`` clients hammering the servers at ``addresses``
    (several: each holds a part of ``layout``, and every commit goes to all of them)."""

    def link(rank: int):
        if len(addresses) > 1:
            return ShardedClient(addresses, rank, layout, ALGORITHM, KEY.encode(), 60, parallel=parallel)
        return connect(transport, addresses[0], rank, layout, ALGORITHM, KEY.encode(), 60)

    clients = [link(rank) for rank in range(connections)]
    clients[0].mailbox.normal_(0, 0.01)
    clients[0].initialize(0)
    payload = CommitPayload(layout, layout.dtype)
    start, stop = threading.Barrier(connections + 1), threading.Event()
    times: list[list[float]] = [[] for _ in range(connections)]

    def hammer(index: int) -> None:
        client = clients[index]
        clock = client.pull().clock
        start.wait()
        while not stop.is_set():
            began = time.perf_counter()
            client.mailbox.fill_(1e-6)  # a small, finite delta (the reply overwrote the last one with the center)
            clock = client.commit(clock, 1, payload).clock
            times[index].append(time.perf_counter() - began)

    threads = [threading.Thread(target=hammer, args=(index,), daemon=True) for index in range(connections)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for client in clients:
        client.close()
    done = [t for per in times for t in per]
    return len(done) / elapsed, statistics.median(done)


CONFIGS = ["one lock", "pipelined", "k servers", "k servers, one thread"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=4_800_000, help="elements of the center (the paper's MLP)")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--configs", nargs="+", default=["one lock", "pipelined"], choices=CONFIGS)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each point is the median over them")
    parser.add_argument("--servers", type=int, default=2, help="k for the 'k servers' configuration")
    parser.add_argument("--transport", choices=["tcp", "shm"], default="tcp")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default="benchmarks/results/server-load")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layout = Layout(args.numel, args.numel, torch.float32, "loadgen")
    nbytes = layout.nbytes
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for connections in args.connections:
            for config in args.configs:
                count = args.servers if config.startswith("k servers") else 1
                options = ["--shard-mib", str(nbytes / 2**20 + 1)] if config == "one lock" else []
                servers = start_parts(KEY, args.transport, [None] * count, log_level="ERROR", options=options)
                try:
                    addresses = [server.wait_ready() for server in servers]
                    parallel = config != "k servers, one thread"
                    measured = exchanges_per_second(
                        addresses, args.transport, layout, connections, args.seconds, parallel
                    )
                finally:
                    for server in servers:
                        server.stop()
                runs.setdefault((config, connections), []).append(measured)
                print(config, connections, measured, file=sys.stderr, flush=True)
    rows, results = [], []
    for (config, connections), measured in runs.items():
        rate = statistics.median(rate for rate, _ in measured)
        median = statistics.median(exchange for _, exchange in measured)
        count = args.servers if config.startswith("k servers") else 1
        moved = rate * 2 * nbytes  # the payload out and the center back
        results.append({"config": config, "servers": count, "connections": connections, "commits_per_s": rate,
                        "bytes_per_s": moved, "median_exchange_s": median,
                        "runs": [{"commits_per_s": r, "median_exchange_s": m} for r, m in measured]})  # fmt: skip
        rows.append(f"| {config} | {count} | {connections} | {rate:.1f} | {moved / 1e9:.3f} | {median * 1e3:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"machine: {os.cpu_count()} cores; command: python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}",
        "",
        f"medians of {args.repeats} round(s), configurations interleaved within each round",
        "",
        "| configuration | servers | connections | commits/s | GB/s moved | median exchange (ms) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
